"""Denied packets from the kernel: an NFLOG (nfnetlink_log) reader, stdlib only.

The ruleset (:mod:`weft.policy.nft`) drops denied packets itself; before each drop, a rule with a
shared rate limit copies the packet's first bytes to NFLOG group :data:`DEFAULT_GROUP` with a
prefix naming the direction. Verdicts stay in the kernel (this is no NFQUEUE): a slow or absent
reader costs nothing but lost log messages.

Two layers:

* :func:`parse_datagram` — pure: one netlink datagram (the kernel batches several messages per
  datagram) -> the :class:`DeniedPacket` s in it plus a count of malformed messages. Each message is
  parsed by :func:`parse_packet_message`, which raises :class:`NflogParseError` (a ValueError)
  and nothing else; one bad message never hides the others.
* :class:`NflogReader` — a nonblocking NETLINK_NETFILTER socket bound to the group in the caller's
  network namespace (the router's), drained from ``loop.add_reader`` into a callback.

pyroute2 has no nfnetlink_log support, hence the few struct layouts below (linux/netfilter/
nfnetlink_log.h). No ``NFULNL_CFG_CMD_PF_BIND``: it only picks the namespace's *default* logger
(used by ``log`` without ``group`` in other people's rules and by conntrack's invalid-packet
logging); ``log group N`` names its logger explicitly, so binding would change other software's
logging for no gain.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from weft.errors import WeftError
from weft.policy.model import IPAddress

__all__ = [
    "DEFAULT_COPY_RANGE",
    "DEFAULT_GROUP",
    "DeniedPacket",
    "NflogError",
    "NflogParseError",
    "NflogReader",
    "ParsedDatagram",
    "config_message",
    "parse_datagram",
    "parse_packet_message",
    "parse_payload",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP: Final = 4783
# IPv4 with options (60) or IPv6 with a hop-by-hop header, plus the 4 port bytes
DEFAULT_COPY_RANGE: Final = 72

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = 0
NFULNL_MSG_CONFIG: Final = 1
NFULA_PAYLOAD: Final = 9
NFULA_PREFIX: Final = 10
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_NLBUFSIZ: Final = 3
NFULA_CFG_TIMEOUT: Final = 4
NFULA_CFG_QTHRESH: Final = 5
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_COPY_PACKET: Final = 2

NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x01
NLM_F_ACK: Final = 0x04
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLMSGHDR: Final = struct.Struct("=IHHII")
NFGENMSG: Final = struct.Struct("!BBH")  # family, version, res_id (big-endian group)
NLATTR: Final = struct.Struct("=HH")

IPPROTO_ICMP: Final = 1
IPPROTO_ICMPV6: Final = 58
# protocols whose header starts with source and destination port
PORT_PROTOCOLS: Final = frozenset({6, 17, 33, 132, 136})  # TCP UDP DCCP SCTP UDP-Lite
# IPv6 extension headers walked to find the transport header (fragment: 44, handled apart)
_IPV6_EXTENSIONS: Final = frozenset({0, 43, 60, 135, 139, 140})
_IPV6_FRAGMENT: Final = 44
_IPV6_AH: Final = 51

_PACKET_TYPE: Final = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
_CONFIG_TYPE: Final = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG


class NflogParseError(ValueError):
    """One netlink message is not a well-formed NFLOG packet message; the text says why."""


class NflogError(WeftError):
    """The NFLOG socket could not be opened or bound (e.g. the group is taken: EBUSY)."""


@dataclass(frozen=True)
class DeniedPacket:
    """One logged packet: the rule's prefix and the addresses/ports from its headers.

    ``sport``/``dport`` are None for protocols without ports (ICMP), for non-first fragments and
    when the copied bytes end before the transport header.
    """

    prefix: str
    family: int  # 4 or 6
    src: IPAddress
    dst: IPAddress
    protocol: int  # IP protocol number
    sport: int | None
    dport: int | None


@dataclass(frozen=True)
class ParsedDatagram:
    packets: tuple[DeniedPacket, ...]
    bad: int  # messages that failed to parse (each skipped)
    errors: tuple[str, ...]  # their reasons, for a debug log


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    """Netlink attributes from ``offset`` on; type -> value (last one wins)."""
    attrs: dict[int, bytes] = {}
    pos = offset
    while pos < len(data):
        if pos + NLATTR.size > len(data):
            raise NflogParseError(f"truncated attribute header at byte {pos}")
        length, kind = NLATTR.unpack_from(data, pos)
        if length < NLATTR.size or pos + length > len(data):
            raise NflogParseError(f"attribute length {length} at byte {pos} out of bounds")
        attrs[kind & NLA_TYPE_MASK] = data[pos + NLATTR.size : pos + length]
        pos += (length + 3) & ~3
    return attrs


def _ports(protocol: int, l4: bytes) -> tuple[int | None, int | None]:
    if protocol not in PORT_PROTOCOLS or len(l4) < 4:
        return None, None
    sport, dport = struct.unpack_from("!HH", l4)
    return sport, dport


def parse_payload(
    payload: bytes,
) -> tuple[int, IPAddress, IPAddress, int, int | None, int | None]:
    """An IP packet's first bytes -> (family, src, dst, protocol, sport, dport)."""
    if not payload:
        raise NflogParseError("empty payload")
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            raise NflogParseError(f"IPv4 header truncated ({len(payload)} bytes)")
        ihl = (payload[0] & 0x0F) * 4
        if ihl < 20:
            raise NflogParseError(f"IPv4 header length {ihl} < 20")
        protocol = payload[9]
        fragment_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        src4 = ipaddress.IPv4Address(payload[12:16])
        dst4 = ipaddress.IPv4Address(payload[16:20])
        if fragment_offset:
            return 4, src4, dst4, protocol, None, None
        return (4, src4, dst4, protocol, *_ports(protocol, payload[ihl:]))
    if version == 6:
        if len(payload) < 40:
            raise NflogParseError(f"IPv6 header truncated ({len(payload)} bytes)")
        src6 = ipaddress.IPv6Address(payload[8:24])
        dst6 = ipaddress.IPv6Address(payload[24:40])
        protocol, pos = payload[6], 40
        while protocol in _IPV6_EXTENSIONS or protocol in (_IPV6_FRAGMENT, _IPV6_AH):
            if pos + 8 > len(payload):
                return 6, src6, dst6, protocol, None, None  # ends inside the extension headers
            following = payload[pos]
            if protocol == _IPV6_FRAGMENT:
                if struct.unpack_from("!H", payload, pos + 2)[0] & 0xFFF8:
                    return 6, src6, dst6, following, None, None  # not the first fragment
                pos += 8
            elif protocol == _IPV6_AH:
                pos += (payload[pos + 1] + 2) * 4
            else:
                pos += (payload[pos + 1] + 1) * 8
            protocol = following
        return (6, src6, dst6, protocol, *_ports(protocol, payload[pos:]))
    raise NflogParseError(f"IP version {version}")


