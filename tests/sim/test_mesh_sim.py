"""Many real MeshCores on the seeded in-memory network: join, discovery, partitions, restarts,
loss. Invariants are asserted after every step."""

from __future__ import annotations

import itertools
import random

import msgpack

from weft.errors import RemoteProtocolError
from weft.gossip.channel import GossipData
from weft.gossip.memnet import MemNet, SimPeer
from weft.gossip.mesh import MeshConfig, RecordsRefused
from weft.gossip.peer import PeerName
from weft.gossip.topology import make_record
from weft.gossip.wire import CHANNEL_TOPOLOGY, TAG_GOSSIP, encode_gossip, encode_update


def run_checked(net: MemNet, seconds: float, step: float = 0.5) -> None:
    end = net.now + seconds
    while net.now < end:
        net.run_for(min(step, end - net.now))
        net.check_invariants()


def converge(net: MemNet, timeout: float, peers: list[SimPeer] | None = None) -> float:
    took = net.run_until_true(lambda: net.converged(peers), timeout, step=0.1)
    assert took is not None, f"no convergence within {timeout}s of simulated time"
    net.check_invariants()
    assert not net.errors, net.errors[:3]
    return took


def sparse(net: MemNet, n: int, degree: int, rng: random.Random) -> list[SimPeer]:
    """Peer i is given up to ``degree`` random earlier peers as targets (connected graph)."""
    peers: list[SimPeer] = []
    for i in range(n):
        targets = [p.address for p in rng.sample(peers, min(degree, i))]
        peers.append(net.add_peer(targets))
    return peers


def test_100_peers_join_from_a_single_seed_and_converge() -> None:
    net = MemNet(seed=1, config=MeshConfig(discovery=False))
    seed = net.add_peer()
    for _ in range(99):
        net.add_peer([seed.address])
    took = converge(net, 20.0)
    assert took < 5.0
    run_checked(net, 5.0)
    assert net.converged()
    first = net.peers[0].core.topology
    assert len(first) == 100
    hub = first.get(seed.name)
    assert hub is not None and len(hub.connections) == 99
    assert all(c.established for c in hub.connections)


def test_discovery_from_one_seed_builds_a_full_mesh() -> None:
    net = MemNet(seed=2)
    seed = net.add_peer()
    for _ in range(29):
        net.add_peer([seed.address])
    converge(net, 30.0)
    run_checked(net, 5.0, step=1.0)
    for p in net.peers:
        assert len(p.core.connected_peers()) == 29, p.nickname
        rec = p.core.topology.ourself
        assert all(c.established for c in rec.connections)
    assert net.converged()
    # data routes are direct everywhere in a full mesh
    a, b = net.peers[3], net.peers[17]
    assert a.core.routes.unicast_next_hop(b.name) == b.name


def test_partition_in_two_halves_and_heal() -> None:
    rng = random.Random(3)
    net = MemNet(seed=3, config=MeshConfig(discovery=False))
    peers = sparse(net, 40, 3, rng)
    # make sure each half stays connected inside itself: chain each half
    left, right = peers[:20], peers[20:]
    for half in (left, right):
        for x, y in itertools.pairwise(half):
            x.core.add_targets([y.address], net.now)
            x.targets.append(y.address)
    converge(net, 20.0)

    net.partition(left, right)
    run_checked(net, 20.0, step=1.0)
    converge(net, 20.0, left)
    converge(net, 20.0, right)
    assert all(len(p.core.topology) == 20 for p in peers)  # the other half was collected

    net.heal()
    took = converge(net, 120.0)
    assert took < 60.0  # reconnection waits for the backoff; the gossip itself is fast
    assert all(len(p.core.topology) == 40 for p in peers)


def test_restarted_peer_replaces_its_old_record_everywhere() -> None:
    rng = random.Random(4)
    net = MemNet(seed=4, config=MeshConfig(discovery=False))
    peers = sparse(net, 30, 3, rng)
    converge(net, 20.0)
    victim = peers[0]  # everyone's early targets point at it
    old_uid = victim.core.identity.uid
    old_version = victim.core.topology.version
    net.restart(victim)
    new_uid = victim.core.identity.uid
    assert new_uid != old_uid
    converge(net, 30.0)
    for p in net.peers:
        rec = p.core.topology.get(victim.name)
        assert rec is not None and rec.uid == new_uid
        assert rec.version > old_version  # it bumped above its old incarnation's record


