"""MeshCore wired by hand with a stepped clock: topology exchange, channels, relaying,
tie-breaks, self/collision detection, restarts, GC, coalescing and hostile input."""

from __future__ import annotations

import contextlib
import itertools
import random
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError, LocalError, RemoteProtocolError
from weft.gossip.channel import GossipData
from weft.gossip.mesh import (
    ConnectionRejected,
    DialRequested,
    MeshConfig,
    MeshCore,
    MeshEvent,
    PeerRestarted,
    PeersRemoved,
    RecordsRefused,
    RoutesChanged,
    TopologyChanged,
)
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.topology import MAX_PEERS, LinkAttributes, PeerRecord, make_record
from weft.gossip.wire import (
    CHANNEL_TOPOLOGY,
    MAX_BODY,
    TAG_BROADCAST,
    TAG_GOSSIP,
    TAG_UNICAST,
    decode_envelope,
    decode_topology,
    encode_gossip,
    encode_update,
)


class SetData:
    """A grow-only set: the simplest GossipData."""

    def __init__(self, items: set[int] | frozenset[int]) -> None:
        self.items = set(items)

    def encode(self) -> list[bytes]:
        return [msgpack.packb(sorted(self.items))]

    def merge(self, other: GossipData) -> GossipData:
        assert isinstance(other, SetData)
        self.items |= other.items
        return self


class SetHandler:
    def __init__(self) -> None:
        self.state: set[int] = set()
        self.unicasts: list[tuple[PeerName, bytes]] = []
        self.broadcasts: list[tuple[PeerName, set[int]]] = []
        self.gossips = 0

    @staticmethod
    def decode(payload: bytes) -> set[int]:
        try:
            items = msgpack.unpackb(payload)
        except Exception as err:
            raise RemoteProtocolError(f"bad set payload: {err}") from None
        if type(items) is not list or any(type(i) is not int for i in items):
            raise RemoteProtocolError("bad set payload")
        return set(items)

    def _delta(self, payload: bytes) -> SetData | None:
        new = self.decode(payload) - self.state
        self.state |= new
        return SetData(new) if new else None

    def on_unicast(self, src: PeerName, payload: bytes) -> None:
        self.unicasts.append((src, payload))

    def on_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        self.broadcasts.append((src, self.decode(payload)))
        return self._delta(payload)

    def on_gossip(self, payload: bytes) -> GossipData | None:
        self.gossips += 1
        return self._delta(payload)

    def snapshot(self) -> GossipData:
        return SetData(self.state)


def key_of(i: int) -> Ed25519PrivateKey:
    """Peer i's identity key: the same across its restarts, as a router's persisted one."""
    return Ed25519PrivateKey.from_private_bytes(i.to_bytes(32, "big"))


