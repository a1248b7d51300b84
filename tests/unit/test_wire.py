"""Mesh wire schema: round trips and bounded, typed rejection."""

from __future__ import annotations

import msgpack
import pytest

from weft.errors import RemoteProtocolError
from weft.gossip.peer import PeerName
from weft.gossip.wire import (
    TAG_BROADCAST,
    TAG_GOSSIP,
    TAG_UNICAST,
    Announcement,
    DigestHash,
    DigestVector,
    RecordRequest,
    TopologyUpdate,
    decode_envelope,
    decode_topology,
    encode_announce,
    encode_broadcast,
    encode_digest_hash,
    encode_digest_vector,
    encode_gossip,
    encode_request,
    encode_unicast,
    encode_update,
)

A, B = PeerName(0x020000000001), PeerName(0x020000000002)


def test_envelopes_round_trip() -> None:
    g = decode_envelope(TAG_GOSSIP, encode_gossip("ipam", A, b"x"))
    assert (g.channel, g.src, g.dst, g.body) == ("ipam", A, None, b"x")
    u = decode_envelope(TAG_UNICAST, encode_unicast("ipam", A, B, b"y"))
    assert (u.src, u.dst, u.body) == (A, B, b"y")
    b = decode_envelope(TAG_BROADCAST, encode_broadcast("dns", B, b""))
    assert (b.channel, b.src, b.body) == ("dns", B, b"")


def test_topology_bodies_round_trip() -> None:
    assert decode_topology(encode_update([b"r1", b"r2"])) == TopologyUpdate([b"r1", b"r2"])
    assert decode_topology(encode_digest_hash(b"h" * 16, 3)) == DigestHash(b"h" * 16, 3)
    vec = {A: (5, 2), B: (7, 1)}
    assert decode_topology(encode_digest_vector(vec)) == DigestVector(vec)
    assert decode_topology(encode_announce(vec)) == Announcement(vec)
    assert decode_topology(encode_request([A, B])) == RecordRequest([A, B])


@pytest.mark.parametrize(
    ("tag", "obj"),
    [
        (TAG_GOSSIP, ["c", 1]),  # too short
        (TAG_GOSSIP, ["", 1, b""]),  # empty channel
        (TAG_GOSSIP, ["c" * 65, 1, b""]),  # channel too long
        (TAG_GOSSIP, ["c", -1, b""]),  # bad name
        (TAG_GOSSIP, ["c", 1 << 48, b""]),
        (TAG_GOSSIP, ["c", 1, "text"]),  # body must be binary
        (TAG_UNICAST, ["c", 1, b""]),  # unicast needs dst
        (TAG_BROADCAST, {"c": 1}),  # maps are refused
        (9, ["c", 1, b""]),  # unknown tag
    ],
)
def test_bad_envelopes(tag: int, obj: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_envelope(tag, msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    "obj",
    [
        [],
        [9, []],
        [1, ["text"]],
        [2, b"short", 1],
        [2, b"h" * 16, -1],
        [3, [1, 2]],  # not triples
        [3, [1, 0, 1]],  # uid 0
        [3, [1, 1, 0]],  # version 0
        [5, [1, 1, True]],
        [4, ["x"]],
        [True, []],
    ],
)
def test_bad_topology_bodies(obj: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_topology(msgpack.packb(obj, use_bin_type=True))


def test_oversized_and_truncated() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_envelope(TAG_GOSSIP, encode_gossip("c", A, b"x")[:-1])
    with pytest.raises(RemoteProtocolError):
        decode_envelope(TAG_GOSSIP, encode_gossip("c", A, b"x") + b"\x00")
    with pytest.raises(RemoteProtocolError):
        decode_topology(b"\xdd\xff\xff\xff\xff")  # array32 claiming 4 billion entries
