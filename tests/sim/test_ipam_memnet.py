"""IPAM over the real mesh cores (weft.gossip.memnet): the "ipam" channel as the router runs it.

Peers join as a chain and find each other by discovery; IPAM reaches consensus over the mesh's
channel gossip; allocations on both sides of a partition never collide; after healing and a
peer restart (same name, persisted IPAM state) every peer sees the same ring.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Network

from weft.gossip.memnet import MemNet, SimPeer
from weft.gossip.peer import PeerName
from weft.ipam.allocator import (
    Allocation,
    AllocationFailed,
    AllocationSucceeded,
    Allocator,
    InitMode,
    IpamConfig,
    IpamEvent,
)
from weft.ipam.node import IpamNode, MemoryStore

N = 12


class World:
    def __init__(self, seed: int) -> None:
        self.stores: dict[PeerName, MemoryStore] = {}
        self.nodes: dict[int, IpamNode] = {}
        self.results: dict[tuple[int, int], Allocation | Exception] = {}
        # a small range (about 21 addresses per peer) so busy peers must borrow from others
        self.cfg = IpamConfig(range=IPv4Network("10.32.0.0/24"), init=InitMode("consensus", N))
        self.net = MemNet(seed=seed, on_core=self.on_core)
        self.rng = random.Random(seed)

    def on_core(self, peer: SimPeer) -> None:
        store = self.stores.setdefault(peer.name, MemoryStore())
        alloc = Allocator(peer.name, self.cfg, self.net.now, random.Random(int(peer.name)),
                          store.load())
        node = IpamNode(alloc, store, lambda: self.net.now)

        def listen(ev: IpamEvent) -> None:
            if isinstance(ev, AllocationSucceeded):
                self.results[(peer.index, ev.request_id)] = ev.allocation
            elif isinstance(ev, AllocationFailed):
                self.results[(peer.index, ev.request_id)] = ev.error

        node.listeners.append(listen)
        node.attach(peer.core.register_channel("ipam", node))
        self.nodes[peer.index] = node

    def flush(self, peer: SimPeer) -> None:
        # What the router's pumping sender does after a send outside a mesh callback.
        self.net._pump(peer)

    def step(self, dt: float = 0.05) -> None:
        self.net.run_for(dt)
        for peer in self.net.alive():
            node = self.nodes[peer.index]
            node.allocator.peers_changed(peer.core.routes_all.unicast_table(), self.net.now)
            t = node.allocator.get_timer()
            if t is not None and t <= self.net.now:
                node.handle_timer()
            else:
                node.pump()
            self.flush(peer)

    def run(self, seconds: float, until: object = None) -> None:
        end = self.net.now + seconds
        while self.net.now < end:
            if callable(until) and until():
                return
            self.step()

    def allocate(self, peer: SimPeer, cid: str) -> tuple[int, int]:
        node = self.nodes[peer.index]
        rid = node.allocator.allocate(cid, None, self.net.now)
        node.pump()
        self.flush(peer)
        return (peer.index, rid)

    def check_no_duplicates(self) -> None:
        seen: dict[int, tuple[int, str]] = {}
        for index, node in self.nodes.items():
            if not self.net.peers[index].alive:
                continue
            for addr, cid in node.allocator.held().items():
                assert addr not in seen, f"{addr} held by {seen[addr]} and {(index, cid)}"
                assert node.allocator.ring.owner(addr) == node.allocator.local
                seen[addr] = (index, cid)


def test_consensus_partition_heal_restart_over_the_real_mesh() -> None:
    w = World(seed=5)
    first = w.net.add_peer()
    for _ in range(N - 1):
        w.net.add_peer([w.net.peers[-1].address])
    w.run(30.0, lambda: all(n.allocator.ready for n in w.nodes.values()))
    assert all(n.allocator.ready for n in w.nodes.values()), "no consensus over the mesh"
    consensus_time = w.net.now
    assert consensus_time < 10.0
    rings = [n.allocator.ring.entries() for n in w.nodes.values()]
    assert all(r == rings[0] for r in rings)

    # partition in two halves; busy peers on both sides borrow from their side only
    left, right = w.net.peers[: N // 2], w.net.peers[N // 2 :]
    w.net.partition(left, right)
    w.run(3.0)
    busy = left[:3] + right[:2]
    asked = [w.allocate(p, f"{p.nickname}-c{i}") for i in range(30) for p in busy]
    w.run(30.0, lambda: all(k in w.results for k in asked))
    w.check_no_duplicates()
    assert all(isinstance(w.results.get(k), Allocation) for k in asked), [
        w.results.get(k) for k in asked if not isinstance(w.results.get(k), Allocation)
    ]

    # heal, restart one peer from its persisted state, keep allocating
    w.net.heal()
    victim = w.net.peers[3]
    held_before = dict(w.nodes[victim.index].allocator.held())
    w.net.restart(victim)
    assert dict(w.nodes[victim.index].allocator.held()) == held_before
    more = [w.allocate(p, f"{p.nickname}-d{i}") for i in range(10) for p in (first, victim)]
    w.run(20.0, lambda: all(k in w.results for k in more))
    assert all(isinstance(w.results.get(k), Allocation) for k in more)
    w.check_no_duplicates()

    # everyone converges to one ring (free counts ride the mesh's 30 s full channel gossip)
    def same_ring() -> bool:
        rings = [n.allocator.ring.entries() for n in w.nodes.values()]
        return all(r == rings[0] for r in rings)

    w.run(70.0)  # more than two rounds of the mesh's full channel gossip
    assert same_ring()
    assert all(n.allocator.conflict is None for n in w.nodes.values())
    assert not w.net.errors
