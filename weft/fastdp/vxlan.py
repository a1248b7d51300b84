"""The Linux VXLAN datapath, kernel side: the vxlan device on the weft bridge and its FDB.

For kernels without openvswitch (like the test machines'). One vxlan device per host, enslaved to
the bridge (default ``weft``), UDP 6784, learning off (the router writes every forwarding entry,
see fdb.py), DF set on the outer header so a path that cannot carry the MTU fails visibly instead
of fragmenting (see heartbeat.py).

VNI scheme: one VNI for the whole network, :data:`NETWORK_VNI` = 0xFFFFFF by default. The OVS
datapath uses Weave's pairwise VNIs ``src_short_id | dst_short_id << 12``; 0xFFFFFF would be the
pair (4095, 4095), a peer talking to itself, which never happens, so the two schemes cannot
collide and an OVS host can talk to a VXLAN host by using the network VNI for that connection.

MTU: the vxlan device gets ``underlay MTU - 50`` (outer IPv4 20 + UDP 8 + VXLAN 8 + inner
Ethernet 14), minus ``VxlanConfig.extra_overhead`` (``esp.ESP_OVERHEAD`` when encrypting).

Every pyroute2 call is wrapped so that a failure raises :class:`DatapathError` naming the
operation (``create vxlan device vxlan-weft on bridge weft: File exists (EEXIST)``).
"""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from weft.errors import ConfigError
from weft.fastdp.errors import DatapathError, wrap_os_error
from weft.fastdp.fdb import FastPeer, FdbDiff, FdbEntry, FdbPlanner, diff_fdb, mac_of_peer
from weft.fastdp.heartbeat import HEARTBEAT_BPF_FILTER
from weft.gossip.peer import PeerName

__all__ = [
    "NETWORK_VNI",
    "VXLAN_OVERHEAD_IPV4",
    "VXLAN_PORT",
    "FdbKernel",
    "FdbReconciler",
    "HeartbeatSocket",
    "VxlanConfig",
    "VxlanDatapath",
    "VxlanDevice",
    "overlay_mtu",
]

VXLAN_PORT = 6784
NETWORK_VNI = 0xFFFFFF
VXLAN_OVERHEAD_IPV4 = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MIN_OVERLAY_MTU = 576
IFNAMSIZ = 16
NTF_SELF = 0x02
NTF_MASTER = 0x04
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
DEFAULT_VXLAN_NAME = "vxlan-weft"

T = TypeVar("T")


def overlay_mtu(underlay_mtu: int, overhead: int = VXLAN_OVERHEAD_IPV4) -> int:
    """The MTU containers get over this datapath; ConfigError when the underlay is too small."""
    mtu = underlay_mtu - overhead
    if mtu < MIN_OVERLAY_MTU:
        raise ConfigError(
            f"underlay MTU {underlay_mtu} leaves {mtu} for the overlay, below {MIN_OVERLAY_MTU}"
        )
    return mtu


@dataclass(frozen=True)
class VxlanConfig:
    """The local vxlan device. Defaults match the wire protocol (UDP 6784)."""

    name: str = DEFAULT_VXLAN_NAME  # device name; a device by this name at start is stale
    bridge: str = "weft"  # the bridge the device is enslaved to (must exist)
    port: int = VXLAN_PORT  # UDP destination (and listening) port
    vni: int = NETWORK_VNI
    # Source address of tunnel packets; None lets the kernel pick by route.
    local_ip: str | None = None
    # None: the MTU of the device holding ``local_ip``, else of the default route's device.
    underlay_mtu: int | None = None
    # Subtracted from the overlay MTU as well, e.g. esp.ESP_OVERHEAD when encrypting.
    extra_overhead: int = 0

    def __post_init__(self) -> None:
        if not 0 < len(self.name) < IFNAMSIZ:
            raise ConfigError(f"vxlan device name {self.name!r} must be 1..15 characters")
        if not 0 < self.port < 65536:
            raise ConfigError(f"vxlan port {self.port} out of range")
        if not 0 < self.vni <= 0xFFFFFF:
            raise ConfigError(f"VNI {self.vni} must be 1..16777215")
        if self.extra_overhead < 0:
            raise ConfigError("extra MTU overhead cannot be negative")
        if self.underlay_mtu is not None:
            overlay_mtu(self.underlay_mtu, self.overhead)

    @property
    def overhead(self) -> int:
        return VXLAN_OVERHEAD_IPV4 + self.extra_overhead


