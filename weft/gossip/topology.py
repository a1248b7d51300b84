"""Topology records, their merge, garbage collection and anti-entropy digests (no I/O).

A *record* describes one peer incarnation as that peer last announced it: name, nickname, uid,
version, short id and its connections ``(name, address, outbound, established)``, each with the
data path its owner chose for it (:class:`LinkAttributes`: datapath, encryption, MTU, data
state; issue #17), so any router can say what carries every link, not only its own. Every peer
owns exactly one record (its own) and only it bumps the version; everybody else just keeps the
best copy they have heard of.

Merge rule (a join-semilattice, so gossip converges whatever the order or duplication):
the record with the higher ``version`` wins, then the higher ``uid``; a tie on both (only a
misbehaving peer produces it) is broken by the encoded bytes so the merge stays commutative.

A record about *ourselves* that is not exactly ours (an older incarnation's, or a forged one)
makes us bump our version above it, so our real record wins everywhere - this is how a restarted
peer (new uid, version starting at 1) replaces its old record.

Records are encoded once into a *blob* and carried as such; decoded records are interned by blob
(a record is immutable), which keeps a simulation of many peers in one process small, makes
relaying a record free of re-encoding and caches signature verification.

Ownership (issue #14 item 4): every peer has an Ed25519 identity key; its record carries the
public key and is signed by it, so relays cannot alter it. A :class:`Topology` binds a peer name
to the first key it sees for it and refuses records for that name signed by another key (ours
included: a record for our name under another key is refused, never a reason to bump). Versions
are bounded: at most :data:`MAX_VERSION`, and at most :data:`MAX_VERSION_STEP` above the version
held, so no record can push a correct peer's own version out of range.

Blob, record encoding version 2 (version 1 was a bare msgpack array; it is refused by name)::

    0      1       3        7       15          23          55          119
    | 0x02 | name (48 bits)  | uid u64 | version u64 | public key | signature | msgpack body
    body: [nickname, short_id, [entry, ...]]
    entry: [name, address, outbound, established]                 (attributes not reported)
         | [name, address, outbound, established, flags, mtu]     (LinkAttributes)
    flags: bits 0-2 datapath (0 not reported, 1 none, 2 sleeve, 3 vxlan, 4 ovs),
           bit 3 data plane encrypted, bits 4-6 data state (0 not reported, 1 pending,
           2 established, 3 degraded, 4 failed); mtu: uint16, 0 = not known yet

The attributes cost 2 to 4 bytes per connection (flags is one byte, an MTU of 128 or more is 3).
Compatibility: an entry of 4 elements (an encoder from before the attributes) decodes with
``attributes=None``; elements after the sixth, body elements after the third, flag bits above 6
and codes this decoder does not know are ignored (decoded as "not reported"), so attributes can
be added later without a new format byte. A decoder from before the attributes (no release had
one) refuses 6-element entries as malformed.

The signature (Ed25519) covers ``"weft-record-v2\0"``, the header before it and the body
(attributes included: a relay can no more change a link's datapath than the link). The fixed
header lets a receiver drop a record that does not beat the one it holds before decoding its body
or verifying its signature (:func:`peek_record`).
"""

from __future__ import annotations

import hashlib
import random
import struct
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import SHORT_ID_BITS, PeerIdentity, PeerName

__all__ = [
    "DATAPATHS",
    "DATA_STATES",
    "DEFAULT_MAX_TOPOLOGY_BYTES",
    "MAX_ADDRESS_LEN",
    "MAX_CONNECTIONS",
    "MAX_NICKNAME_LEN",
    "MAX_PEERS",
    "MAX_VERSION",
    "MAX_VERSION_STEP",
    "RECORD_FORMAT",
    "ConnectionSummary",
    "LinkAttributes",
    "MergeResult",
    "PeerRecord",
    "Topology",
    "decode_record",
    "make_record",
    "merge_records",
    "peek_record",
    "record_wins",
]