class Harness:
    """Zero-latency wiring of cores with a hand-stepped clock."""

    def __init__(self, config: MeshConfig | None = None) -> None:
        self.config = config or MeshConfig(discovery=False)
        self.now = 0.0
        self.cores: list[MeshCore] = []
        self.links: dict[tuple[int, int], tuple[MeshCore, int]] = {}
        self.events: dict[int, list[MeshEvent]] = {}
        self.blocked: dict[int, set[int]] = {}
        self.sent: list[tuple[int, int, int, bytes]] = []
        self.public_keys: dict[int, bytes] = {}  # id(core) -> the identity key it proves
        self._next = 1

    def core(self, i: int, uid: int | None = None) -> MeshCore:
        ident = PeerIdentity(PeerName(0x020000000000 + i), f"p{i}", uid or 1000 + i, i)
        c = MeshCore(ident, self.config, random.Random(i), self.now, key=key_of(i))
        self.public_keys[id(c)] = key_of(i).public_key().public_bytes_raw()
        self.cores.append(c)
        self.events[id(c)] = []
        return c

    def link(self, a: MeshCore, b: MeshCore, conn_uid: int | None = None) -> tuple[int, int]:
        ia, ib = self._next, self._next + 1
        self._next += 2
        self.links[(id(a), ia)] = (b, ib)
        self.links[(id(b), ib)] = (a, ia)
        uid = conn_uid if conn_uid is not None else ia
        a.connection_added(
            ia,
            b.identity,
            f"h{int(b.name) & 255}:6783",
            True,
            self.now,
            uid,
            identity_key=self.public_keys[id(b)],
        )
        b.connection_added(
            ib,
            a.identity,
            f"h{int(a.name) & 255}:40000",
            False,
            self.now,
            uid,
            identity_key=self.public_keys[id(a)],
        )
        a.connection_established(ia, self.now)
        b.connection_established(ib, self.now)
        return ia, ib

    def unlink(self, a: MeshCore, conn_id: int) -> None:
        b, ib = self.links.pop((id(a), conn_id))
        self.links.pop((id(b), ib), None)
        a.connection_removed(conn_id, self.now, "test")
        b.connection_removed(ib, self.now, "test")

    def deliver(self) -> int:
        n = 0
        moved = True
        while moved:
            moved = False
            for c in list(self.cores):
                for conn_id, tag, payload in c.messages_to_send(self.blocked.get(id(c), set())):
                    target = self.links.get((id(c), conn_id))
                    self.sent.append((id(c), conn_id, tag, payload))
                    if target is not None:
                        target[0].receive(target[1], tag, payload, self.now)
                        moved = True
                        n += 1
                while (ev := c.next_event()) is not None:
                    self.events[id(c)].append(ev)
        return n

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            for c in self.cores:
                t = c.get_timer()
                if t is not None and t <= self.now:
                    c.handle_timer(self.now)
            self.deliver()


def names(core: MeshCore) -> set[PeerName]:
    return set(core.topology.records)


def test_two_peers_exchange_topology_and_routes() -> None:
    h = Harness()
    a, b = h.core(1), h.core(2)
    h.link(a, b)
    h.run(2.0)
    assert names(a) == names(b) == {a.name, b.name}
    assert a.topology.digest_hash() == b.topology.digest_hash()
    assert a.routes.unicast_next_hop(b.name) == b.name
    assert a.routes.broadcast_next_hops(a.name) == [b.name]
    evs = h.events[id(a)]
    assert any(isinstance(e, TopologyChanged) for e in evs)
    assert any(isinstance(e, RoutesChanged) for e in evs)
    st_ = a.status()
    assert st_["connections"][0]["state"] == "established"
    assert {p["name"] for p in st_["peers"]} == {str(a.name), str(b.name)}


def test_line_relays_unicast_broadcast_gossip_and_unknown_channels() -> None:
    h = Harness()
    a, b, c = h.core(1), h.core(2), h.core(3)
    ha, hc = SetHandler(), SetHandler()
    sa = a.register_channel("set", ha)
    c.register_channel("set", hc)  # b does not know "set": it relays as a surrogate
    h.link(a, b)
    h.link(b, c)
    h.run(3.0)
    assert names(a) == names(c) == {a.name, b.name, c.name}
    assert a.routes.unicast_next_hop(c.name) == b.name

    sa.unicast(c.name, b"hello")
    h.deliver()
    assert hc.unicasts == [(a.name, b"hello")]

    sa.broadcast(SetData({1, 2}))
    h.deliver()
    assert hc.broadcasts == [(a.name, {1, 2})] and hc.state == {1, 2}

    sa.gossip(SetData({3}))
    h.deliver()
    assert 3 in hc.state
    assert b.stats.surrogate_relayed >= 2


def test_pending_channel_data_coalesces_on_a_blocked_connection() -> None:
    h = Harness()
    a, b = h.core(1), h.core(2)
    sa = a.register_channel("set", SetHandler())
    hb = SetHandler()
    b.register_channel("set", hb)
    ia, _ = h.link(a, b)
    h.run(1.0)
    h.blocked[id(a)] = {ia}
    for i in range(10):
        sa.gossip(SetData({i}))
    h.deliver()
    assert hb.state == set()
    before = hb.gossips
    h.blocked.clear()
    h.deliver()
    assert hb.state == set(range(10))
    assert hb.gossips - before == 1  # ten sends, one merged message


