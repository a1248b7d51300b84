"""Kernel work for CNI attachments: a veth pair from a container's netns onto the weft bridge.

Synchronous pyroute2 calls, meant to run in a worker thread (``asyncio.to_thread``) of the router.
To act inside a container's network namespace without forking (pyroute2's ``IPRoute(netns=...)``
forks a child per socket, ~9 ms here), the calling thread briefly ``setns()``-es into the target
namespace, opens a netlink socket there — a socket stays bound to the namespace it was created
in — and switches straight back (~1.5 ms). Only that thread ever changes namespace, and a failure to
switch back is fatal for the process rather than silently leaving a worker in a container.

Why not ``weft/host/bridge.py``'s attach: CNI needs a caller-chosen interface name, a host-side
name derived from the attachment, hairpin mode, routes from configuration or IPAM, and an exact
undo of a half-done ADD; those belong to the CNI contract, so they live here.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import hashlib
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weft.errors import WeftError

__all__ = [
    "AttachError",
    "AttachFailure",
    "AttachSpec",
    "Attached",
    "BridgeInfo",
    "attach",
    "bridge_info",
    "check",
    "detach",
    "host_ifname",
    "in_netns",
    "limit_gso",
]


class AttachFailure(enum.Enum):
    """Why a kernel step failed; each caller's boundary maps it to its own form (the CNI server
    to the spec's error codes, weft.cni.server.cni_error)."""

    NETNS_GONE = "netns-gone"  # the container's network namespace does not exist
    BRIDGE_MISSING = "bridge-missing"  # the weft bridge is not there (yet): retry later
    INTERFACE_EXISTS = "interface-exists"  # the container already has an interface of that name
    KERNEL = "kernel"  # any other netlink or namespace failure


class AttachError(WeftError):
    """A kernel step of attach/detach/check failed: ``failure`` says which kind, ``msg`` and
    ``details`` say what and where."""

    def __init__(self, failure: AttachFailure, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.failure = failure
        self.msg = msg
        self.details = details


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """The host end's name: 'vwf' + 12 hex digits of the attachment's hash (15 characters)."""
    digest = hashlib.sha256(f"{network}:{container_id}:{ifname}".encode()).hexdigest()
    return "vwf" + digest[:12]


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _netlink_socket_in(netns_path: str) -> socket.socket:
    """A NETLINK_ROUTE socket bound to the namespace at ``netns_path`` (see module docstring)."""
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AttachError(
            AttachFailure.NETNS_GONE, "network namespace does not exist", netns_path
        ) from None
    except OSError as err:
        raise AttachError(
            AttachFailure.KERNEL, "cannot open network namespace", f"{netns_path}: {err}"
        ) from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as err:
            raise AttachError(
                AttachFailure.KERNEL, "cannot enter netns", f"{netns_path}: {err}"
            ) from err
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)
        finally:
            try:
                _setns(home)
            except OSError as err:  # a worker stuck in a container namespace: stop everything
                os.write(2, f"weft: cannot return to own network namespace: {err}\n".encode())
                os._exit(70)
    finally:
        os.close(home)
        os.close(target)


@contextmanager
def in_netns(netns_path: str) -> Iterator[IPRoute]:
    """An IPRoute whose requests act inside the namespace at ``netns_path``."""
    sock = _netlink_socket_in(netns_path)
    ipr = IPRoute(use_socket=sock)
    try:
        yield ipr
    finally:
        ipr.close()
        sock.close()


@dataclass(frozen=True)
class BridgeInfo:
    """What ADD needs to know about the host's weft bridge."""

    index: int
    mac: str
    mtu: int
    addresses: tuple[str, ...]  # CIDRs on the bridge (the ``weft expose`` addresses)

    def gateway_for(self, address: str) -> str | None:
        """The bridge address in the same subnet as ``address`` (a CIDR), if any."""
        net = ipaddress.ip_interface(address).network
        for cidr in self.addresses:
            candidate = ipaddress.ip_interface(cidr)
            if candidate.ip in net and candidate.version == net.version:
                return str(candidate.ip)
        return None


_local = threading.local()


def _host() -> IPRoute:
    """This worker thread's netlink handle in the router's own namespace (kept: ~1.5 ms each)."""
    ipr: IPRoute | None = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = IPRoute()
        _local.ipr = ipr
    return ipr


def _get_link(ipr: IPRoute, name: str) -> Any | None:
    """One RTM_GETLINK by name (``link_lookup`` dumps every link), None when absent."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise


def bridge_info(bridge: str) -> BridgeInfo | None:
    """The bridge's index, MAC, MTU and addresses, or None when it does not exist."""
    ipr = _host()
    link = _get_link(ipr, bridge)
    if link is None:
        return None
    index = int(link["index"])
    addresses = tuple(
        f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index)
    )
    return BridgeInfo(
        index=index,
        mac=str(link.get_attr("IFLA_ADDRESS")),
        mtu=int(link.get_attr("IFLA_MTU")),
        addresses=addresses,
    )


