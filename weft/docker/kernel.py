"""Kernel work for Docker endpoints: a veth pair on the weft bridge, left for Docker to move.

Docker (unlike a CNI runtime) moves the container end into the sandbox itself, so the pair is
made in the host namespace only. Bridge lookups and deletion are the CNI plugin's
(weft/host/attach.py); host addresses on the bridge are the data plane's ``Bridge.expose`` /
``hide`` (weft/host/bridge.py). Synchronous; call from a worker thread.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weft.errors import LocalError
from weft.host import attach as cni_kernel
from weft.host.bridge import Bridge

__all__ = ["HostKernel"]


class HostKernel:
    """The real :class:`~weft.docker.plugin.EndpointKernel`."""

    def create(self, host: str, peer: str, bridge: str, mtu: int | None) -> None:
        info = cni_kernel.bridge_info(bridge)
        if info is None:
            raise LocalError(f"bridge {bridge} does not exist (is the router's data plane up?)")
        use_mtu = mtu or info.mtu
        with IPRoute() as ipr:
            for attempt in (1, 2):
                try:
                    ipr.link(
                        "add",
                        ifname=host,
                        kind="veth",
                        mtu=use_mtu,
                        master=info.index,
                        state="up",
                        peer={"ifname": peer, "mtu": use_mtu},
                    )
                    return
                except NetlinkError as err:
                    # a pair left by an earlier router or a Join retried after an error
                    if err.code == errno.EEXIST and attempt == 1:
                        cni_kernel.detach(host)
                        cni_kernel.detach(peer)
                        continue
                    raise LocalError(f"cannot create veth {host}: {err}") from None

    def delete(self, host: str) -> bool:
        return cni_kernel.detach(host)

    def expose(self, bridge: str, cidr: str) -> None:
        Bridge(bridge).expose(cidr)

    def hide(self, bridge: str, cidr: str) -> None:
        Bridge(bridge).hide(cidr)
