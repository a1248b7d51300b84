"""Seeded simulation of IPAM with the real cores: 100 peers, partitions, crashes, restarts.

Invariants checked after every step:
* no address is held by two containers (live peers and crashed peers' persisted state together);
* the spans each peer believes it owns never overlap another peer's beliefs;
* every address a peer hands out lies in a span that peer owns.
A request may fail only when the requester's side of the partition had no free address at all.
After the final heal every peer sees the same ring and every request has been answered.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Network

import pytest

from weft.gossip.peer import PeerName
from weft.ipam.allocator import (
    AllocationFailed,
    AllocationSucceeded,
    Allocator,
    InitMode,
    IpamConfig,
    IpamEvent,
    RangeFullError,
)
from weft.ipam.ring import Ring, RingData
from weft.ipam.sim import SimNet, SimPeer


@dataclass
class Req:
    peer: PeerName
    cid: str
    issued: float
    free_seen: int


def names(n: int) -> list[PeerName]:
    rng = random.Random(42)
    return sorted({PeerName(0x020000000000 | rng.getrandbits(40)) for _ in range(n)})[:n]


def component_free(net: SimNet, name: PeerName) -> int:
    """Ground truth: free addresses owned by live peers in ``name``'s side of the partition."""
    total = 0
    for n in [name, *net.reachable_from(name)]:
        a = net.peers[n].allocator
        total += sum(a.free_in(lo, hi) for lo, hi in a.ring.owned_ranges(n))
    return total


def owned_beliefs(net: SimNet) -> list[tuple[int, int, PeerName]]:
    out = []
    for n, p in net.peers.items():
        if p.alive:
            ring = p.allocator.ring
        else:
            state = p.store.load()
            if state is None or not state.entries:
                continue
            ring = Ring(state.range_start, state.range_end, n)
            ring.merge(RingData(state.range_start, state.range_end, state.seeds, state.entries))
        out += [(lo, hi, n) for lo, hi in ring.owned_ranges(n)]
    return sorted(out)


def check_invariants(net: SimNet) -> None:
    holders: dict[int, tuple[PeerName, str]] = {}
    for n, p in net.peers.items():
        if p.alive:
            a = p.allocator
            items = list(a.held().items())
            for addr, _ in items:
                assert a.ring.owner(addr) == n, f"{n} holds {addr} outside its spans"
        else:
            state = p.store.load()
            items = [] if state is None else [
                (addr, cid) for cid, xs in state.allocations.items() for addr, _ in xs
            ]
        for addr, cid in items:
            assert addr not in holders, f"{addr} held by {holders[addr]} and {(n, cid)}"
            holders[addr] = (n, cid)
    beliefs = owned_beliefs(net)
    for (_, end1, p1), (start2, _, p2) in itertools.pairwise(beliefs):
        assert end1 <= start2, f"{p1} and {p2} both believe they own {start2}"


