"""The sleeve data plane's core: framing, fragmentation, crypto, heartbeats, PMTU, forwarding.

No I/O: :class:`SleeveCore` takes frames read from the TAP, UDP datagrams and overlay-control
messages together with ``now``, and produces UDP transmissions, frames to write to the TAP,
overlay-control messages and events. :mod:`weft.sleeve.pump` is the asyncio pump around it.

Wire format
===========

Every UDP datagram (port 6783) starts with a 27-byte plaintext header, all integers big endian::

    0   1  version (high 4 bits, = 2) | kind (low 4 bits): 1 data, 2 heartbeat
    1   6  sender: peer name of the hop that sent this datagram (selects the keys)
    7   8  message id: the data-key counter when encrypted, a per-link sequence otherwise
    15  4  message length (the whole sealed message, all fragments together)
    19  4  fragment offset into the message
    23  2  fragment index
    25  2  fragment count

followed, on an encrypted link in a message of two or more fragments, by the fragment's 8-byte
*fragment tag* (below), then the fragment's bytes. A message that fits one datagram is
``index 0, count 1`` and never touches the reassembly buffers. A longer one is cut into
``count`` fragments of ``chunk = ceil(length / count)`` bytes except the last, in index order,
so ``offset == index * chunk``: the cut follows from (length, count) alone and receivers check
every fragment's offset and size against it, which makes overlapping fragments impossible and
lets a fragment that does not fit be dropped on its own (the message's reassembly is untouched).

A message is, when encrypted, ``counter(8) || AEAD(plaintext) || tag(16)`` sealed by
:class:`weft.gossip.crypto.DataSealer` with the data key of the connection's direction and the
first 7 header bytes (version/kind and sender) as associated data; its counter equals the header's
message id, which lets a receiver refuse replayed fragments before buffering them. Unencrypted,
the message is the plaintext itself.

Fragment tags (sleeve version 2, issue #14 item 2): the AEAD authenticates a message only once it
is whole, so the header fields that steer reassembly are authenticated per fragment with one
keyed hash per message, :func:`_fragment_tags`: SHAKE128(tag key || header bytes 0..18 || count)
gives ``8 * count`` bytes, fragment ``i`` carries bytes ``8i .. 8i+8``; the tag key of each
direction is derived from its data key. A fragment whose tag is wrong is dropped before it can
open, take, evict or spoil a reassembly, so without the key nothing reaches reassembly state;
the AEAD still decides on the content. Version 1 had no fragment tags: a peer advertising it is
refused, the connection's info names both versions.

The plaintext of a *data* message is one or more records::

    0   6  source peer (where the frame entered the overlay)
    6   6  destination peer, or 00:00:00:00:00:00 for broadcast / unknown destination
    12  1  flags: bit 0 = the frame starts with a 10-byte virtio_net_hdr
    13  4  frame length
    17  .. frame (virtio_net_hdr + Ethernet frame, or the Ethernet frame alone)

A record's source must be the peer of the link it came over, or a peer the data routes put
that peer on a shortest path from (:meth:`RoutesView.may_relay`); other records are dropped
(``wrong_source_peer``, issue #14 item 8), so a neighbour cannot speak for any peer it likes.

So a TCP super-frame (up to ~64 KB, read from a TAP opened with IFF_VNET_HDR and TSO offloads)
travels as one record in one message, fragmented to the path MTU and re-joined on the far side,
where the virtio_net_hdr goes back to the kernel unchanged. Small frames for the same next hop are
batched into one message up to one datagram; a frame larger than half a datagram leaves at once
in a message of its own (on the per-frame path: one full-size frame, one datagram). How datagrams
are handed to the kernel is local: :func:`gso_batches` lets equal-size ones for one address leave
in one UDP GSO send, which the kernel cuts back into the same datagrams. A relay reassembles,
forwards each record along the routes and fragments again for its own next hop, whose path MTU
may differ.

The plaintext of a *heartbeat* message is ``sequence(4) || token(8) || padding``; heartbeats
double as path-MTU probes, so the whole datagram has exactly the probed size. Each side picks a
random 8-byte *link token* per link and sends it over the control connection (overlay control
message ``0x02 || token(8)``: "echo this; send me a heartbeat now"); heartbeats carry the
receiver's token, and a heartbeat without the right one is neither acknowledged nor allowed to
move the link (counted ``heartbeat_token``). The receiver acknowledges each good heartbeat over
the control connection (``0x01 || sequence(4) || datagram size(4)``).

Where a link sends (issue #14 items 3 and 8): to the address the peer's datagrams come from, but
the address moves only on evidence an off-path sender cannot forge. Encrypted: any authenticated
message (its AEAD opened; a replay is refused by the window). Plaintext: only a heartbeat that
carries our token (which only the control connection's peer learned); plaintext data from any
other address is dropped (``wrong_source``) and answered with our token over the control
connection (at most once per ``heartbeat_pending``), so after a NAT rebinding the peer's next
heartbeat comes at once from its new address and moves the link. Until the peer's token has
arrived a link sends no heartbeats; ours is re-sent each tick until a heartbeat carrying it
arrives (a control message may race the peer's start). Plaintext message ids start at a random
value, so an off-path sender cannot guess them either.

Connection state machine (per remote peer, :class:`_Link`)
==========================================================

``pending`` -> ``established`` on the first acknowledged heartbeat (the overlay then reports the
connection established to the mesh, which makes it eligible for data routes). Heartbeats go every
``heartbeat_pending`` seconds until then, every ``heartbeat_interval`` (1 s) after. With no
acknowledgement for ``silent_after`` (3 s: at least two heartbeats unanswered) the link is
``degraded`` ("silent"): the switch counts it unhealthy and moves the connection to another
healthy datapath if there is one, and status and UI show it. With none for ``heartbeat_timeout``
(15 s) it is ``failed``. Hysteresis against a loaded host: back to ``established`` only after
``recover_acks`` (2) acknowledgements in a row, with no unanswered heartbeat in between. Weave
showed a dead link only after its 60 s heartbeat timeout.

Path MTU (in UDP payload bytes): starts at ``pmtu_min`` (known to work on any IPv4 path), upper
bound = the local underlay MTU minus 28. While searching, every ``probe_timeout`` a ladder of
``probe_ladder`` heartbeats evenly spaced in (confirmed, upper] is sent; an acknowledged size
raises the confirmed value, a probe unanswered within ``probe_timeout`` lowers the upper bound
below its size; the search ends when the two are within ``pmtu_granularity``. Two consecutive
unanswered full-size heartbeats after that mean the path shrank: the datagram size drops to
``pmtu_min`` and the search runs again below the old value. A local EMSGSIZE does the same at
once. The search is repeated every ``reprobe_interval`` to notice a path that grew.

Silence is not a smaller path: a probe's loss counts against its size only if the link was
alive meanwhile. A search probe that times out lowers the upper bound only if some
acknowledgement arrived after it was sent; a full-size heartbeat that times out sends a
``pmtu_min`` heartbeat at once, and counts as a miss only when that small one is acknowledged.
So a cut path (nothing comes back) keeps its MTU, and a path that came back smaller is found.

Frames are never silently lost to the MTU: records larger than a datagram are fragmented. With
``fragment=False`` (for comparison with Weave's behaviour) a frame too large for one datagram is
answered with a synthesized ICMP "fragmentation needed" (IPv4) / "packet too big" (IPv6) frame
written back to the TAP, towards the sender.

Drops are counted by reason in :attr:`SleeveCore.drops`; peer input can only ever cause a drop.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from random import Random
from typing import Any, Final, NamedTuple

from weft.errors import ConfigError, LocalError
from weft.gossip.crypto import (
    DATA_OVERHEAD,
    DEFAULT_DATA_CIPHER,
    DataCipher,
    DataOpener,
    DataPacketError,
    DataSealer,
)
from weft.gossip.peer import PeerName
from weft.overlay import RoutesView
from weft.sleeve.maccache import MacCache, MacCacheConfig

__all__ = [
    "BROADCAST",
    "HEADER_SIZE",
    "KIND_DATA",
    "KIND_HEARTBEAT",
    "RECORD_HEADER_SIZE",
    "VERSION",
    "VNET_HDR_SIZE",
    "LinkEstablished",
    "LinkStatusChanged",
    "SleeveConfig",
    "SleeveCore",
    "SleeveEvent",
    "TapFrame",
    "Transmit",
    "complete_checksum",
    "features_of",
    "gso_batches",
    "icmp_too_big",
    "remote_sleeve",
    "strip_vnet",
]

VERSION: Final = 2  # 1: one AEAD per message, fragment headers unauthenticated (refused now)
KIND_DATA: Final = 1
KIND_HEARTBEAT: Final = 2
_VK_DATA: Final = (VERSION << 4) | KIND_DATA
_VK_HEARTBEAT: Final = (VERSION << 4) | KIND_HEARTBEAT

_HEADER = struct.Struct(">B6sQIIHH")
HEADER_SIZE: Final = _HEADER.size  # 27
_PREFIX = struct.Struct(">B6sQI")  # the part of the header shared by a message's fragments
_TAIL = struct.Struct(">IHH")  # offset, index, count
_CONSTANT_HEADER: Final = _PREFIX.size  # 19 bytes the same in every fragment of a message
_RECORD = struct.Struct(">6s6sBI")
RECORD_HEADER_SIZE: Final = _RECORD.size  # 17
_HEADER_RECORD = struct.Struct(">B6sQIIHH6s6sBI")  # a one-record datagram's two headers
VNET_HDR_SIZE: Final = 10
FLAG_VNET: Final = 0x01
BROADCAST: Final = b"\x00" * 6
_ETH_HEADER: Final = 14
_MIN_RECORD: Final = RECORD_HEADER_SIZE + _ETH_HEADER  # shorter frames are dropped as runts
_IP_UDP_OVERHEAD: Final = 28  # IPv4 20 + UDP 8
_MAX_UDP: Final = 65507  # the largest IPv4 UDP payload
# The largest message: one super-frame record (virtio header + 14 + VLAN 4 + 64 KiB IP) sealed.
MAX_MESSAGE: Final = RECORD_HEADER_SIZE + VNET_HDR_SIZE + 18 + 65535 + DATA_OVERHEAD
# Encrypted links: each fragment of a multi-fragment message carries this after its header.
FRAGMENT_TAG_SIZE: Final = 8
_FRAGMENT_TAG_KEY: Final = b"weft sleeve v2 fragment tags"
_KINDS: Final = frozenset((_VK_DATA, _VK_HEARTBEAT))
_CTRL_HB_ACK: Final = 0x01
_CTRL_TOKEN: Final = 0x02
_TOKEN_SIZE: Final = 8
_HB_BODY: Final = 4 + _TOKEN_SIZE  # sequence, the receiver's token
_ACK = struct.Struct(">BII")
_SEQ = struct.Struct(">I")
_STP_PREFIX: Final = b"\x01\x80\xc2\x00\x00"  # 01:80:c2:00:00:0X, IEEE link-local (STP, LLDP...)
_VNET_F_NEEDS_CSUM: Final = 1
_VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


@dataclass(frozen=True)
class SleeveConfig:
    """Sleeve tuning; the defaults suit a LAN and follow Weave where Weave had a value."""

    port: int = 6783  # UDP port of the sleeve (0: any free port, for tests)
    tap_vnet_hdr: bool = True  # the local TAP delivers/accepts a virtio_net_hdr (super-frames)
    fragment: bool = True  # fragment frames larger than a datagram (False: ICMP too-big instead)
    heartbeat_pending: float = 0.5  # heartbeat period until the first acknowledgement (Weave)
    heartbeat_interval: float = 1.0  # heartbeat period once established (Weave: 10 s)
    silent_after: float = 3.0  # no acknowledgement this long: "degraded" (the link is silent)
    heartbeat_timeout: float = 15.0  # no acknowledgement this long: "failed" (Weave: 60 s)
    recover_acks: int = 2  # acknowledgements in a row that end "degraded"/"failed"
    probe_timeout: float = 1.0  # a PMTU probe unanswered this long failed
    probe_ladder: int = 6  # probes per search round
    pmtu_min: int = 548  # UDP payload every IPv4 path carries (576 - 28); never probed below
    pmtu_granularity: int = 8  # the search stops when confirmed and upper bound are this close
    reprobe_interval: float = 600.0  # repeat the PMTU search to notice a path that grew
    reassembly_timeout: float = 2.0  # an incomplete message is freed after this long
    reassembly_per_peer: int = 64  # incomplete messages kept per peer (oldest evicted)
    reassembly_bytes: int = 32 << 20  # all incomplete messages together, bytes
    max_gso_bytes: int = 65507  # one UDP_SEGMENT send: at most a maximal UDP datagram
    max_gso_segments: int = 64  # kernel UDP_MAX_SEGMENTS (64 on older kernels, 128 on newer)
    mac_cache: MacCacheConfig = field(default_factory=MacCacheConfig)
    cipher: DataCipher = DEFAULT_DATA_CIPHER

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"sleeve port {self.port} is not a UDP port (1..65535, 0: any)")
        if self.pmtu_min < HEADER_SIZE + DATA_OVERHEAD + RECORD_HEADER_SIZE + 64:
            raise ConfigError(f"pmtu_min {self.pmtu_min} is too small for one frame")
        for name in ("heartbeat_pending", "heartbeat_interval", "heartbeat_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sleeve {name} must be positive")
        if not self.heartbeat_interval < self.silent_after <= self.heartbeat_timeout:
            raise ConfigError(
                "sleeve silent_after must be above heartbeat_interval and at most heartbeat_timeout"
            )
        if self.recover_acks < 1:
            raise ConfigError("sleeve recover_acks must be at least 1")
        if self.probe_ladder < 1 or self.pmtu_granularity < 1:
            raise ConfigError("probe_ladder and pmtu_granularity must be at least 1")
        if self.max_gso_segments < 1 or self.max_gso_bytes < self.pmtu_min:
            raise ConfigError("max_gso_segments must be >= 1 and max_gso_bytes >= pmtu_min")


class Transmit(NamedTuple):
    """Datagrams to send to ``addr``: ``pieces`` (a scatter-gather list, so nothing is joined in
    userspace) hold back-to-back datagrams of ``segment`` bytes, the last may be shorter;
    ``segment == 0`` means one datagram (UDP GSO otherwise)."""

    peer: PeerName
    addr: tuple[str, int]
    pieces: tuple[bytes | memoryview, ...]
    segment: int

    @property
    def buffer(self) -> bytes:
        """The datagrams joined (for the paths without scatter-gather, and tests)."""
        return b"".join(self.pieces)


@dataclass(frozen=True)
class LinkEstablished:
    """The link to ``peer`` carried its first acknowledged heartbeat."""

    peer: PeerName


@dataclass(frozen=True)
class LinkStatusChanged:
    """State, MTU or info of the link to ``peer`` changed (for status/UI)."""

    peer: PeerName


SleeveEvent = LinkEstablished | LinkStatusChanged
TapFrame = bytes | bytearray | memoryview | tuple[bytes | memoryview, ...]


class _Reassembly:
    """An incomplete message: its fragments as views, joined once when the last one arrives;
    ``tags``: the fragment tags its fragments must carry (encrypted links)."""

    __slots__ = ("count", "deadline", "got", "kind", "mask", "parts", "tags", "total")

    def __init__(
        self, kind: int, total: int, count: int, deadline: float, tags: bytes | None
    ) -> None:
        self.kind = kind
        self.total = total
        self.count = count
        self.parts: list[bytes | memoryview] = [b""] * count
        self.mask = 0
        self.got = 0
        self.deadline = deadline
        self.tags = tags


class _Link:
    """Everything the sleeve knows about one directly connected peer."""

    def __init__(
        self,
        name: PeerName,
        local_bytes: bytes,
        addr: tuple[str, int],
        sealer: DataSealer | None,
        opener: DataOpener | None,
        superframes: bool,
        upper: int,
        config: SleeveConfig,
        now: float,
        rng: Random,
    ) -> None:
        self.name = name
        self.name_bytes = name.to_bytes(6, "big")
        self.addr = addr
        self.sealer = sealer
        self.opener = opener
        self.superframes = superframes
        # Message ids when not encrypted: a random start, so an off-path sender cannot guess them.
        self.seq = rng.getrandbits(64)
        # Ours: the peer echoes it in its heartbeats (learned over the control connection, which
        # an off-path sender cannot read), the only evidence that moves a plaintext link's address.
        self.token = rng.getrandbits(8 * _TOKEN_SIZE).to_bytes(_TOKEN_SIZE, "big")
        self.peer_token: bytes | None = None  # the peer's, for the heartbeats we send
        self.next_token = now  # when we may send our token again (rate limit)
        self.heard = False  # a heartbeat with our token came: the peer has it
        self.state = "pending"
        self.info = "waiting for the first UDP heartbeat acknowledgement"
        self.ever_established = False
        self.created = now
        self.last_ack: float | None = None
        self.rtt: float | None = None  # heartbeat sent -> its acknowledgement, the last one
        self.pmtu = config.pmtu_min
        self.underlay_upper = upper
        self.upper = upper
        self.searching = True
        self.probes: dict[int, tuple[int, float]] = {}
        self.probe_seq = 0
        self.settled_misses = 0  # full-size heartbeats lost while the path was alive
        self.unconfirmed_misses = 0  # full-size losses waiting for a small heartbeat's answer
        self.recovering = 0  # acknowledgements in a row while degraded or failed
        self.next_tick = now
        self.next_heartbeat = now
        self.next_reprobe = now + config.reprobe_interval
        self.reasm: dict[int, _Reassembly] = {}
        self.pending: list[bytes | memoryview] = []
        self.pending_size = 0
        self.overhead = DATA_OVERHEAD if sealer is not None else 0
        # Associated data of what we send: our header's version/kind byte and our name.
        self.aad_data = bytes([_VK_DATA]) + local_bytes
        self.aad_heartbeat = bytes([_VK_HEARTBEAT]) + local_bytes
        self.send_tag_key: bytes | None = None  # fragment-tag keys (see _fragment_tags)
        self.recv_tag_key: bytes | None = None
        self.addr_changes = 0


class SleeveCore:
    """The sans-I/O sleeve of one router. All methods run on one thread and never block.

    Outputs are taken with :meth:`take_transmits`, :meth:`take_tap_frames`,
    :meth:`take_control` and :meth:`next_event`; records queued for batching leave with
    :meth:`flush`, which the pump calls after draining its input.
    """

    def __init__(
        self, local: PeerName, config: SleeveConfig | None = None, rng: Random | None = None
    ) -> None:
        """``rng``: message-id starts and link tokens (default: the OS's CSPRNG; tests pass a
        seeded one for reproducible wires)."""
        self.config = config or SleeveConfig()
        self._rng: Random = rng if rng is not None else secrets.SystemRandom()
        self.local = local
        self.local_bytes = local.to_bytes(6, "big")
        self.macs = MacCache(self.config.mac_cache)
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()  # rarer events; the hot counters are attributes
        self.tap_frames_in = 0
        self.tap_frames_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0  # UDP payload bytes received / sent, headers included
        self.bytes_out = 0
        self._links: dict[PeerName, _Link] = {}
        self._by_bytes: dict[bytes, _Link] = {}
        self._names: dict[bytes, PeerName] = {}
        self._routes: RoutesView | None = None
        self._dirty: dict[PeerName, _Link] = {}
        self._transmits: list[Transmit] = []
        self._tap: list[TapFrame] = []
        self._control: list[tuple[PeerName, bytes]] = []
        self._events: list[SleeveEvent] = []
        self._reasm_bytes = 0
        self._next_sweep: float | None = None
        self._tail_cache: dict[tuple[int, int], list[bytes]] = {}
        self._column_cache: dict[tuple[int, int, int, int], list[bytes]] = {}
        self._eth = VNET_HDR_SIZE if self.config.tap_vnet_hdr else 0
        self._tap_flags = FLAG_VNET if self.config.tap_vnet_hdr else 0
        self._last_link: _Link | None = None  # the unicast decision of the last TAP frame
        self._last_dst = b""

    # ----------------------------------------------------------------- links

    def add_link(
        self,
        peer: PeerName,
        addr: tuple[str, int],
        now: float,
        *,
        send_key: bytes | None = None,
        recv_key: bytes | None = None,
        superframes: bool = True,
        underlay_mtu: int = 1500,
        cipher: DataCipher | None = None,
    ) -> None:
        """A control connection to ``peer`` completed its handshake; start heartbeating.

        ``addr`` is where to send until the peer's authenticated packets teach us better;
        ``underlay_mtu`` is the local interface MTU towards it (the PMTU search's upper bound).
        Keys come both or neither. Replaces an existing link to the same peer.
        """
        if peer == self.local:
            raise LocalError("a sleeve link to ourselves")
        if (send_key is None) != (recv_key is None):
            raise LocalError("sleeve data keys must be given both or neither")
        self.remove_link(peer)
        use = cipher or self.config.cipher
        sealer = DataSealer(send_key, use) if send_key is not None else None
        opener = DataOpener(recv_key, use) if recv_key is not None else None
        upper = max(self.config.pmtu_min, min(_MAX_UDP, underlay_mtu - _IP_UDP_OVERHEAD))
        link = _Link(
            peer,
            self.local_bytes,
            addr,
            sealer,
            opener,
            superframes,
            upper,
            self.config,
            now,
            self._rng,
        )
        if send_key is not None and recv_key is not None:
            link.send_tag_key = _tag_key(send_key)
            link.recv_tag_key = _tag_key(recv_key)
        self._links[peer] = link
        self._by_bytes[link.name_bytes] = link
        self._send_token(link, now)

    def remove_link(self, peer: PeerName) -> None:
        link = self._links.pop(peer, None)
        if link is None:
            return
        del self._by_bytes[link.name_bytes]
        self._dirty.pop(peer, None)
        for r in link.reasm.values():
            self._reasm_bytes -= r.total
        link.reasm.clear()
        self.macs.forget_peer(peer)

    def routes_changed(self, routes: RoutesView) -> None:
        self._routes = routes

    @property
    def superframes_everywhere(self) -> bool:
        """True when every linked peer accepts records with a virtio_net_hdr (super-frames)."""
        return all(link.superframes for link in self._links.values())

    def link_status(self, peer: PeerName) -> dict[str, Any] | None:
        """``{state, mtu, pmtu, info, addr, encrypted, superframes}`` of the link, or None."""
        link = self._links.get(peer)
        if link is None:
            return None
        return {
            "state": link.state,
            "pmtu": link.pmtu,
            "mtu": self._frame_mtu(link),
            "info": self._info(link),
            "addr": f"{link.addr[0]}:{link.addr[1]}",
            "encrypted": link.sealer is not None,
            "superframes": link.superframes and self.config.tap_vnet_hdr,
            "searching": link.searching,
            "last_ack": link.last_ack,  # the core's clock; None before the first
            "rtt": link.rtt,
        }

    def _frame_mtu(self, link: _Link) -> int:
        """The largest IP packet that crosses this link in one datagram (what Weave called the
        sleeve MTU: 1414 plain, 1390 encrypted on a 1500 underlay)."""
        vnet = VNET_HDR_SIZE if link.superframes and self.config.tap_vnet_hdr else 0
        return link.pmtu - HEADER_SIZE - link.overhead - RECORD_HEADER_SIZE - vnet - _ETH_HEADER

    def _info(self, link: _Link) -> str:
        parts = [f"udp {link.addr[0]}:{link.addr[1]}", f"pmtu {link.pmtu}"]
        if link.searching:
            parts.append("probing")
        parts.append(
            "super-frames" if link.superframes and self.config.tap_vnet_hdr else "per-frame"
        )
        if link.state != "established":
            parts.append(
                link.info if link.peer_token is not None else "waiting for the peer's sleeve token"
            )
        return ", ".join(parts)

    # ----------------------------------------------------------------- outputs

    def take_transmits(self) -> list[Transmit]:
        out, self._transmits = self._transmits, []
        return out

    def take_tap_frames(self) -> list[TapFrame]:
        """Frames for the TAP; a tuple is one frame in pieces (write it with ``writev``)."""
        out, self._tap = self._tap, []
        return out

    def take_control(self) -> list[tuple[PeerName, bytes]]:
        out, self._control = self._control, []
        return out

    def next_event(self) -> SleeveEvent | None:
        return self._events.pop(0) if self._events else None

    # ----------------------------------------------------------------- TAP side

    def frame_from_tap(self, frame: bytes | memoryview, now: float) -> None:
        """A frame the local bridge handed to the TAP (with virtio_net_hdr when configured)."""
        eth = self._eth
        if len(frame) < eth + _ETH_HEADER:
            self.drops["tap_runt"] += 1
            return
        dst = frame[eth : eth + 6]
        multicast = dst[0] & 1
        if multicast and dst[:5] == _STP_PREFIX:
            self.drops["stp"] += 1
            return
        self.tap_frames_in += 1
        src_mac = int.from_bytes(frame[eth + 6 : eth + 12], "big")
        if not src_mac >> 40 & 1:
            self.macs.learn(src_mac, self.local, now)
        routes = self._routes
        if multicast:  # broadcast / multicast
            self._broadcast(self.local, self.local_bytes, self._tap_flags, frame, None)
            return
        owner = self.macs.lookup(int.from_bytes(dst, "big"), now)
        if owner is None:
            self._broadcast(self.local, self.local_bytes, self._tap_flags, frame, None)
            return
        if owner == self.local:
            self.drops["local_destination"] += 1
            return
        hop = routes.unicast_next_hop(owner) if routes is not None else owner
        link = self._links.get(hop) if hop is not None else None
        if link is None:
            self.drops["no_route"] += 1
            return
        if not self.config.fragment and self._too_big(link, frame, self._tap_flags):
            return
        dst_b = _name_bytes(owner)
        self._last_link, self._last_dst = link, dst_b  # for frames_from_tap's next frame
        self._queue(link, self.local_bytes, dst_b, self._tap_flags, frame)

    def frames_from_tap(self, frames: Iterable[bytes | memoryview], now: float) -> None:
        """Frames read from the TAP in one drain, in order (:meth:`frame_from_tap` for each).

        A frame to the same destination from the same source MAC as the frame before it takes
        that frame's decision (owner, next hop, link) without learning and looking up again:
        with one ``now`` nothing can change in between (the only learning is that same source's,
        and routes, links and MAC expiry change only between calls)."""
        eth = self._eth
        flags = self._tap_flags
        local_bytes = self.local_bytes
        queue = self._queue
        last_key = b""
        last_link: _Link | None = None
        last_dst = b""
        memo = self.config.fragment  # fragment=False decides per frame size (ICMP too-big)
        least = eth + _ETH_HEADER
        for frame in frames:
            if memo and last_link is not None and len(frame) >= least:
                key = bytes(frame[eth : eth + 12])
                if key == last_key:
                    self.tap_frames_in += 1
                    queue(last_link, local_bytes, last_dst, flags, frame)
                    continue
            self._last_link = None
            self.frame_from_tap(frame, now)
            last_link = self._last_link
            if last_link is not None:
                last_key = bytes(frame[eth : eth + 12])
                last_dst = self._last_dst
                self._last_link = None

    def _broadcast(
        self,
        src: PeerName,
        src_bytes: bytes,
        flags: int,
        frame: bytes | memoryview,
        came_from: PeerName | None,
    ) -> None:
        routes = self._routes
        if routes is None:
            hops: Iterable[PeerName] = list(self._links) if src == self.local else []
        else:
            hops = routes.broadcast_next_hops(src)
        for hop in hops:
            if hop in (came_from, src):
                continue
            link = self._links.get(hop)
            if link is None:
                self.drops["no_route"] += 1
                continue
            self._queue(link, src_bytes, BROADCAST, flags, frame)

    def _too_big(self, link: _Link, frame: bytes | memoryview, flags: int) -> bool:
        """``fragment=False`` mode: answer frames that need more than one datagram with ICMP."""
        eth = VNET_HDR_SIZE if flags & FLAG_VNET else 0
        if flags & FLAG_VNET and frame[1] != 0:  # GSO super-frames are always fragmented
            return False
        room = link.pmtu - HEADER_SIZE - link.overhead - RECORD_HEADER_SIZE
        if len(frame) <= room:
            return False
        icmp = icmp_too_big(memoryview(frame)[eth:], room - eth - _ETH_HEADER)
        self.drops["too_big"] += 1
        if icmp is not None:
            self._tap.append(bytes(VNET_HDR_SIZE) + icmp if self.config.tap_vnet_hdr else icmp)
            self.stats["icmp_too_big"] += 1
        return True

    # ----------------------------------------------------------------- batching and sending

    def _queue(
        self, link: _Link, src: bytes, dst: bytes, flags: int, frame: bytes | memoryview
    ) -> None:
        if flags & FLAG_VNET and not link.superframes:
            stripped = strip_vnet(frame)
            if stripped is None:
                self.drops["needs_offload"] += 1
                return
            frame, flags = stripped, flags & ~FLAG_VNET
        n = len(frame)
        size = RECORD_HEADER_SIZE + n
        room = link.pmtu - HEADER_SIZE - link.overhead
        if size > room // 2:
            # No record as large could join this one (a full-MTU frame on the per-frame path, or
            # a fragmented one), only a rare tiny one: a message of its own now, after what
            # waits, as batching would.
            if link.pending:
                self._flush_link(link)
            if link.sealer is None and size <= room:  # _send_message's one-datagram case, inline
                msg_id = link.seq
                link.seq = (msg_id + 1) & 0xFFFFFFFFFFFFFFFF
                self.messages_out += 1
                self.bytes_out += HEADER_SIZE + size
                # datagram header and record header in one buffer: one iovec less per datagram
                head = _HEADER_RECORD.pack(
                    _VK_DATA, self.local_bytes, msg_id, size, 0, 0, 1, src, dst, flags, n
                )
                self._transmits.append(Transmit(link.name, link.addr, (head, frame), 0))
                return
            self._send_message(link, _VK_DATA, (_RECORD.pack(src, dst, flags, n), frame))
            return
        if link.pending_size + size > room:
            self._flush_link(link)
        link.pending.append(_RECORD.pack(src, dst, flags, n))
        link.pending.append(frame)
        link.pending_size += size
        self._dirty[link.name] = link

    def flush(self) -> None:
        """Send every batch still waiting (call after draining the inputs)."""
        if self._dirty:
            for link in self._dirty.values():
                self._flush_link(link)
            self._dirty.clear()

    def _flush_link(self, link: _Link) -> None:
        if link.pending:
            parts, link.pending, link.pending_size = link.pending, [], 0
            self._send_message(link, _VK_DATA, parts)

    def _send_message(
        self, link: _Link, vk: int, parts: Iterable[bytes | memoryview], single: bool = False
    ) -> None:
        pieces: list[bytes | memoryview]
        sealer = link.sealer
        if sealer is not None:
            msg_id = sealer.next_counter
            blob = sealer.seal(
                b"".join(parts), link.aad_data if vk == _VK_DATA else link.aad_heartbeat
            )
            pieces = [blob]
            total = len(blob)
            ftag = FRAGMENT_TAG_SIZE
        else:
            msg_id = link.seq
            link.seq = (link.seq + 1) & 0xFFFFFFFFFFFFFFFF
            pieces = list(parts)
            total = sum(map(len, pieces))
            ftag = 0
        pmtu = link.pmtu
        self.messages_out += 1
        if total <= pmtu - HEADER_SIZE or single:
            self.bytes_out += HEADER_SIZE + total
            header = _HEADER.pack(vk, self.local_bytes, msg_id, total, 0, 0, 1)
            self._transmits.append(Transmit(link.name, link.addr, (header, *pieces), 0))
            return
        # The cut follows from (length, count) alone: chunk = ceil(length / count), so the
        # fragment tags, which bind length and count, authenticate every offset and size too.
        count = -(-total // (pmtu - HEADER_SIZE - ftag))
        chunk = -(-total // count)
        segment = HEADER_SIZE + ftag + chunk
        self.bytes_out += (HEADER_SIZE + ftag) * count + total
        frags = _fragments(pieces, chunk)
        tails = self._tails(chunk, count)
        prefix = _PREFIX.pack(vk, self.local_bytes, msg_id, total)
        per_send = max(1, min(self.config.max_gso_segments, self.config.max_gso_bytes // segment))
        if ftag:  # each fragment's tail and tag in one piece
            assert link.send_tag_key is not None
            tags = _fragment_tags(link.send_tag_key, prefix, count)
            tails = [t + tags[i * ftag : i * ftag + ftag] for i, t in enumerate(tails)]
        for index in range(0, count, per_send):
            stop = min(count, index + per_send)
            n = stop - index
            # prefix, tail, payload for each fragment, interleaved by slice assignment (C speed)
            out: list[bytes | memoryview] = [prefix] * (3 * n)
            out[1::3] = tails[index:stop]
            out[2::3] = frags[index:stop]
            self._transmits.append(
                Transmit(link.name, link.addr, tuple(out), segment if n > 1 else 0)
            )

    def _tail_columns(self, chunk: int, index: int, run: int, count: int) -> list[bytes]:
        """Byte j of the tails of fragments ``index .. index + run``, for each j (cached)."""
        key = (chunk, index, run, count)
        columns = self._column_cache.get(key)
        if columns is None:
            if len(self._column_cache) > 1024:
                self._column_cache.clear()
            tails = self._tails(chunk, count)[index : index + run]
            columns = [bytes(t[j] for t in tails) for j in range(_TAIL.size)]
            self._column_cache[key] = columns
        return columns

    def _tails(self, chunk: int, count: int) -> list[bytes]:
        """``offset || index || count`` of every fragment, cached per cut."""
        key = (chunk, count)
        tails = self._tail_cache.get(key)
        if tails is None:
            if len(self._tail_cache) > 256:
                self._tail_cache.clear()
            tails = [_TAIL.pack(i * chunk, i, count) for i in range(count)]
            self._tail_cache[key] = tails
        return tails

    # ----------------------------------------------------------------- UDP side

    def datagrams_received(
        self, buf: bytes, addr: tuple[str, int], now: float, segment: int = 0
    ) -> None:
        """One received buffer: a datagram, or with UDP GRO several of ``segment`` bytes each."""
        n = len(buf)
        self.bytes_in += n
        if segment <= 0 or segment >= n:
            self._datagram(buf, 0, n, addr, now)
            return
        view = memoryview(buf)
        start = 0
        while start < n:
            # A run needs a multi-fragment message (count >= 2); per-frame datagrams skip it.
            if (
                n - start > segment >= HEADER_SIZE  # (GRO of runts: no header to look at)
                and (buf[start + 25] or buf[start + 26] > 1)
            ):
                done = self._run(buf, view, start, n, segment, addr, now)
                if done:
                    start = done
                    continue
            self._datagram(view, start, min(n, start + segment), addr, now)
            start += segment

    def _run(
        self,
        raw: bytes,
        view: memoryview,
        start: int,
        n: int,
        segment: int,
        addr: tuple[str, int],
        now: float,
    ) -> int:
        """GRO fast path: consecutive fragments of one message sitting in order from ``start``.

        A coalesced buffer usually holds a long run of one super-frame's fragments back to back
        (the whole message, or the part that one GSO send carried). The run's headers (and, when
        encrypted, fragment tags) are checked against the expected ones in one pass; a complete
        message is joined directly, a partial run goes into the reassembly buffer in one step.
        Returns where the run ended, or 0 when anything is unusual (then the general path takes
        each datagram, which is always safe: nothing here changed any state yet).
        """
        header: tuple[int, bytes, int, int, int, int, int] = _HEADER.unpack_from(view, start)
        vk, sender, msg_id, total, offset, index, count = header
        link = self._by_bytes.get(sender)
        if link is None:
            return 0
        opener = link.opener
        ftag = FRAGMENT_TAG_SIZE if opener is not None else 0
        chunk = segment - HEADER_SIZE - ftag
        if count < 2 or vk not in _KINDS or total > MAX_MESSAGE or offset != index * chunk:
            return 0
        if count > self._max_count(total) or chunk != -(-total // count):
            return 0
        if opener is None and link.addr != addr:
            return 0  # the general path refuses each
        last = total - (count - 1) * chunk  # the last fragment's size
        # How many of this message's fragments can follow in this buffer.
        run = min(count - index, (n - start + segment - 1) // segment)
        if run < 2:
            return 0
        end = (
            start
            + (run - 1) * segment
            + (HEADER_SIZE + ftag + last if index + run == count else segment)
        )
        if end > n or (end < n and index + run == count and last != chunk):
            return 0
        # Check every header of the run column by column: byte j of all of them is one strided
        # slice (C speed), instead of unpacking each header in Python.
        last_pos = start + (run - 1) * segment + 1
        first = raw[start : start + HEADER_SIZE]
        for j in range(_CONSTANT_HEADER):
            if raw[start + j : last_pos + j : segment].count(first[j]) != run:
                return 0
        for j, column in enumerate(self._tail_columns(chunk, index, run, count)):
            if (
                raw[start + _CONSTANT_HEADER + j : last_pos + _CONSTANT_HEADER + j : segment]
                != column
            ):
                return 0
        reasm = link.reasm.get(msg_id)
        if reasm is not None and (reasm.total != total or reasm.count != count or reasm.kind != vk):
            return 0
        tags: bytes | None = None
        if opener is not None:
            try:
                opener.check(msg_id)
            except DataPacketError as err:
                self.drops[err.reason] += run
                return end
            assert link.recv_tag_key is not None
            tags = reasm.tags if reasm is not None else None
            if tags is None:
                tags = _fragment_tags(link.recv_tag_key, first[:_CONSTANT_HEADER], count)
            got = b"".join(
                [raw[p + HEADER_SIZE : p + HEADER_SIZE + ftag] for p in range(start, end, segment)]
            )
            if got != tags[index * ftag : (index + run) * ftag]:
                return 0  # a forged fragment among them: one by one, it alone is dropped
        skip = HEADER_SIZE + ftag
        parts: list[bytes | memoryview] = [
            view[p + skip : p + segment] for p in range(start, end - segment, segment)
        ]
        parts.append(view[start + (run - 1) * segment + skip : end])
        if run == count:
            self.stats["reassembled"] += 1
            self._assembled(link, vk, msg_id, parts, total, addr, segment, now)
            return end
        if reasm is None:
            reasm = self._reassembly_for(link, msg_id, vk, total, count, run, now, tags)
            if reasm is None:
                return end
        bits = ((1 << run) - 1) << index
        if reasm.mask & bits:
            return 0  # duplicates: let the general path sort them out
        reasm.parts[index : index + run] = parts
        reasm.mask |= bits
        reasm.got += run
        if reasm.got == count:
            del link.reasm[msg_id]
            self._reasm_bytes -= total
            self.stats["reassembled"] += 1
            self._assembled(link, vk, msg_id, reasm.parts, total, addr, segment, now)
        return end

    def _datagram(
        self, buf: bytes | memoryview, start: int, end: int, addr: tuple[str, int], now: float
    ) -> None:
        if end - start < HEADER_SIZE:
            self.drops["truncated"] += 1
            return
        vk, sender, msg_id, total, offset, index, count = _HEADER.unpack_from(buf, start)
        if vk not in _KINDS:
            self.drops["malformed"] += 1
            return
        link = self._by_bytes.get(sender)
        if link is None:
            self.drops["unknown_peer"] += 1
            return
        opener = link.opener
        ftag = FRAGMENT_TAG_SIZE if opener is not None and count > 1 else 0
        size = end - start - HEADER_SIZE - ftag
        if total > MAX_MESSAGE:
            self.drops["oversize"] += 1
            return
        if count <= 1 or index >= count:
            bad = count == 0 or index != 0 or offset != 0 or size != total
        else:
            # the cut follows from (length, count): every offset and size is known in advance
            chunk = -(-total // count)
            want = chunk if index < count - 1 else total - (count - 1) * chunk
            bad = (
                index >= count
                or count > self._max_count(total)
                or want <= 0
                or size != want
                or offset != index * chunk
            )
        if bad:
            self.drops["malformed"] += 1
            return
        if opener is not None:
            try:
                opener.check(msg_id)
            except DataPacketError as err:
                self.drops[err.reason] += 1
                return
        elif link.addr != addr and vk != _VK_HEARTBEAT:
            # Plaintext from elsewhere proves nothing; only a heartbeat carrying our token
            # moves the link. Ask the peer for one (our token again, rate-limited).
            self._wrong_source(link, now)
            return
        payload = buf[start + HEADER_SIZE + ftag : end]
        if count == 1:
            if opener is None and vk == _VK_DATA:  # _message's plain data case, inline
                self.messages_in += 1
                self._records(link, payload, now)
                return
            self._message(link, vk, msg_id, payload, addr, end - start, now)
            return
        if opener is None and link.addr != addr:  # (a plaintext heartbeat is one datagram)
            self._wrong_source(link, now)
            return
        reasm = link.reasm.get(msg_id)
        if reasm is not None and (reasm.total != total or reasm.count != count or reasm.kind != vk):
            # Another cut under the same id: not the message being reassembled (encrypted: its
            # tag cannot be right). Only this datagram goes; the reassembly is left alone.
            self.drops["malformed"] += 1
            return
        tags: bytes | None = None
        if opener is not None:
            assert link.recv_tag_key is not None
            tags = reasm.tags if reasm is not None else None
            if tags is None:
                prefix = bytes(buf[start : start + _CONSTANT_HEADER])
                tags = _fragment_tags(link.recv_tag_key, prefix, count)
            at = start + HEADER_SIZE
            if buf[at : at + ftag] != tags[index * ftag : (index + 1) * ftag]:
                # Forged (or damaged): dropped before it can open, take or spoil any slot.
                self.drops["fragment_tag"] += 1
                return
        if reasm is None:
            reasm = self._reassembly_for(link, msg_id, vk, total, count, 1, now, tags)
            if reasm is None:
                return
        bit = 1 << index
        if reasm.mask & bit:
            self.drops["duplicate"] += 1
            return
        reasm.parts[index] = payload
        reasm.mask |= bit
        reasm.got += 1
        if reasm.got == count:
            del link.reasm[msg_id]
            self._reasm_bytes -= total
            self.stats["reassembled"] += 1
            self._assembled(link, vk, msg_id, reasm.parts, total, addr, end - start, now)

    def _max_count(self, total: int) -> int:
        """No sender cuts smaller than ``pmtu_min`` datagrams, which bounds the fragment count
        (and so what one incomplete message can hold)."""
        return total // (self.config.pmtu_min - HEADER_SIZE - FRAGMENT_TAG_SIZE) + 1

    def _reassembly_for(
        self,
        link: _Link,
        msg_id: int,
        vk: int,
        total: int,
        count: int,
        fragments: int,
        now: float,
        tags: bytes | None,
    ) -> _Reassembly | None:
        """A new reassembly of ``msg_id`` within the memory bounds (encrypted: opened only for a
        fragment whose tag was right); None when the ``fragments`` just received must be dropped
        (counted here)."""
        if self._reasm_bytes + total > self.config.reassembly_bytes:
            self.drops["reassembly_full"] += fragments
            return None
        if len(link.reasm) >= self.config.reassembly_per_peer:
            oldest = next(iter(link.reasm))
            self._reasm_bytes -= link.reasm.pop(oldest).total
            self.drops["reassembly_evicted"] += 1
        reasm = _Reassembly(vk, total, count, now + self.config.reassembly_timeout, tags)
        link.reasm[msg_id] = reasm
        self._reasm_bytes += total
        if self._next_sweep is None:
            self._next_sweep = reasm.deadline
        return reasm

    def _assembled(
        self,
        link: _Link,
        vk: int,
        msg_id: int,
        parts: list[bytes | memoryview],
        total: int,
        addr: tuple[str, int],
        dgram_size: int,
        now: float,
    ) -> None:
        """A complete multi-fragment message. The common case, an unencrypted super-frame for
        this host, goes to the TAP as the list of fragments (one ``writev``, no join here)."""
        first = parts[0]
        eth = self._eth
        if (
            link.opener is None
            and vk == _VK_DATA
            and self._tap_flags
            and len(first) >= RECORD_HEADER_SIZE + eth + _ETH_HEADER
        ):
            src_b, dst_b, flags, length = _RECORD.unpack_from(first, 0)
            if (
                dst_b == self.local_bytes
                and flags == FLAG_VNET
                and RECORD_HEADER_SIZE + length == total
                and src_b != self.local_bytes
                and src_b != BROADCAST
                and (src_b == link.name_bytes or self._relay_ok(src_b, link, count=False))
            ):
                self.messages_in += 1
                mac_at = RECORD_HEADER_SIZE + eth + 6
                src_mac = int.from_bytes(first[mac_at : mac_at + 6], "big")
                if not src_mac >> 40 & 1:
                    self.macs.learn(src_mac, self._peer(src_b), now)
                self.tap_frames_out += 1
                self._tap.append((first[RECORD_HEADER_SIZE:], *parts[1:]))
                return
        self._message(link, vk, msg_id, b"".join(parts), addr, dgram_size, now)

    def _peer(self, name_bytes: bytes) -> PeerName:
        src = self._names.get(name_bytes)
        if src is None:
            src = PeerName(int.from_bytes(name_bytes, "big"))
            if len(self._names) > 65536:
                self._names.clear()
            self._names[name_bytes] = src
        return src

    def _message(
        self,
        link: _Link,
        vk: int,
        msg_id: int,
        blob: bytes | bytearray | memoryview,
        addr: tuple[str, int],
        dgram_size: int,
        now: float,
    ) -> None:
        opener = link.opener
        plain: bytes | bytearray | memoryview
        if opener is not None:
            aad = bytes([vk]) + link.name_bytes
            try:
                plain = opener.open(blob, aad)
            except DataPacketError as err:
                self.drops[err.reason] += 1
                return
            if int.from_bytes(blob[:8], "big") != msg_id:
                self.drops["malformed"] += 1
                return
            if link.addr != addr:  # authenticated: the peer's address moved (NAT rebinding)
                self._moved(link, addr)
        else:
            plain = blob
        self.messages_in += 1
        if vk == _VK_HEARTBEAT:
            if len(plain) < _HB_BODY:
                self.drops["malformed"] += 1
                return
            if not secrets.compare_digest(bytes(plain[4:_HB_BODY]), link.token):
                # Not from the peer we gave our token to: neither acknowledged (a forged ack
                # could confirm a path MTU) nor allowed to move the link.
                self.drops["heartbeat_token"] += 1
                self._send_token(link, now)
                return
            link.heard = True
            if link.addr != addr:  # the token proves it: the peer's address moved
                self._moved(link, addr)
            (seq,) = _SEQ.unpack_from(plain, 0)
            self._control.append((link.name, _ACK.pack(_CTRL_HB_ACK, seq, dgram_size)))
            return
        self._records(link, plain, now)

    def _moved(self, link: _Link, addr: tuple[str, int]) -> None:
        link.addr = addr
        link.addr_changes += 1
        self._events.append(LinkStatusChanged(link.name))

    def _wrong_source(self, link: _Link, now: float) -> None:
        self.drops["wrong_source"] += 1
        self._send_token(link, now)

    def _send_token(self, link: _Link, now: float) -> None:
        """Tell the peer our token over the control connection (at most once per
        ``heartbeat_pending``); it answers with a heartbeat carrying it, from wherever it is."""
        if now < link.next_token:
            return
        link.next_token = now + self.config.heartbeat_pending
        self._control.append((link.name, bytes((_CTRL_TOKEN,)) + link.token))

    def _records(self, link: _Link, plain: bytes | bytearray | memoryview, now: float) -> None:
        view = memoryview(plain)
        n = len(view)
        pos = 0
        unpack = _RECORD.unpack_from
        local_bytes = self.local_bytes
        names = self._names
        plain_tap = not self.config.tap_vnet_hdr
        while pos < n:
            if n - pos < RECORD_HEADER_SIZE:
                self.drops["malformed"] += 1
                return
            src_b, dst_b, flags, length = unpack(view, pos)
            start = pos + RECORD_HEADER_SIZE
            pos = start + length
            if pos > n:
                self.drops["malformed"] += 1
                return
            frame = view[start:pos]
            eth = VNET_HDR_SIZE if flags & FLAG_VNET else 0
            if length < eth + _ETH_HEADER or flags & ~FLAG_VNET:
                self.drops["malformed"] += 1
                continue
            if src_b == local_bytes:
                self.drops["looped"] += 1
                continue
            if src_b == BROADCAST:
                self.drops["malformed"] += 1
                continue
            src = names.get(src_b) or self._peer(src_b)
            if src_b != link.name_bytes and not self._relay_ok(src_b, link):
                continue
            src_mac = int.from_bytes(frame[eth + 6 : eth + 12], "big")
            if not src_mac >> 40 & 1:
                self.macs.learn(src_mac, src, now)
            if dst_b == local_bytes:
                if plain_tap and not flags:  # _deliver's per-frame case, inline
                    self.tap_frames_out += 1
                    self._tap.append(frame)
                else:
                    self._deliver(frame, flags)
            elif dst_b == BROADCAST:
                self._deliver(frame, flags)
                self._broadcast(src, src_b, flags, frame, link.name)
            else:
                routes = self._routes
                dst = PeerName(int.from_bytes(dst_b, "big"))
                hop = routes.unicast_next_hop(dst) if routes is not None else None
                next_link = self._links.get(hop) if hop is not None else None
                if next_link is None or hop == link.name:
                    self.drops["no_route"] += 1
                    continue
                self.stats["relayed"] += 1
                self._queue(next_link, src_b, dst_b, flags, frame)

    def _relay_ok(self, src_b: bytes, link: _Link, count: bool = True) -> bool:
        """A record from ``src_b`` relayed by ``link``'s peer: only if the routes put that peer
        on a shortest path from ``src_b`` to us (#14 item 8: a neighbour cannot speak for any
        peer it likes, e.g. to poison the MAC table with another peer's containers)."""
        routes = self._routes
        if routes is not None and routes.may_relay(self._peer(src_b), link.name):
            return True
        if count:
            self.drops["wrong_source_peer"] += 1
        return False

    def _deliver(self, frame: memoryview, flags: int) -> None:
        self.tap_frames_out += 1
        if flags & FLAG_VNET:
            if self.config.tap_vnet_hdr:
                self._tap.append(frame)
                return
            stripped = strip_vnet(frame)
            if stripped is None:
                self.drops["needs_offload"] += 1
                return
            self._tap.append(stripped)
        elif self.config.tap_vnet_hdr:
            self._tap.append(bytes(VNET_HDR_SIZE) + frame)
        else:
            self._tap.append(frame)

    # ----------------------------------------------------------------- control side

    def control_received(self, peer: PeerName, payload: bytes, now: float) -> None:
        """An overlay-control message from ``peer``'s sleeve: a heartbeat acknowledgement, or the
        peer's token (its heartbeats from us must carry it; send one now)."""
        link = self._links.get(peer)
        if link is None:
            return
        if len(payload) == 1 + _TOKEN_SIZE and payload[0] == _CTRL_TOKEN:
            link.peer_token = bytes(payload[1:])
            self._heartbeat(link, link.pmtu, now)
            return
        if len(payload) != _ACK.size or payload[0] != _CTRL_HB_ACK:
            self.drops["control_malformed"] += 1
            return
        _, seq, _size = _ACK.unpack(payload)
        probe = link.probes.pop(seq, None)
        link.last_ack = now  # the peer answered over the control connection: the path lives
        if probe is None:
            return  # forgotten (a late answer to a probe already counted as lost): size unknown
        link.rtt = max(0.0, now - probe[1])
        changed = False
        if probe[0] < link.pmtu:
            # A small liveness heartbeat: the path is alive, so the full-size losses were real.
            link.settled_misses += link.unconfirmed_misses
            link.unconfirmed_misses = 0
            if self._check_shrunk(link, now):
                self._events.append(LinkStatusChanged(peer))
            return
        link.settled_misses = link.unconfirmed_misses = 0
        if probe[0] > link.pmtu:
            link.pmtu = probe[0]
            link.upper = max(link.upper, link.pmtu)
            changed = True
        if link.state == "pending":
            link.state = "established"
            link.info = ""
            changed = True
            if not link.ever_established:
                link.ever_established = True
                self._events.append(LinkEstablished(peer))
        elif link.state != "established":
            link.recovering += 1
            if link.recovering >= self.config.recover_acks:
                link.state = "established"
                link.info = ""
                link.recovering = 0
                changed = True
        if link.searching and link.upper - link.pmtu < self.config.pmtu_granularity:
            link.searching = False
            link.probes.clear()
            changed = True
        if changed:
            self._events.append(LinkStatusChanged(peer))

    def send_too_big(self, peer: PeerName, size: int, now: float) -> None:
        """The local stack refused a datagram of ``size`` bytes (EMSGSIZE): the path shrank."""
        link = self._links.get(peer)
        if link is None or size <= self.config.pmtu_min:
            return
        link.upper = min(link.upper, size - 1)
        if link.pmtu >= size:
            link.pmtu = self.config.pmtu_min
        link.searching = True
        link.next_tick = now
        self._events.append(LinkStatusChanged(peer))

    # ----------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        deadlines = [link.next_tick for link in self._links.values()]
        if self._next_sweep is not None:
            deadlines.append(self._next_sweep)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for link in list(self._links.values()):
            if link.next_tick <= now:
                self._tick(link, now)
        if self._next_sweep is not None and self._next_sweep <= now:
            self._sweep(now)
        self.macs.expire(now)
        self.flush()

    def _sweep(self, now: float) -> None:
        nearest: float | None = None
        for link in self._links.values():
            reasm = link.reasm
            while reasm:
                msg_id, r = next(iter(reasm.items()))
                if r.deadline > now:
                    if nearest is None or r.deadline < nearest:
                        nearest = r.deadline
                    break
                del reasm[msg_id]
                self._reasm_bytes -= r.total
                self.drops["reassembly_timeout"] += 1
        self._next_sweep = nearest

    def _tick(self, link: _Link, now: float) -> None:
        cfg = self.config
        changed = False
        if not link.heard:  # the peer may not have our token (a control message lost in a race)
            self._send_token(link, now)
        for seq, (size, sent) in list(link.probes.items()):
            if now - sent < cfg.probe_timeout:
                continue
            del link.probes[seq]
            if size >= link.pmtu:
                link.recovering = 0  # hysteresis: recovery needs answers in a row
            alive = link.last_ack is not None and link.last_ack >= sent
            if size > link.pmtu:
                if alive:  # lost while others came back: too big (silence proves nothing)
                    link.upper = min(link.upper, size - 1)
            elif size == link.pmtu and link.state != "pending" and not link.searching:
                # Lost at full size: ask with a small heartbeat whether the path is alive.
                link.unconfirmed_misses += 1
                if link.pmtu > cfg.pmtu_min:
                    self._heartbeat(link, cfg.pmtu_min, now)
        changed = self._check_shrunk(link, now) or changed
        if not link.searching and now >= link.next_reprobe and link.state == "established":
            link.upper = max(link.pmtu, link.underlay_upper)
            link.searching = link.upper - link.pmtu >= cfg.pmtu_granularity
        if link.searching and link.state == "established":
            # Only a proven path is probed: before the peer answers anything, a lost probe says
            # nothing about its size.
            link.next_reprobe = now + cfg.reprobe_interval
            if not any(size > link.pmtu for size, _ in link.probes.values()):
                if link.upper - link.pmtu < cfg.pmtu_granularity:
                    link.searching = False
                    changed = True
                else:
                    span = link.upper - link.pmtu
                    sizes = sorted(
                        {
                            link.pmtu + span * i // cfg.probe_ladder
                            for i in range(1, cfg.probe_ladder + 1)
                        }
                    )
                    for size in sizes:
                        if size > link.pmtu:
                            self._heartbeat(link, size, now)
        if link.state != "established" or now >= link.next_heartbeat:
            self._heartbeat(link, link.pmtu, now)
            link.next_heartbeat = now + (
                cfg.heartbeat_interval if link.state == "established" else cfg.heartbeat_pending
            )
        since = link.last_ack if link.last_ack is not None else link.created
        silent = now - since
        if silent >= cfg.heartbeat_timeout and link.state != "failed":
            link.state = "failed"
            link.info = f"UDP heartbeats unanswered for {cfg.heartbeat_timeout:g}s"
            link.recovering = 0
            changed = True
        elif silent >= cfg.silent_after and link.state == "established":
            link.state = "degraded"
            link.info = f"silent: no UDP heartbeat answered for {cfg.silent_after:g}s"
            link.recovering = 0
            changed = True
        if changed:
            self._events.append(LinkStatusChanged(link.name))
        fast = link.searching or link.state != "established" or bool(link.probes)
        link.next_tick = min(
            link.next_heartbeat,
            now
            + (min(cfg.probe_timeout, cfg.heartbeat_pending) if fast else cfg.heartbeat_interval),
        )
        if link.probes:
            link.next_tick = min(
                link.next_tick, min(s for _, s in link.probes.values()) + cfg.probe_timeout
            )
        if link.state == "established" and link.last_ack is not None:
            link.next_tick = min(link.next_tick, max(now, link.last_ack + cfg.silent_after))

    def _check_shrunk(self, link: _Link, now: float) -> bool:
        """Two full-size heartbeats lost while the path was alive: it shrank; search again."""
        cfg = self.config
        if link.settled_misses < 2 or link.pmtu <= cfg.pmtu_min:
            return False
        link.upper = link.pmtu - 1
        link.pmtu = cfg.pmtu_min
        link.searching = True
        link.settled_misses = link.unconfirmed_misses = 0
        link.next_tick = min(link.next_tick, now)
        return True

    def _heartbeat(self, link: _Link, size: int, now: float) -> None:
        token = link.peer_token
        if token is None:
            return  # the peer's token has not come over the control connection yet
        seq = link.probe_seq
        link.probe_seq = (seq + 1) & 0xFFFFFFFF
        body = size - HEADER_SIZE - link.overhead
        link.probes[seq] = (size, now)
        self._send_message(
            link,
            _VK_HEARTBEAT,
            (_SEQ.pack(seq), token, bytes(max(0, body - _HB_BODY))),
            single=True,
        )

    # ----------------------------------------------------------------- status

    def status(self, now: float) -> dict[str, Any]:
        return {
            "drops": dict(self.drops),
            "stats": {
                **self.stats,
                "tap_frames_in": self.tap_frames_in,
                "tap_frames_out": self.tap_frames_out,
                "messages_in": self.messages_in,
                "messages_out": self.messages_out,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
            },
            "macs": len(self.macs),
            "mac_moves": self.macs.moves,
            "reassembly_bytes": self._reasm_bytes,
            "links": {str(p): self.link_status(p) for p in self._links},
        }


# --------------------------------------------------------------------- frame helpers


def _tag_key(data_key: bytes) -> bytes:
    """The fragment-tag key of one direction, derived from its data key."""
    return hashlib.blake2b(_FRAGMENT_TAG_KEY, key=data_key, digest_size=32).digest()


def _fragment_tags(key: bytes, prefix: bytes | memoryview, count: int) -> bytes:
    """The ``count`` fragment tags of one message, back to back: a keyed SHAKE128 (KMAC-style
    prefix key) of the header bytes every fragment shares (version/kind, sender, message id,
    length) and the count; fragment ``i`` carries bytes ``8i .. 8i+8``. One call per message;
    together with the cut following from (length, count) they authenticate every header field
    that steers reassembly, before anything is buffered (the message's AEAD still
    authenticates the content)."""
    return hashlib.shake_128(key + bytes(prefix) + count.to_bytes(2, "big")).digest(
        FRAGMENT_TAG_SIZE * count
    )


_NAME_BYTES: dict[int, bytes] = {}


def _name_bytes(name: int) -> bytes:
    """A peer name as its 6 wire bytes (cached: it is needed for every unicast frame)."""
    raw = _NAME_BYTES.get(name)
    if raw is None:
        if len(_NAME_BYTES) > 65536:
            _NAME_BYTES.clear()
        raw = _NAME_BYTES[name] = name.to_bytes(6, "big")
    return raw


def gso_batches(transmits: list[Transmit], max_segments: int, max_bytes: int) -> list[Transmit]:
    """Single datagrams for one address merged into UDP GSO sends (local syscall batching).

    Consecutive single-datagram transmissions (``segment == 0``) to the same address whose sizes
    are equal join one :class:`Transmit` with ``segment`` = that size; a shorter one may close the
    run (GSO's short last segment). The kernel cuts the send back into exactly the datagrams it
    was made of, so the wire is unchanged: a receiver without UDP GRO (or without super-frame
    support) sees the same separate datagrams as without batching, each still sealed on its own.
    Order per address is kept (a batch leaves before anything later to the same address); at most
    ``max_segments`` datagrams and ``max_bytes`` bytes per send. Anything else passes unchanged,
    heartbeats too: they are path-MTU probes and must cross the path as the datagrams they are
    (a GSO buffer can pass a veth or bridge whose MTU its segments exceed, which would confirm
    a size the real path drops).
    """
    if len(transmits) < 2:
        return transmits
    out: list[Transmit] = []
    # address -> [index in out, size, count, bytes, pieces, closed]
    open_: dict[tuple[str, int], list[Any]] = {}

    def close(batch: list[Any]) -> None:
        if batch[2] > 1:
            first = out[batch[0]]
            out[batch[0]] = Transmit(first.peer, first.addr, tuple(batch[4]), batch[1])

    for t in transmits:
        batch = open_.get(t.addr)
        if t.segment or t.pieces[0][0] != _VK_DATA:
            if batch is not None:
                close(batch)
                del open_[t.addr]
            out.append(t)
            continue
        size = 0
        for piece in t.pieces:
            size += len(piece)
        if batch is not None:
            if (
                not batch[5]
                and size <= batch[1]
                and batch[2] < max_segments
                and batch[3] + size <= max_bytes
            ):
                batch[2] += 1
                batch[3] += size
                batch[4].extend(t.pieces)
                batch[5] = size < batch[1]
                continue
            close(batch)
        open_[t.addr] = [len(out), size, 1, size, list(t.pieces), False]
        out.append(t)
    for batch in open_.values():
        close(batch)
    return out


def _fragments(parts: list[bytes | memoryview], chunk: int) -> list[bytes | memoryview]:
    """Each ``chunk``-sized fragment of the concatenation of ``parts`` as one buffer: views where
    a fragment lies inside one part (the common cases), a small join where it straddles."""
    if len(parts) == 1:
        view = memoryview(parts[0])
        return [view[o : o + chunk] for o in range(0, len(view), chunk)]
    if len(parts) == 2 and len(parts[0]) < chunk:  # record header + one large frame
        head, body = parts[0], memoryview(parts[1])
        first = chunk - len(head)
        out: list[bytes | memoryview] = [bytes(head) + body[:first]]
        out += [body[o : o + chunk] for o in range(first, len(body), chunk)]
        return out
    return [c[0] if len(c) == 1 else b"".join(c) for c in _cut(parts, chunk)]


def _cut(parts: list[bytes | memoryview], chunk: int) -> list[list[bytes | memoryview]]:
    """The pieces of each ``chunk``-sized fragment of the concatenation of ``parts``, as views
    (nothing is copied; the kernel gathers them)."""
    if len(parts) == 1:
        view = memoryview(parts[0])
        return [[view[o : o + chunk]] for o in range(0, len(view), chunk)]
    if len(parts) == 2 and len(parts[0]) < chunk:  # record header + one large frame
        head, body = parts[0], memoryview(parts[1])
        first = chunk - len(head)
        return [[head, body[:first]]] + [
            [body[o : o + chunk]] for o in range(first, len(body), chunk)
        ]
    out: list[list[bytes | memoryview]] = []
    current: list[bytes | memoryview] = []
    room = chunk
    for part in parts:
        view = memoryview(part)
        pos, n = 0, len(view)
        while pos < n:
            take = min(room, n - pos)
            current.append(view[pos : pos + take])
            pos += take
            room -= take
            if room == 0:
                out.append(current)
                current, room = [], chunk
    if current:
        out.append(current)
    return out


def strip_vnet(frame: bytes | memoryview) -> bytes | None:
    """Drop the virtio_net_hdr for a peer or TAP without one; finish a partial checksum.

    A GSO super-frame cannot be passed on that way (None)."""
    flags, gso_type, _hl, _gs, csum_start, csum_offset = _VNET_HDR.unpack_from(frame, 0)
    if gso_type != 0:
        return None
    eth = bytes(frame[VNET_HDR_SIZE:])
    if flags & _VNET_F_NEEDS_CSUM:
        completed = complete_checksum(eth, csum_start, csum_offset)
        if completed is None:
            return None
        return completed
    return eth


def _ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 sum of ``data`` (padded to even length): the sum of 16-bit words mod 0xffff.

    One big-integer conversion does it at C speed: 2**16 == 1 (mod 0xffff)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big") % 0xFFFF
    return value if value or not any(data) else 0xFFFF


def complete_checksum(frame: bytes, csum_start: int, csum_offset: int) -> bytes | None:
    """Finish a CHECKSUM_PARTIAL frame: the field at ``csum_start + csum_offset`` holds the
    pseudo-header sum; the one's complement of the sum from ``csum_start`` goes there."""
    where = csum_start + csum_offset
    if csum_start >= len(frame) or where + 2 > len(frame):
        return None
    out = bytearray(frame)
    total = _ones_complement_sum(memoryview(out)[csum_start:])
    csum = (~total) & 0xFFFF
    out[where : where + 2] = csum.to_bytes(2, "big")
    return bytes(out)


def _checksum(data: bytes | bytearray) -> int:
    return (~_ones_complement_sum(data)) & 0xFFFF


def icmp_too_big(eth_frame: bytes | memoryview, mtu: int) -> bytes | None:
    """An Ethernet frame answering ``eth_frame`` with ICMP "fragmentation needed" (IPv4, DF set)
    or ICMPv6 "packet too big", advertising ``mtu``; None when no answer applies."""
    frame = bytes(eth_frame)
    if len(frame) < _ETH_HEADER + 20:
        return None
    dst_mac, src_mac, ethertype = frame[0:6], frame[6:12], frame[12:14]
    ip = frame[_ETH_HEADER:]
    if ethertype == b"\x08\x00" and ip[0] >> 4 == 4:
        ihl = (ip[0] & 0x0F) * 4
        if ihl < 20 or len(ip) < ihl or not ip[6] & 0x40:  # no DF: the sender may fragment
            return None
        quoted = ip[: ihl + 8]
        icmp = bytearray(b"\x03\x04\x00\x00\x00\x00" + max(68, mtu).to_bytes(2, "big") + quoted)
        icmp[2:4] = _checksum(icmp).to_bytes(2, "big")
        total = 20 + len(icmp)
        hdr = bytearray(
            b"\x45\x00"
            + total.to_bytes(2, "big")
            + b"\x00\x00\x40\x00\x40\x01\x00\x00"
            + ip[16:20]
            + ip[12:16]
        )
        hdr[10:12] = _checksum(hdr).to_bytes(2, "big")
        return src_mac + dst_mac + b"\x08\x00" + bytes(hdr) + bytes(icmp)
    if ethertype == b"\x86\xdd" and ip[0] >> 4 == 6 and len(ip) >= 40:
        quoted = ip[: max(0, min(len(ip), 1280 - 48))]
        body = bytearray(b"\x02\x00\x00\x00" + max(1280, mtu).to_bytes(4, "big") + quoted)
        src, dst = ip[24:40], ip[8:24]
        pseudo = src + dst + len(body).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
        body[2:4] = _checksum(pseudo + bytes(body)).to_bytes(2, "big")
        hdr6 = b"\x60\x00\x00\x00" + len(body).to_bytes(2, "big") + b"\x3a\x40" + src + dst
        return src_mac + dst_mac + b"\x86\xdd" + hdr6 + bytes(body)
    return None


def features_of(config: SleeveConfig) -> dict[str, Any]:
    """What the sleeve advertises in the handshake hello (flat scalar features, as the hello
    allows): ``sleeve_version``, ``sleeve_port``, ``sleeve_superframes``, ``sleeve_cipher``."""
    return {
        "sleeve_version": VERSION,
        "sleeve_port": config.port,
        "sleeve_superframes": config.tap_vnet_hdr,
        "sleeve_cipher": config.cipher,
    }


def remote_sleeve(features: Mapping[str, Any]) -> dict[str, Any] | None:
    """The remote's sleeve features, validated; None when it has no (compatible) sleeve."""
    if features.get("sleeve_version") != VERSION:
        return None
    port = features.get("sleeve_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    cipher = features.get("sleeve_cipher")
    return {
        "port": port,
        "superframes": features.get("sleeve_superframes") is True,
        "cipher": cipher if isinstance(cipher, str) else None,
    }
