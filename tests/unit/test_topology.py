"""Topology records: merge laws (hypothesis), self bumps, GC, short ids, digests, decoding."""

from __future__ import annotations

import contextlib
import random
import struct

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.topology import (
    _MAX_RECORD_BYTES,
    DATA_STATES,
    DATAPATHS,
    MAX_ADDRESS_LEN,
    MAX_CONNECTIONS,
    MAX_PEERS,
    MAX_VERSION,
    MAX_VERSION_STEP,
    ConnectionSummary,
    LinkAttributes,
    PeerRecord,
    Topology,
    decode_record,
    make_record,
    merge_records,
    peek_record,
)

NAMES = [PeerName(0x020000000000 + i) for i in range(6)]
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(6)]


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
        KEYS[i],
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
    replicas = [
        Topology(ident, random.Random(k), Ed25519PrivateKey.generate())
        for k, ident in enumerate(idents)
    ]
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
    return Topology(PeerIdentity(NAMES[i], f"n{i}", uid, i), random.Random(1), KEYS[i])


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
    stale = make_record(NAMES[0], "old", 49, 9, 0, [], KEYS[0])  # our key: an old start of ours
    r = t.merge([stale])
    assert r.self_bumped
    assert t.version == 10 and t.ourself.uid == 50
    assert t.ourself in r.new  # our corrected record is to be relayed
    # our own current record coming back changes nothing
    assert not t.merge([t.ourself]).changed
    assert not t.merge([make_record(NAMES[0], "n0", 50, 3, 0, [], KEYS[0])]).changed


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
    t = Topology(PeerIdentity(NAMES[3], "n3", 5, 77), random.Random(2), KEYS[3])
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


def signed(body: object, name: int = 1, uid: int = 1, version: int = 1, fmt: int = 2) -> bytes:
    """A v2 blob validly signed over any body (so the body decoder is reached)."""
    header = struct.pack(">BHIQQ", fmt, name >> 32, name & 0xFFFFFFFF, uid, version)
    key = KEYS[5]
    header += key.public_key().public_bytes_raw()
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    return header + key.sign(b"weft-record-v2\0" + header + raw) + raw