MAX_NICKNAME_LEN = 255
MAX_ADDRESS_LEN = 300
# Bounds (issue #14 item 5): a record lists at most MAX_CONNECTIONS connections (the router's
# --conn-limit may not exceed it; Weave's default is 200), a router holds at most MAX_PEERS
# records (MeshConfig.max_peers, at most this) and at most max_bytes of them; records beyond
# are refused with a reason. These also bound every topology message (see wire.py).
MAX_CONNECTIONS = 1024
MAX_PEERS = 10_000
DEFAULT_MAX_TOPOLOGY_BYTES = 64 * 1024 * 1024
# A connection entry encodes to at most 22 bytes besides its address: array header 1, name 9,
# address header 3, two booleans 2, flags (< 2^16) 3, mtu 3; 24 leaves room for one more small
# attribute a later encoder may append (trailing elements are ignored, see above).
_MAX_ENTRY_OVERHEAD = 24
_MAX_RECORD_BYTES = MAX_CONNECTIONS * (MAX_ADDRESS_LEN + _MAX_ENTRY_OVERHEAD) + 1024
_UINT64 = 1 << 64
_SHORT_IDS = 1 << SHORT_ID_BITS

RECORD_FORMAT = 2  # the first byte of a blob; 1 was a bare msgpack array (0x96)
# A version beyond MAX_VERSION, or more than MAX_VERSION_STEP above the one held, is refused: an
# honest peer counts up by one per change (or to one above its own older record), so neither is
# ever reached, and a peer's own version stays far from the 2^63 every decoder rejects.
MAX_VERSION = 1 << 62
MAX_VERSION_STEP = 1 << 32
_HEADER = struct.Struct(">BHIQQ")  # format, name (high 16, low 32 bits), uid, version
_KEY_AT = _HEADER.size  # 23
_SIG_AT = _KEY_AT + 32  # 55
_BODY_AT = _SIG_AT + 64  # 119
_SIG_CONTEXT = b"weft-record-v2\0"
_MAX_BINDINGS = 20_000  # remembered name -> key bindings (twice the peers a mesh may hold)


# Wire codes of LinkAttributes (index + 1; 0 = not reported). Append only, never reorder.
DATAPATHS = ("none", "sleeve", "vxlan", "ovs")
DATA_STATES = ("pending", "established", "degraded", "failed")
_DP_CODE = {d: i + 1 for i, d in enumerate(DATAPATHS)}
_STATE_CODE = {s: i + 1 for i, s in enumerate(DATA_STATES)}


@dataclass(frozen=True, slots=True)
class LinkAttributes:
    """What a connection's owner says carries it (the switch's choice; issue #17).

    ``datapath`` one of :data:`DATAPATHS` and ``state`` one of :data:`DATA_STATES`, or None
    (not reported, or a code this decoder does not know); ``mtu`` the data path's MTU (1..65535)
    or None while unknown."""

    datapath: str | None
    encrypted: bool
    mtu: int | None = None
    state: str | None = None

    def __post_init__(self) -> None:
        if self.datapath is not None and self.datapath not in _DP_CODE:
            raise ValueError(f"unknown datapath {self.datapath!r}")
        if self.state is not None and self.state not in _STATE_CODE:
            raise ValueError(f"unknown data state {self.state!r}")
        if self.mtu is not None and not 0 < self.mtu < 65536:
            raise ValueError(f"mtu {self.mtu} is not in 1..65535")

    def encode(self) -> tuple[int, int]:
        """``(flags, mtu)`` as carried in an entry."""
        flags = _DP_CODE.get(self.datapath or "", 0) | (8 if self.encrypted else 0)
        return flags | _STATE_CODE.get(self.state or "", 0) << 4, self.mtu or 0


# Decoded attributes, shared: a mesh has few distinct ones, and decoding is hot (issue #18).
_ATTRIBUTES: dict[int, LinkAttributes] = {}


