"""The Open vSwitch kernel datapath, driven over generic netlink (no ovs-vswitchd, no OVS tools).

Four generic netlink families (include/uapi/linux/openvswitch.h): ``ovs_datapath``,
``ovs_vport``, ``ovs_flow``, ``ovs_packet``. Every message is ``nlmsghdr`` + ``genlmsghdr`` +
``struct ovs_header { int dp_ifindex; }`` + netlink attributes.

The encoding is ours, in two layers, both pure and tested byte for byte offline:

* :class:`GenlMessage` and the attribute helpers (:func:`nla`, :func:`parse_attrs`): the wire.
* Typed values: :class:`FlowKey`/:class:`TunnelKey` (flow keys and masks),
  :class:`OutputAction`/:class:`SetTunnelAction`, :class:`DatapathInfo`, :class:`VportInfo`,
  :class:`FlowInfo`, :class:`Upcall`, each with ``encode``/``decode``.

:class:`OvsClient` does the I/O: pyroute2's ``GenericNetlinkSocket`` resolves the family ids once,
then requests go over a plain netlink socket of ours (exact bytes, sequence numbers, acks) and
miss upcalls arrive on a second, non-blocking one whose port id is given to the kernel as the
upcall pid (``fileno()`` for ``loop.add_reader``).

How weft uses it (as Weave's "bridged fastdp"): a datapath ``weft-dp`` whose ports are a vxlan
vport (UDP 6784) and a netdev vport on a veth into the Linux bridge ``weft`` (containers stay on
the bridge). Frames from the bridge miss, come up as upcalls, and the router installs flows keyed
on in-port + Ethernet src/dst (+ tunnel id/addresses for what arrives from the vxlan port) with
actions ``set(tunnel) + output(vxlan)`` or ``output(bridge port)``. VNIs are Weave's:
``src_short_id | dst_short_id << 12`` (see vxlan.py for the Linux VXLAN network VNI).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from weft.errors import ConfigError
from weft.fastdp.errors import DatapathError, wrap_os_error

__all__ = [
    "OVSP_LOCAL",
    "Action",
    "DatapathInfo",
    "FlowInfo",
    "FlowKey",
    "GenlMessage",
    "OutputAction",
    "OvsClient",
    "SetTunnelAction",
    "TunnelKey",
    "UnknownAction",
    "Upcall",
    "VportInfo",
    "VportType",
    "decode_actions",
    "encode_actions",
    "exact_mask",
    "nla",
    "pair_vni",
    "parse_attrs",
]

# -- constants from include/uapi/linux/openvswitch.h ----------------------------------------------

OVS_DATAPATH_FAMILY = "ovs_datapath"
OVS_VPORT_FAMILY = "ovs_vport"
OVS_FLOW_FAMILY = "ovs_flow"
OVS_PACKET_FAMILY = "ovs_packet"
OVS_DATAPATH_VERSION = 2
OVS_VPORT_VERSION = 1
OVS_FLOW_VERSION = 1
OVS_PACKET_VERSION = 1

OVSP_LOCAL = 0

# ovs_datapath_cmd / ovs_vport_cmd / ovs_flow_cmd share numbering
CMD_NEW, CMD_DEL, CMD_GET, CMD_SET = 1, 2, 3, 4
# ovs_packet_cmd
OVS_PACKET_CMD_MISS, OVS_PACKET_CMD_ACTION, OVS_PACKET_CMD_EXECUTE = 1, 2, 3

# ovs_datapath_attr
OVS_DP_ATTR_NAME = 1
OVS_DP_ATTR_UPCALL_PID = 2
OVS_DP_ATTR_STATS = 3
OVS_DP_ATTR_MEGAFLOW_STATS = 4
OVS_DP_ATTR_USER_FEATURES = 5
OVS_DP_F_UNALIGNED = 1 << 0
OVS_DP_F_VPORT_PIDS = 1 << 1

# ovs_packet_attr
OVS_PACKET_ATTR_PACKET = 1
OVS_PACKET_ATTR_KEY = 2
OVS_PACKET_ATTR_ACTIONS = 3
OVS_PACKET_ATTR_USERDATA = 4

# ovs_vport_attr
OVS_VPORT_ATTR_PORT_NO = 1
OVS_VPORT_ATTR_TYPE = 2
OVS_VPORT_ATTR_NAME = 3
OVS_VPORT_ATTR_OPTIONS = 4
OVS_VPORT_ATTR_UPCALL_PID = 5
OVS_VPORT_ATTR_STATS = 6
OVS_VPORT_ATTR_IFINDEX = 8
OVS_TUNNEL_ATTR_DST_PORT = 1  # in OVS_VPORT_ATTR_OPTIONS, u16 host order

# ovs_flow_attr
OVS_FLOW_ATTR_KEY = 1
OVS_FLOW_ATTR_ACTIONS = 2
OVS_FLOW_ATTR_STATS = 3
OVS_FLOW_ATTR_TCP_FLAGS = 4
OVS_FLOW_ATTR_USED = 5
OVS_FLOW_ATTR_CLEAR = 6
OVS_FLOW_ATTR_MASK = 7

# ovs_key_attr
OVS_KEY_ATTR_ENCAP = 1
OVS_KEY_ATTR_PRIORITY = 2
OVS_KEY_ATTR_IN_PORT = 3
OVS_KEY_ATTR_ETHERNET = 4
OVS_KEY_ATTR_ETHERTYPE = 6
OVS_KEY_ATTR_SKB_MARK = 15
OVS_KEY_ATTR_TUNNEL = 16

# ovs_tunnel_key_attr (note: ID is attribute type 0)
OVS_TUNNEL_KEY_ATTR_ID = 0
OVS_TUNNEL_KEY_ATTR_IPV4_SRC = 1
OVS_TUNNEL_KEY_ATTR_IPV4_DST = 2
OVS_TUNNEL_KEY_ATTR_TOS = 3
OVS_TUNNEL_KEY_ATTR_TTL = 4
OVS_TUNNEL_KEY_ATTR_DONT_FRAGMENT = 5
OVS_TUNNEL_KEY_ATTR_CSUM = 6
OVS_TUNNEL_KEY_ATTR_TP_SRC = 9
OVS_TUNNEL_KEY_ATTR_TP_DST = 10

# ovs_action_attr
OVS_ACTION_ATTR_OUTPUT = 1
OVS_ACTION_ATTR_USERSPACE = 2
OVS_ACTION_ATTR_SET = 3

# netlink
NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ECHO = 0x08  # OVS answers NEW/DEL/SET by notification: ECHO sends it to us too
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLA_TYPE_MASK = 0x3FFF
NLMSGHDR = struct.Struct("=IHHII")
GENL_OVS_HDR = struct.Struct("=BBHi")  # genlmsghdr (cmd, version, reserved) + ovs_header
HEADER_SIZE = NLMSGHDR.size + GENL_OVS_HDR.size


class VportType:
    NETDEV = 1
    INTERNAL = 2
    GRE = 3
    VXLAN = 4
    GENEVE = 5
    NAMES: ClassVar[dict[int, str]] = {
        1: "netdev",
        2: "internal",
        3: "gre",
        4: "vxlan",
        5: "geneve",
    }


def pair_vni(src_short_id: int, dst_short_id: int) -> int:
    """Weave's per-pair VNI for OVS tunnels: ``src | dst << 12`` (12-bit short ids)."""
    if not (0 <= src_short_id < 4096 and 0 <= dst_short_id < 4096):
        raise ConfigError("short ids must fit in 12 bits")
    return src_short_id | dst_short_id << 12