@dataclass(frozen=True)
class AttachSpec:
    """One container interface to create. ``routes`` entries follow the CNI result's shape.

    ``mtu`` None: the bridge's. ``gateways`` maps an address (CIDR) to its gateway; addresses
    without one get the bridge's address in their subnet, if any. No ``routes`` and
    ``default_route``: a default route via each address's gateway.
    """

    netns: str
    ifname: str
    host_ifname: str
    bridge: str
    mtu: int | None
    hairpin: bool
    addresses: tuple[str, ...]  # CIDRs
    routes: tuple[Mapping[str, Any], ...] = ()
    gateways: Mapping[str, str] = field(default_factory=dict)
    default_route: bool = True
    gso_max_size: int | None = None  # cap both ends' GSO/TSO size (best effort); None: leave
    loopback_up: bool = False  # also bring the container's ``lo`` up (``weft attach``)


@dataclass(frozen=True)
class Attached:
    """What ADD made: MACs and MTU, the gateways and routes installed, the bridge's MAC/MTU."""

    host_mac: str
    container_mac: str
    mtu: int
    gateways: Mapping[str, str]
    routes: tuple[Mapping[str, Any], ...]
    bridge_mac: str
    bridge_mtu: int


def _route_args(route: Mapping[str, Any], oif: int, default_gw: str | None) -> dict[str, Any]:
    dst = str(route["dst"])
    net = ipaddress.ip_network(dst, strict=False)
    args: dict[str, Any] = {"dst": str(net), "oif": oif}
    if net.version == 6:
        args["family"] = socket.AF_INET6
    gw = route.get("gw") or default_gw
    if gw and ipaddress.ip_address(gw).version == net.version:
        args["gateway"] = gw
    for key in ("priority", "table", "scope"):
        if isinstance(route.get(key), int):
            args[key] = route[key]
    metrics = {}
    if isinstance(route.get("mtu"), int) and route["mtu"]:
        metrics["RTAX_MTU"] = route["mtu"]
    if isinstance(route.get("advmss"), int) and route["advmss"]:
        metrics["RTAX_ADVMSS"] = route["advmss"]
    if metrics:
        args["metrics"] = {"attrs": list(metrics.items())}
    return args


def _delete_link(ipr: IPRoute, name: str) -> bool:
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return False
        raise
    return True


def _random_mac() -> str:
    """A random unicast, locally administered MAC (set at creation: no read-back needed)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _exists_error(spec: AttachSpec) -> AttachError:
    return AttachError(
        AttachFailure.INTERFACE_EXISTS,
        f"interface {spec.ifname} already exists in the container",
        spec.netns,
    )


def attach(spec: AttachSpec) -> Attached:
    """Create the veth pair and configure both ends; on any failure remove what was made.

    Raises AttachError: NETNS_GONE, BRIDGE_MISSING (not yet set up), INTERFACE_EXISTS when
    ``ifname`` already exists there, KERNEL for other kernel failures. About eight netlink
    round trips: the veth is created on the bridge, up, with its MTU and both MACs in one request.
    """
    info = bridge_info(spec.bridge)
    if info is None:
        raise AttachError(
            AttachFailure.BRIDGE_MISSING,
            f"bridge {spec.bridge} does not exist yet",
            "the weft router has not set up its data plane",
        )
    gateways = dict(spec.gateways)
    for cidr in spec.addresses:
        if cidr not in gateways:
            gw = info.gateway_for(cidr)
            if gw:
                gateways[cidr] = gw
    routes: tuple[Mapping[str, Any], ...] = spec.routes
    if not routes and spec.default_route:
        # the default route goes via the bridge's address (``weft expose``) in our subnet
        routes = tuple(
            {"dst": "0.0.0.0/0" if ipaddress.ip_interface(c).version == 4 else "::/0", "gw": gw}
            for c, gw in gateways.items()
        )
    mtu = spec.mtu or info.mtu
    host_mac, container_mac = _random_mac(), _random_mac()
    ipr = _host()
    try:
        netns_fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AttachError(
            AttachFailure.NETNS_GONE, "network namespace does not exist", spec.netns
        ) from None
    try:
        for attempt in (1, 2):
            try:
                ipr.link(
                    "add",
                    ifname=spec.host_ifname,
                    kind="veth",
                    mtu=mtu,
                    address=host_mac,
                    master=info.index,
                    state="up",
                    peer={
                        "ifname": spec.ifname,
                        "net_ns_fd": netns_fd,
                        "mtu": mtu,
                        "address": container_mac,
                    },
                )
                break
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise AttachError(
                        AttachFailure.KERNEL, "cannot create veth pair", str(err)
                    ) from None
                # Either the container already has ``ifname`` (a second ADD, or someone else's
                # interface: refuse, touching nothing), or a host end with our name survived a
                # crash (the name hashes network, container id and ifname, so it can only be this
                # attachment's, and its container end is gone): remove it and try once more.
                if attempt == 2:
                    raise _exists_error(spec) from None
                with in_netns(spec.netns) as nsr:
                    if _get_link(nsr, spec.ifname) is not None:
                        raise _exists_error(spec) from None
                if not _delete_link(ipr, spec.host_ifname):
                    raise _exists_error(spec) from None
    finally:
        os.close(netns_fd)
    try:
        _configure(spec, ipr, routes, gateways)
    except BaseException:
        _delete_link(ipr, spec.host_ifname)
        raise
    return Attached(
        host_mac=host_mac,
        container_mac=container_mac,
        mtu=mtu,
        gateways=gateways,
        routes=routes,
        bridge_mac=info.mac,
        bridge_mtu=info.mtu,
    )


def limit_gso(ipr: IPRoute, index: int, size: int) -> None:
    """Cap a device's TSO/GSO size (best effort: an old kernel may refuse)."""
    with contextlib.suppress(NetlinkError):
        ipr.link("set", index=index, gso_max_size=size)


