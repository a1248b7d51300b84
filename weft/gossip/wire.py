"""msgpack schema of the mesh messages (tags 4, 5, 6) with bounded, type-checked decoders.

Envelopes (the message body after the tag byte):

* tag 4 gossip:    ``[channel: str, src: uint48, body: bin]``
* tag 5 unicast:   ``[channel: str, src: uint48, dst: uint48, body: bin]``
* tag 6 broadcast: ``[channel: str, src: uint48, body: bin]``

The ``"topology"`` gossip channel is the mesh's own; its body is one of:

* ``[1, [record_blob, ...]]``                   UPDATE: records (see topology.py for the blob)
* ``[2, hash: bin16, count: uint]``              DIGEST_HASH: "this is the hash of my vector"
* ``[3, [name, uid, version, name, ...]]``       DIGEST_VECTOR: "send me what is newer than this"
* ``[4, [name, ...]]``                           REQUEST: "send me these records"
* ``[5, [name, uid, version, name, ...]]``       ANNOUNCE: "I have these (ask if you want them)"

Relayed records are announced rather than pushed (MeshConfig.eager_record_bytes), so a peer that
hears of a new version from several neighbours downloads it once; a peer's own new record is pushed.

Every decoder raises :class:`~weft.errors.RemoteProtocolError` and nothing else on bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from weft.errors import RemoteProtocolError
from weft.gossip.peer import PeerName
from weft.gossip.topology import MAX_PEERS

__all__ = [
    "CHANNEL_TOPOLOGY",
    "MAX_BODY",
    "MAX_CHANNEL_LEN",
    "TAG_BROADCAST",
    "TAG_GOSSIP",
    "TAG_UNICAST",
    "TOPO_ANNOUNCE",
    "TOPO_DIGEST_HASH",
    "TOPO_DIGEST_VECTOR",
    "TOPO_REQUEST",
    "TOPO_UPDATE",
    "Announcement",
    "DigestHash",
    "DigestVector",
    "Envelope",
    "RecordRequest",
    "TopologyMessage",
    "TopologyUpdate",
    "decode_envelope",
    "decode_topology",
    "encode_announce",
    "encode_broadcast",
    "encode_digest_hash",
    "encode_digest_vector",
    "encode_gossip",
    "encode_request",
    "encode_unicast",
    "encode_update",
]

TAG_GOSSIP = 4
TAG_UNICAST = 5
TAG_BROADCAST = 6
CHANNEL_TOPOLOGY = "topology"

MAX_CHANNEL_LEN = 64
MAX_BODY = 10 * 1024 * 1024  # the session's frame cap
# A router holds at most MAX_PEERS records (topology.py), so no message needs more entries; a
# full-state sync is chunked into updates of about 1 MiB (mesh.py), far below MAX_BODY.
MAX_RECORDS = MAX_PEERS  # per message
MAX_VECTOR = MAX_PEERS  # entries per digest vector, announcement or request

TOPO_UPDATE = 1
TOPO_DIGEST_HASH = 2
TOPO_DIGEST_VECTOR = 3
TOPO_REQUEST = 4
TOPO_ANNOUNCE = 5

_UINT64 = 1 << 64
_NAME_LIMIT = 1 << 48


def _pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def _unpack(payload: bytes, what: str, max_array: int) -> Any:
    if type(payload) is not bytes:
        raise RemoteProtocolError(f"malformed {what}: not a byte string")
    if len(payload) > MAX_BODY + 1024:
        raise RemoteProtocolError(f"malformed {what}: {len(payload)} bytes is too large")
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_CHANNEL_LEN,
            max_bin_len=MAX_BODY,
            max_array_len=max_array,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as err:  # msgpack raises several unrelated types on bad input
        raise RemoteProtocolError(f"malformed {what}: undecodable ({type(err).__name__})") from None


def _name(value: object, what: str) -> PeerName:
    if type(value) is not int or not 0 <= value < _NAME_LIMIT:
        raise RemoteProtocolError(f"malformed {what}: bad peer name")
    return PeerName(value)


@dataclass(frozen=True, slots=True)
class Envelope:
    tag: int
    channel: str
    src: PeerName
    dst: PeerName | None  # unicast only
    body: bytes


def encode_gossip(channel: str, src: PeerName, body: bytes) -> bytes:
    return _pack([channel, int(src), body])


def encode_unicast(channel: str, src: PeerName, dst: PeerName, body: bytes) -> bytes:
    return _pack([channel, int(src), int(dst), body])


def encode_broadcast(channel: str, src: PeerName, body: bytes) -> bytes:
    return _pack([channel, int(src), body])


def decode_envelope(tag: int, payload: bytes) -> Envelope:
    """Decode a tag 4/5/6 message body."""
    names = {TAG_GOSSIP: "gossip", TAG_UNICAST: "unicast", TAG_BROADCAST: "broadcast"}
    what = names.get(tag)
    if what is None:
        raise RemoteProtocolError(f"unknown message tag {tag}")
    obj = _unpack(payload, f"{what} message", 4)
    want = 4 if tag == TAG_UNICAST else 3
    if type(obj) is not list or len(obj) != want:
        raise RemoteProtocolError(f"malformed {what} message: expected {want} fields")
    channel = obj[0]
    if type(channel) is not str or not channel:
        raise RemoteProtocolError(f"malformed {what} message: bad channel name")
    src = _name(obj[1], f"{what} message")
    dst = _name(obj[2], f"{what} message") if tag == TAG_UNICAST else None
    body = obj[-1]
    if type(body) is not bytes:
        raise RemoteProtocolError(f"malformed {what} message: body must be binary")
    return Envelope(tag=tag, channel=channel, src=src, dst=dst, body=body)


# --- topology channel bodies ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopologyUpdate:
    blobs: list[bytes]


@dataclass(frozen=True, slots=True)
class DigestHash:
    hash: bytes
    count: int


@dataclass(frozen=True, slots=True)
class DigestVector:
    vector: dict[PeerName, tuple[int, int]]  # name -> (uid, version)


@dataclass(frozen=True, slots=True)
class RecordRequest:
    names: list[PeerName]


@dataclass(frozen=True, slots=True)
class Announcement:
    vector: dict[PeerName, tuple[int, int]]  # name -> (uid, version), a partial vector


TopologyMessage = TopologyUpdate | DigestHash | DigestVector | RecordRequest | Announcement


def encode_update(blobs: list[bytes]) -> bytes:
    return _pack([TOPO_UPDATE, blobs])


def encode_digest_hash(digest: bytes, count: int) -> bytes:
    return _pack([TOPO_DIGEST_HASH, digest, count])


def _flat(vector: dict[PeerName, tuple[int, int]]) -> list[int]:
    flat: list[int] = []
    for name, (uid, version) in vector.items():
        flat += (int(name), uid, version)
    return flat


def encode_digest_vector(vector: dict[PeerName, tuple[int, int]]) -> bytes:
    return _pack([TOPO_DIGEST_VECTOR, _flat(vector)])


def encode_announce(vector: dict[PeerName, tuple[int, int]]) -> bytes:
    return _pack([TOPO_ANNOUNCE, _flat(vector)])


def encode_request(names: list[PeerName]) -> bytes:
    return _pack([TOPO_REQUEST, [int(n) for n in names]])


def decode_topology(body: bytes) -> TopologyMessage:
    """Decode a topology-channel body (record blobs stay undecoded; see ``decode_record``)."""
    obj = _unpack(body, "topology message", max(MAX_RECORDS, 3 * MAX_VECTOR))
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise RemoteProtocolError("malformed topology message: expected [kind, ...]")
    kind = obj[0]
    if kind == TOPO_UPDATE and len(obj) == 2 and type(obj[1]) is list:
        blobs = obj[1]
        if len(blobs) > MAX_RECORDS or any(type(b) is not bytes for b in blobs):
            raise RemoteProtocolError("malformed topology update: records must be binary")
        return TopologyUpdate(blobs)
    if kind == TOPO_DIGEST_HASH and len(obj) == 3:
        digest, count = obj[1], obj[2]
        if type(digest) is not bytes or len(digest) != 16:
            raise RemoteProtocolError("malformed topology digest: hash must be 16 bytes")
        if type(count) is not int or not 0 <= count <= MAX_VECTOR:
            raise RemoteProtocolError("malformed topology digest: bad count")
        return DigestHash(digest, count)
    if kind in (TOPO_DIGEST_VECTOR, TOPO_ANNOUNCE) and len(obj) == 2 and type(obj[1]) is list:
        flat = obj[1]
        if len(flat) % 3 or len(flat) > 3 * MAX_VECTOR:
            raise RemoteProtocolError("malformed topology vector: bad length")
        vector: dict[PeerName, tuple[int, int]] = {}
        for i in range(0, len(flat), 3):
            name, uid, version = flat[i], flat[i + 1], flat[i + 2]
            if type(uid) is not int or not 0 < uid < _UINT64:
                raise RemoteProtocolError("malformed topology vector: bad uid")
            if type(version) is not int or not 0 < version < 1 << 63:
                raise RemoteProtocolError("malformed topology vector: bad version")
            vector[_name(name, "topology vector")] = (uid, version)
        return DigestVector(vector) if kind == TOPO_DIGEST_VECTOR else Announcement(vector)
    if kind == TOPO_REQUEST and len(obj) == 2 and type(obj[1]) is list:
        if len(obj[1]) > MAX_VECTOR:
            raise RemoteProtocolError("malformed topology request: too many names")
        return RecordRequest([_name(n, "topology request") for n in obj[1]])
    raise RemoteProtocolError(f"malformed topology message: unknown kind {kind!r}")
