"""The host side of the data plane: the ``weft`` bridge, the router's TAP on it, and containers.

* :func:`ensure_bridge` creates the bridge if missing (STP off, so no forwarding delay), sets its
  MTU to the overlay MTU and puts the router's TAP on it (TAP MTU 65521, its maximum: large
  frames pass, and the bridge's own MTU stays the one set here).
* :class:`Bridge` implements ``weft expose`` (an address for the host on the bridge),
  ``weft attach`` (a veth from a network namespace, given as a path or an ``ip netns`` name, onto
  the bridge, with the addresses given — required until IPAM is wired), ``weft detach`` and
  ``weft ps``.

All calls are synchronous pyroute2 and meant for a worker thread (``asyncio.to_thread``). To act
inside a container's namespace the calling thread briefly ``setns()``-es into it, opens a netlink
socket (a socket stays bound to the namespace it was created in) and switches straight back; a
failure to switch back is fatal for the process rather than leaving a thread in a container.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weft.errors import ConfigError, LocalError, WeftError
from weft.host import attach

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_MTU",
    "Attachment",
    "Bridge",
    "ensure_bridge",
    "resolve_netns",
]

DEFAULT_BRIDGE: Final = "weft"
DEFAULT_MTU: Final = 1376  # Weave's default container MTU; fits one datagram on most underlays
# TCP super-frames no larger than this fit one UDP GSO send (44 x 1472-byte datagrams, sealed),
# so the sleeve moves each with one sendmsg and the receiver gets it whole from GRO.
SUPERFRAME_MAX: Final = 61440


def resolve_netns(netns: str) -> str:
    """A namespace path from a path or an ``ip netns`` name; ConfigError when there is none."""
    if not netns:
        raise ConfigError("netns must not be empty")
    path = netns if "/" in netns else f"/run/netns/{netns}"
    if not os.path.exists(path):
        raise ConfigError(f"network namespace {netns!r} not found ({path} does not exist)")
    return path


def _link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def ensure_bridge(
    name: str = DEFAULT_BRIDGE, tap: str | None = None, mtu: int = DEFAULT_MTU
) -> int:
    """Create the bridge if missing, bring it up, put ``tap`` on it; return the bridge index."""
    with IPRoute() as ipr:
        index = _link_index(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise LocalError(f"cannot create bridge {name}: {err}") from err
            index = _link_index(ipr, name)
            if index is None:
                raise LocalError(f"bridge {name} vanished right after it was created")
        ipr.link("set", index=index, mtu=mtu, state="up")
        attach.limit_gso(ipr, index, SUPERFRAME_MAX)  # the host's own traffic, exposed address
        if tap is not None:
            tap_index = _link_index(ipr, tap)
            if tap_index is None:
                raise LocalError(f"TAP {tap} not found")
            ipr.link("set", index=tap_index, mtu=65521)  # the TAP maximum
            ipr.link("set", index=tap_index, master=index, state="up")
        return index


@dataclass
class Attachment:
    netns: str  # as given by the user
    path: str
    ifname: str
    host_ifname: str
    mac: str
    addresses: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "ifname": self.ifname,
            "host_ifname": self.host_ifname,
            "mac": self.mac,
            "addresses": list(self.addresses),
        }


def _host_ifname(path: str) -> str:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        key = f"{st.st_dev}:{st.st_ino}"  # the namespace itself, whatever path named it
    except OSError:
        key = real
    return "vwe" + hashlib.sha256(key.encode()).hexdigest()[:10]


def _addresses(ipr: IPRoute, index: int) -> list[str]:
    out = []
    for msg in ipr.get_addr(index=index):
        addr = msg.get_attr("IFA_ADDRESS")
        if addr and msg["family"] == 2:
            out.append(f"{addr}/{msg['prefixlen']}")
    return out


def _bridge_error(err: attach.AttachError, netns: str, ifname: str, bridge: str) -> WeftError:
    """The caller's error (``weft attach``, the bridge API: ConfigError is a 400) for a failed
    kernel step."""
    if err.failure is attach.AttachFailure.INTERFACE_EXISTS:
        return ConfigError(f"{netns} already has an interface named {ifname}")
    if err.failure is attach.AttachFailure.NETNS_GONE:
        return ConfigError(f"network namespace {netns!r} not found")
    if err.failure is attach.AttachFailure.BRIDGE_MISSING:
        return LocalError(f"bridge {bridge} does not exist (is the router's data plane up?)")
    detail = f": {err.details}" if err.details else ""
    return LocalError(f"cannot attach {netns}: {err.msg}{detail}")


class Bridge:
    """Containers and host addresses on one bridge. One instance per router; not thread-safe:
    the HTTP handlers serialise calls (one worker thread at a time)."""

    def __init__(self, name: str = DEFAULT_BRIDGE, mtu: int = DEFAULT_MTU) -> None:
        self.name = name
        self.mtu = mtu
        self._attached: dict[str, Attachment] = {}  # by host_ifname
        self.lock = threading.Lock()

    def _bridge_index(self, ipr: IPRoute) -> int:
        index = _link_index(ipr, self.name)
        if index is None:
            raise LocalError(f"bridge {self.name} does not exist (is the router's data plane up?)")
        return index

    def expose(self, cidr: str | None) -> list[str]:
        """Give the host ``cidr`` on the bridge (idempotent); return the bridge's addresses."""
        if not cidr:
            raise ConfigError("a CIDR is required (e.g. 10.32.0.1/12): IPAM is not wired yet")
        iface = _parse_cidr(cidr)
        with IPRoute() as ipr:
            index = self._bridge_index(ipr)
            try:
                ipr.addr(
                    "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except NetlinkError as err:
                if err.code != errno.EEXIST:
                    raise LocalError(f"cannot add {cidr} to {self.name}: {err}") from err
            return _addresses(ipr, index)

    def hide(self, cidr: str) -> list[str]:
        """Remove an exposed address; return what remains."""
        iface = _parse_cidr(cidr)
        with IPRoute() as ipr:
            index = self._bridge_index(ipr)
            try:
                ipr.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except NetlinkError as err:
                if err.code != errno.EADDRNOTAVAIL:
                    raise LocalError(f"cannot remove {cidr} from {self.name}: {err}") from err
            return _addresses(ipr, index)

    def attach(
        self, netns: str, ips: list[str], ifname: str = "ethwe", mtu: int | None = None
    ) -> Attachment:
        """Put ``netns`` on the bridge through a veth named ``ifname`` inside it."""
        path = resolve_netns(netns)
        if not ips:
            raise ConfigError("--ip is required (e.g. 10.32.0.2/12): IPAM is not wired yet")
        ifaces = [_parse_cidr(ip) for ip in ips]
        if not 0 < len(ifname.encode()) < 16 or "/" in ifname or ifname.strip() != ifname:
            raise ConfigError(f"invalid interface name {ifname!r}")
        use_mtu = mtu or self.mtu
        if not 68 <= use_mtu <= 65535:
            raise ConfigError(f"MTU {use_mtu} out of range 68..65535")
        host = _host_ifname(path)
        if host in self._attached:
            raise ConfigError(f"{netns} is already attached (as {host}); detach it first")
        spec = attach.AttachSpec(
            netns=path,
            ifname=ifname,
            host_ifname=host,
            bridge=self.name,
            mtu=use_mtu,
            hairpin=False,
            addresses=tuple(str(iface) for iface in ifaces),
            default_route=False,  # `weft attach` adds an address on the bridge's subnet only
            gso_max_size=SUPERFRAME_MAX,
            loopback_up=True,
        )
        try:
            attached = attach.attach(spec)
        except attach.AttachError as err:
            raise _bridge_error(err, netns, ifname, self.name) from None
        mac = attached.container_mac
        addresses = list(spec.addresses)
        att = Attachment(netns, path, ifname, host, mac, addresses)
        self._attached[host] = att
        return att

    def detach(self, netns: str) -> bool:
        """Remove the namespace's veth; False when it was not attached."""
        path = netns if "/" in netns else f"/run/netns/{netns}"
        host = _host_ifname(path) if os.path.exists(path) else None
        found = self._attached.pop(host, None) if host else None
        if found is None:
            for key, att in list(self._attached.items()):
                if netns in (att.netns, att.path):
                    found = self._attached.pop(key)
                    host = key
                    break
        if host is None:
            return False
        with IPRoute() as ipr:
            if _link_index(ipr, host) is None:
                return found is not None
            ipr.link("del", ifname=host)
        return True

    def attachments(self) -> list[dict[str, Any]]:
        """What this router attached, as last seen (no netlink: cheap enough for ``/status``)."""
        return [att.as_dict() for att in self._attached.values()]

    def ps(self) -> list[dict[str, Any]]:
        """Attached namespaces with their MAC and current addresses (gone ones are dropped)."""
        out = []
        with IPRoute() as ipr:
            for host, att in list(self._attached.items()):
                if _link_index(ipr, host) is None or not os.path.exists(att.path):
                    del self._attached[host]
                    continue
                try:
                    with attach.in_netns(att.path) as nsr:
                        inner = _link_index(nsr, att.ifname)
                        if inner is not None:
                            att.addresses = _addresses(nsr, inner)
                            att.mac = str(nsr.get_links(inner)[0].get_attr("IFLA_ADDRESS"))
                except OSError:
                    pass
                out.append(att.as_dict())
        return out


def _parse_cidr(text: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as err:
        raise ConfigError(f"invalid address {text!r}: expected a CIDR like 10.32.0.2/12") from err
    if not isinstance(iface, ipaddress.IPv4Interface) or "/" not in text:
        raise ConfigError(f"invalid address {text!r}: expected an IPv4 CIDR like 10.32.0.2/12")
    return iface


def netns_exists(netns: str) -> bool:
    return Path(netns if "/" in netns else f"/run/netns/{netns}").exists()


def main(argv: list[str] | None = None) -> int:
    """``python -m weft.host.bridge attach|detach|expose NETNS-or-CIDR [--ip CIDR]...``: the
    same kernel work as the HTTP API, for debugging and tests (run inside the host namespace)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m weft.host.bridge")
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("attach")
    p.add_argument("netns")
    p.add_argument("--ip", action="append", default=[])
    p.add_argument("--ifname", default="ethwe")
    p.add_argument("--mtu", type=int)
    p = sub.add_parser("detach")
    p.add_argument("netns")
    p = sub.add_parser("expose")
    p.add_argument("cidr")
    args = parser.parse_args(argv)
    bridge = Bridge(args.bridge)
    if args.cmd == "attach":
        print(json.dumps(bridge.attach(args.netns, args.ip, args.ifname, args.mtu).as_dict()))
    elif args.cmd == "detach":
        host = _host_ifname(resolve_netns(args.netns))
        with IPRoute() as ipr:
            if _link_index(ipr, host) is not None:
                ipr.link("del", ifname=host)
    else:
        print(json.dumps(bridge.expose(args.cidr)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