def run_simulation(seed: int, n_peers: int, steps: int, init: InitMode) -> dict[str, int]:
    rng = random.Random(seed)
    cfg = IpamConfig(range=IPv4Network("10.32.0.0/21"), init=init, request_timeout=20.0)
    peers = names(n_peers)
    # fanout 4 instead of 2*log2(n): each change still floods everyone (receivers relay what
    # was new) and periodic full gossip repairs the rest; it keeps the test quick.
    net = SimNet(seed=seed, fanout=4)
    for n in peers:
        net.add_peer(n, cfg)
    net.run_for(5.0, lambda: all(p.allocator.ready for p in net.peers.values()))
    assert all(p.allocator.ready for p in net.peers.values())

    pending: dict[tuple[PeerName, int], Req] = {}
    held: dict[str, PeerName] = {}
    stats = {"allocated": 0, "released": 0, "failed_full": 0, "lost_in_crash": 0,
             "partitions": 0, "crashes": 0}

    def on_event(peer: SimPeer, ev: IpamEvent) -> None:
        if isinstance(ev, AllocationSucceeded):
            req = pending.pop((peer.name, ev.request_id), None)
            if req is not None:
                held[req.cid] = peer.name
                stats["allocated"] += 1
        elif isinstance(ev, AllocationFailed):
            req = pending.pop((peer.name, ev.request_id), None)
            assert req is not None
            # Only a side of the partition with no free space at all may say no.
            assert isinstance(ev.error, RangeFullError), ev.error
            assert component_free(net, peer.name) == 0 or req.free_seen == 0, ev.error
            stats["failed_full"] += 1

    net.listeners.append(on_event)
    hot = peers[: max(1, n_peers // 5)]
    down: set[PeerName] = set()
    cid_seq = 0
    for step in range(steps * 3):
        # three client calls per step of the clock, so thousands of calls stay quick
        r = rng.random()
        live = [n for n in peers if n not in down]
        if r < 0.55:
            name = rng.choice(hot) if rng.random() < 0.6 else rng.choice(peers)
            if name in down or len(held) + len(pending) > 1400:
                continue
            cid_seq += 1
            cid = f"c{cid_seq}"
            rid = net.call(name, partial(Allocator.allocate, container_id=cid, subnet=None,
                                         now=net.now))
            pending[(name, rid)] = Req(name, cid, net.now, component_free(net, name))
            # an answer that came synchronously was already recorded by the listener
            if (name, rid) in pending and any(
                isinstance(e, AllocationSucceeded) and e.request_id == rid
                for e in net.peers[name].events[-3:]
            ):
                pending.pop((name, rid))
                held[cid] = name
                stats["allocated"] += 1
        elif r < 0.85:
            candidates = [c for c, n in held.items() if n not in down]
            if candidates:
                cid = rng.choice(candidates)
                net.call(held.pop(cid), partial(Allocator.release, container_id=cid, now=net.now))
                stats["released"] += 1
        elif r < 0.86:
            groups: list[set[PeerName]] = [set(), set()]
            for n in peers:
                groups[rng.random() < 0.3].add(n)
            net.partition(groups)
            stats["partitions"] += 1
        elif r < 0.875:
            net.heal()
        elif r < 0.885 and len(down) < 5 and live:
            victim = rng.choice(live)
            net.crash(victim)
            down.add(victim)
            stats["crashes"] += 1
            for key in [k for k in pending if k[0] == victim]:
                del pending[key]  # the client saw its connection drop
                stats["lost_in_crash"] += 1
        elif r < 0.90 and down:
            back = rng.choice(sorted(down))
            down.discard(back)
            net.start(back)
        if step % 3 == 2:
            net.run_for(rng.random() * 0.3)
            check_invariants(net)

    # final heal: everyone back, everything answered, one ring everywhere
    net.heal()
    for n in sorted(down):
        net.start(n)
    net.run_for(30.0, lambda: not pending)
    assert not pending, f"{len(pending)} requests never answered"
    # free counts that changed quietly travel with the periodic full gossip: give it rounds
    net.run_for(60.0)
    check_invariants(net)
    for p in net.peers.values():
        p.allocator.ring.check_invariants()
    rings = {n: p.allocator.ring.entries() for n, p in net.peers.items()}
    first = next(iter(rings.values()))
    assert all(r == first for r in rings.values()), "rings differ after the final heal"
    for cid, n in held.items():
        assert [x.container_id for x in net.peers[n].allocator.lookup(cid)] == [cid]
    assert all(p.allocator.conflict is None for p in net.peers.values())
    stats["messages"] = net.messages
    return stats


def test_hundred_peers_partitions_crashes_no_duplicates() -> None:
    # 20 seeds: the other 80 peers start with nothing and live on donations.
    peers = names(100)
    stats = run_simulation(
        seed=7, n_peers=100, steps=1000, init=InitMode("seed", seeds=tuple(peers[::5]))
    )
    # 3,000 client calls in all
    assert stats["allocated"] > 1000 and stats["released"] > 500
    assert stats["partitions"] > 10 and stats["crashes"] > 10


@pytest.mark.parametrize("seed", [1, 2])
def test_consensus_ring_then_churn(seed: int) -> None:
    stats = run_simulation(seed=seed, n_peers=30, steps=250, init=InitMode("consensus", 30))
    assert stats["allocated"] > 300


def test_allocators_are_independent_objects() -> None:
    # guard against the simulation sharing state between peers by accident
    a = Allocator(PeerName(1), IpamConfig(), 0.0)
    b = Allocator(PeerName(2), IpamConfig(), 0.0)
    assert a.ring is not b.ring
