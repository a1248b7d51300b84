"""Kernel work for CNI attachments: a veth pair from a container's netns onto the weft bridge.

Synchronous pyroute2 calls, meant to run in a worker thread (``asyncio.to_thread``) of the router.
To act inside a container's network namespace without forking (pyroute2's ``IPRoute(netns=...)``
forks a child per socket, ~9 ms here), the calling thread briefly ``setns()``-es into the target
namespace, opens a netlink socket there — a socket stays bound to the namespace it was created
in — and switches straight back (~1.5 ms). Only that thread ever changes namespace, and a failure to
switch back is fatal for the process rather than silently leaving a worker in a container.

Why not ``weft/router/bridge.py``'s attach: CNI needs a caller-chosen interface name, a host-side
name derived from the attachment, hairpin mode, routes from configuration or IPAM, and an exact
undo of a half-done ADD; those belong to the CNI contract, so they live here.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weft.cni.plugin import ERR_INTERFACE_EXISTS, ERR_KERNEL, ERR_UNKNOWN_CONTAINER, CniError

__all__ = [
    "AttachSpec",
    "Attached",
    "BridgeInfo",
    "attach",
    "bridge_info",
    "check",
    "detach",
    "host_ifname",
    "in_netns",
]

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
        raise CniError(
            ERR_UNKNOWN_CONTAINER, "network namespace does not exist", netns_path
        ) from None
    except OSError as err:
        raise CniError(
            ERR_KERNEL, "cannot open network namespace", f"{netns_path}: {err}"
        ) from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        except OSError as err:
            raise CniError(ERR_KERNEL, "cannot enter netns", f"{netns_path}: {err}") from err
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


def bridge_info(bridge: str) -> BridgeInfo | None:
    """The bridge's index, MAC, MTU and addresses, or None when it does not exist."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
        addresses = tuple(
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=found[0])
        )
        return BridgeInfo(
            index=found[0],
            mac=str(link.get_attr("IFLA_ADDRESS")),
            mtu=int(link.get_attr("IFLA_MTU")),
            addresses=addresses,
        )


@dataclass(frozen=True)
class AttachSpec:
    """One container interface to create. ``routes`` entries follow the CNI result's shape."""

    netns: str
    ifname: str
    host_ifname: str
    bridge: str
    mtu: int
    hairpin: bool
    addresses: tuple[str, ...]  # CIDRs
    routes: tuple[Mapping[str, Any], ...] = ()
    gateways: Mapping[str, str] = field(default_factory=dict)  # address CIDR -> gateway


@dataclass(frozen=True)
class Attached:
    host_mac: str
    container_mac: str


def _route_args(route: Mapping[str, Any], oif: int, default_gw: str | None) -> dict[str, Any]:
    dst = str(route["dst"])
    net = ipaddress.ip_network(dst, strict=False)
    args: dict[str, Any] = {"dst": str(net), "oif": oif}
    if net.version == 6:
        args["family"] = socket.AF_INET6
    gw = route.get("gw") or default_gw
    if gw and ipaddress.ip_address(gw).version == net.version:
        args["gateway"] = gw
    for key, arg in (("priority", "priority"), ("table", "table"), ("scope", "scope")):
        if isinstance(route.get(key), int):
            args[arg] = route[key]
    metrics = {}
    if isinstance(route.get("mtu"), int) and route["mtu"]:
        metrics["RTAX_MTU"] = route["mtu"]
    if isinstance(route.get("advmss"), int) and route["advmss"]:
        metrics["RTAX_ADVMSS"] = route["advmss"]
    if metrics:
        args["metrics"] = {"attrs": list(metrics.items())}
    return args


def _delete_link(ipr: IPRoute, name: str) -> bool:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return False
    try:
        ipr.link("del", index=found[0])
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise
    return True


def attach(spec: AttachSpec) -> Attached:
    """Create the veth pair and configure both ends; on any failure remove what was made.

    Raises CniError: 3 when the namespace is gone, 101 when ``ifname`` already exists there, 100
    for other kernel failures.
    """
    with in_netns(spec.netns) as nsr:
        if nsr.link_lookup(ifname=spec.ifname):
            raise CniError(
                ERR_INTERFACE_EXISTS,
                f"interface {spec.ifname} already exists in the container",
                spec.netns,
            )
        with IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname=spec.bridge)
            if not bridge:
                raise CniError(ERR_KERNEL, f"bridge {spec.bridge} does not exist")
            # A host end with our name can only be a leftover of this very attachment (the name
            # hashes network, container id and ifname): a crash between create and undo.
            _delete_link(ipr, spec.host_ifname)
            netns_fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link(
                    "add",
                    ifname=spec.host_ifname,
                    kind="veth",
                    mtu=spec.mtu,
                    peer={"ifname": spec.ifname, "net_ns_fd": netns_fd, "mtu": spec.mtu},
                )
            except NetlinkError as err:
                if err.code == errno.EEXIST:
                    raise CniError(
                        ERR_INTERFACE_EXISTS,
                        f"interface {spec.ifname} already exists in the container",
                        spec.netns,
                    ) from None
                raise CniError(ERR_KERNEL, "cannot create veth pair", str(err)) from None
            finally:
                os.close(netns_fd)
            try:
                return _configure(spec, ipr, nsr, bridge[0])
            except BaseException:
                _delete_link(ipr, spec.host_ifname)
                raise