def _attributes(flags: object, mtu: object) -> LinkAttributes:
    if type(flags) is not int or type(mtu) is not int or not 0 <= flags < 65536 > mtu >= 0:
        raise _bad("connection flags and mtu must be integers in [0, 65536)")
    key = mtu << 7 | flags & 0x7F  # flag bits above 6 are a later encoder's: ignored
    attrs = _ATTRIBUTES.get(key)
    if attrs is None:
        if len(_ATTRIBUTES) >= 4096:
            _ATTRIBUTES.clear()  # only a cache
        dp, state = flags & 7, flags >> 4 & 7
        attrs = _ATTRIBUTES[key] = LinkAttributes(
            datapath=DATAPATHS[dp - 1] if 0 < dp <= len(DATAPATHS) else None,
            encrypted=bool(flags & 8),
            mtu=mtu or None,
            state=DATA_STATES[state - 1] if 0 < state <= len(DATA_STATES) else None,
        )
    return attrs


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """One connection as its owner announces it."""

    name: PeerName  # the remote peer
    address: str  # "host:port" as the owner sees the remote (outbound: what it dialed)
    outbound: bool
    established: bool
    attributes: LinkAttributes | None = None  # None: not reported (older encoder, no overlay)

    def entry(self) -> list[object]:
        head: list[object] = [int(self.name), self.address, self.outbound, self.established]
        if self.attributes is not None:
            head.extend(self.attributes.encode())
        return head

    def to_status(self) -> dict[str, Any]:
        a = self.attributes
        return {
            "name": str(self.name),
            "address": self.address,
            "outbound": self.outbound,
            "established": self.established,
            # None: the owner did not report it (a peer from before the attributes)
            "datapath": a.datapath if a is not None else None,
            "encrypted": a.encrypted if a is not None else None,
            "mtu": a.mtu if a is not None else None,
            "data_state": a.state if a is not None else None,
        }


@dataclass(frozen=True, slots=True, weakref_slot=True)
class PeerRecord:
    """One peer's announced state. Build with :func:`make_record`; ``blob`` is its encoding."""

    name: PeerName
    nickname: str
    uid: int
    version: int
    short_id: int
    connections: tuple[ConnectionSummary, ...]
    public_key: bytes = field(repr=False)  # the owner's raw Ed25519 key, which signed ``blob``
    blob: bytes = field(repr=False, compare=False)
    conn_names: frozenset[PeerName] = field(repr=False, compare=False)

    @property
    def key(self) -> tuple[int, int, bytes]:
        """Merge order: version, then uid, then the encoding (ties only from a bad peer)."""
        return (self.version, self.uid, self.blob)

    def to_status(self) -> dict[str, Any]:
        return {
            "name": str(self.name),
            "nickname": self.nickname,
            "uid": self.uid,
            "version": self.version,
            "short_id": self.short_id,
            "public_key": self.public_key.hex(),
            "connections": [c.to_status() for c in self.connections],
        }


# Interned decoded records, keyed by their blob (content-identical => same immutable object).
_INTERN: weakref.WeakValueDictionary[bytes, PeerRecord] = weakref.WeakValueDictionary()


def make_record(
    name: PeerName,
    nickname: str,
    uid: int,
    version: int,
    short_id: int,
    connections: Iterable[ConnectionSummary],
    key: Ed25519PrivateKey,
) -> PeerRecord:
    """Build, encode and sign (with the owner's ``key``) a record; connections are sorted by
    remote name for a canonical blob."""
    conns = tuple(sorted(connections, key=lambda c: (c.name, c.address)))
    public = key.public_key().public_bytes_raw()
    header = _HEADER.pack(RECORD_FORMAT, name >> 32, name & 0xFFFFFFFF, uid, version) + public
    body = msgpack.packb(
        [nickname, short_id, [c.entry() for c in conns]],
        use_bin_type=True,
    )
    blob = header + key.sign(_SIG_CONTEXT + header + body) + body
    rec = PeerRecord(
        name=name,
        nickname=nickname,
        uid=uid,
        version=version,
        short_id=short_id,
        connections=conns,
        public_key=public,
        blob=blob,
        conn_names=frozenset(c.name for c in conns),
    )
    _INTERN[blob] = rec  # made here: no need to verify it when it comes back
    return rec


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed peer record: {what}")


def _int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:
        raise _bad(f"{what} must be an integer in [{low}, {high})")
    return value


def _str(value: object, what: str, limit: int) -> str:
    if type(value) is not str or len(value) > limit:
        raise _bad(f"{what} must be a string of at most {limit} characters")
    return value


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise _bad(f"{what} must be a boolean")
    return value