def test_duplicate_connection_lower_conn_uid_wins() -> None:
    h = Harness()
    a, b = h.core(1), h.core(2)
    first, _ = h.link(a, b, conn_uid=50)
    ib = h._next + 1
    h.link(a, b, conn_uid=10)  # lower: replaces the first on both sides
    h.deliver()
    assert ConnectionRejected(first, "replaced by a newer connection") in h.events[id(a)]
    assert a.connected_peers() == {b.name: ib - 1}
    h.link(a, b, conn_uid=99)  # higher: rejected
    h.deliver()
    rejected = [e for e in h.events[id(a)] if isinstance(e, ConnectionRejected)]
    assert rejected[-1].reason.startswith("duplicate connection")
    assert len(a.connected_peers()) == 1


def test_connection_to_self_and_name_collision_are_refused() -> None:
    h = Harness()
    a = h.core(1)
    twin = PeerIdentity(a.name, "twin", a.identity.uid + 1, 9)
    assert a.admission(a.identity, 5).reason == "connection to self"
    assert "name collision" in a.admission(twin, 5).reason
    a.add_targets(["10.9.9.9"], 0.0)
    assert a.next_event() == DialRequested("10.9.9.9:6783")
    assert not a.connection_added(7, a.identity, "10.9.9.9:6783", True, 0.0)
    assert a.next_event() == ConnectionRejected(7, "connection to self")
    a.handle_timer(1000.0)
    assert a.next_event() is None  # never dials itself again
    assert a.status()["targets"][0]["last_error"] == "connection to self"


def test_a_neighbours_name_is_bound_to_the_key_its_handshake_proved() -> None:
    h = Harness()
    a, b = h.core(1), h.core(2)
    h.link(a, b)  # no gossip delivered yet
    assert a.topology.binding(b.name) == h.public_keys[id(b)]


def test_another_key_under_a_connected_peers_name_cannot_displace_it() -> None:
    """A password holder connecting under b's name (a new uid, as a restart would have) took
    b's place at a before protocol v3: admission let a newer incarnation replace the old
    connection. Now the handshake proves the connecting side's key, and a's binding of b's name
    to b's key refuses it; b's connection stays."""
    h = Harness()
    a, b = h.core(1), h.core(2)
    ia, _ = h.link(a, b)
    h.run(1.0)
    impostor = PeerIdentity(b.name, "p2", b.identity.uid + 1, b.identity.short_id)
    stranger_key = key_of(66).public_key().public_bytes_raw()
    verdict = a.admission(impostor, 5, stranger_key)
    assert not verdict.accept and verdict.reason.startswith("identity key mismatch")
    assert not a.connection_added(77, impostor, "10.6.6.6:40000", False, h.now, 5, stranger_key)
    h.deliver()
    rejected = [e for e in h.events[id(a)] if isinstance(e, ConnectionRejected)]
    assert [e.conn_id for e in rejected] == [77]
    assert "identity key mismatch" in rejected[0].reason
    assert a.connected_peers() == {b.name: ia}
    # b itself, restarted (same key, new uid), still replaces its old connection
    restarted = PeerIdentity(b.name, "p2", b.identity.uid + 2, b.identity.short_id)
    assert a.admission(restarted, 5, h.public_keys[id(b)]).replaces == ia


def test_dial_failure_backs_off_then_retries() -> None:
    h = Harness()
    a = h.core(1)
    a.add_targets(["10.0.0.5:6783"], 0.0)
    assert a.next_event() == DialRequested("10.0.0.5:6783")
    a.dial_failed("10.0.0.5:6783", 0.0, "connection refused")
    t = a.get_timer()
    assert t is not None
    row = a.status()["targets"][0]
    assert row["state"] == "retrying" and 1.0 <= row["next_try"] < 3.0
    a.handle_timer(row["next_try"])
    assert a.next_event() == DialRequested("10.0.0.5:6783")


