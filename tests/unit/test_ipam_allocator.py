"""The allocator core, alone and with a few peers on the in-memory network (clock stepped)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import msgpack
import pytest

from weft.errors import ConfigError, RemoteProtocolError, WeftError
from weft.gossip.peer import PeerName
from weft.ipam.allocator import (
    AddressInUseError,
    Allocation,
    AllocationFailed,
    AllocationSucceeded,
    Allocator,
    ConsensusReached,
    InitMode,
    IpamConfig,
    PeerReachableError,
    RangeFullError,
    RequestTimeoutError,
    RingConflictDetected,
    SpaceDonated,
    UnknownPeerError,
)
from weft.ipam.sim import SimNet

A, B, C, D = (PeerName(0x020000000000 + i) for i in (1, 2, 3, 4))
SMALL = IPv4Network("10.32.0.0/26")


def single(config: IpamConfig | None = None) -> Allocator:
    return Allocator(A, config or IpamConfig(), now=0.0)


def result(a: Allocator, rid: int) -> Allocation | WeftError | None:
    while (ev := a.next_event()) is not None:
        if isinstance(ev, AllocationSucceeded) and ev.request_id == rid:
            return ev.allocation
        if isinstance(ev, AllocationFailed) and ev.request_id == rid:
            return ev.error
    return None


def test_config_defaults_and_validation() -> None:
    cfg = IpamConfig()
    assert str(cfg.range) == "10.32.0.0/12" and cfg.subnet == cfg.range
    assert str(cfg.init) == "consensus=1"
    with pytest.raises(ConfigError, match="not inside"):
        IpamConfig(default_subnet=IPv4Network("192.168.0.0/24"))
    assert InitMode.parse("consensus=5").quorum == 3
    assert InitMode.parse("observer").kind == "observer"
    assert InitMode.parse(f"seed={B},{A}").seeds == (A, B)
    for bad in ("consensus=x", "seed=", "seed=zz", "paxos", "consensus=0"):
        with pytest.raises(ConfigError):
            InitMode.parse(bad)


def test_single_peer_allocates_lowest_first_and_is_idempotent() -> None:
    a = single()
    assert a.ready  # consensus among 1 peer: itself
    got = result(a, a.allocate("c1", None, 0.0))
    assert isinstance(got, Allocation) and got.cidr == "10.32.0.1/12"
    again = result(a, a.allocate("c1", None, 0.0))
    assert isinstance(again, Allocation) and again.address == got.address
    second = result(a, a.allocate("c2", None, 0.0))
    assert isinstance(second, Allocation) and str(second.address) == "10.32.0.2"
    assert [x.container_id for x in a.allocations()] == ["c1", "c2"]
    assert a.release("c1", 0.0)[0].address == got.address
    third = result(a, a.allocate("c3", None, 0.0))
    assert isinstance(third, Allocation) and third.address == got.address
    assert a.release("nobody", 0.0) == []


def test_subnets_and_bad_subnets() -> None:
    a = single()
    got = result(a, a.allocate("c1", IPv4Network("10.32.5.0/24"), 0.0))
    assert isinstance(got, Allocation) and got.cidr == "10.32.5.1/24"
    # one address per container and subnet
    other = result(a, a.allocate("c1", None, 0.0))
    assert isinstance(other, Allocation) and str(other.address) == "10.32.0.1"
    assert len(a.lookup("c1")) == 2
    for bad in ("10.64.0.0/24", "10.32.0.0/31", "10.32.0.1/24", "nonsense"):
        with pytest.raises(ConfigError):
            a.allocate("c9", a.parse_subnet(bad), 0.0)
    with pytest.raises(ConfigError, match="container id"):
        a.allocate("", None, 0.0)


def test_subnet_network_and_broadcast_are_never_handed_out() -> None:
    a = single(IpamConfig(range=IPv4Network("10.32.0.0/29")))
    got = [result(a, a.allocate(f"c{i}", None, 0.0)) for i in range(6)]
    assert [str(x.address) for x in got if isinstance(x, Allocation)] == [
        f"10.32.0.{i}" for i in range(1, 7)
    ]
    rid = a.allocate("c7", None, 0.0)
    assert result(a, rid) is None  # waits: maybe a peer frees space
    a.handle_timer(10.0)
    assert isinstance(result(a, rid), RangeFullError)


def test_claims() -> None:
    a = single()
    got = result(a, a.claim("c1", IPv4Address("10.32.0.9"), None, 0.0))
    assert isinstance(got, Allocation) and got.cidr == "10.32.0.9/12"
    assert isinstance(result(a, a.claim("c1", IPv4Address("10.32.0.9"), None, 0.0)), Allocation)
    with pytest.raises(AddressInUseError, match="held by container c1"):
        a.claim("c2", IPv4Address("10.32.0.9"), None, 0.0)
    with pytest.raises(ConfigError, match="not in subnet"):
        a.claim("c2", IPv4Address("10.64.0.9"), None, 0.0)
    with pytest.raises(ConfigError, match="network or broadcast"):
        a.claim("c2", IPv4Address("10.32.0.0"), None, 0.0)
    # the allocator skips the claimed address
    nxt = [result(a, a.allocate(f"x{i}", None, 0.0)) for i in range(9)]
    assert "10.32.0.9" not in [str(x.address) for x in nxt if isinstance(x, Allocation)]


def test_waits_while_not_ready_and_times_out_clearly() -> None:
    a = Allocator(A, IpamConfig(init=InitMode("observer"), request_timeout=5.0), now=0.0)
    rid = a.allocate("c1", None, 0.0)
    assert result(a, rid) is None
    assert a.get_timer() == 5.0
    a.handle_timer(5.0)
    err = result(a, rid)
    assert isinstance(err, RequestTimeoutError)
    assert "timed out after 5s" in str(err) and "not ready" in str(err)


def test_malformed_gossip_is_a_remote_protocol_error() -> None:
    a = single()
    for bad in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"ring": {"r": 1}}),
                msgpack.packb({"paxos": [[1, 2]]})):
        with pytest.raises(RemoteProtocolError):
            a.receive_gossip(bad, 0.0)
    with pytest.raises(RemoteProtocolError):
        a.receive_unicast(B, msgpack.packb({"t": "ask", "id": "x"}), 0.0)
    with pytest.raises(RemoteProtocolError):
        a.receive_unicast(B, msgpack.packb({"t": "what"}), 0.0)


# ----- several peers on the simulated network ---------------------------------------------


def net_of(names: list[PeerName], config: IpamConfig, seed: int = 1) -> SimNet:
    net = SimNet(seed=seed)
    for n in names:
        net.add_peer(n, config)
    return net


def request(net: SimNet, name: PeerName, fn_name: str, *args: object,
            wait: float = 60.0) -> Allocation | WeftError:
    peer = net.peers[name]
    first = len(peer.events)
    rid = net.call(name, lambda a: getattr(a, fn_name)(*args, net.now))
    found: list[Allocation | WeftError] = []

    def done() -> bool:
        for ev in peer.events[first:]:
            if isinstance(ev, AllocationSucceeded) and ev.request_id == rid:
                found.append(ev.allocation)
            elif isinstance(ev, AllocationFailed) and ev.request_id == rid:
                found.append(ev.error)
        return bool(found)

    if not done():
        net.run_for(wait, done)
    assert found, f"request {rid} on {name} did not finish"
    return found[0]


def test_consensus_among_three_builds_one_ring() -> None:
    net = net_of([C, A, B], IpamConfig(init=InitMode("consensus", 3)))
    net.run_for(5.0, lambda: all(p.allocator.ready for p in net.peers.values()))
    rings = [p.allocator.ring.entries() for p in net.peers.values()]
    assert rings[0] and all(r == rings[0] for r in rings)
    assert net.peers[A].allocator.ring.seeds == (A, B, C)
    assert any(isinstance(e, ConsensusReached) for e in net.peers[B].events)
    # every entry lists its ranges; together they tile the whole allocation range
    import ipaddress
    import itertools

    entries = net.peers[A].allocator.status()["entries"]
    spans = sorted(
        (int(ipaddress.IPv4Address(a)), int(ipaddress.IPv4Address(b)))
        for e in entries
        for a, b in (r.split("-") for r in e["ranges"])
    )
    assert all(e["ranges_more"] == 0 for e in entries)
    assert sum(b - a + 1 for a, b in spans) == sum(e["owned"] for e in entries)
    assert all(x[1] + 1 == y[0] for x, y in itertools.pairwise(spans))


def test_consensus_waits_for_n_peers() -> None:
    net = net_of([A, B], IpamConfig(init=InitMode("consensus", 3)))
    net.run_for(20.0)
    assert not any(p.allocator.ready for p in net.peers.values())
    status = net.peers[A].allocator.status()
    assert status["consensus"] == {"quorum": 2, "participants": 2}
    net.add_peer(C, IpamConfig(init=InitMode("consensus", 3)))
    net.run_for(5.0, lambda: all(p.allocator.ready for p in net.peers.values()))
    assert all(p.allocator.ready for p in net.peers.values())


def test_consensus_falls_back_when_the_lowest_peer_dies() -> None:
    cfg = IpamConfig(init=InitMode("consensus", 3), consensus_fallback=2.0)
    net = net_of([A, B, C, D], cfg)
    net.crash(A)  # heard of (its claim went out at start) but gone before proposing
    net.run_for(30.0, lambda: all(net.peers[n].allocator.ready for n in (B, C, D)))
    assert all(net.peers[n].allocator.ready for n in (B, C, D))
    rings = [net.peers[n].allocator.ring.entries() for n in (B, C, D)]
    assert all(r == rings[0] for r in rings)


def test_donation_when_a_peer_runs_out() -> None:
    cfg = IpamConfig(range=SMALL, init=InitMode("seed", seeds=(A, B)))
    net = net_of([A, B, C], cfg)
    # C is no seed: it owns nothing and must ask
    got = request(net, C, "allocate", "c1", None)
    assert isinstance(got, Allocation)
    assert net.peers[C].allocator.ring.owner(int(got.address)) == C
    assert any(isinstance(e, SpaceDonated) for p in (A, B) for e in net.peers[p].events)
    # drain A's own space, then it borrows too; never the same address twice
    seen = {got.address}
    for i in range(40):
        x = request(net, A, "allocate", f"a{i}", None)
        assert isinstance(x, Allocation), x
        assert x.address not in seen
        seen.add(x.address)


def test_claim_of_address_owned_by_another_peer() -> None:
    cfg = IpamConfig(range=SMALL, init=InitMode("seed", seeds=(A, B)))
    net = net_of([A, B], cfg)
    high = IPv4Address("10.32.0.50")  # in B's half
    got = request(net, A, "claim", "c1", high, None)
    assert isinstance(got, Allocation) and got.address == high
    assert net.peers[B].allocator.ring.owner(int(high)) == A
    # B holds .40 for a container: A cannot claim it
    assert isinstance(request(net, B, "claim", "b1", IPv4Address("10.32.0.40"), None),
                      Allocation)
    err = request(net, A, "claim", "c2", IPv4Address("10.32.0.40"), None)
    assert isinstance(err, AddressInUseError)


def test_different_seeds_are_reported_not_merged() -> None:
    net = SimNet(seed=3)
    net.add_peer(A, IpamConfig(init=InitMode("seed", seeds=(A,))))
    net.add_peer(B, IpamConfig(init=InitMode("seed", seeds=(B,))))
    net.run_for(20.0)
    for name in (A, B):
        alloc = net.peers[name].allocator
        assert alloc.conflict is not None and "different address spaces" in alloc.conflict
        assert alloc.status()["conflict"] == alloc.conflict
        assert alloc.ring.owners() == {name}
        assert any(isinstance(e, RingConflictDetected) for e in net.peers[name].events)


def test_rmpeer() -> None:
    cfg = IpamConfig(range=SMALL, init=InitMode("seed", seeds=(A, B, C)))
    net = net_of([A, B, C], cfg)
    with pytest.raises(UnknownPeerError):
        net.call(A, lambda a: a.rmpeer(D, net.now))
    with pytest.raises(PeerReachableError):
        net.call(A, lambda a: a.rmpeer(C, net.now))
    with pytest.raises(ConfigError):
        net.call(A, lambda a: a.rmpeer(A, net.now))
    before = net.peers[A].allocator.ring.entries()
    assert net.peers[A].allocator.ring.entries() == before
    net.crash(C)
    status = net.peers[A].allocator.status()
    assert status["unreachable"] == 22 and any(not e["reachable"] for e in status["entries"])
    taken = net.call(A, lambda a: a.rmpeer(C, net.now))
    assert taken == 22
    net.run_for(10.0)
    assert net.peers[B].allocator.ring.owners() == {A, B}
    assert net.peers[A].allocator.status()["unreachable"] == 0


def test_reset_hands_space_to_a_live_peer() -> None:
    cfg = IpamConfig(range=SMALL, init=InitMode("seed", seeds=(A, B)))
    net = net_of([A, B], cfg)
    assert isinstance(request(net, B, "allocate", "b1", None), Allocation)
    to = net.call(B, lambda a: a.reset(net.now))
    assert to == A
    net.run_for(5.0)
    assert net.peers[A].allocator.ring.owners() == {A}
    with pytest.raises(WeftError, match="reset"):
        net.call(B, lambda a: a.allocate("b2", None, net.now))


def test_restart_keeps_ring_and_allocations() -> None:
    cfg = IpamConfig(range=SMALL, init=InitMode("seed", seeds=(A, B)))
    net = net_of([A, B], cfg)
    got = [request(net, A, "allocate", f"c{i}", None) for i in range(3)]
    ring_before = net.peers[A].allocator.ring.entries()
    net.crash(A)
    net.start(A)
    alloc = net.peers[A].allocator
    assert alloc.ring.entries() == ring_before
    assert [x.address for x in alloc.allocations()] == [
        x.address for x in got if isinstance(x, Allocation)
    ]
    again = request(net, A, "allocate", "c1", None)
    assert isinstance(again, Allocation) and again == got[1]