def peek_record(blob: bytes) -> tuple[PeerName, int, int]:
    """``(name, uid, version)`` from a blob's fixed header, without decoding or verifying the
    rest (for deciding cheaply whether the record is worth :func:`decode_record`)."""
    if type(blob) is not bytes or len(blob) < _BODY_AT:
        if type(blob) is bytes and blob[:1] == b"\x96":
            raise _old_format()
        raise _bad("record is shorter than its header")
    fmt, hi, lo, uid, version = _HEADER.unpack_from(blob)
    if fmt != RECORD_FORMAT:
        raise _old_format() if fmt == 0x96 else _bad(f"unknown record encoding version {fmt}")
    if not 0 < uid < _UINT64 or not 0 < version < 1 << 63:
        raise _bad("uid and version must be non-zero (version below 2^63)")
    return PeerName(hi << 32 | lo), uid, version


def _old_format() -> RemoteProtocolError:
    return RemoteProtocolError(
        "peer record in encoding version 1 (unsigned) refused: this peer speaks record encoding"
        f" version {RECORD_FORMAT} (signed records); upgrade the sending peer"
    )


def decode_record(blob: bytes) -> PeerRecord:
    """Decode one record blob and verify its signature (against the key it carries; who may
    use that key for that name is :class:`Topology`'s business). Anything malformed or badly
    signed raises :class:`RemoteProtocolError` only. Verified records are cached by blob."""
    if type(blob) is not bytes:
        raise _bad("record is not a byte string")
    cached = _INTERN.get(blob)
    if cached is not None:
        return cached
    if len(blob) > _MAX_RECORD_BYTES:
        raise _bad(f"record of {len(blob)} bytes is too large")
    name, uid, version = peek_record(blob)
    # verified before the body is read: nothing unauthenticated is interpreted
    public = blob[_KEY_AT:_SIG_AT]
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            blob[_SIG_AT:_BODY_AT], _SIG_CONTEXT + blob[:_SIG_AT] + blob[_BODY_AT:]
        )
    except (InvalidSignature, ValueError):
        raise _bad(f"the record of {name} is not signed by the key it carries") from None
    try:
        obj = msgpack.unpackb(
            memoryview(blob)[_BODY_AT:],
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_ADDRESS_LEN,
            max_bin_len=0,
            max_array_len=MAX_CONNECTIONS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as err:  # msgpack raises several unrelated types on bad input
        raise _bad(f"undecodable ({type(err).__name__})") from None
    if type(obj) is not list or len(obj) < 3:  # later elements: a newer encoder's, ignored
        raise _bad("expected a body of at least 3 elements")
    nickname = _str(obj[0], "nickname", MAX_NICKNAME_LEN)
    short_id = _int(obj[1], "short id", 0, _SHORT_IDS)
    raw_conns = obj[2]
    if type(raw_conns) is not list:
        raise _bad("connections must be an array")
    conns: list[ConnectionSummary] = []
    seen: set[PeerName] = set()
    for raw in raw_conns:
        if type(raw) is not list or not (len(raw) == 4 or len(raw) >= 6):
            raise _bad("connection must be an array of 4, or at least 6, elements")
        cname = PeerName(_int(raw[0], "connection name", 0, 1 << 48))
        if cname == name:
            raise _bad("peer lists a connection to itself")
        if cname in seen:
            raise _bad("peer lists the same connection twice")
        seen.add(cname)
        conns.append(
            ConnectionSummary(
                name=cname,
                address=_str(raw[1], "connection address", MAX_ADDRESS_LEN),
                outbound=_bool(raw[2], "outbound"),
                established=_bool(raw[3], "established"),
                attributes=_attributes(raw[4], raw[5]) if len(raw) >= 6 else None,
            )
        )
    record = PeerRecord(
        name=name,
        nickname=nickname,
        uid=uid,
        version=version,
        short_id=short_id,
        connections=tuple(conns),
        public_key=public,
        blob=blob,
        conn_names=frozenset(seen),
    )
    _INTERN[blob] = record
    return record


def record_wins(new: PeerRecord, old: PeerRecord | None) -> bool:
    """True when ``new`` should replace ``old`` under the merge rule."""
    return old is None or new.key > old.key


def merge_records(
    state: Mapping[PeerName, PeerRecord], incoming: Iterable[PeerRecord]
) -> dict[PeerName, PeerRecord]:
    """The pure merge (no self handling): per name, the winning record. Used by tests as the law."""
    out = dict(state)
    for rec in incoming:
        if record_wins(rec, out.get(rec.name)):
            out[rec.name] = rec
    return out


@dataclass
class MergeResult:
    """What one :meth:`Topology.merge` changed."""

    new: list[PeerRecord] = field(default_factory=list)  # records to relay (incl. our bumped one)
    added: list[PeerName] = field(default_factory=list)  # names we had no record for
    restarted: list[tuple[PeerName, int, int]] = field(default_factory=list)  # (name, old, new uid)
    replaced: list[tuple[PeerRecord | None, PeerRecord]] = field(default_factory=list)
    refused: list[tuple[PeerName, str]] = field(default_factory=list)  # (name, why), not merged
    connections_removed: bool = False  # a record lost a connection (GC may be due)
    self_bumped: bool = False
    short_id_changed: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.new)