# -- attributes ------------------------------------------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute: ``len u16, type u16, payload``, padded to 4 bytes."""
    if len(payload) > 0xFFFF - 4:
        raise ConfigError(f"netlink attribute {kind} too large ({len(payload)} bytes)")
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def nla_str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """Attributes in order (type with flag bits masked off); DatapathError when malformed."""
    out = []
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4 or pos + length > len(data):
            raise DatapathError("decode netlink attributes", f"bad attribute length {length}")
        out.append((kind & NLA_TYPE_MASK, bytes(data[pos + 4 : pos + length])))
        pos += (length + 3) & ~3
    return out


def _attr_dict(data: bytes) -> dict[int, bytes]:
    return dict(parse_attrs(data))


def _u32(payload: bytes) -> int:
    if len(payload) != 4:
        raise DatapathError("decode netlink attribute", f"u32 of {len(payload)} bytes")
    return int(struct.unpack_from("=I", payload)[0])


def _need(attrs: dict[int, bytes], kind: int, what: str) -> bytes:
    if kind not in attrs:
        raise DatapathError(f"decode {what}", f"attribute {kind} missing")
    return attrs[kind]


def _cstr(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


def _mac_bytes(mac: str | None) -> bytes:
    if mac is None:
        return bytes(6)
    parts = mac.split(":")
    if len(parts) != 6:
        raise ConfigError(f"invalid MAC address {mac!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"invalid MAC address {mac!r}") from None


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ip_bytes(ip: str) -> bytes:
    try:
        return ipaddress.IPv4Address(ip).packed
    except ValueError:
        raise ConfigError(f"invalid IPv4 address {ip!r}") from None


# -- the generic netlink message ----------------------------------------------------------------


@dataclass(frozen=True)
class GenlMessage:
    """``nlmsghdr`` + ``genlmsghdr`` + ``ovs_header`` + raw attributes."""

    family: int  # nlmsg_type: the family id resolved at start
    cmd: int
    dp_ifindex: int = 0
    attrs: bytes = b""
    version: int = 1
    flags: int = NLM_F_REQUEST
    seq: int = 0
    pid: int = 0

    def encode(self) -> bytes:
        body = GENL_OVS_HDR.pack(self.cmd, self.version, 0, self.dp_ifindex) + self.attrs
        head = NLMSGHDR.pack(NLMSGHDR.size + len(body), self.family, self.flags, self.seq, self.pid)
        return head + body

    @classmethod
    def decode(cls, data: bytes) -> GenlMessage:
        if len(data) < HEADER_SIZE:
            raise DatapathError("decode OVS message", f"{len(data)} bytes is too short")
        length, family, flags, seq, pid = NLMSGHDR.unpack_from(data)
        if length > len(data) or length < HEADER_SIZE:
            raise DatapathError("decode OVS message", f"bad length {length}")
        cmd, version, _reserved, dp_ifindex = GENL_OVS_HDR.unpack_from(data, NLMSGHDR.size)
        return cls(
            family=family,
            cmd=cmd,
            dp_ifindex=dp_ifindex,
            attrs=bytes(data[HEADER_SIZE:length]),
            version=version,
            flags=flags,
            seq=seq,
            pid=pid,
        )

    def attr_dict(self) -> dict[int, bytes]:
        return _attr_dict(self.attrs)


def split_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """A netlink datagram -> ``(type, flags, seq, whole message bytes)`` for each message."""
    out = []
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or pos + length > len(data):
            raise DatapathError("decode netlink reply", f"bad message length {length}")
        out.append((kind, flags, seq, bytes(data[pos : pos + length])))
        pos += (length + 3) & ~3
    return out


# -- flow keys and masks ------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelKey:
    """Tunnel metadata: in a flow key (what arrived), a mask, or a set-tunnel action."""

    tun_id: int | None = None  # the VNI for VXLAN (be64 on the wire)
    ipv4_src: str | None = None
    ipv4_dst: str | None = None
    tos: int | None = None
    ttl: int | None = None
    dont_fragment: bool = False
    csum: bool = False
    tp_dst: int | None = None

    def encode(self) -> bytes:
        out = b""
        if self.tun_id is not None:
            out += nla(OVS_TUNNEL_KEY_ATTR_ID, struct.pack("!Q", self.tun_id))
        if self.ipv4_src is not None:
            out += nla(OVS_TUNNEL_KEY_ATTR_IPV4_SRC, _ip_bytes(self.ipv4_src))
        if self.ipv4_dst is not None:
            out += nla(OVS_TUNNEL_KEY_ATTR_IPV4_DST, _ip_bytes(self.ipv4_dst))
        if self.tos is not None:
            out += nla(OVS_TUNNEL_KEY_ATTR_TOS, bytes([self.tos]))
        if self.ttl is not None:
            out += nla(OVS_TUNNEL_KEY_ATTR_TTL, bytes([self.ttl]))
        if self.dont_fragment:
            out += nla(OVS_TUNNEL_KEY_ATTR_DONT_FRAGMENT, b"")
        if self.csum:
            out += nla(OVS_TUNNEL_KEY_ATTR_CSUM, b"")
        if self.tp_dst is not None:
            out += nla(OVS_TUNNEL_KEY_ATTR_TP_DST, struct.pack("!H", self.tp_dst))
        return out

    @classmethod
    def decode(cls, data: bytes) -> TunnelKey:
        a = _attr_dict(data)

        def ip(kind: int) -> str | None:
            raw = a.get(kind)
            return str(ipaddress.IPv4Address(raw)) if raw is not None and len(raw) == 4 else None

        def byte(kind: int) -> int | None:
            raw = a.get(kind)
            return raw[0] if raw else None

        tun_id = a.get(OVS_TUNNEL_KEY_ATTR_ID)
        tp_dst = a.get(OVS_TUNNEL_KEY_ATTR_TP_DST)
        return cls(
            tun_id=struct.unpack("!Q", tun_id)[0] if tun_id and len(tun_id) == 8 else None,
            ipv4_src=ip(OVS_TUNNEL_KEY_ATTR_IPV4_SRC),
            ipv4_dst=ip(OVS_TUNNEL_KEY_ATTR_IPV4_DST),
            tos=byte(OVS_TUNNEL_KEY_ATTR_TOS),
            ttl=byte(OVS_TUNNEL_KEY_ATTR_TTL),
            dont_fragment=OVS_TUNNEL_KEY_ATTR_DONT_FRAGMENT in a,
            csum=OVS_TUNNEL_KEY_ATTR_CSUM in a,
            tp_dst=struct.unpack("!H", tp_dst)[0] if tp_dst and len(tp_dst) == 2 else None,
        )


@dataclass(frozen=True)
class FlowKey:
    """The parts of a flow key weft uses. As a mask, set values are bit masks.

    Ethernet is always encoded (both addresses; an absent one is zero), so flows are Ethernet
    flows; EtherType is left out, which the kernel treats as wildcarded when a mask is given.
    """

    in_port: int | None = None
    eth_src: str | None = None
    eth_dst: str | None = None
    ethertype: int | None = None
    tunnel: TunnelKey | None = None
    priority: int | None = None
    skb_mark: int | None = None

    def encode(self) -> bytes:
        out = b""
        if self.priority is not None:
            out += nla_u32(OVS_KEY_ATTR_PRIORITY, self.priority)
        if self.tunnel is not None:
            out += nla(OVS_KEY_ATTR_TUNNEL, self.tunnel.encode())
        if self.in_port is not None:
            out += nla_u32(OVS_KEY_ATTR_IN_PORT, self.in_port)
        if self.skb_mark is not None:
            out += nla_u32(OVS_KEY_ATTR_SKB_MARK, self.skb_mark)
        out += nla(OVS_KEY_ATTR_ETHERNET, _mac_bytes(self.eth_src) + _mac_bytes(self.eth_dst))
        if self.ethertype is not None:
            out += nla(OVS_KEY_ATTR_ETHERTYPE, struct.pack("!H", self.ethertype))
        return out

    @classmethod
    def decode(cls, data: bytes) -> FlowKey:
        """Decode what the kernel reports (unknown key attributes are ignored)."""
        a = _attr_dict(data)
        eth = a.get(OVS_KEY_ATTR_ETHERNET)
        etype = a.get(OVS_KEY_ATTR_ETHERTYPE)
        tun = a.get(OVS_KEY_ATTR_TUNNEL)
        return cls(
            in_port=_u32(a[OVS_KEY_ATTR_IN_PORT]) if OVS_KEY_ATTR_IN_PORT in a else None,
            eth_src=_mac_text(eth[0:6]) if eth and len(eth) == 12 else None,
            eth_dst=_mac_text(eth[6:12]) if eth and len(eth) == 12 else None,
            ethertype=struct.unpack("!H", etype)[0] if etype and len(etype) == 2 else None,
            tunnel=TunnelKey.decode(tun) if tun is not None else None,
            priority=_u32(a[OVS_KEY_ATTR_PRIORITY]) if OVS_KEY_ATTR_PRIORITY in a else None,
            skb_mark=_u32(a[OVS_KEY_ATTR_SKB_MARK]) if OVS_KEY_ATTR_SKB_MARK in a else None,
        )


def exact_mask(key: FlowKey) -> FlowKey:
    """A mask matching exactly the fields set in ``key`` and wildcarding the rest."""
    tunnel = None
    if key.tunnel is not None:
        t = key.tunnel
        tunnel = TunnelKey(
            tun_id=0xFFFFFFFFFFFFFFFF if t.tun_id is not None else None,
            ipv4_src="255.255.255.255" if t.ipv4_src is not None else None,
            ipv4_dst="255.255.255.255" if t.ipv4_dst is not None else None,
            # The kernel wants TTL in tunnel keys; it is never worth matching on.
            ttl=0 if t.ttl is not None else None,
        )
    full = "ff:ff:ff:ff:ff:ff"
    return FlowKey(
        in_port=0xFFFFFFFF if key.in_port is not None else None,
        eth_src=full if key.eth_src is not None else None,
        eth_dst=full if key.eth_dst is not None else None,
        tunnel=tunnel,
    )


# -- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputAction:
    port: int


@dataclass(frozen=True)
class SetTunnelAction:
    """Set tunnel metadata for the next output to a tunnel vport (needs id, dst and ttl)."""

    tunnel: TunnelKey


@dataclass(frozen=True)
class UnknownAction:
    kind: int
    payload: bytes


Action = OutputAction | SetTunnelAction | UnknownAction


def encode_actions(actions: Iterable[Action]) -> bytes:
    out = b""
    for action in actions:
        if isinstance(action, OutputAction):
            out += nla_u32(OVS_ACTION_ATTR_OUTPUT, action.port)
        elif isinstance(action, SetTunnelAction):
            t = action.tunnel
            if t.tun_id is None or t.ipv4_dst is None or t.ttl is None:
                raise ConfigError("set-tunnel needs tun_id, ipv4_dst and ttl")
            out += nla(OVS_ACTION_ATTR_SET, nla(OVS_KEY_ATTR_TUNNEL, t.encode()))
        else:
            out += nla(action.kind, action.payload)
    return out


def decode_actions(data: bytes) -> list[Action]:
    out: list[Action] = []
    for kind, payload in parse_attrs(data):
        if kind == OVS_ACTION_ATTR_OUTPUT and len(payload) == 4:
            out.append(OutputAction(_u32(payload)))
        elif kind == OVS_ACTION_ATTR_SET:
            inner = _attr_dict(payload)
            if OVS_KEY_ATTR_TUNNEL in inner:
                out.append(SetTunnelAction(TunnelKey.decode(inner[OVS_KEY_ATTR_TUNNEL])))
            else:
                out.append(UnknownAction(kind, payload))
        else:
            out.append(UnknownAction(kind, payload))
    return out


# -- typed replies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatapathInfo:
    name: str
    ifindex: int
    hits: int = 0
    missed: int = 0
    lost: int = 0
    flows: int = 0
    user_features: int = 0

    @classmethod
    def decode(cls, msg: GenlMessage) -> DatapathInfo:
        a = msg.attr_dict()
        stats = a.get(OVS_DP_ATTR_STATS, b"")
        hit = missed = lost = flows = 0
        if len(stats) >= 32:
            hit, missed, lost, flows = struct.unpack_from("=4Q", stats)
        feats = a.get(OVS_DP_ATTR_USER_FEATURES)
        return cls(
            name=_cstr(a.get(OVS_DP_ATTR_NAME, b"")),
            ifindex=msg.dp_ifindex,
            hits=hit,
            missed=missed,
            lost=lost,
            flows=flows,
            user_features=_u32(feats) if feats and len(feats) == 4 else 0,
        )


@dataclass(frozen=True)
class VportInfo:
    dp_ifindex: int
    port_no: int
    type: int
    name: str
    upcall_pids: tuple[int, ...] = ()
    dst_port: int | None = None  # tunnel vports
    ifindex: int | None = None
    rx_packets: int = 0
    tx_packets: int = 0

    @property
    def type_name(self) -> str:
        return VportType.NAMES.get(self.type, str(self.type))

    @classmethod
    def decode(cls, msg: GenlMessage) -> VportInfo:
        a = msg.attr_dict()
        pids = a.get(OVS_VPORT_ATTR_UPCALL_PID, b"")
        options = _attr_dict(a.get(OVS_VPORT_ATTR_OPTIONS, b""))
        dst = options.get(OVS_TUNNEL_ATTR_DST_PORT)
        stats = a.get(OVS_VPORT_ATTR_STATS, b"")
        rx = tx = 0
        if len(stats) >= 16:
            rx, tx = struct.unpack_from("=2Q", stats)
        ifindex = a.get(OVS_VPORT_ATTR_IFINDEX)
        return cls(
            dp_ifindex=msg.dp_ifindex,
            port_no=_u32(_need(a, OVS_VPORT_ATTR_PORT_NO, "vport")),
            type=_u32(_need(a, OVS_VPORT_ATTR_TYPE, "vport")),
            name=_cstr(a.get(OVS_VPORT_ATTR_NAME, b"")),
            upcall_pids=struct.unpack(f"={len(pids) // 4}I", pids[: len(pids) // 4 * 4]),
            dst_port=struct.unpack("=H", dst)[0] if dst and len(dst) == 2 else None,
            ifindex=_u32(ifindex) if ifindex and len(ifindex) == 4 else None,
            rx_packets=rx,
            tx_packets=tx,
        )


@dataclass(frozen=True)
class FlowInfo:
    key: FlowKey
    mask: FlowKey | None
    actions: tuple[Action, ...]
    packets: int = 0
    bytes: int = 0
    used_ms: int | None = None  # kernel monotonic milliseconds of the last hit

    @classmethod
    def decode(cls, msg: GenlMessage) -> FlowInfo:
        a = msg.attr_dict()
        stats = a.get(OVS_FLOW_ATTR_STATS, b"")
        packets = nbytes = 0
        if len(stats) >= 16:
            packets, nbytes = struct.unpack_from("=2Q", stats)
        used = a.get(OVS_FLOW_ATTR_USED)
        return cls(
            key=FlowKey.decode(a.get(OVS_FLOW_ATTR_KEY, b"")),
            mask=FlowKey.decode(a[OVS_FLOW_ATTR_MASK]) if OVS_FLOW_ATTR_MASK in a else None,
            actions=tuple(decode_actions(a.get(OVS_FLOW_ATTR_ACTIONS, b""))),
            packets=packets,
            bytes=nbytes,
            used_ms=struct.unpack("=Q", used)[0] if used and len(used) == 8 else None,
        )


@dataclass(frozen=True)
class Upcall:
    """A packet the datapath sent up: a flow-table miss (or a userspace action)."""

    cmd: int
    dp_ifindex: int
    packet: bytes
    key: FlowKey
    raw_key: bytes = field(repr=False, default=b"")

    @property
    def is_miss(self) -> bool:
        return self.cmd == OVS_PACKET_CMD_MISS

    @classmethod
    def decode(cls, msg: GenlMessage) -> Upcall:
        a = msg.attr_dict()
        if OVS_PACKET_ATTR_PACKET not in a or OVS_PACKET_ATTR_KEY not in a:
            raise DatapathError("decode OVS upcall", "packet or key missing")
        raw_key = a[OVS_PACKET_ATTR_KEY]
        return cls(
            cmd=msg.cmd,
            dp_ifindex=msg.dp_ifindex,
            packet=a[OVS_PACKET_ATTR_PACKET],
            key=FlowKey.decode(raw_key),
            raw_key=raw_key,
        )


# -- request builders (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class Families:
    datapath: int
    vport: int
    flow: int
    packet: int


def dp_new(fam: Families, name: str, upcall_pid: int) -> GenlMessage:
    attrs = (
        nla_str(OVS_DP_ATTR_NAME, name)
        + nla_u32(OVS_DP_ATTR_UPCALL_PID, upcall_pid)
        + nla_u32(OVS_DP_ATTR_USER_FEATURES, OVS_DP_F_UNALIGNED | OVS_DP_F_VPORT_PIDS)
    )
    return GenlMessage(fam.datapath, CMD_NEW, 0, attrs, OVS_DATAPATH_VERSION)


def dp_by_name(fam: Families, cmd: int, name: str) -> GenlMessage:
    return GenlMessage(fam.datapath, cmd, 0, nla_str(OVS_DP_ATTR_NAME, name), OVS_DATAPATH_VERSION)


def vport_new(
    fam: Families,
    dp_ifindex: int,
    vport_type: int,
    name: str,
    upcall_pid: int,
    dst_port: int | None = None,
) -> GenlMessage:
    attrs = (
        nla_u32(OVS_VPORT_ATTR_TYPE, vport_type)
        + nla_str(OVS_VPORT_ATTR_NAME, name)
        + nla_u32(OVS_VPORT_ATTR_UPCALL_PID, upcall_pid)
    )
    if vport_type in (VportType.VXLAN, VportType.GENEVE):
        if dst_port is None:
            raise ConfigError("a tunnel vport needs a UDP destination port")
        attrs += nla(
            OVS_VPORT_ATTR_OPTIONS, nla(OVS_TUNNEL_ATTR_DST_PORT, struct.pack("=H", dst_port))
        )
    elif dst_port is not None:
        raise ConfigError("only tunnel vports take a UDP port")
    return GenlMessage(fam.vport, CMD_NEW, dp_ifindex, attrs, OVS_VPORT_VERSION)


def flow_new(
    fam: Families, dp_ifindex: int, key: FlowKey, mask: FlowKey | None, actions: Sequence[Action]
) -> GenlMessage:
    attrs = nla(OVS_FLOW_ATTR_KEY, key.encode())
    if mask is not None:
        attrs += nla(OVS_FLOW_ATTR_MASK, mask.encode())
    attrs += nla(OVS_FLOW_ATTR_ACTIONS, encode_actions(actions))
    return GenlMessage(fam.flow, CMD_NEW, dp_ifindex, attrs, OVS_FLOW_VERSION)


def packet_execute(
    fam: Families, dp_ifindex: int, packet: bytes, actions: Sequence[Action], in_port: int
) -> GenlMessage:
    attrs = (
        nla(OVS_PACKET_ATTR_PACKET, packet)
        + nla(OVS_PACKET_ATTR_KEY, FlowKey(in_port=in_port).encode())
        + nla(OVS_PACKET_ATTR_ACTIONS, encode_actions(actions))
    )
    return GenlMessage(fam.packet, OVS_PACKET_CMD_EXECUTE, dp_ifindex, attrs, OVS_PACKET_VERSION)


# -- the client ---------------------------------------------------------------------------------


def genl_family_ids(names: Sequence[str]) -> dict[str, int]:
    """Resolve generic netlink family ids with pyroute2's ``GenericNetlinkSocket``.

    Asking for a family lets the kernel load its module (e.g. openvswitch) on demand.
    DatapathError names the family that is missing.
    """
    from pyroute2 import GenericNetlinkSocket
    from pyroute2.netlink import genlmsg

    ids: dict[str, int] = {}
    sock = GenericNetlinkSocket()
    try:
        for i, name in enumerate(names):
            try:
                if i == 0:
                    # bind() registers the controller's message class, then resolves the name.
                    sock.bind(name, genlmsg)
                    ids[name] = int(sock.prid)
                else:
                    ids[name] = int(sock.discovery(name).get_attr("CTRL_ATTR_FAMILY_ID"))
            except Exception as err:
                raise wrap_os_error(f"resolve generic netlink family {name}", err) from err
    finally:
        sock.close()
    return ids


def resolve_families() -> Families:
    """Look the four OVS families up once."""
    ids = genl_family_ids(
        (OVS_DATAPATH_FAMILY, OVS_VPORT_FAMILY, OVS_FLOW_FAMILY, OVS_PACKET_FAMILY)
    )
    return Families(
        ids[OVS_DATAPATH_FAMILY],
        ids[OVS_VPORT_FAMILY],
        ids[OVS_FLOW_FAMILY],
        ids[OVS_PACKET_FAMILY],
    )


def _open_genl(blocking: bool) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, 0))
        sock.setblocking(blocking)
    except OSError:
        sock.close()
        raise
    return sock


class OvsClient:
    """Requests to the OVS datapath plus a non-blocking upcall socket. Not thread-safe.

    Requests block for one netlink round trip (microseconds; the kernel answers synchronously).
    """

    def __init__(self, families: Families | None = None, timeout: float = 5.0) -> None:
        self.families = families or resolve_families()
        try:
            self._req = _open_genl(blocking=True)
            self._req.settimeout(timeout)
            self._up = _open_genl(blocking=False)
        except OSError as err:
            raise wrap_os_error("open generic netlink sockets", err) from err
        self._seq = 0

    @property
    def upcall_pid(self) -> int:
        """The netlink port id the kernel sends upcalls to."""
        return int(self._up.getsockname()[0])

    def fileno(self) -> int:
        """The upcall socket, for ``loop.add_reader``."""
        return self._up.fileno()

    def close(self) -> None:
        self._req.close()
        self._up.close()

    # -- transport ------------------------------------------------------------------------------

    def _request(
        self, op: str, msg: GenlMessage, *, dump: bool = False, create: bool = False
    ) -> list[GenlMessage]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_DUMP if dump else NLM_F_ECHO)
        flags |= NLM_F_CREATE if create else 0
        wire = GenlMessage(
            msg.family, msg.cmd, msg.dp_ifindex, msg.attrs, msg.version, flags, self._seq
        ).encode()
        replies: list[GenlMessage] = []
        try:
            self._req.send(wire)
            while True:
                data = self._req.recv(1 << 20)
                for kind, _flags, seq, raw in split_messages(data):
                    if seq != self._seq:
                        continue  # a late answer to an earlier, timed-out request
                    if kind == NLMSG_DONE:
                        return replies
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", raw, NLMSGHDR.size)
                        if code == 0:
                            if not dump:
                                return replies
                            continue
                        raise DatapathError(op, _strerror(-code), -code)
                    replies.append(GenlMessage.decode(raw))
        except DatapathError:
            raise
        except OSError as err:
            raise wrap_os_error(op, err) from err

    # -- datapaths ------------------------------------------------------------------------------

    def create_datapath(self, name: str) -> DatapathInfo:
        op = f"create OVS datapath {name}"
        replies = self._request(op, dp_new(self.families, name, self.upcall_pid), create=True)
        return DatapathInfo.decode(_one(op, replies))

    def find_datapath(self, name: str) -> DatapathInfo | None:
        try:
            replies = self._request(
                f"look up OVS datapath {name}", dp_by_name(self.families, CMD_GET, name)
            )
        except DatapathError as err:
            if err.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return DatapathInfo.decode(replies[0]) if replies else None

    def list_datapaths(self) -> list[DatapathInfo]:
        msg = GenlMessage(self.families.datapath, CMD_GET, 0, b"", OVS_DATAPATH_VERSION)
        return [DatapathInfo.decode(m) for m in self._request("list OVS datapaths", msg, dump=True)]

    def delete_datapath(self, name: str) -> bool:
        """Delete (with all its vports and flows); False if there was none."""
        try:
            self._request(f"delete OVS datapath {name}", dp_by_name(self.families, CMD_DEL, name))
        except DatapathError as err:
            if err.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    def remove_stale(self, name: str) -> bool:
        """A datapath by our name at start was left by a crashed router: delete it."""
        return self.delete_datapath(name)

    # -- vports ---------------------------------------------------------------------------------

    def create_vport(
        self, dp: DatapathInfo, vport_type: int, name: str, dst_port: int | None = None
    ) -> VportInfo:
        kind = VportType.NAMES.get(vport_type, str(vport_type))
        op = f"create {kind} vport {name} in {dp.name}"
        msg = vport_new(self.families, dp.ifindex, vport_type, name, self.upcall_pid, dst_port)
        return VportInfo.decode(_one(op, self._request(op, msg, create=True)))

    def list_vports(self, dp: DatapathInfo) -> list[VportInfo]:
        msg = GenlMessage(self.families.vport, CMD_GET, dp.ifindex, b"", OVS_VPORT_VERSION)
        replies = self._request(f"list vports of {dp.name}", msg, dump=True)
        return [VportInfo.decode(m) for m in replies]

    def find_vport(self, dp: DatapathInfo, name: str) -> VportInfo | None:
        return next((v for v in self.list_vports(dp) if v.name == name), None)

    def delete_vport(self, dp: DatapathInfo, port_no: int) -> None:
        msg = GenlMessage(
            self.families.vport, CMD_DEL, dp.ifindex, nla_u32(OVS_VPORT_ATTR_PORT_NO, port_no)
        )
        self._request(f"delete vport {port_no} of {dp.name}", msg)

    # -- flows ----------------------------------------------------------------------------------

    def install_flow(
        self,
        dp: DatapathInfo,
        key: FlowKey,
        actions: Sequence[Action],
        mask: FlowKey | None = None,
    ) -> None:
        """Create the flow, or replace the actions of an identical one. ``mask`` defaults to
        :func:`exact_mask` of the key (the fields given are matched, the rest wildcarded)."""
        msg = flow_new(self.families, dp.ifindex, key, mask or exact_mask(key), actions)
        self._request(f"install flow {_describe(key)} in {dp.name}", msg)

    def dump_flows(self, dp: DatapathInfo) -> list[FlowInfo]:
        msg = GenlMessage(self.families.flow, CMD_GET, dp.ifindex, b"", OVS_FLOW_VERSION)
        replies = self._request(f"dump flows of {dp.name}", msg, dump=True)
        return [FlowInfo.decode(m) for m in replies]

    def get_flow(self, dp: DatapathInfo, key: FlowKey) -> FlowInfo | None:
        """The flow installed with exactly this key, or None."""
        msg = GenlMessage(
            self.families.flow, CMD_GET, dp.ifindex, nla(OVS_FLOW_ATTR_KEY, key.encode())
        )
        try:
            replies = self._request(f"get flow {_describe(key)} from {dp.name}", msg)
        except DatapathError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        return FlowInfo.decode(replies[0]) if replies else None

    def delete_flow(self, dp: DatapathInfo, key: FlowKey) -> bool:
        msg = GenlMessage(
            self.families.flow, CMD_DEL, dp.ifindex, nla(OVS_FLOW_ATTR_KEY, key.encode())
        )
        try:
            self._request(f"delete flow {_describe(key)} from {dp.name}", msg)
        except DatapathError as err:
            if err.errno == errno.ENOENT:
                return False
            raise
        return True

    def flush_flows(self, dp: DatapathInfo) -> None:
        """Delete every flow (a DEL without a key), e.g. when routes change."""
        msg = GenlMessage(self.families.flow, CMD_DEL, dp.ifindex, b"")
        self._request(f"flush flows of {dp.name}", msg)

    # -- packets --------------------------------------------------------------------------------

    def execute(
        self,
        dp: DatapathInfo,
        packet: bytes,
        actions: Sequence[Action],
        in_port: int = OVSP_LOCAL,
    ) -> None:
        """Run ``actions`` on ``packet`` as if it arrived on ``in_port`` (e.g. a heartbeat
        probe: set-tunnel + output to the vxlan vport; or a missed frame, once decided)."""
        msg = packet_execute(self.families, dp.ifindex, packet, actions, in_port)
        self._request(f"execute a {len(packet)}-byte packet in {dp.name}", msg)

    def receive_upcalls(self, limit: int = 64) -> list[Upcall]:
        """Drain up to ``limit`` upcalls without blocking. Malformed ones are skipped."""
        out: list[Upcall] = []
        while len(out) < limit:
            try:
                data = self._up.recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    continue  # the kernel dropped upcalls (counted in dp "lost"); go on
                raise wrap_os_error("receive OVS upcalls", err) from err
            for kind, _flags, _seq, raw in split_messages(data):
                if kind != self.families.packet:
                    continue
                try:
                    out.append(Upcall.decode(GenlMessage.decode(raw)))
                except DatapathError:
                    continue
        return out


def _one(op: str, replies: list[GenlMessage]) -> GenlMessage:
    if not replies:
        raise DatapathError(op, "the kernel sent no reply")
    return replies[0]


def _strerror(code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code)} ({name})"


def _describe(key: FlowKey) -> str:
    parts = []
    if key.in_port is not None:
        parts.append(f"in_port={key.in_port}")
    if key.eth_src is not None:
        parts.append(f"src={key.eth_src}")
    if key.eth_dst is not None:
        parts.append(f"dst={key.eth_dst}")
    if key.tunnel is not None and key.tunnel.tun_id is not None:
        parts.append(f"tun_id={key.tunnel.tun_id:#x}")
    return "[" + " ".join(parts) + "]"
