"""Optional parts `weft router` composes into its Router: IPAM and the CNI handler.

Each part has its own module and its own wiring function; this file only decides, from the
RouterConfig, which to build and glues the few seams between them:

* IPAM (``weft.ipam.service``): ``IpamService(name, config_from_flags(--ipalloc-range,
  --ipalloc-default-subnet, --ipalloc-init, number of launch peers), data_dir)`` and
  ``attach_to_router`` (gossip channel "ipam", ``/ip/...`` routes, ``ipam`` status key). Its
  SQLite store is closed when the router's app is cleaned up (at stop).
* CNI (``weft.cni.server``): ``setup_cni(router, IpamForCni(service), CniConfig(bridge))``, so
  ``/cni/{add,del,check,status,gc}`` allocate from the mesh-wide allocator.

:class:`IpamForCni` adapts the IPAM service to the CNI handler's ``CniIpam`` protocol: CIDR
strings, idempotent release, and the error mapping the plugin turns into CNI codes (transient
-> ``IpamUnavailable`` (11, try again later), anything else -> ``IpamRefused`` (103)).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from weft.errors import WeftError

if TYPE_CHECKING:
    from aiohttp import web

    from weft.ipam.service import IpamService
    from weft.router.router import Router

__all__ = ["IpamForCni", "compose_ipam_and_cni"]

log = logging.getLogger("weft.router")


class IpamForCni:
    """``CniIpam`` over :class:`~weft.ipam.service.IpamService` (runs on the router's loop)."""

    def __init__(self, service: IpamService) -> None:
        self.service = service

    async def allocate(self, ident: str, subnet: str | None) -> str:
        from weft.cni.server import IpamRefused, IpamUnavailable
        from weft.ipam.allocator import NotReadyError, RequestTimeoutError

        try:
            allocation = await self.service.allocate(ident, subnet)
        except (NotReadyError, RequestTimeoutError) as err:
            raise IpamUnavailable(str(err)) from None
        except WeftError as err:
            raise IpamRefused(str(err)) from None
        return allocation.cidr

    async def release(self, ident: str) -> None:
        from weft.cni.server import IpamRefused, IpamUnavailable
        from weft.ipam.allocator import NotReadyError

        try:
            self.service.release(ident)
        except NotReadyError as err:
            raise IpamUnavailable(str(err)) from None
        except WeftError as err:
            raise IpamRefused(str(err)) from None

    async def lookup(self, ident: str) -> list[str]:
        return [a.cidr for a in self.service.lookup(ident)]

    async def idents(self, prefix: str) -> list[str]:
        return sorted(
            {
                a.container_id
                for a in self.service.allocations()
                if a.container_id.startswith(prefix)
            }
        )

    def ready(self) -> bool:
        return self.service.ready()


def compose_ipam_and_cni(router: Router) -> IpamService | None:
    """Build IPAM (unless ``--no-ipam``) and the CNI handler on it; None when IPAM is off."""
    config = router.config
    if not config.ipam:
        log.info("IPAM off (--no-ipam): no /ip or /cni routes")
        return None
    from weft.cni.server import CniConfig, setup_cni
    from weft.ipam.service import IpamService, attach_to_router, config_from_flags

    ipam_config = config_from_flags(
        config.ipalloc_range,
        config.ipalloc_default_subnet,
        config.ipalloc_init,
        initial_peers=len(config.peers),
    )
    service = IpamService(router.identity.name, ipam_config, config.data_dir)
    attach_to_router(router, service)

    async def close_ipam(_app: web.Application) -> None:
        service.close()

    router.app.on_cleanup.append(close_ipam)
    bridge = os.environ.get("WEFT_BRIDGE", "weft")
    setup_cni(router, IpamForCni(service), CniConfig(bridge=bridge))
    log.info(
        "IPAM on %s (%s); CNI handler on bridge %s", ipam_config.range, ipam_config.init, bridge
    )
    return service