def test_converges_with_message_loss() -> None:
    rng = random.Random(5)
    net = MemNet(seed=5, config=MeshConfig(discovery=False), loss=0.2)
    sparse(net, 30, 3, rng)
    converge(net, 60.0)
    assert net.messages_dropped > 0
    # a late joiner under loss
    newcomer = net.add_peer([net.peers[7].address, net.peers[12].address])
    converge(net, 60.0)
    assert net.knows(newcomer.name)


class Union:
    def __init__(self, items: set[int]) -> None:
        self.items = set(items)

    def encode(self) -> list[bytes]:
        return [msgpack.packb(sorted(self.items))]

    def merge(self, other: GossipData) -> GossipData:
        assert isinstance(other, Union)
        self.items |= other.items
        return self


class UnionHandler:
    def __init__(self) -> None:
        self.state: set[int] = set()

    def _delta(self, payload: bytes) -> Union | None:
        items = msgpack.unpackb(payload)
        if type(items) is not list:
            raise RemoteProtocolError("bad union payload")
        new = set(items) - self.state
        self.state |= new
        return Union(new) if new else None

    def on_unicast(self, src: PeerName, payload: bytes) -> None:
        pass

    def on_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        return self._delta(payload)

    def on_gossip(self, payload: bytes) -> GossipData | None:
        return self._delta(payload)

    def snapshot(self) -> GossipData:
        return Union(self.state)


def test_application_channel_spreads_through_surrogates() -> None:
    """Half the peers know the channel; gossip and broadcasts still reach all that do."""
    handlers: dict[int, UnionHandler] = {}
    senders = {}

    def setup(peer: SimPeer) -> None:
        if peer.index % 2 == 0:
            h = handlers[peer.index] = UnionHandler()
            senders[peer.index] = peer.core.register_channel("union", h)

    rng = random.Random(6)
    net = MemNet(seed=6, config=MeshConfig(discovery=False), on_core=setup)
    sparse(net, 24, 3, rng)
    converge(net, 20.0)
    handlers[0].state.add(1)
    senders[0].broadcast(Union({1}))
    handlers[4].state.add(2)
    senders[4].gossip(Union({2}))
    net.flush(net.peers[0])
    net.flush(net.peers[4])
    run_checked(net, 40.0, step=2.0)  # gossip relays plus periodic full-state gossip
    assert all(h.state == {1, 2} for h in handlers.values()), {
        i: h.state for i, h in handlers.items()
    }


def test_converges_without_neighbour_bookkeeping() -> None:
    """Dense meshes stop tracking what each neighbour holds; gossip must not depend on it."""
    rng = random.Random(7)
    net = MemNet(seed=7, config=MeshConfig(discovery=False, track_known_degree=0), loss=0.1)
    sparse(net, 30, 3, rng)
    converge(net, 60.0)


def test_member_forging_another_peers_record_cannot_cut_it_off() -> None:
    """Attack (issue #14 item 4) on a 20-peer mesh: a member (a password holder) sends every
    neighbour a record under a victim's name, version 2^63-1 and no connections, signed by its
    own key. Before, the victim bumped past 2^63, every decoder refused its record and its
    neighbours disconnected. Now every peer refuses the forgery; the mesh keeps converging and
    the victim's record everywhere is its own."""
    net = MemNet(seed=14, config=MeshConfig(discovery=False), keep_events=True)
    peers = sparse(net, 20, 2, random.Random(14))
    converge(net, 30.0)
    attacker, victim = peers[5], peers[10]
    forged = make_record(
        victim.name, victim.nickname, 7, (1 << 63) - 1, 1, [], net.identity_key(attacker.name)
    )
    message = encode_gossip(CHANNEL_TOPOLOGY, attacker.name, encode_update([forged.blob]))
    for conn_id in list(attacker.conns):
        net.inject(attacker, conn_id, TAG_GOSSIP, message)
    run_checked(net, 10.0)
    converge(net, 30.0)
    assert not net.errors
    assert victim.core.topology.version < 1 << 32
    want = victim.core.topology.public_key
    for p in peers:
        rec = p.core.topology.get(victim.name)
        assert rec is not None and rec.public_key == want and rec.version < 1 << 32
    assert any(isinstance(e, RecordsRefused) for p in peers for e in p.events)