def test_dial_losing_the_duplicate_tie_break_is_not_a_failure() -> None:
    h = Harness()
    a, b = h.core(1), h.core(2)
    h.link(a, b, conn_uid=10)
    a.add_targets(["b.example:6783"], 0.0)  # another name for b
    assert a.next_event() == DialRequested("b.example:6783")
    assert not a.connection_added(90, b.identity, "b.example:6783", True, 0.0, conn_uid=99)
    row = a.status()["targets"][0]
    assert row["state"] == "connected" and row["attempts"] == 0 and row["last_error"] == ""
    a.handle_timer(1000.0)  # no retry that could replace the working connection
    assert not [e for e in iter(a.next_event, None) if isinstance(e, DialRequested)]


def test_restarted_peer_replaces_its_record() -> None:
    h = Harness()
    a, b, c = h.core(1), h.core(2), h.core(3)
    _, _ib = h.link(a, b)
    h.link(b, c)
    h.run(2.0)
    for _ in range(3):  # push b's version up
        _x, _y = h.link(b, h.core(10 + _))
        h.run(0.5)
    old_uid = b.identity.uid
    h.cores.remove(b)
    for (cid, conn_id), _target in list(h.links.items()):
        if cid == id(b):
            other, oid = h.links.pop((cid, conn_id))
            h.links.pop((id(other), oid), None)
            other.connection_removed(oid, h.now, "reset")
    b2 = h.core(2, uid=old_uid + 1)
    h.link(a, b2)
    h.link(b2, c)
    h.run(3.0)
    for core in (a, c, b2):
        rec = core.topology.get(b2.name)
        assert rec is not None and rec.uid == old_uid + 1
    assert any(isinstance(e, PeerRestarted) and e.new_uid == old_uid + 1 for e in h.events[id(a)])


def test_unreachable_peers_are_garbage_collected_after_grace() -> None:
    h = Harness()
    a, b, c = h.core(1), h.core(2), h.core(3)
    h.link(a, b)
    _, ic = h.link(b, c)
    h.run(2.0)
    assert c.name in a.topology
    h.unlink(c, ic)
    h.run(1.0)
    assert c.name in a.topology  # grace period
    h.run(3.0)
    assert c.name not in a.topology and c.name not in b.topology
    assert any(isinstance(e, PeersRemoved) and c.name in e.names for e in h.events[id(a)])


def test_steady_state_sends_only_digest_hashes() -> None:
    h = Harness()
    cores = [h.core(i) for i in range(1, 5)]
    for x, y in itertools.pairwise(cores):
        h.link(x, y)
    h.run(5.0)
    h.sent.clear()
    h.run(30.0, step=0.05)
    topo = [p for (_, _, tag, p) in h.sent if tag == TAG_GOSSIP]
    assert topo, "anti-entropy should still run"
    assert max(len(p) for p in topo) < 64  # hashes only, no records
    per_peer_per_s = sum(len(p) for p in topo) / 4 / 30.0
    assert per_peer_per_s < 50


def test_api_misuse_and_config_validation() -> None:
    h = Harness()
    a = h.core(1)
    a.register_channel("set", SetHandler())
    with pytest.raises(LocalError):
        a.register_channel("set", SetHandler())
    with pytest.raises(LocalError):
        a.register_channel("topology", SetHandler())
    with pytest.raises(ConfigError):
        MeshConfig(port=0)
    with pytest.raises(ConfigError):
        MeshConfig(gossip_interval=0)
    a.receive(12345, TAG_GOSSIP, b"\x00", 0.0)  # unknown connection: ignored


# --- hostile input: anything either works or raises RemoteProtocolError -------------------------

_core_pair: dict[str, Any] = {}