def parse_packet_message(body: bytes) -> DeniedPacket:
    """The body of one NFULNL_MSG_PACKET message (after the netlink header) -> the packet."""
    if len(body) < NFGENMSG.size:
        raise NflogParseError("message shorter than its nfgenmsg header")
    attrs = _attributes(body, NFGENMSG.size)
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        raise NflogParseError("no NFULA_PAYLOAD (copy mode not packet?)")
    raw_prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0]
    try:
        prefix = raw_prefix.decode("ascii")
    except UnicodeDecodeError:
        raise NflogParseError(f"prefix not ASCII: {raw_prefix!r}") from None
    family, src, dst, protocol, sport, dport = parse_payload(payload)
    return DeniedPacket(prefix, family, src, dst, protocol, sport, dport)


def parse_datagram(data: bytes) -> ParsedDatagram:
    """Every NFLOG packet message in one datagram; malformed ones are counted and skipped.

    A broken netlink header makes the rest of the datagram unwalkable: it counts as one bad
    message and ends the walk. Acks, NOOP and DONE are not packets and not errors.
    """
    packets: list[DeniedPacket] = []
    errors: list[str] = []
    pos = 0
    while pos < len(data):
        if pos + NLMSGHDR.size > len(data):
            errors.append(f"{len(data) - pos} trailing bytes after the last message")
            break
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or pos + length > len(data):
            errors.append(f"message length {length} at byte {pos} out of bounds")
            break
        body = data[pos + NLMSGHDR.size : pos + length]
        pos += (length + 3) & ~3
        if kind == _PACKET_TYPE:
            try:
                packets.append(parse_packet_message(body))
            except NflogParseError as err:
                errors.append(str(err))
        elif kind == NLMSG_ERROR:
            if len(body) >= 4 and struct.unpack_from("=i", body)[0] != 0:
                errors.append(f"netlink error {-struct.unpack_from('=i', body)[0]}")
        elif kind not in (NLMSG_NOOP, NLMSG_DONE):
            errors.append(f"unexpected message type {kind:#x}")
    return ParsedDatagram(tuple(packets), len(errors), tuple(errors))


