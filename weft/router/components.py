"""Optional parts `weft router` composes into its Router: IPAM and the CNI handler.

Each part has its own module and its own wiring function; this file only decides, from the
RouterConfig, which to build and glues the few seams between them:

* IPAM (``weft.ipam.service``): ``IpamService(name, config_from_flags(--ipalloc-range,
  --ipalloc-default-subnet, --ipalloc-init, number of launch peers), data_dir)`` and
  ``attach_to_router`` (gossip channel "ipam", ``/ip/...`` routes, ``ipam`` status key). Its
  SQLite store is closed when the router's app is cleaned up (at stop).
* CNI (``weft.cni.server``): ``setup_cni(router, ServiceIpam(service), CniConfig(...))``, so
  ``/cni/{add,del,check,status,gc}`` allocate (and claim static addresses) from the mesh-wide
  allocator; releases a plugin could not deliver are spooled under ``<data dir>/cni-spool``.
* The data plane's ``/attach`` and ``/expose`` without an address: :func:`bridge_ipam_hooks`.

``weft.cni.ipam_adapter.ServiceIpam`` adapts the IPAM service to the ``CniIpam`` protocol (CIDR
strings, idempotent release, transient errors -> CNI code 11, refusals -> 103); the Docker plugin
uses the same adapter.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aiohttp import web

    from weft.cni.server import CniService
    from weft.ipam.service import IpamService
    from weft.router.router import Router

__all__ = ["bridge_ipam_hooks", "compose_ipam_and_cni"]

log = logging.getLogger("weft.router")


def compose_ipam_and_cni(router: Router) -> tuple[IpamService | None, CniService | None]:
    """Build IPAM (unless ``--no-ipam``) and the CNI handler on it; (None, None) when IPAM is
    off."""
    config = router.config
    if not config.ipam:
        log.info("IPAM off (--no-ipam): no /ip or /cni routes")
        return None, None
    from weft.cni.ipam_adapter import ServiceIpam
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
    spool = str(config.data_dir / "cni-spool")
    cni = setup_cni(router, ServiceIpam(service), CniConfig(bridge=bridge, spool_dir=spool))
    log.info(
        "IPAM on %s (%s); CNI handler on bridge %s", ipam_config.range, ipam_config.init, bridge
    )
    return service, cni


def bridge_ipam_hooks(
    service: IpamService,
) -> tuple[Callable[[str], Awaitable[list[str]]], Callable[[str], Awaitable[None]]]:
    """``allocate(ident) -> [cidr]`` and ``release(ident)`` for the bridge API, so `weft attach`
    and `weft expose` without an address take one from IPAM (and `weft detach` gives it back)."""

    async def allocate(ident: str) -> list[str]:
        return [(await service.allocate(ident, None)).cidr]

    async def release(ident: str) -> None:
        service.release(ident)

    return allocate, release