def _target() -> tuple[MeshCore, int]:
    if not _core_pair:
        h = Harness()
        a, b = h.core(1), h.core(2)
        a.register_channel("set", SetHandler())
        ia, _ = h.link(a, b)
        _core_pair["v"] = (a, ia)
    v: tuple[MeshCore, int] = _core_pair["v"]
    return v


leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=8)
    | st.binary(max_size=40)
)
shapes = st.recursive(leaf, lambda inner: st.lists(inner, max_size=5), max_leaves=16)


@settings(max_examples=300)
@given(
    st.sampled_from([0, 3, TAG_GOSSIP, TAG_UNICAST, TAG_BROADCAST, 7, 200]), st.binary(max_size=80)
)
def test_garbage_bytes_only_raise_remote_protocol_error(tag: int, payload: bytes) -> None:
    a, ia = _target()
    with contextlib.suppress(RemoteProtocolError):
        a.receive(ia, tag, payload, 1.0)


@settings(max_examples=300)
@given(st.sampled_from([TAG_GOSSIP, TAG_UNICAST, TAG_BROADCAST]), shapes, shapes)
def test_structured_garbage_only_raises_remote_protocol_error(
    tag: int, body: Any, channel_body: Any
) -> None:
    a, ia = _target()
    payloads = []
    for obj in (body, ["topology", 5, channel_body], ["set", 5, channel_body]):
        try:
            payloads.append(msgpack.packb(obj, use_bin_type=True))
        except (OverflowError, ValueError, TypeError):
            continue
    try:
        inner = msgpack.packb(channel_body, use_bin_type=True)
        payloads.append(encode_gossip("topology", PeerName(5), inner))
    except (OverflowError, ValueError, TypeError):
        pass
    for p in payloads:
        with contextlib.suppress(RemoteProtocolError):
            a.receive(ia, tag, p, 1.0)


# --- bounds (issue #14 item 5) -------------------------------------------------------------------


def _flood(count: int) -> list[bytes]:
    key = key_of(99)  # the member signs the flood with its own key: each name is new
    return [
        make_record(PeerName(0x030000000000 + i), "", 1, 1, 0, [], key).blob for i in range(count)
    ]


def test_a_member_cannot_grow_the_topology_past_its_limit() -> None:
    """The attack: 6.6 MiB of records from one member left 100 k records on the victim."""
    h = Harness(MeshConfig(discovery=False, max_peers=100))
    a, b = h.core(1), h.core(2)
    _, ib = h.link(a, b)
    h.run(1.0)
    flood = _flood(500)
    for i in range(0, len(flood), 100):  # "a" is the member: it can send b anything
        b.receive(
            ib,
            TAG_GOSSIP,
            encode_gossip("topology", a.name, encode_update(flood[i : i + 100])),
            h.now,
        )
    assert len(b.topology) == 100
    assert b.stats.records_refused == 402  # 98 flood records fit beside a and b
    refusals = [e for e in _drain(b) if isinstance(e, RecordsRefused)]
    assert refusals and refusals[0].source == a.name
    assert "the limit (max_peers)" in refusals[0].reason
    assert ib in b.connected_peers().values()  # refusing is not a protocol error


def test_full_sync_at_the_limit_is_chunked_and_converges() -> None:
    """At MAX_PEERS records a joiner still downloads the topology: in bounded messages each
    below the decoder's limit (past ~200 k records one sync message exceeded it before)."""
    h = Harness(MeshConfig(discovery=False, gc_grace=3600.0))  # the fake peers are unreachable
    a, b = h.core(1), h.core(2)
    _, ib = h.link(a, b)
    h.run(1.0)
    flood = _flood(MAX_PEERS + 50)
    for i in range(0, len(flood), 5000):
        b.receive(
            ib,
            TAG_GOSSIP,
            encode_gossip("topology", a.name, encode_update(flood[i : i + 5000])),
            h.now,
        )
    assert len(b.topology) == MAX_PEERS
    c = h.core(3)
    h.sent.clear()
    h.link(c, b)
    h.run(3.0)
    assert len(c.topology) == MAX_PEERS
    biggest = max(len(p) for (_, _, _, p) in h.sent)
    assert biggest < MAX_BODY
    assert biggest < 2 * 1024 * 1024  # updates are chunked at about 1 MiB
    for _, _, tag, payload in h.sent:  # every message decodes under the wire's bounds
        env = decode_envelope(tag, payload)
        if env.channel == "topology":
            decode_topology(env.body)


