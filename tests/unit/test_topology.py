"""Topology records: merge laws (hypothesis), self bumps, GC, short ids, digests, decoding."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.topology import (
    _MAX_RECORD_BYTES,
    MAX_ADDRESS_LEN,
    MAX_CONNECTIONS,
    MAX_PEERS,
    ConnectionSummary,
    PeerRecord,
    Topology,
    decode_record,
    make_record,
    merge_records,
)

NAMES = [PeerName(0x020000000000 + i) for i in range(6)]


def conn(name: PeerName, est: bool = True, out: bool = True) -> ConnectionSummary:
    return ConnectionSummary(name, f"10.0.0.{int(name) & 255}:6783", out, est)


def rec(
    i: int, version: int = 1, uid: int = 7, conns: tuple[int, ...] = (), short_id: int | None = None
) -> PeerRecord:
    return make_record(
        NAMES[i],
        f"n{i}",
        uid,
        version,
        i if short_id is None else short_id,
        [conn(NAMES[j]) for j in conns],
    )


@st.composite
def records(draw: st.DrawFn) -> PeerRecord:
    i = draw(st.integers(0, len(NAMES) - 1))
    others = [j for j in range(len(NAMES)) if j != i]
    conns = draw(st.lists(st.sampled_from(others), unique=True, max_size=3))
    return rec(
        i,
        version=draw(st.integers(1, 4)),
        uid=draw(st.integers(1, 3)),
        conns=tuple(conns),
    )


record_lists = st.lists(records(), max_size=12)


# --- the merge is a join-semilattice -------------------------------------------------------------


@given(record_lists, record_lists)
def test_merge_commutative(a: list[PeerRecord], b: list[PeerRecord]) -> None:
    sa, sb = merge_records({}, a), merge_records({}, b)
    assert merge_records(sa, sb.values()) == merge_records(sb, sa.values())


@given(record_lists)
def test_merge_idempotent(a: list[PeerRecord]) -> None:
    s = merge_records({}, a)
    assert merge_records(s, s.values()) == s
    assert merge_records(s, a) == s


@given(record_lists, record_lists, record_lists)
def test_merge_associative(a: list[PeerRecord], b: list[PeerRecord], c: list[PeerRecord]) -> None:
    sa, sb, sc = (merge_records({}, x) for x in (a, b, c))
    left = merge_records(merge_records(sa, sb.values()), sc.values())
    right = merge_records(sa, merge_records(sb, sc.values()).values())
    assert left == right


@settings(max_examples=50)
@given(record_lists, st.randoms(use_true_random=False))
def test_replicas_converge_whatever_the_order(all_recs: list[PeerRecord], r: random.Random) -> None:
    """Three Topology replicas fed the same records in different orders and with duplicates
    end with identical views of the other peers."""
    idents = [PeerIdentity(PeerName(0x0A0000000000 + k), f"r{k}", 99, 100 + k) for k in range(3)]
    replicas = [Topology(ident, random.Random(k)) for k, ident in enumerate(idents)]
    for t in replicas:
        order = list(all_recs) + r.sample(all_recs, len(all_recs) // 2)
        r.shuffle(order)
        for chunk_start in range(0, len(order), 3):
            t.merge(order[chunk_start : chunk_start + 3])
    views = [
        {n: v for n, v in t.records.items() if n not in {i.name for i in idents}} for t in replicas
    ]
    assert views[0] == views[1] == views[2]
    assert views[0] == merge_records({}, all_recs)


# --- Topology behaviour --------------------------------------------------------------------------


def topo(i: int = 0, uid: int = 50) -> Topology:
    return Topology(PeerIdentity(NAMES[i], f"n{i}", uid, i), random.Random(1))


def test_local_connection_change_bumps_version() -> None:
    t = topo()
    assert t.version == 1
    assert t.set_local_connections([conn(NAMES[1])])
    assert t.version == 2 and t.ourself.conn_names == {NAMES[1]}
    assert not t.set_local_connections([conn(NAMES[1])])
    assert t.version == 2


def test_higher_version_then_higher_uid_wins() -> None:
    t = topo()
    r = t.merge([rec(1, version=3, uid=5)])
    assert [x.version for x in r.new] == [3] and r.added == [NAMES[1]]
    assert not t.merge([rec(1, version=2, uid=9)]).changed
    assert not t.merge([rec(1, version=3, uid=4)]).changed
    r = t.merge([rec(1, version=3, uid=6)])
    assert r.changed and r.restarted == [(NAMES[1], 5, 6)]
    got = t.get(NAMES[1])
    assert got is not None and got.uid == 6


def test_stale_record_about_ourselves_bumps_our_version() -> None:
    t = topo(uid=50)
    t.set_local_connections([conn(NAMES[1])])  # version 2
    # an old incarnation of us (other uid) announced version 9
    stale = make_record(NAMES[0], "old", 49, 9, 0, [])
    r = t.merge([stale])
    assert r.self_bumped
    assert t.version == 10 and t.ourself.uid == 50
    assert t.ourself in r.new  # our corrected record is to be relayed
    # our own current record coming back changes nothing
    assert not t.merge([t.ourself]).changed
    assert not t.merge([make_record(NAMES[0], "n0", 50, 3, 0, [])]).changed


def test_restarted_peer_replaces_old_record_everywhere() -> None:
    """A restart (new uid, version 1) wins once the restarted peer bumps above its old record."""
    old_self = topo(1, uid=10)
    for _ in range(5):
        old_self.set_local_connections([conn(NAMES[0])] if old_self.version % 2 else [])
    observer = topo(0)
    observer.merge([old_self.ourself])
    new_self = topo(1, uid=11)
    assert not observer.merge([new_self.ourself]).changed  # version 1 loses...
    new_self.merge([old_self.ourself])  # ...until it hears of its old record
    r = observer.merge([new_self.ourself])
    assert r.restarted == [(NAMES[1], 10, 11)]


def test_gc_reachability_follows_announced_connections() -> None:
    t = topo()
    t.set_local_connections([conn(NAMES[1])])
    t.merge([rec(1, conns=(0, 2)), rec(2, conns=(1,)), rec(3, conns=(4,)), rec(4, conns=(3,))])
    assert t.reachable() == {NAMES[0], NAMES[1], NAMES[2]}
    assert t.remove([NAMES[3], NAMES[4], NAMES[0]]) == [NAMES[3], NAMES[4]]
    assert NAMES[0] in t and NAMES[3] not in t


def test_short_id_collision_lower_name_keeps_it() -> None:
    t = Topology(PeerIdentity(NAMES[3], "n3", 5, 77), random.Random(2))
    r = t.merge([rec(4, short_id=77)])  # higher name: we keep ours
    assert not r.short_id_changed and t.short_id == 77
    r = t.merge([rec(1, short_id=77)])  # lower name: we move
    assert r.short_id_changed and t.short_id not in (77, 4)
    assert t.ourself.short_id == t.short_id and t.version == 2


def test_digest_exchange_finds_exactly_the_difference() -> None:
    a, b = topo(0), topo(1)
    a.merge([rec(2, version=3), rec(3, version=1)])
    b.merge([rec(2, version=2), rec(4, version=5)])
    newer = {r.name for r in a.newer_than(b.digest())}
    assert newer == {NAMES[0], NAMES[2], NAMES[3]}
    assert set(a.wanted_from(b.digest())) == {NAMES[1], NAMES[4]}
    assert a.digest_hash() != b.digest_hash()
    a.merge(b.newer_than(a.digest()))
    b.merge(a.newer_than(b.digest()))
    assert a.digest_hash() == b.digest_hash()


# --- decoding ------------------------------------------------------------------------------------


def test_record_roundtrip_and_interning() -> None:
    r = rec(2, version=4, uid=9, conns=(1, 3))
    d = decode_record(bytes(r.blob))
    assert d == r and d.conn_names == r.conn_names
    assert decode_record(bytes(bytearray(r.blob))) is d


@given(st.binary(max_size=200))
def test_decode_record_garbage_only_raises_remote_protocol_error(blob: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_record(blob)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=20,
)


@given(json_like)
def test_decode_record_wrong_shapes_rejected(obj: object) -> None:
    try:
        blob = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    with contextlib.suppress(RemoteProtocolError):
        decode_record(blob)


@pytest.mark.parametrize(
    "obj",
    [
        [1, "n", 1, 1, 4096, []],  # short id too large
        [1, "n", 0, 1, 1, []],  # uid 0
        [1, "n", 1, 0, 1, []],  # version 0
        [1 << 48, "n", 1, 1, 1, []],  # name too large
        [1, "n", 1, 1, 1, [[1, "a", True, True]]],  # connection to itself
        [1, "n", 1, 1, 1, [[2, "a", True, True], [2, "b", True, True]]],  # duplicate
        [1, "n", 1, 1, 1, [[2, "a", 1, True]]],  # int where bool
        [1, "n", True, 1, 1, []],  # bool where int
        [1, "x" * 300, 1, 1, 1, []],  # nickname too long
    ],
)
def test_decode_record_rejects_bad_fields(obj: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_record(msgpack.packb(obj, use_bin_type=True))


# --- bounds (issue #14 item 5) -------------------------------------------------------------------


def many(count: int, start: int = 100, nconns: int = 0, addr_len: int = 12) -> list[PeerRecord]:
    """``count`` records of fresh names, each listing ``nconns`` connections."""
    out = []
    for i in range(count):
        name = PeerName(0x030000000000 + start + i)
        conns = [
            ConnectionSummary(PeerName(0x040000000000 + j), "h" * addr_len, True, True)
            for j in range(nconns)
        ]
        out.append(make_record(name, "", 1, 1, 0, conns))
    return out


def test_topology_refuses_peer_records_beyond_max_peers() -> None:
    """The attack: one member announced 100 k records and the victim held them all."""
    t = Topology(PeerIdentity(NAMES[0], "n0", 50, 0), random.Random(1), max_peers=20)
    r = t.merge(many(100))
    assert len(t) == 20 and len(r.new) == 19
    assert len(r.refused) == 81
    assert "20 peer records, the limit (max_peers)" in r.refused[0][1]
    # refused records are not asked for again at that version...
    refused_name = r.refused[0][0]
    assert refused_name not in t.wanted_from({refused_name: (1, 1)})
    assert t.wanted_from({refused_name: (1, 2)}) == [refused_name]  # ...a newer one may fit
    # at the limit, held records still advance: anti-entropy keeps working for them
    held = next(n for n in t.records if n != NAMES[0])
    newer = make_record(held, "", 1, 2, 0, [])
    assert t.merge([newer]).new == [newer]
    # room freed by garbage collection admits a refused peer again
    t.remove([held])
    assert t.wanted_from({refused_name: (1, 1)}) == [refused_name]
    assert t.merge(many(1, start=100 + 99)).added


def test_topology_refuses_records_beyond_its_byte_budget() -> None:
    budget = 2 * _MAX_RECORD_BYTES
    t = Topology(PeerIdentity(NAMES[0], "n0", 50, 0), random.Random(1), max_bytes=budget)
    big = many(10, nconns=MAX_CONNECTIONS, addr_len=MAX_ADDRESS_LEN)
    assert len(big[0].blob) > budget // 3
    r = t.merge(big)
    assert t.size_bytes <= budget and len(r.new) == 2 and len(r.refused) == 8
    assert f"budget of {budget} bytes" in r.refused[0][1]
    assert t.size_bytes == sum(len(x.blob) for x in t.records.values())


def test_own_record_never_lists_more_than_max_connections() -> None:
    t = topo()
    conns = [conn(PeerName(0x040000000000 + j)) for j in range(MAX_CONNECTIONS + 5)]
    t.set_local_connections(conns)
    assert len(t.ourself.connections) == MAX_CONNECTIONS
    assert decode_record(bytes(bytearray(t.ourself.blob))).connections == t.ourself.connections


def test_topology_limits_are_checked() -> None:
    ident = PeerIdentity(NAMES[0], "n0", 50, 0)
    with pytest.raises(ConfigError, match="max_peers"):
        Topology(ident, random.Random(1), max_peers=MAX_PEERS + 1)
    with pytest.raises(ConfigError, match="below one record"):
        Topology(ident, random.Random(1), max_bytes=1000)