class FdbKernel(Protocol):
    """What the reconciler needs from the kernel (VxlanDevice; a dict-backed fake in tests)."""

    def fdb_entries(self) -> frozenset[FdbEntry]: ...

    def fdb_add(self, entry: FdbEntry) -> None: ...

    def fdb_remove(self, entry: FdbEntry) -> None: ...


class FdbReconciler:
    """Makes the kernel's FDB equal to a desired set, reading the kernel each time.

    Idempotent: after a failure (raised as DatapathError) the next ``apply`` starts from what the
    kernel really holds, so nothing is lost by retrying on the next topology or MAC change.
    """

    def __init__(self, kernel: FdbKernel) -> None:
        self.kernel = kernel

    def apply(self, desired: frozenset[FdbEntry]) -> FdbDiff:
        diff = diff_fdb(self.kernel.fdb_entries(), desired)
        for entry in diff.remove:
            self.kernel.fdb_remove(entry)
        for entry in diff.add:
            self.kernel.fdb_add(entry)
        return diff


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


class VxlanDevice:
    """The vxlan device in one network namespace, driven through a pyroute2 ``IPRoute``/``NetNS``.

    Not thread-safe; call from the router's loop (each call is a short netlink round trip).
    """

    def __init__(self, ipr: Any, config: VxlanConfig) -> None:
        self.ipr = ipr
        self.config = config
        self.ifindex: int | None = None
        self.mtu: int | None = None

    # -- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _op(self, op: str) -> Iterator[None]:
        try:
            yield
        except DatapathError:
            raise
        except Exception as err:  # pyroute2 raises NetlinkError (an OSError) and others
            raise wrap_os_error(op, err) from err

    def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._op(op):
            return fn(*args, **kwargs)

    def _lookup(self, ifname: str) -> int | None:
        found = self._call(f"look up link {ifname}", self.ipr.link_lookup, ifname=ifname)
        return int(found[0]) if found else None

    def _require_index(self) -> int:
        if self.ifindex is None:
            raise DatapathError(f"use vxlan device {self.config.name}", "not started")
        return self.ifindex

    def _vxlan_links(self) -> list[tuple[int, str, int | None, int | None]]:
        """(ifindex, name, dstport, vni) of every vxlan link in the namespace."""
        out = []
        for link in self._call("list links", self.ipr.get_links):
            info = _attr(link, "IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
                continue
            data = info.get_attr("IFLA_INFO_DATA")
            port = data.get_attr("IFLA_VXLAN_PORT") if data is not None else None
            vni = data.get_attr("IFLA_VXLAN_ID") if data is not None else None
            out.append((int(link["index"]), str(_attr(link, "IFLA_IFNAME")), port, vni))
        return out

    # -- lifecycle -------------------------------------------------------------------------

    def find(self) -> int | None:
        """The ifindex of our device if it exists (it is stale unless we created it)."""
        return self._lookup(self.config.name)

    def remove_stale(self) -> list[str]:
        """Delete a device left by a crashed router; return the names removed.

        Ours is the device with our name. A vxlan device under another name holding our UDP
        port and VNI belongs to someone else: we refuse to start rather than delete it.
        """
        removed = []
        for index, name, port, vni in self._vxlan_links():
            if name == self.config.name:
                self._call(f"delete stale vxlan device {name}", self.ipr.link, "del", index=index)
                removed.append(name)
            elif port == self.config.port and vni == self.config.vni:
                raise DatapathError(
                    f"create vxlan device {self.config.name}",
                    f"device {name} already uses UDP {port} with VNI {vni}; "
                    "remove it or configure another VNI",
                    errno.EEXIST,
                )
        return removed

    def detect_underlay_mtu(self) -> int:
        if self.config.underlay_mtu is not None:
            return self.config.underlay_mtu
        index: int | None = None
        if self.config.local_ip is not None:
            for addr in self._call("list addresses", self.ipr.get_addr, family=socket.AF_INET):
                if _attr(addr, "IFA_ADDRESS") == self.config.local_ip:
                    index = int(addr["index"])
                    break
            if index is None:
                raise ConfigError(f"no interface has the local address {self.config.local_ip}")
        else:
            routes = self._call("list default routes", self.ipr.get_default_routes, family=2)
            for route in routes:
                oif = _attr(route, "RTA_OIF")
                if oif is not None:
                    index = int(oif)
                    break
            if index is None:
                raise ConfigError(
                    "cannot tell the underlay MTU: no default route; set the local address "
                    "or the underlay MTU"
                )
        (link,) = self._call(f"read link {index}", self.ipr.get_links, index)
        return int(_attr(link, "IFLA_MTU"))

    def start(self, local_name: PeerName) -> int:
        """Remove any stale device, create ours on the bridge, bring it up; return its MTU.

        Also pins ``local_name`` (as a MAC) to the vxlan port in the bridge's FDB, so heartbeat
        probes addressed to us are dropped by the bridge (never forwarded to containers) after
        the heartbeat socket has seen them.
        """
        cfg = self.config
        self.remove_stale()
        mtu = overlay_mtu(self.detect_underlay_mtu(), cfg.overhead)
        bridge = self._lookup(cfg.bridge)
        if bridge is None:
            raise DatapathError(f"create vxlan device {cfg.name}", f"bridge {cfg.bridge} missing")
        kwargs: dict[str, Any] = {
            "ifname": cfg.name,
            "kind": "vxlan",
            "vxlan_id": cfg.vni,
            "vxlan_port": cfg.port,
            "vxlan_learning": 0,
            "vxlan_df": 1,  # set DF on outer headers: oversize probes fail, never fragment
            "vxlan_udp_csum": 1,
        }
        if cfg.local_ip is not None:
            kwargs["vxlan_local"] = cfg.local_ip
        op = f"create vxlan device {cfg.name} on bridge {cfg.bridge}"
        self._call(op, self.ipr.link, "add", **kwargs)
        index = self._lookup(cfg.name)
        if index is None:
            raise DatapathError(op, "device vanished right after creation")
        self.ifindex = index
        try:
            self._call(
                f"attach {cfg.name} to bridge {cfg.bridge} with MTU {mtu}",
                self.ipr.link,
                "set",
                index=index,
                master=bridge,
                mtu=mtu,
                state="up",
            )
            self._call(
                f"pin heartbeat MAC {local_name} to {cfg.name}",
                self.ipr.fdb,
                "replace",
                ifindex=index,
                lladdr=mac_of_peer(local_name),
                master=bridge,
                flags=NTF_MASTER,
                state=NUD_NOARP | NUD_PERMANENT,
            )
        except BaseException:
            self.delete()
            raise
        self.mtu = mtu
        return mtu

    def set_underlay_mtu(self, underlay_mtu: int) -> int:
        """Adopt a new underlay MTU; returns the new overlay MTU (heartbeats must re-probe)."""
        mtu = overlay_mtu(underlay_mtu, self.config.overhead)
        index = self._require_index()
        self._call(
            f"set MTU {mtu} on {self.config.name}", self.ipr.link, "set", index=index, mtu=mtu
        )
        self.mtu = mtu
        return mtu

    def delete(self) -> None:
        """Remove our device (idempotent); its FDB goes with it."""
        index = self.ifindex if self.ifindex is not None else self.find()
        self.ifindex = None
        self.mtu = None
        if index is None:
            return
        try:
            self.ipr.link("del", index=index)
        except Exception as err:
            if getattr(err, "code", None) != errno.ENODEV:
                raise wrap_os_error(f"delete vxlan device {self.config.name}", err) from err

    # -- FDB (FdbKernel) ---------------------------------------------------------------------

    def fdb_entries(self) -> frozenset[FdbEntry]:
        """The device's own (``self``) entries with a remote; bridge entries are not ours."""
        index = self._require_index()
        entries = set()
        for msg in self._call(
            f"dump FDB of {self.config.name}", self.ipr.fdb, "dump", ifindex=index
        ):
            if msg["ifindex"] != index or not msg["flags"] & NTF_SELF:
                continue
            dst = _attr(msg, "NDA_DST")
            mac = _attr(msg, "NDA_LLADDR")
            if dst is None or mac is None:
                continue
            entries.add(FdbEntry(str(mac).lower(), str(dst)))
        return frozenset(entries)

    def fdb_add(self, entry: FdbEntry) -> None:
        index = self._require_index()
        # Several flood entries coexist (append); a unicast MAC has one remote (replace).
        command = "append" if entry.is_flood else "replace"
        self._call(
            f"add FDB entry {entry.mac} -> {entry.dst} on {self.config.name}",
            self.ipr.fdb,
            command,
            ifindex=index,
            lladdr=entry.mac,
            dst=entry.dst,
            flags=NTF_SELF,
            state=NUD_PERMANENT,
        )

    def fdb_remove(self, entry: FdbEntry) -> None:
        index = self._require_index()
        try:
            self.ipr.fdb("del", ifindex=index, lladdr=entry.mac, dst=entry.dst, flags=NTF_SELF)
        except Exception as err:
            if getattr(err, "code", None) == errno.ENOENT:
                return  # already gone: the goal is reached
            raise wrap_os_error(
                f"remove FDB entry {entry.mac} -> {entry.dst} on {self.config.name}", err
            ) from err


# -- heartbeat packet socket -------------------------------------------------------------------

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
PACKET_IGNORE_OUTGOING = 23
SOL_PACKET = 263


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class HeartbeatSocket:
    """A non-blocking packet socket on the vxlan device for fast-path heartbeat probes.

    Receives only ethertype 0x88B5 frames (a kernel BPF filter, so data traffic is never copied
    up) and never its own outgoing frames. ``fileno()`` is for ``loop.add_reader``. Must be
    created inside the network namespace of the device.
    """

    def __init__(self, ifname: str) -> None:
        op = f"open heartbeat socket on {ifname}"
        # Protocol 0 receives nothing until bind, so no frame slips in before the filter.
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as err:
            raise wrap_os_error(op, err) from err
        try:
            prog = ctypes.create_string_buffer(HEARTBEAT_BPF_FILTER)
            fprog = _SockFprog(len(HEARTBEAT_BPF_FILTER) // 8, ctypes.addressof(prog))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.bind((ifname, ETH_P_ALL))
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise wrap_os_error(op, err) from err
        self.ifname = ifname
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, frame: bytes) -> bool:
        """Send one frame; False when the kernel refused it (e.g. EMSGSIZE, no FDB entry)."""
        try:
            self._sock.send(frame)
        except (BlockingIOError, OSError):
            return False
        return True

    def receive(self, limit: int = 64) -> list[bytes]:
        """Drain up to ``limit`` frames (non-blocking)."""
        frames = []
        for _ in range(limit):
            try:
                frames.append(self._sock.recv(65536))
            except (BlockingIOError, InterruptedError):
                break
        return frames

    def close(self) -> None:
        self._sock.close()


class VxlanDatapath:
    """The host side of the Linux VXLAN datapath as the overlay switch uses it.

    Owns the device, the desired-FDB inputs and the reconciler; every change re-applies the
    whole desired FDB (cheap: a dump and a few entries). Runs on the router's loop.

    ``start`` -> ``peer_started`` per connection whose remote offers vxlan -> heartbeats decide
    ``peer_carrying(name, True/False)`` -> ``macs_changed`` from the MAC cache ->
    ``peer_stopped`` when the connection goes -> ``stop``.
    """

    def __init__(self, ipr: Any, config: VxlanConfig, local_name: PeerName) -> None:
        self.device = VxlanDevice(ipr, config)
        self.local_name = local_name
        self.planner = FdbPlanner(local_name)
        self.reconciler = FdbReconciler(self.device)
        self.peers: dict[PeerName, FastPeer] = {}
        self.mac_locations: dict[str, PeerName] = {}
        self.last_error: str = ""

    @property
    def mtu(self) -> int | None:
        return self.device.mtu

    def start(self) -> int:
        """Remove stale state, create the device; returns the overlay MTU."""
        return self.device.start(self.local_name)

    def stop(self) -> None:
        self.device.delete()
        self.peers.clear()

    def peer_started(self, name: PeerName, ip: str) -> None:
        """A connection's VXLAN path starts probing (heartbeat entry only)."""
        self.peers[name] = FastPeer(ip, carrying=False)
        self.apply()

    def peer_carrying(self, name: PeerName, carrying: bool) -> None:
        """The overlay switch chose (or dropped) VXLAN for this connection."""
        peer = self.peers.get(name)
        if peer is not None and peer.carrying != carrying:
            self.peers[name] = FastPeer(peer.ip, carrying)
            self.apply()

    def peer_stopped(self, name: PeerName) -> None:
        if self.peers.pop(name, None) is not None:
            self.apply()

    def macs_changed(self, mac_locations: dict[str, PeerName]) -> None:
        self.mac_locations = dict(mac_locations)
        self.apply()

    def apply(self) -> FdbDiff:
        """Bring the kernel in line; a failure is kept in ``last_error`` (shown in status)
        and raised; the next change retries from the kernel's real state."""
        try:
            diff = self.reconciler.apply(self.planner.desired(self.peers, self.mac_locations))
        except DatapathError as err:
            self.last_error = str(err)
            raise
        self.last_error = ""
        return diff

    def status(self) -> dict[str, Any]:
        return {
            "device": self.device.config.name,
            "mtu": self.device.mtu,
            "vni": self.device.config.vni,
            "port": self.device.config.port,
            "peers": {
                str(name): {"ip": p.ip, "carrying": p.carrying} for name, p in self.peers.items()
            },
            "macs": len(self.mac_locations),
            "last_error": self.last_error,
        }