def _drain(core: MeshCore) -> list[MeshEvent]:
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


def test_a_neighbour_cannot_speak_as_another_peer() -> None:
    """#14 item 8: unicast and broadcast messages carry a claimed source that used to be taken
    as given, so a neighbour could act as another peer (e.g. on IPAM). Now a claimed source
    must be the neighbour itself or a peer it can be relaying for; legitimate relaying (the
    line a - b - c, and a triangle where b relays nothing) still works."""
    from weft.gossip.wire import encode_broadcast, encode_unicast

    h = Harness()
    a, b, c = h.core(1), h.core(2), h.core(3)
    ha, hc = SetHandler(), SetHandler()
    a.register_channel("set", ha)
    c.register_channel("set", hc)
    (ab, ba) = h.link(a, b)
    h.link(a, c)
    h.run(3.0)
    # b, a's neighbour, claims messages from c (a hears c directly: b is no relay for c).
    a.receive(ab, TAG_UNICAST, encode_unicast("set", c.name, a.name, b"as c"), h.now)
    a.receive(ab, TAG_BROADCAST, encode_broadcast("set", c.name, msgpack.packb([7])), h.now)
    assert ha.unicasts == [] and ha.broadcasts == [] and 7 not in ha.state
    assert a.stats.source_refused == 2
    # ... and b's own messages, and c's through its own connection, are taken.
    a.receive(ab, TAG_UNICAST, encode_unicast("set", b.name, a.name, b"as b"), h.now)
    ca = next(i for (core_id, i), (peer, _) in h.links.items() if core_id == id(a) and peer is c)
    a.receive(ca, TAG_UNICAST, encode_unicast("set", c.name, a.name, b"as c"), h.now)
    assert ha.unicasts == [(b.name, b"as b"), (c.name, b"as c")]
    del ba


# --- signed records (issue #14 item 4) -----------------------------------------------------------


def _update(src: MeshCore, blobs: list[bytes]) -> bytes:
    return encode_gossip(CHANNEL_TOPOLOGY, src.name, encode_update(blobs))


def test_neighbour_forging_a_peers_record_is_refused_and_the_victim_keeps_speaking() -> None:
    """Attack (issue #14 item 4): a password holder b sends a with a record under c's name of
    version 2^63-1. Before, a relayed it, c bumped past 2^63 and every decoder refused c's
    record. Now the record is refused (c's name is bound to c's key), the connection stays, a
    RecordsRefused event names the source, and c's record everywhere is c's own."""
    h = Harness()
    a, b, c = h.core(1), h.core(2), h.core(3)
    ia, _ = h.link(a, b)
    h.link(a, c)
    h.run(2.0)
    forged = make_record(c.name, "p3", 5, (1 << 63) - 1, 3, [], key_of(2))
    a.receive(ia, TAG_GOSSIP, _update(b, [forged.blob]), h.now)
    h.run(3.0)
    refused = [e for e in h.events[id(a)] if isinstance(e, RecordsRefused)]
    assert refused and refused[0].source == b.name and refused[0].name == c.name
    assert a.stats.records_refused == 1
    assert c.topology.version < 1 << 32
    for core in (a, b, c):
        got = core.topology.get(c.name)
        assert got is not None and got.public_key == c.topology.public_key
    assert set(a.connected_peers()) == {b.name, c.name}