def _attr(kind: int, value: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def config_message(group: int, seq: int, attrs: list[tuple[int, bytes]], family: int = 0) -> bytes:
    """An NFULNL_MSG_CONFIG request for ``group`` asking for an ack (pure, for tests too)."""
    body = NFGENMSG.pack(family, 0, group) + b"".join(_attr(k, v) for k, v in attrs)
    return (
        NLMSGHDR.pack(NLMSGHDR.size + len(body), _CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        + body
    )


class NflogReader:
    """Reads one NFLOG group in the current network namespace into ``on_packet``.

    ``start()`` binds synchronously, so EPERM (another socket holds the group, or no privilege)
    surfaces as :class:`NflogError` right away; then it reads from the event loop. ``lost`` counts
    the times the kernel dropped messages because our socket buffer was full (ENOBUFS); ``bad``
    counts malformed messages.
    """

    def __init__(
        self,
        on_packet: Callable[[DeniedPacket], None],
        group: int = DEFAULT_GROUP,
        copy_range: int = DEFAULT_COPY_RANGE,
        *,
        flush_centiseconds: int = 20,  # the kernel batches up to this long
        queue_threshold: int = 16,  # or this many messages
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not 0 <= group <= 0xFFFF:
            raise NflogError(f"NFLOG group {group} not in 0..65535")
        self.on_packet = on_packet
        self.group = group
        self.copy_range = copy_range
        self.flush_centiseconds = flush_centiseconds
        self.queue_threshold = queue_threshold
        self.loop = loop
        self.received = 0
        self.bad = 0
        self.lost = 0  # ENOBUFS events (each one or more messages)
        self._sock: socket.socket | None = None

    def start(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as err:
            raise NflogError(f"cannot open a NETLINK_NETFILTER socket: {err}") from err
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, 0))
            sock.settimeout(5.0)
            requests = [
                [(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))],
                [
                    (NFULA_CFG_MODE, struct.pack("!IBx", self.copy_range, NFULNL_COPY_PACKET)),
                    (NFULA_CFG_NLBUFSIZ, struct.pack("!I", 16384)),
                    (NFULA_CFG_TIMEOUT, struct.pack("!I", self.flush_centiseconds)),
                    (NFULA_CFG_QTHRESH, struct.pack("!I", self.queue_threshold)),
                ],
            ]
            for seq, attrs in enumerate(requests, start=1):
                sock.send(config_message(self.group, seq, attrs))
                self._await_ack(sock, seq)
            sock.setblocking(False)
        except (OSError, NflogError) as err:
            sock.close()
            if isinstance(err, NflogError):
                raise
            raise NflogError(f"NFLOG group {self.group}: {err}") from err
        self._sock = sock
        loop = self.loop or asyncio.get_running_loop()
        self.loop = loop
        loop.add_reader(sock.fileno(), self._ready)

    def _await_ack(self, sock: socket.socket, seq: int) -> None:
        while True:
            data = sock.recv(1 << 16)
            pos = 0
            while pos + NLMSGHDR.size <= len(data):
                length, kind, _flags, rseq, _pid = NLMSGHDR.unpack_from(data, pos)
                if length < NLMSGHDR.size:
                    raise NflogError("malformed netlink reply")
                if kind == NLMSG_ERROR and rseq == seq:
                    (code,) = struct.unpack_from("=i", data, pos + NLMSGHDR.size)
                    if code:
                        name = errno.errorcode.get(-code, str(-code))
                        # the kernel answers EPERM when another socket holds the group
                        hint = " (group taken, or no CAP_NET_ADMIN)" if -code == errno.EPERM else ""
                        raise NflogError(f"binding NFLOG group {self.group}: {name}{hint}")
                    return
                pos += (length + 3) & ~3

    def _ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):  # a budget, so a flood cannot starve the loop
            try:
                data = sock.recv(1 << 17)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                log.warning("NFLOG group %s: %s", self.group, err)
                return
            parsed = parse_datagram(data)
            if parsed.bad:
                self.bad += parsed.bad
                log.debug("NFLOG: %d bad messages: %s", parsed.bad, "; ".join(parsed.errors))
            for packet in parsed.packets:
                self.received += 1
                try:
                    self.on_packet(packet)
                except Exception:
                    log.exception("NFLOG callback failed")

    def close(self) -> None:
        """Stop reading; closing the socket releases the group in the kernel."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(sock.fileno())
        sock.close()