def _configure(spec: AttachSpec, ipr: IPRoute, nsr: IPRoute, bridge: int) -> Attached:
    step = "configure host end"
    try:
        host = ipr.link_lookup(ifname=spec.host_ifname)[0]
        ipr.link("set", index=host, master=bridge)
        if spec.hairpin:
            ipr.brport("set", index=host, mode=1)
        ipr.link("set", index=host, state="up")
        host_mac = str(ipr.get_links(host)[0].get_attr("IFLA_ADDRESS"))

        step = "configure container end"
        idx = nsr.link_lookup(ifname=spec.ifname)[0]
        lo = nsr.link_lookup(ifname="lo")
        if lo:
            nsr.link("set", index=lo[0], state="up")
        for cidr in spec.addresses:
            iface = ipaddress.ip_interface(cidr)
            extra: dict[str, Any] = {}
            if iface.version == 4:
                extra["broadcast"] = str(iface.network.broadcast_address)
            nsr.addr(
                "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra
            )
        nsr.link("set", index=idx, state="up")
        step = "add routes"
        for route in spec.routes:
            net = ipaddress.ip_network(str(route["dst"]), strict=False)
            default_gw = next(
                (
                    gw
                    for cidr, gw in spec.gateways.items()
                    if ipaddress.ip_interface(cidr).version == net.version
                ),
                None,
            )
            nsr.route("add", **_route_args(route, idx, default_gw))
        container_mac = str(nsr.get_links(idx)[0].get_attr("IFLA_ADDRESS"))
    except NetlinkError as err:
        raise CniError(ERR_KERNEL, f"cannot {step}", str(err)) from None
    return Attached(host_mac=host_mac, container_mac=container_mac)


def detach(host_name: str, netns: str, ifname: str) -> bool:
    """Remove an attachment's veth pair (idempotent). True when something was removed.

    Deleting the host end removes the pair even when the namespace is already gone. When the host
    end is missing but the namespace still holds a veth named ``ifname`` whose peer is gone, that
    cannot be ours to judge; it is left alone.
    """
    del netns, ifname
    with IPRoute() as ipr:
        return _delete_link(ipr, host_name)


def check(spec: AttachSpec, routes: Sequence[Mapping[str, Any]], bridge: str) -> list[str]:
    """Problems found with an attachment (empty when it is as expected)."""
    problems: list[str] = []
    with IPRoute() as ipr:
        host = ipr.link_lookup(ifname=spec.host_ifname)
        if not host:
            problems.append(f"host interface {spec.host_ifname} is missing")
        else:
            link = ipr.get_links(host[0])[0]
            bridges = ipr.link_lookup(ifname=bridge)
            if not bridges or link.get_attr("IFLA_MASTER") != bridges[0]:
                problems.append(f"host interface {spec.host_ifname} is not on bridge {bridge}")
    try:
        with in_netns(spec.netns) as nsr:
            found = nsr.link_lookup(ifname=spec.ifname)
            if not found:
                problems.append(f"interface {spec.ifname} is missing in {spec.netns}")
                return problems
            idx = found[0]
            link = nsr.get_links(idx)[0]
            if link.get_attr("IFLA_OPERSTATE") == "DOWN" or not link["flags"] & 1:
                problems.append(f"interface {spec.ifname} is down")
            have = {
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in nsr.get_addr(index=idx)
            }
            for cidr in spec.addresses:
                iface = ipaddress.ip_interface(cidr)
                if f"{iface.ip}/{iface.network.prefixlen}" not in have:
                    problems.append(f"address {cidr} is missing on {spec.ifname}")
            installed = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                for r in nsr.get_routes(family=family):
                    if r.get_attr("RTA_OIF") != idx:
                        continue
                    dst = r.get_attr("RTA_DST")
                    net = ipaddress.ip_network(
                        f"{dst}/{r['dst_len']}"
                        if dst
                        else ("::/0" if family == socket.AF_INET6 else "0.0.0.0/0")
                    )
                    installed.add((str(net), r.get_attr("RTA_GATEWAY")))
            for route in routes:
                net = ipaddress.ip_network(str(route["dst"]), strict=False)
                gw = route.get("gw")
                if (str(net), gw) not in installed and not (
                    gw is None and any(n == str(net) for n, _ in installed)
                ):
                    problems.append(
                        f"route to {net}"
                        + (f" via {gw}" if gw else "")
                        + f" is missing on {spec.ifname}"
                    )
    except CniError as err:
        problems.append(f"{err.msg}: {err.details}")
    return problems
