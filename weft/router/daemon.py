"""`weft router`: run one router in the foreground until SIGTERM/SIGINT or ``POST /stop``.

This is where the parts are composed (docs/ARCHITECTURE.md, "Router composition"): the data plane
(an Overlay chosen by ``--datapath``), then the router, then the parts that plug into it (UI and
metrics routes, ...), each only if it is installed. A part that is missing is logged, never fatal,
except the data plane asked for explicitly with ``--datapath sleeve``.

A fatal error is one stderr line starting with ``weft router: error:`` (what `weft launch` shows)
and exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from weft.errors import ConfigError, WeftError
from weft.overlay import NullOverlay, Overlay
from weft.router.components import bridge_ipam_hooks, compose_ipam_and_cni
from weft.router.config import RouterConfig
from weft.router.router import Router

if TYPE_CHECKING:
    from weft.ipam.service import IpamService
    from weft.k8s.netpol import PolicyFollower

__all__ = ["FATAL_MARK", "Components", "build_overlay", "compose", "run_router", "serve"]

log = logging.getLogger("weft.router")

FATAL_MARK = "weft router: error: "
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"

# The data plane's factory: ``make_overlay(config: RouterConfig) -> Overlay``: the overlay switch
# (sleeve always, kernel VXLAN where it works; it reads ``config.datapath`` itself).
OVERLAY_FACTORIES = {"sleeve": ("weft.switch.pump", "make_overlay")}


def build_overlay(config: RouterConfig) -> Overlay:
    """The Overlay for ``config.datapath`` (call inside the running loop).

    ``none`` -> NullOverlay. ``sleeve``/``vxlan`` -> the overlay switch in that mode, or a fatal
    ConfigError saying why not. ``auto`` -> the switch (vxlan where the kernel allows, sleeve
    always) when it can be built here, else NullOverlay with a warning (control plane only), so
    a router still meshes on a host without TUN or without privileges.
    """
    if config.datapath == "none":
        return NullOverlay()
    module_name, func_name = OVERLAY_FACTORIES["sleeve"]
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, func_name)
        overlay: Overlay = factory(config)
    except (ImportError, AttributeError, OSError, WeftError) as err:
        reason = f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)
        if config.datapath != "auto":
            raise ConfigError(
                f"--datapath {config.datapath} is not available here: {reason}"
            ) from None
        log.warning("no data plane (%s): running the control plane only", reason)
        return NullOverlay()
    return overlay


@dataclass
class Components:
    """What :func:`compose` built, for callers that need a part (tests, later wiring)."""

    ipam: IpamService | None = None
    policy: PolicyFollower | None = None


def compose(router: Router) -> Components:
    """Plug the optional parts into ``router`` (before it starts)."""
    parts = Components()
    parts.ipam, cni = compose_ipam_and_cni(router)
    overlay_routes = getattr(router.overlay, "setup_routes", None)
    if callable(overlay_routes):
        # the data plane's /expose, /attach, /detach, /ps; addresses from IPAM when not given
        hooks = bridge_ipam_hooks(parts.ipam) if parts.ipam is not None else (None, None)
        overlay_routes(router.app, *hooks)
    sleeve = getattr(router.overlay, "sleeve", router.overlay)  # the switch wraps the sleeve
    bridge = getattr(sleeve, "bridge", None)
    if bridge is not None:
        router.add_status_provider("containers", bridge.attachments)
    config = router.config
    if config.docker_plugin is not None:
        if parts.ipam is None:
            raise ConfigError("--docker-plugin needs IPAM (drop --no-ipam)")
        from weft.cni.ipam_adapter import ServiceIpam
        from weft.docker.server import setup_docker_plugin

        setup_docker_plugin(router, ServiceIpam(parts.ipam), config.docker_plugin)
    if config.k8s is not None:
        from weft.k8s.discovery import setup_k8s

        discovery = setup_k8s(router, parts.ipam, config.k8s)
        if config.k8s.network_policy:
            from weft.k8s.netpol import setup_network_policy

            parts.policy = setup_network_policy(router, discovery, cni)
        else:
            log.info("NetworkPolicy not enforced (--no-network-policy)")
    try:
        from weft.ui.metrics import Metrics
        from weft.ui.server import setup_routes
    except ImportError as err:
        log.info("UI and metrics not installed (%s)", err)
    else:
        metrics = Metrics(get_status=router.status)
        metrics.set_mesh_stats_source(lambda: router.mesh.stats)
        hub = setup_routes(router.app, router.status, metrics=metrics)
        setup_routes(router.status_app, router.status, hub=hub, metrics=metrics)
        router.on_status_changed(hub.notify)
        router.on_connection_closed(lambda label, _reason: metrics.connection_terminated(label))
        # The overlay switch's fallbacks (by reason) reach the metrics through its status
        # (overlay.switch.fallback_reasons): no on_fallback wiring, which would count them twice.
    return parts


async def _k8s_identity(config: RouterConfig) -> RouterConfig:
    """Under ``--k8s`` the peer name derives from the node name (so every router can tell which
    peer a deleted node ran), and a fresh node agrees on the range with the listed nodes."""
    k8s = config.k8s
    if k8s is None:
        return config
    from weft.k8s.core import peer_name_for_node
    from weft.k8s.discovery import initial_ipalloc_init

    config = replace(config, name=peer_name_for_node(k8s.node_name))
    if config.ipam and config.ipalloc_init is None and not (config.data_dir / "ipam.db").exists():
        config = replace(config, ipalloc_init=await initial_ipalloc_init(k8s))
    return config


async def serve(config: RouterConfig) -> int:
    config = await _k8s_identity(config)
    overlay = build_overlay(config)
    router = Router(config, overlay)
    compose(router)
    await router.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, router.request_stop)
    await router.wait_stopped()
    log.info("router %s stopped", router.identity.name)
    return 0


def run_router(config: RouterConfig, log_level: str = "info") -> int:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format=LOG_FORMAT,
        stream=sys.stderr,
        force=True,
    )
    # aiohttp's own access/server chatter is noise for an operator at "info".
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, logging.root.level))
    try:
        return asyncio.run(serve(config))
    except WeftError as err:
        _fatal(str(err))
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # a crash: keep the traceback in the log, and one readable line
        log.exception("router crashed")
        _fatal(f"crashed: {type(err).__name__}: {err}")
        return 1


def _fatal(message: str) -> None:
    print(f"{FATAL_MARK}{message}", file=sys.stderr, flush=True)