def test_records_that_do_not_beat_the_held_version_are_not_decoded() -> None:
    """Issue #18's CPU concern: an old version is dropped from its header. The body here is
    garbage and the signature absent: decoding it would close the connection."""
    h = Harness()
    a, b = h.core(1), h.core(2)
    ia, _ = h.link(a, b)
    h.run(2.0)
    held = a.topology.get(b.name)
    assert held is not None
    skipped = a.stats.records_skipped
    older = bytearray(held.blob[:119] + b"\xc1garbage")  # broken signature and body...
    older[15:23] = (held.version - 1).to_bytes(8, "big")  # ...of an older version
    a.receive(ia, TAG_GOSSIP, _update(b, [held.blob, bytes(older)]), h.now)
    assert a.stats.records_skipped == skipped + 2  # both dropped undecoded, no error
    newer = bytearray(held.blob)
    newer[15:23] = (held.version + 1).to_bytes(8, "big")  # newer: decoded, the forgery caught
    with pytest.raises(RemoteProtocolError, match="not signed"):
        a.receive(ia, TAG_GOSSIP, _update(b, [bytes(newer)]), h.now)


# --- link attributes in our record: coalesced (issues #17 item 2, #18) ---------------------------


def _attrs(
    datapath: str = "sleeve", mtu: int | None = 1376, state: str = "established"
) -> LinkAttributes:
    return LinkAttributes(datapath, True, mtu, state)


def held(core: MeshCore, name: PeerName) -> PeerRecord:
    rec = core.topology.get(name)
    assert rec is not None
    return rec


def test_a_pmtu_search_and_a_switch_over_make_one_new_version() -> None:
    h = Harness()
    a, b = h.core(1), h.core(2)
    ia, _ = h.link(a, b)
    a.connection_attributes(ia, _attrs(mtu=548, state="pending"), h.now)  # with the connection
    h.run(2.0)
    v = a.topology.version
    assert held(b, a.name).connections[0].attributes == _attrs(mtu=548, state="pending")
    # Ten MTU probe steps and a switch to vxlan within 2 s, then nothing: one version, after
    # attributes_delay, with the last word; reported again unchanged: no version at all.
    for step in range(10):
        a.connection_attributes(ia, _attrs(mtu=548 + 80 * step), h.now)
        h.run(0.2)
    a.connection_attributes(ia, _attrs("vxlan", 1376), h.now)
    h.run(h.config.attributes_delay + 1.0)
    assert a.topology.version == v + 1
    rec = held(b, a.name)
    assert rec.version == v + 1 and rec.connections[0].attributes == _attrs("vxlan", 1376)
    for _ in range(20):  # the router reports on every status change, e.g. each heartbeat
        a.connection_attributes(ia, _attrs("vxlan", 1376), h.now)
        h.run(0.5)
    assert a.topology.version == v + 1
    assert b.status()["peers"][0]["connections"][0] | {"name": "", "address": ""} == {
        "name": "", "address": "", "outbound": True, "established": True,
        "datapath": "vxlan", "encrypted": True, "mtu": 1376, "data_state": "established",
    }  # fmt: skip


def test_a_connection_change_carries_pending_attributes_at_once() -> None:
    h = Harness()
    a, b, c = h.core(1), h.core(2), h.core(3)
    ia, _ = h.link(a, b)
    h.run(2.0)
    v = a.topology.version
    a.connection_attributes(ia, _attrs(state="degraded"), h.now)
    h.run(0.1)
    assert a.topology.version == v  # waiting for attributes_delay
    h.link(a, c)  # a new connection: our record is rebuilt after local_delay, attributes too
    h.run(0.5)
    assert a.topology.version == v + 1  # added and established in one version
    after = a.topology.version
    mine = {x.name: x.attributes for x in a.topology.ourself.connections}
    assert mine[b.name] == _attrs(state="degraded") and mine[c.name] is None
    h.run(h.config.attributes_delay + 1.0)
    assert a.topology.version == after  # nothing left to publish
    assert held(b, a.name).version == after
