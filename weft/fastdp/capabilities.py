"""What the kernel offers the fast datapaths, probed once at router start.

Three questions, each answered by trying the real thing once (which also lets the kernel load the
module on demand) and never retried: a kernel that lacks a feature at start is reported, in
``/status`` and the log, and the router runs without it until restarted.

* ``openvswitch``: the generic netlink families ovs_datapath, ovs_vport, ovs_flow, ovs_packet
  resolve (asking for them makes the kernel load ``openvswitch`` if it can).
* ``vxlan``: a vxlan link can be created (a throwaway, never brought up, deleted at once).
* ``esp``: an ESP transport-mode SA with ``rfc4106(gcm(aes))`` can be added over NETLINK_XFRM
  (on loopback with a random SPI, deleted at once); this is what encrypted fast paths need.

Call :func:`probe_capabilities` inside the router's network namespace.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weft.fastdp.errors import DatapathError, wrap_os_error

__all__ = [
    "OVS_FAMILIES",
    "Capabilities",
    "Feature",
    "probe_capabilities",
    "probe_esp",
    "probe_openvswitch",
    "probe_vxlan",
]

OVS_FAMILIES = ("ovs_datapath", "ovs_vport", "ovs_flow", "ovs_packet")


@dataclass(frozen=True)
class Feature:
    available: bool
    detail: str  # why not, or what was found

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "detail": self.detail}


@dataclass(frozen=True)
class Capabilities:
    openvswitch: Feature
    vxlan: Feature
    esp: Feature

    def fast_datapaths(self) -> list[str]:
        """Kernel datapaths this host can run, best first (sleeve always runs besides)."""
        out = []
        if self.openvswitch.available:
            out.append("ovs")
        if self.vxlan.available:
            out.append("vxlan")
        return out

    def status(self) -> dict[str, Any]:
        return {
            "openvswitch": self.openvswitch.as_dict(),
            "vxlan": self.vxlan.as_dict(),
            "esp": self.esp.as_dict(),
            "fast_datapaths": self.fast_datapaths(),
        }


def probe_openvswitch() -> Feature:
    from weft.fastdp.ovs import genl_family_ids

    try:
        ids = genl_family_ids(OVS_FAMILIES)
    except DatapathError as err:
        if err.errno == errno.ENOENT:
            return Feature(False, f"{err} (openvswitch module not loaded/available)")
        return Feature(False, str(err))
    return Feature(True, " ".join(f"{name}={ids[name]}" for name in OVS_FAMILIES))


def probe_vxlan(ipr: Any | None = None) -> Feature:
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = IPRoute() if ipr is None else ipr
    name = f"wfcap{secrets.token_hex(4)}"[:15]
    vni = 1 + secrets.randbelow(0xFFFFF0)
    try:
        try:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_port=0)
        except Exception as err:
            return Feature(False, str(wrap_os_error("create a vxlan link", err)))
        try:
            ipr.link("del", ifname=name)
        except Exception as err:
            return Feature(True, f"created, but deleting {name} failed: {err}")
        return Feature(True, "vxlan links can be created")
    finally:
        if own:
            ipr.close()


# -- NETLINK_XFRM, just enough to add and delete one SA ----------------------------------------

NETLINK_XFRM = 6
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRMA_ALG_AEAD = 18
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_CREATE = 0x400
NLM_F_EXCL = 0x200
NLMSG_ERROR = 0x02
IPPROTO_ESP = 50
XFRM_MODE_TRANSPORT = 0
XFRM_INF = 0xFFFFFFFFFFFFFFFF
AEAD_NAME = "rfc4106(gcm(aes))"

# struct xfrm_usersa_info (224 bytes on 64-bit; the offsets are those of linux/xfrm.h):
#   selector 0..56, id {daddr16, spi be32, proto u8} 56..80, saddr 80..96,
#   lifetime_cfg 8*u64 96..160, lifetime_cur 4*u64 160..192, stats 3*u32 192..204,
#   seq u32 204, reqid u32 208, family u16 212, mode u8 214, replay_window u8 215, flags u8 216.
XFRM_USERSA_INFO_SIZE = 224


def _nlattr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + bytes(-len(payload) % 4)


def encode_newsa(spi: int, addr: bytes, key: bytes, icv_bits: int = 128, seq: int = 1) -> bytes:
    """An XFRM_MSG_NEWSA netlink message for an ESP transport SA ``addr -> addr`` (IPv4)."""
    info = bytearray(XFRM_USERSA_INFO_SIZE)
    addr16 = addr.ljust(16, b"\0")
    # selector: family AF_INET so the state is IPv4 (daddr/saddr left zero: any).
    struct.pack_into("=H", info, 40, socket.AF_INET)
    info[56:72] = addr16
    struct.pack_into("!I", info, 72, spi)
    info[76] = IPPROTO_ESP
    info[80:96] = addr16
    struct.pack_into("=8Q", info, 96, *([XFRM_INF] * 4 + [0] * 4))
    struct.pack_into("=H", info, 212, socket.AF_INET)
    info[214] = XFRM_MODE_TRANSPORT
    aead = AEAD_NAME.encode().ljust(64, b"\0") + struct.pack("=II", len(key) * 8, icv_bits) + key
    body = bytes(info) + _nlattr(XFRMA_ALG_AEAD, aead)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), XFRM_MSG_NEWSA, flags, seq, 0) + body


def encode_delsa(spi: int, addr: bytes, seq: int = 2) -> bytes:
    """XFRM_MSG_DELSA for the SA made by :func:`encode_newsa` (struct xfrm_usersa_id)."""
    body = (
        addr.ljust(16, b"\0")
        + struct.pack("!I", spi)
        + struct.pack("=HBx", socket.AF_INET, IPPROTO_ESP)
    )
    return (
        struct.pack("=IHHII", 16 + len(body), XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        + body
    )


def _ack_errno(reply: bytes) -> int:
    """The (positive) errno of a netlink ack, 0 for success."""
    if len(reply) < 20:
        raise OSError(errno.EPROTO, "short netlink reply")
    _length, kind = struct.unpack_from("=IH", reply, 0)
    if kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink message type {kind}")
    (code,) = struct.unpack_from("=i", reply, 16)
    return -int(code)


def probe_esp(make_socket: Callable[[], socket.socket] | None = None) -> Feature:
    def default_socket() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)

    try:
        sock = (make_socket or default_socket)()
    except OSError as err:
        return Feature(False, str(wrap_os_error("open NETLINK_XFRM socket", err)))
    with sock:
        sock.settimeout(5)
        spi = 0xC0000000 | secrets.randbits(24)  # high range: unlikely to meet a real SA
        addr = socket.inet_aton("127.0.0.1")
        key = os.urandom(20)  # AES-128 key + 4-byte salt
        try:
            sock.send(encode_newsa(spi, addr, key))
            code = _ack_errno(sock.recv(65536))
            if code:
                failed = wrap_os_error(f"add an ESP SA with {AEAD_NAME}", OSError(code, ""))
                hint = {
                    errno.ENOSYS: " (kernel lacks the AEAD for ESP)",
                    errno.EPROTONOSUPPORT: " (kernel lacks ESP: esp4 module)",
                }.get(code, "")
                return Feature(False, f"{failed}{hint}")
            sock.send(encode_delsa(spi, addr))
            code = _ack_errno(sock.recv(65536))
        except OSError as err:
            return Feature(False, str(wrap_os_error("probe ESP over NETLINK_XFRM", err)))
        if code:
            return Feature(True, f"ESP works, but deleting probe SA {spi:#x} failed: errno {code}")
        return Feature(True, f"ESP transport SAs with {AEAD_NAME}")


def probe_capabilities(ipr: Any | None = None) -> Capabilities:
    """Probe all three once. Never raises for a missing feature; reports it."""
    return Capabilities(openvswitch=probe_openvswitch(), vxlan=probe_vxlan(ipr), esp=probe_esp())