@given(json_like)
def test_decode_record_wrong_shapes_rejected(obj: object) -> None:
    try:
        blob = signed(obj)
    except (OverflowError, ValueError):
        return
    with contextlib.suppress(RemoteProtocolError):
        decode_record(blob)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]),
            st.integers(0, 400),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_signed_records_only_raise_remote_protocol_error(
    edits: list[tuple[str, int, bytes]],
) -> None:
    """A real v2 record (signed header: format, name, uid, version, key; signature; body) with
    bytes flipped, cut or inserted: the header peek and the full decoder either give the
    original's fields or raise RemoteProtocolError, nothing else."""
    original = rec(2, version=4, uid=9, conns=(1, 3))
    blob = bytearray(original.blob)
    for op, at, data in edits:
        at %= len(blob) + 1
        if op == "flip" and at < len(blob):
            blob[at] ^= data[0]
        elif op == "cut":
            del blob[at:]
        else:
            blob[at:at] = data
    with contextlib.suppress(RemoteProtocolError):
        peek_record(bytes(blob))
    try:
        decoded = decode_record(bytes(blob))
    except RemoteProtocolError:
        return
    assert decoded == original  # only an unchanged blob decodes


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ({}, ["n", 4096, []]),  # short id too large
        ({"uid": 0}, ["n", 1, []]),  # uid 0
        ({"version": 0}, ["n", 1, []]),  # version 0
        ({"version": 1 << 63}, ["n", 1, []]),  # version beyond what any decoder takes
        ({"uid": 0, "version": 0}, ["n", 1, []]),  # both
        ({}, ["n", 1, [[1, "a", True, True]]]),  # connection to itself
        ({}, ["n", 1, [[2, "a", True, True], [2, "b", True, True]]]),  # duplicate
        ({}, ["n", 1, [[2, "a", 1, True]]]),  # int where bool
        ({}, ["n", True, []]),  # bool where int
        ({}, ["x" * 300, 1, []]),  # nickname too long
        ({"fmt": 3}, ["n", 1, []]),  # unknown encoding version
        ({}, ["n", 1, [[2, "a", True, True, 0x1A]]]),  # 5 elements: flags without an mtu
        ({}, ["n", 1, [[2, "a", True, True, 1 << 16, 1400]]]),  # flags beyond 16 bits
        ({}, ["n", 1, [[2, "a", True, True, -1, 1400]]]),  # negative flags
        ({}, ["n", 1, [[2, "a", True, True, 0x1A, 1 << 16]]]),  # mtu beyond uint16
        ({}, ["n", 1, [[2, "a", True, True, True, 1400]]]),  # bool where flags
        ({}, ["n", 1, [[2, "a", True, True, 0x1A, "1400"]]]),  # string where mtu
        ({}, ["n", 1]),  # body too short
    ],
)
def test_decode_record_rejects_bad_fields(header: dict[str, int], body: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_record(signed(body, **header))


def test_decode_record_accepts_the_signed_helper_blob() -> None:
    """The helper above builds valid blobs: the rejections are about the fields, not it."""
    r = decode_record(signed(["n", 1, [[2, "a", True, False]]], name=1, uid=3, version=4))
    assert (r.name, r.uid, r.version, r.nickname) == (PeerName(1), 3, 4, "n")
    assert r.public_key == KEYS[5].public_key().public_bytes_raw()


# --- ownership: signed records, first-key binding, version bounds (issue #14 item 4) -------------


def test_old_unsigned_record_encoding_is_refused_by_name() -> None:
    v1 = msgpack.packb([1, "n", 1, 1, 1, []], use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="encoding version 1"):
        decode_record(v1)


def test_relay_cannot_alter_a_signed_record() -> None:
    """A relay (any password holder) that changes a byte of a record it forwards - header or
    body - is caught by the signature."""
    r = rec(2, version=4, uid=9, conns=(1, 3))
    for at in (3, 20, len(r.blob) - 5):  # name, version, a connection address
        forged = bytearray(r.blob)
        forged[at] ^= 1
        with pytest.raises(RemoteProtocolError, match="not signed"):
            decode_record(bytes(forged))


def test_peer_cannot_forge_another_peers_record() -> None:
    """Attack: a password holder (key KEYS[5]) announces a record under peer 1's name with a
    higher version and no connections, to cut peer 1 off. Peer 1's name is bound to its key:
    the forgery is refused, the real record stays, and peer 1's own next version - even the
    one the forgery pre-empted - still wins."""
    t = topo()
    real = rec(1, version=3, conns=(0,))
    assert t.merge([real]).changed
    forged = decode_record(make_record(NAMES[1], "n1", 7, 4, 1, [], KEYS[5]).blob)
    r = t.merge([forged])
    assert not r.changed and r.refused and r.refused[0][0] == NAMES[1]
    assert "another key" in r.refused[0][1]
    assert t.get(NAMES[1]) is real
    assert t.merge([rec(1, version=4, uid=7, conns=(0,))]).changed  # the owner moves on


def test_forged_record_for_our_name_does_not_bump_us_out_of_range() -> None:
    """Attack (issue #14 item 4): one forged record of version 2^63-1 for the victim's name
    made the victim bump to 2^63, which every decoder refuses - its neighbours disconnected.
    Now a record for our name signed by another key is refused and our version stays."""
    t = topo(0)
    forged = decode_record(make_record(NAMES[0], "n0", 7, (1 << 63) - 1, 0, [], KEYS[5]).blob)
    r = t.merge([forged])
    assert not r.self_bumped and r.refused and "our own name" in r.refused[0][1]
    assert t.version == 1
    assert decode_record(t.ourself.blob).version == 1  # we can still speak


def test_version_bump_beyond_reach_is_refused_even_from_the_owner() -> None:
    """A version far beyond the held one (a buggy owner, a stolen key) is refused, so no record
    can make a peer's version unusable; the owner's normal steps are unaffected."""
    t = topo()
    assert t.merge([rec(1, version=10)]).changed
    too_far = rec(1, version=10 + MAX_VERSION_STEP + 1)
    r = t.merge([too_far])
    assert not r.changed and "jumps" in r.refused[0][1]
    r = t.merge([rec(4, version=MAX_VERSION + 1)])  # a name we do not hold yet
    assert not r.changed and "limit" in r.refused[0][1]
    assert t.merge([rec(1, version=10 + MAX_VERSION_STEP)]).changed  # within the bound


def test_our_own_older_incarnation_still_bumps_us() -> None:
    """The restart rule survives signing: a record for our name signed by our (persisted) key
    with another uid is an older start of ours, and we bump above it."""
    t = topo(0, uid=50)
    old = make_record(NAMES[0], "n0", 49, 40, 0, [], KEYS[0])
    r = t.merge([old])
    assert r.self_bumped and t.version == 41


def test_first_key_binding_outlives_garbage_collection() -> None:
    """A peer collected as unreachable keeps its name's binding: a password holder cannot
    take the name over once the real peer is away."""
    t = topo()
    t.merge([rec(1, version=2)])
    assert t.remove([NAMES[1]]) == [NAMES[1]]
    forged = decode_record(make_record(NAMES[1], "n1", 7, 9, 1, [], KEYS[5]).blob)
    assert t.merge([forged]).refused
    assert t.binding(NAMES[1]) == KEYS[1].public_key().public_bytes_raw()
    assert t.merge([rec(1, version=3)]).changed  # the real one comes back


def test_header_check_skips_records_that_do_not_beat_the_held_one() -> None:
    t = topo()
    held = rec(1, version=5)
    t.merge([held])
    assert not t.beats_held(NAMES[1], 7, 5, held.blob)  # the same record
    assert not t.beats_held(NAMES[1], 7, 4, b"")  # older: never decoded
    assert t.beats_held(NAMES[1], 7, 6, b"")
    assert not t.beats_held(NAMES[0], 50, 1, b"")  # our own current record


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
        out.append(make_record(name, "", 1, 1, 0, conns, KEYS[5]))
    return out


def test_topology_refuses_peer_records_beyond_max_peers() -> None:
    """The attack: one member announced 100 k records and the victim held them all."""
    t = Topology(PeerIdentity(NAMES[0], "n0", 50, 0), random.Random(1), KEYS[0], max_peers=20)
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
    newer = make_record(held, "", 1, 2, 0, [], KEYS[5])
    assert t.merge([newer]).new == [newer]
    # room freed by garbage collection admits a refused peer again
    t.remove([held])
    assert t.wanted_from({refused_name: (1, 1)}) == [refused_name]
    assert t.merge(many(1, start=100 + 99)).added


def test_topology_refuses_records_beyond_its_byte_budget() -> None:
    budget = 2 * _MAX_RECORD_BYTES
    t = Topology(PeerIdentity(NAMES[0], "n0", 50, 0), random.Random(1), KEYS[0], max_bytes=budget)
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
        Topology(ident, random.Random(1), KEYS[0], max_peers=MAX_PEERS + 1)
    with pytest.raises(ConfigError, match="below one record"):
        Topology(ident, random.Random(1), KEYS[0], max_bytes=1000)


# --- link attributes: datapath, encryption, MTU, data state per connection (issue #17 item 2) ---


def attributed(i: int, attrs: list[LinkAttributes | None], addr_len: int = 0) -> PeerRecord:
    conns = [
        ConnectionSummary(
            PeerName(0x040000000000 + k),
            "a" * addr_len if addr_len else f"10.0.0.{k}:6783",
            True,
            True,
            a,
        )
        for k, a in enumerate(attrs)
    ]
    return make_record(NAMES[i], f"n{i}", 7, 3, i, conns, KEYS[i])


def test_link_attributes_round_trip_for_every_code() -> None:
    attrs: list[LinkAttributes | None] = [
        LinkAttributes(dp, enc, mtu, state)
        for dp, state in zip(DATAPATHS, DATA_STATES, strict=True)
        for enc in (False, True)
        for mtu in (None, 1, 1376, 65535)
    ]
    attrs += [LinkAttributes(None, False), LinkAttributes("sleeve", True, None, None), None]
    r = attributed(1, attrs)
    d = decode_record(bytes(bytearray(r.blob)))
    assert d == r
    got = sorted((c.attributes for c in d.connections), key=repr)
    assert got == sorted(attrs, key=repr)
    status = {c["address"]: c for c in d.to_status()["connections"]}
    first = next(c for c in d.connections if c.attributes == attrs[0])
    assert status[first.address] == {
        "name": str(first.name), "address": first.address, "outbound": True,
        "established": True, "datapath": "none", "encrypted": False, "mtu": None,
        "data_state": "pending",
    }  # fmt: skip
    bare = next(c for c in d.connections if c.attributes is None)
    assert [status[bare.address][k] for k in ("datapath", "encrypted", "mtu", "data_state")] == [
        None, None, None, None,
    ]  # fmt: skip


def test_link_attributes_are_validated() -> None:
    for datapath, mtu, state in (
        ("fastpath", None, None),
        ("sleeve", 0, None),
        ("sleeve", 65536, None),
        ("sleeve", 1400, "silent"),
    ):
        with pytest.raises(ValueError):
            LinkAttributes(datapath, True, mtu, state)


def test_record_without_attributes_decodes_as_not_reported() -> None:
    """An encoder from before the attributes wrote 4-element entries: they still decode, with
    nothing reported; and a connection without attributes is still encoded that way."""
    old = decode_record(signed(["n", 1, [[2, "a:1", True, True], [3, "b:1", False, False]]]))
    assert [c.attributes for c in old.connections] == [None, None]
    assert old.to_status()["connections"][0]["datapath"] is None
    r = rec(2, conns=(1, 3))
    body = msgpack.unpackb(r.blob[119:])
    assert [len(e) for e in body[2]] == [4, 4]  # the old encoding, byte for byte


def test_later_attributes_and_unknown_codes_are_ignored() -> None:
    """Forward compatibility: trailing entry and body elements, flag bits above 6 and codes
    this decoder does not know decode as 'not reported' rather than refusing the record."""
    r = decode_record(
        signed(
            ["n", 1, [[2, "a:1", True, True, 0x80 | 0x70 | 0x08 | 7, 1400, 9, "future"]], "more"]
        )
    )
    (c,) = r.connections
    assert c.attributes == LinkAttributes(None, True, 1400, None)
    mixed = decode_record(signed(["n", 1, [[2, "a:1", True, True, 0x2A, 0], [3, "b", True, True]]]))
    assert [c.attributes for c in mixed.connections] == [
        LinkAttributes("sleeve", True, None, "established"),
        None,
    ]


def test_attributes_cost_at_most_four_bytes_per_connection() -> None:
    n = 50
    plain = attributed(1, [None] * n)
    full = attributed(1, [LinkAttributes("ovs", True, 65535, "degraded")] * n)
    none = attributed(1, [LinkAttributes("none", True, None, "established")] * n)
    assert len(full.blob) - len(plain.blob) == 4 * n
    assert len(none.blob) - len(plain.blob) == 2 * n


def test_largest_record_with_attributes_is_within_the_decoders_limit() -> None:
    attrs: list[LinkAttributes | None] = [LinkAttributes("ovs", True, 65535, "failed")]
    biggest = attributed(1, attrs * MAX_CONNECTIONS, addr_len=MAX_ADDRESS_LEN)
    assert len(biggest.blob) <= _MAX_RECORD_BYTES
    assert decode_record(bytes(bytearray(biggest.blob))) == biggest


def test_a_relay_cannot_change_a_links_attributes() -> None:
    r = attributed(1, [LinkAttributes("vxlan", True, 1376, "established")])
    flags = bytes([0x23 | 0x08])  # vxlan, encrypted, established
    at = r.blob.rindex(flags + b"\xcd")  # flags, then the uint16 mtu
    for forged in (bytes([0x22 | 0x08]), bytes([0x23])):  # sleeve instead; plaintext
        blob = r.blob[:at] + forged + r.blob[at + 1 :]
        with pytest.raises(RemoteProtocolError, match="not signed"):
            decode_record(blob)


def test_an_attribute_change_bumps_our_version_once() -> None:
    t = topo()
    link = conn(NAMES[1])
    assert t.set_local_connections([link])
    v = t.version
    sleeve = LinkAttributes("sleeve", True, 1376, "established")
    assert t.set_local_connections([ConnectionSummary(link.name, link.address, True, True, sleeve)])
    assert t.version == v + 1
    same = LinkAttributes("sleeve", True, 1376, "established")
    assert not t.set_local_connections(
        [ConnectionSummary(link.name, link.address, True, True, same)]
    )
    assert t.version == v + 1
    assert decode_record(bytes(bytearray(t.ourself.blob))).connections[0].attributes == sleeve