class Topology:
    """The set of records one peer knows, with its own record kept authoritative.

    Bounded: at most ``max_peers`` records (ours included) and ``max_bytes`` of encoded records;
    a record that would need a new slot or more bytes beyond either bound is refused (listed in
    :attr:`MergeResult.refused`, and not asked for again at that version: :meth:`wanted_from`).
    Replacing a held record by a newer one of no larger size is always possible, so the peers
    already held keep converging at the limit.

    Ownership: a name is bound to the first public key seen for it (ours to ``key``), and the
    binding outlives the record (garbage collection does not forget it; only a full table of
    bindings drops some of names no record is held for): a record signed by another key, or
    with a version beyond the bounds, is refused (:attr:`MergeResult.refused`).

    Not thread-safe; owned by one :class:`~weft.gossip.mesh.MeshCore`.
    """

    def __init__(
        self,
        identity: PeerIdentity,
        rng: random.Random,
        key: Ed25519PrivateKey,
        *,
        max_peers: int = MAX_PEERS,
        max_bytes: int = DEFAULT_MAX_TOPOLOGY_BYTES,
    ) -> None:
        if not 1 <= max_peers <= MAX_PEERS:
            raise ConfigError(f"max_peers {max_peers} is not in 1..{MAX_PEERS}")
        if max_bytes < _MAX_RECORD_BYTES:
            raise ConfigError(f"max topology bytes {max_bytes} is below one record's limit")
        self.max_peers = max_peers
        self.max_bytes = max_bytes
        self._bytes = 0  # sum of the held records' blob sizes
        # refused records: name -> (version, uid) not to fetch again (cleared when room frees up)
        self._refused: dict[PeerName, tuple[int, int]] = {}
        self._key = key
        self.public_key = key.public_key().public_bytes_raw()
        # name -> the public key bound to it (first sight); bounded by _MAX_BINDINGS
        self._bindings: dict[PeerName, bytes] = {identity.name: self.public_key}
        self._rng = rng
        self.name = identity.name
        self._nickname = identity.nickname
        self._uid = identity.uid
        self._short_id = identity.short_id % _SHORT_IDS
        self._version = 1
        self._conns: tuple[ConnectionSummary, ...] = ()
        self._records: dict[PeerName, PeerRecord] = {}
        self._hash: bytes | None = None
        self._rebuild_self()

    # --- our own record -------------------------------------------------------------------

    @property
    def ourself(self) -> PeerRecord:
        return self._records[self.name]

    @property
    def short_id(self) -> int:
        return self._short_id

    @property
    def version(self) -> int:
        return self._version

    def _rebuild_self(self) -> PeerRecord:
        rec = make_record(
            self.name,
            self._nickname,
            self._uid,
            self._version,
            self._short_id,
            self._conns,
            self._key,
        )
        self._put(rec)
        self._hash = None
        return rec

    def set_local_connections(self, connections: Iterable[ConnectionSummary]) -> bool:
        """Replace our connection list; bumps our version when it changed. True if changed."""
        # more than a record may list (the router's --conn-limit prevents it): keep the first
        conns = tuple(sorted(connections, key=lambda c: (c.name, c.address)))[:MAX_CONNECTIONS]
        if conns == self._conns:
            return False
        self._conns = conns
        self._version += 1
        self._rebuild_self()
        return True

    def _resolve_short_id(self) -> bool:
        """Weave's rule: on a short-id clash the lower name keeps it; the other picks anew."""
        clash = any(
            r.short_id == self._short_id and r.name < self.name
            for r in self._records.values()
            if r.name != self.name
        )
        if not clash:
            return False
        used = {r.short_id for r in self._records.values() if r.name != self.name}
        free = [i for i in range(_SHORT_IDS) if i not in used]
        if not free:
            return False  # more than 4096 peers: collisions are unavoidable; keep ours
        self._short_id = self._rng.choice(free)
        self._version += 1
        self._rebuild_self()
        return True

    # --- reading ----------------------------------------------------------------------------

    @property
    def records(self) -> Mapping[PeerName, PeerRecord]:
        return self._records

    def get(self, name: PeerName) -> PeerRecord | None:
        return self._records.get(name)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    @property
    def size_bytes(self) -> int:
        """Encoded size of every record held (bounded by ``max_bytes``, ours aside)."""
        return self._bytes

    def _put(self, rec: PeerRecord) -> None:
        old = self._records.get(rec.name)
        if old is not None:
            self._bytes -= len(old.blob)
        self._records[rec.name] = rec
        self._bytes += len(rec.blob)

    def _room_for(self, rec: PeerRecord, old: PeerRecord | None) -> str | None:
        """Why ``rec`` cannot be held (None: it can)."""
        if old is None and len(self._records) >= self.max_peers:
            return f"the topology holds {len(self._records)} peer records, the limit (max_peers)"
        grow = len(rec.blob) - (len(old.blob) if old is not None else 0)
        if grow > 0 and self._bytes + grow > self.max_bytes:
            return f"the topology would exceed its budget of {self.max_bytes} bytes"
        return None

    def _refuse(self, rec: PeerRecord, why: str, result: MergeResult) -> None:
        if len(self._refused) >= 2 * MAX_PEERS:
            self._refused.clear()  # only an optimisation: forget rather than grow
        self._refused[rec.name] = max(self._refused.get(rec.name, (0, 0)), (rec.version, rec.uid))
        result.refused.append((rec.name, why))

    # --- merging ----------------------------------------------------------------------------

    def beats_held(self, name: PeerName, uid: int, version: int, blob: bytes) -> bool:
        """Could a record with this header (and ``blob``) change anything? (False: drop it
        undecoded.)

        Cheap on purpose (issue #18: decoding dominates formation): a header that does not beat
        the held record, or that was refused at this version already, is not worth decoding or
        verifying (an equal header is, if the blob differs: the merge's tie-break, which only a
        misbehaving owner needs). Our own name: only a record that could be an older
        incarnation's is."""
        mine = self._records.get(name)
        if mine is not None:
            if name == self.name:
                return uid != self._uid or version > self._version
            if (version, uid) < (mine.version, mine.uid):
                return False
            if (version, uid) == (mine.version, mine.uid) and blob == mine.blob:
                return False
        # Refusals are not remembered against headers: a header is not authenticated, and a
        # forged one must not keep the owner's real record of that version out.
        return True

    def check(self, rec: PeerRecord) -> str | None:
        """Why ``rec`` (signature verified) may not be merged, or None: the name's key binding
        and the version bounds."""
        bound = self._bindings.get(rec.name)
        if bound is not None and bound != rec.public_key:
            if rec.name == self.name:
                return "a record for our own name signed by another key (our name in use?)"
            return "signed by another key than the one bound to that name"
        if rec.version > MAX_VERSION:
            return f"version {rec.version} is beyond the limit of 2^62"
        held = self._records.get(rec.name)
        base = self._version if rec.name == self.name else held.version if held else 0
        if rec.version - base > MAX_VERSION_STEP:
            return f"version {rec.version} jumps more than 2^32 above the held {base}"
        return None

    def _bind(self, rec: PeerRecord) -> bool:
        return self.bind(rec.name, rec.public_key)

    def bind(self, name: PeerName, public_key: bytes) -> bool:
        """Bind ``name`` to ``public_key`` unless it is bound already (to any key: check
        :meth:`binding` first). False: the table is full of names with records held."""
        if name in self._bindings:
            return True
        if len(self._bindings) >= _MAX_BINDINGS:
            # forget bindings of names we hold no record for (peers gone), oldest first
            for n in [n for n in self._bindings if n not in self._records][: _MAX_BINDINGS // 4]:
                del self._bindings[n]
            if len(self._bindings) >= _MAX_BINDINGS:
                return False
        self._bindings[name] = public_key
        return True

    def binding(self, name: PeerName) -> bytes | None:
        """The public key bound to ``name`` (None: none yet)."""
        return self._bindings.get(name)

    def merge(self, incoming: Iterable[PeerRecord]) -> MergeResult:
        """Merge records heard from a peer (signatures verified by :func:`decode_record`);
        returns what changed (``new`` = what to relay, ``refused`` = what was not merged)."""
        result = MergeResult()
        bump_to = 0
        for rec in incoming:
            if not self.beats_held(rec.name, rec.uid, rec.version, rec.blob):
                continue
            why = self.check(rec)
            if why is not None:
                # not remembered in _refused: who signed is not in the header, and a forged
                # record must not keep the owner's real one of that version from being asked for
                result.refused.append((rec.name, why))
                continue
            if rec.name == self.name:
                mine = self._records[self.name]
                if rec.key != mine.key:
                    bump_to = max(bump_to, rec.version)  # our own older incarnation's record
                continue
            old = self._records.get(rec.name)
            if not record_wins(rec, old):
                continue
            why = self._room_for(rec, old)
            if why is not None:
                self._refuse(rec, why, result)
                continue
            if not self._bind(rec):
                result.refused.append((rec.name, "too many peer names bound to keys"))
                continue
            self._records[rec.name] = rec
            self._bytes += len(rec.blob) - (len(old.blob) if old is not None else 0)
            result.new.append(rec)
            result.replaced.append((old, rec))
            if old is None:
                result.added.append(rec.name)
            else:
                if old.uid != rec.uid:
                    result.restarted.append((rec.name, old.uid, rec.uid))
                if not old.conn_names <= rec.conn_names:
                    result.connections_removed = True
        if result.new or bump_to:
            self._hash = None
        if bump_to:
            self._version = max(self._version, bump_to) + 1
            result.self_bumped = True
        if any(r.short_id == self._short_id for r in result.new) and self._resolve_short_id():
            result.short_id_changed = True
            result.self_bumped = True
        elif result.self_bumped:
            self._rebuild_self()
        if result.self_bumped:
            result.new.append(self._records[self.name])
        return result

    def remove(self, names: Iterable[PeerName]) -> list[PeerName]:
        """Drop records (garbage collection); never our own. Returns the names removed."""
        gone = []
        for n in names:
            rec = self._records.pop(n, None) if n != self.name else None
            if rec is not None:
                self._bytes -= len(rec.blob)
                gone.append(n)
        if gone:
            self._hash = None
            self._refused.clear()  # room freed: refused records may fit now
        return gone

    def reachable(self) -> set[PeerName]:
        """Names reachable from us following every announced connection (GC's notion)."""
        seen = {self.name}
        stack = [self.name]
        records = self._records
        while stack:
            rec = records.get(stack.pop())
            if rec is None:
                continue
            for other in rec.conn_names:
                if other not in seen and other in records:
                    seen.add(other)
                    stack.append(other)
        return seen

    # --- anti-entropy -----------------------------------------------------------------------

    def digest(self) -> dict[PeerName, tuple[int, int]]:
        """Version vector: name -> (uid, version)."""
        return {n: (r.uid, r.version) for n, r in self._records.items()}

    def digest_hash(self) -> bytes:
        """A 16-byte hash of the version vector (equal hashes => nothing to exchange)."""
        if self._hash is None:
            h = hashlib.blake2b(digest_size=16)
            pack = struct.Struct(">QQQ").pack
            for n in sorted(self._records):
                r = self._records[n]
                h.update(pack(n, r.uid, r.version))
            self._hash = h.digest()
        return self._hash

    def newer_than(self, vector: Mapping[PeerName, tuple[int, int]]) -> list[PeerRecord]:
        """Our records the vector's owner lacks or holds an older version of."""
        out = []
        for n, r in self._records.items():
            theirs = vector.get(n)
            if theirs is None or (r.version, r.uid) > (theirs[1], theirs[0]):
                out.append(r)
        return out

    def wanted_from(self, vector: Mapping[PeerName, tuple[int, int]]) -> list[PeerName]:
        """Names for which the vector's owner holds something newer than we do."""
        out = []
        refused = self._refused
        for n, (uid, version) in vector.items():
            mine = self._records.get(n)
            if mine is None or (version, uid) > (mine.version, mine.uid):
                no = refused.get(n)
                if no is None or (version, uid) > no:
                    out.append(n)
        return out