def _configure(
    spec: AttachSpec,
    ipr: IPRoute,
    routes: Sequence[Mapping[str, Any]],
    gateways: Mapping[str, str],
) -> None:
    step = "set hairpin mode"
    try:
        if spec.gso_max_size is not None:
            host = _get_link(ipr, spec.host_ifname)
            if host is not None:
                limit_gso(ipr, int(host["index"]), spec.gso_max_size)
        if spec.hairpin:
            ipr.brport("set", ifname=spec.host_ifname, mode=1)
        step = "configure container end"
        with in_netns(spec.netns) as nsr:
            link = _get_link(nsr, spec.ifname)
            if link is None:
                raise AttachError(
                    AttachFailure.KERNEL, f"{spec.ifname} vanished from the container"
                )
            idx = int(link["index"])
            for cidr in spec.addresses:
                iface = ipaddress.ip_interface(cidr)
                extra: dict[str, Any] = {}
                if iface.version == 4:
                    extra["broadcast"] = str(iface.network.broadcast_address)
                nsr.addr(
                    "add",
                    index=idx,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    **extra,
                )
            if spec.gso_max_size is not None:
                limit_gso(nsr, idx, spec.gso_max_size)
            nsr.link("set", index=idx, state="up")
            if spec.loopback_up:
                lo = _get_link(nsr, "lo")
                if lo is not None:
                    nsr.link("set", index=int(lo["index"]), state="up")
            step = "add routes"
            for route in routes:
                net = ipaddress.ip_network(str(route["dst"]), strict=False)
                default_gw = next(
                    (
                        gw
                        for cidr, gw in gateways.items()
                        if ipaddress.ip_interface(cidr).version == net.version
                    ),
                    None,
                )
                nsr.route("add", **_route_args(route, idx, default_gw))
    except NetlinkError as err:
        raise AttachError(AttachFailure.KERNEL, f"cannot {step}", str(err)) from None


def detach(host_name: str) -> bool:
    """Remove an attachment's veth pair (idempotent). True when something was removed.

    Deleting the host end removes the pair, also when the namespace is already gone.
    """
    return _delete_link(_host(), host_name)


def check(
    netns: str,
    ifname: str,
    host_name: str,
    bridge: str,
    addresses: Sequence[str],
    routes: Sequence[Mapping[str, Any]],
) -> list[str]:
    """Problems found with an attachment (empty when it is as expected)."""
    problems: list[str] = []
    ipr = _host()
    host = _get_link(ipr, host_name)
    if host is None:
        problems.append(f"host interface {host_name} is missing")
    else:
        br = _get_link(ipr, bridge)
        if br is None or host.get_attr("IFLA_MASTER") != br["index"]:
            problems.append(f"host interface {host_name} is not on bridge {bridge}")
    try:
        with in_netns(netns) as nsr:
            link = _get_link(nsr, ifname)
            if link is None:
                problems.append(f"interface {ifname} is missing in {netns}")
                return problems
            idx = int(link["index"])
            if not link["flags"] & 1:  # IFF_UP
                problems.append(f"interface {ifname} is down")
            have = {
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in nsr.get_addr(index=idx)
            }
            for cidr in addresses:
                iface = ipaddress.ip_interface(cidr)
                if f"{iface.ip}/{iface.network.prefixlen}" not in have:
                    problems.append(f"address {cidr} is missing on {ifname}")
            installed = set()
            for family, any_dst in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                for r in nsr.get_routes(family=family):
                    if r.get_attr("RTA_OIF") != idx:
                        continue
                    dst = r.get_attr("RTA_DST") or any_dst
                    net = ipaddress.ip_network(f"{dst}/{r['dst_len']}")
                    installed.add((str(net), r.get_attr("RTA_GATEWAY")))
            for route in routes:
                net = ipaddress.ip_network(str(route["dst"]), strict=False)
                gw = route.get("gw")
                if (str(net), gw) in installed or (
                    gw is None and any(n == str(net) for n, _ in installed)
                ):
                    continue
                via = f" via {gw}" if gw else ""
                problems.append(f"route to {net}{via} is missing on {ifname}")
    except AttachError as err:
        problems.append(f"{err.msg}: {err.details}")
    return problems
