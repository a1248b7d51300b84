"""``--k8s``: follow the node list through the Kubernetes API and drive the router from it.

The asyncio shell around weft/k8s/core.py, with kubernetes_asyncio as the API client: LIST
``/api/v1/nodes`` (optionally with a label selector), then WATCH from the list's resourceVersion
until the server ends the watch (``watch_timeout``) or it fails; then LIST again. A watch that
answers 410 Gone (our resourceVersion is too old) is relisted at once; any other failure (API
down, 403 Forbidden, garbage) leaves the router's targets as they were - the mesh keeps running on
what it knew - and is retried with backoff. The first failure after a success, and the first
success after failures, are each logged once; single retries only at debug level.

Every change of the node set sets the router's direct targets (``replace``: the node list is the
peer list) and looks for IPAM space to reclaim (:func:`~weft.k8s.core.choose_reclaims`), as does a
timer every ``reclaim_interval`` (a dead router is only "unreachable" after its connections time
out).

Composition: ``setup_k8s(router, ipam, config)`` before ``router.start()`` - see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from weft.errors import ConfigError, LocalError, RemoteProtocolError, WeftError
from weft.gossip.peer import PeerName
from weft.k8s.apiclient import failure_reason, list_objects, make_api_client, watch_objects
from weft.k8s.core import (
    ApiHealth,
    ApiRecovered,
    ApiUnreachable,
    K8sConfig,
    Node,
    NodeDeleted,
    NodeView,
    TargetsChanged,
    choose_reclaims,
)

if TYPE_CHECKING:
    from aiohttp import web
    from kubernetes_asyncio.client import ApiClient

    from weft.gossip.mesh import MeshCore
    from weft.gossip.peer import PeerIdentity

__all__ = ["IpamAdmin", "K8sDiscovery", "K8sMesh", "RouterMesh", "fetch_nodes",
           "initial_ipalloc_init", "setup_k8s"]

log = logging.getLogger("weft.k8s")


class K8sMesh(Protocol):
    """What discovery drives; every method runs on the event loop and must not block."""

    @property
    def local_peer(self) -> PeerName: ...

    def set_targets(self, addresses: Sequence[str]) -> None:
        """Make ``addresses`` (``host:port``) the router's direct targets, replacing others."""
        ...

    def reachable_peers(self) -> set[PeerName]:
        """Peers reachable over the mesh now."""
        ...

    def ipam_owners(self) -> Mapping[PeerName, int] | None:
        """Addresses owned per peer in the IPAM ring; None when there is no ring (yet)."""
        ...

    async def rmpeer(self, peer: PeerName) -> int:
        """Take over ``peer``'s IPAM space; returns the addresses taken (WeftError: refused)."""
        ...


class IpamAdmin(Protocol):
    """The IPAM service as RouterMesh uses it (weft.ipam.service.IpamService fits).

    ``status()``: ``{"ready": bool, "entries": [{"peer": "aa:..", "owned": int, ...}], ...}``;
    ``rmpeer(name)``: take over ``name``'s space, return the addresses taken (WeftError: refused);
    it may be a coroutine function.
    """

    def status(self) -> Mapping[str, Any]: ...

    def rmpeer(self, peer: PeerName) -> int | Awaitable[int]: ...


class Router(Protocol):
    """What discovery uses of weft.router.router.Router (a Protocol: the daemon composes this
    package, so this package does not import the daemon)."""

    app: web.Application

    @property
    def identity(self) -> PeerIdentity: ...

    @property
    def mesh(self) -> MeshCore: ...

    def connect(self, peers: Sequence[str], replace: bool = False) -> list[str]: ...

    def add_status_provider(self, key: str, fn: Callable[[], Any]) -> None: ...


class RouterMesh:
    """:class:`K8sMesh` over a :class:`~weft.router.router.Router` and the IPAM service."""

    def __init__(self, router: Router, ipam: IpamAdmin | None) -> None:
        self.router = router
        self.ipam = ipam

    @property
    def local_peer(self) -> PeerName:
        return self.router.identity.name

    def set_targets(self, addresses: Sequence[str]) -> None:
        self.router.connect(addresses, replace=True)

    def reachable_peers(self) -> set[PeerName]:
        # the same view IPAM's "reachable" uses (gossip routes over all connections)
        return {PeerName(int(n)) for n in self.router.mesh.routes_all.unicast_table()}

    def ipam_owners(self) -> Mapping[PeerName, int] | None:
        if self.ipam is None:
            return None
        status = self.ipam.status()
        if not status.get("ready"):
            return None
        owners: dict[PeerName, int] = {}
        for entry in status.get("entries") or []:
            owners[PeerName.parse(str(entry["peer"]))] = int(entry.get("owned") or 0)
        return owners

    async def rmpeer(self, peer: PeerName) -> int:
        if self.ipam is None:
            raise ConfigError("no IPAM service to reclaim space with")
        taken = self.ipam.rmpeer(peer)
        if inspect.isawaitable(taken):
            taken = await taken
        return int(taken)


class K8sDiscovery:
    """Nodes -> router targets, deleted nodes -> IPAM reclaim. ``start``/``stop`` on the loop."""

    def __init__(
        self,
        config: K8sConfig,
        mesh: K8sMesh,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.mesh = mesh
        self.clock = clock
        self.view = NodeView(config)
        self.health = ApiHealth(config, rng or random.Random())
        self.deleted: dict[PeerName, str] = {}  # peer -> node name, for the logs
        self.reclaimed: list[dict[str, Any]] = []
        self._refusals: dict[PeerName, str] = {}  # last rmpeer refusal logged per peer
        self._tasks: list[asyncio.Task[None]] = []
        self._api: ApiClient | None = None
        self._reclaim_wakeup = asyncio.Event()
        self.lists = 0  # LISTs done (tests, status)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self._api = await self._make_api_client()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(), name="k8s-follow"),
            loop.create_task(self._reclaim_loop(), name="k8s-reclaim"),
        ]
        log.info("k8s: following nodes as %s (peer %s)", self.config.node_name,
                 self.mesh.local_peer)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _make_api_client(self) -> ApiClient:
        return await make_api_client(self.config)

    def status(self) -> dict[str, Any]:
        """The ``k8s`` object of ``/status``."""
        now = self.clock()
        h = self.health
        return {
            "node": self.config.node_name,
            "api": {None: "starting", True: "ok", False: "unreachable"}[h.ok],
            "since": round(now - h.since, 1) if h.since is not None else None,
            "failures": h.failures,
            "last_error": h.last_error,
            "nodes": [
                {"name": n.name, "internal_ip": n.internal_ip, "peer": str(n.peer)}
                for n in sorted(self.view.nodes.values(), key=lambda n: n.name)
            ],
            "targets": list(self.view.targets),
            "reclaimed": list(self.reclaimed),
        }

    # ------------------------------------------------------------------ following the API

    async def _follow(self) -> None:
        while True:
            try:
                version = await self._list()
                self._succeeded()
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # never stop following
                reason = failure_reason(err)
                if reason is None:
                    log.debug("k8s: watch expired; listing again")
                    continue
                await self._failed(reason)

    def _v1(self) -> Any:
        from kubernetes_asyncio import client

        return client.CoreV1Api(self._api)

    async def _list(self) -> str:
        """LIST the nodes, apply them; returns the list's resourceVersion."""
        kwargs: dict[str, Any] = {}
        if self.config.label_selector:
            kwargs["label_selector"] = self.config.label_selector
        items, version = await list_objects(
            self._v1().list_node, "NodeList", self.config.request_timeout, **kwargs
        )
        self.view.listed(items)
        self.lists += 1
        self._apply()
        return version

    async def _watch(self, version: str) -> None:
        """WATCH from ``version`` until the server ends the watch."""
        kwargs: dict[str, Any] = {}
        if self.config.label_selector:
            kwargs["label_selector"] = self.config.label_selector
        async with watch_objects(
            self._v1().list_node, version, self.config.watch_timeout,
            self.config.request_timeout, **kwargs,
        ) as events:
            async for event_type, obj in events:
                self.view.watched(event_type, obj)
                self._apply()

    def _succeeded(self) -> None:
        event = self.health.succeeded(self.clock())
        if event is not None:
            self._log(event)

    async def _failed(self, reason: str) -> None:
        delay, event = self.health.failed(reason, self.clock())
        if event is not None:
            self._log(event)
        else:
            log.debug("k8s: API still unreachable (%s); next try in %.1f s", reason, delay)
        await asyncio.sleep(delay)

    def _log(self, event: ApiUnreachable | ApiRecovered) -> None:
        if isinstance(event, ApiUnreachable):
            log.warning(
                "k8s: API server unreachable (%s); keeping the %d known nodes as peers,"
                " retrying with backoff up to %g s",
                event.reason,
                len(self.view.nodes),
                self.config.retry_max,
            )
        else:
            log.info("k8s: API server reachable again after %d failed attempts", event.failures)

    def _apply(self) -> None:
        changed = False
        while (event := self.view.next_event()) is not None:
            if isinstance(event, TargetsChanged):
                log.info("k8s: %d peer nodes: %s", len(event.targets),
                         " ".join(event.targets) or "-")
                self.mesh.set_targets(event.targets)
            elif isinstance(event, NodeDeleted):
                log.info("k8s: node %s (peer %s) deleted", event.name, event.peer)
                self.deleted[event.peer] = event.name
                changed = True
        if changed:
            self._reclaim_wakeup.set()

    # ------------------------------------------------------------------ reclaiming

    async def _reclaim_loop(self) -> None:
        while True:
            # asyncio.timeout: 3.11's wait_for can lose a cancellation racing the event
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.reclaim_interval):
                    await self._reclaim_wakeup.wait()
            self._reclaim_wakeup.clear()
            try:
                await self.reclaim()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("k8s: reclaim check failed")

    async def reclaim(self) -> list[tuple[PeerName, int]]:
        """Take over the space of orphaned peers if this router is the one to (see core)."""
        if not self.view.synced:
            return []
        owners = self.mesh.ipam_owners()
        if not owners:
            return []
        chosen = choose_reclaims(
            self.mesh.local_peer, self.view.peers(), owners, self.mesh.reachable_peers()
        )
        done = []
        for peer in chosen:
            node = self.deleted.get(peer, "a node no longer listed")
            try:
                taken = await self.mesh.rmpeer(peer)
            except WeftError as err:
                if self._refusals.get(peer) != str(err):  # once per reason, not per retry
                    self._refusals[peer] = str(err)
                    log.info("k8s: cannot reclaim the space of %s (%s) yet: %s", peer, node, err)
                continue
            self._refusals.pop(peer, None)
            log.info("k8s: reclaimed %d addresses of peer %s (%s)", taken, peer, node)
            self.reclaimed.append({"peer": str(peer), "node": node, "addresses": taken})
            del self.reclaimed[:-20]
            done.append((peer, taken))
        return done


async def fetch_nodes(config: K8sConfig) -> list[Node]:
    """LIST the nodes once (for the daemon's start, e.g. ``--ipalloc-init consensus=<nodes>``).

    Raises ConfigError without an API configuration and LocalError when the API does not answer.
    """
    from kubernetes_asyncio.client import ApiException

    class _Quiet:
        local_peer = PeerName(0)

        def set_targets(self, addresses: Sequence[str]) -> None:
            del addresses

        def reachable_peers(self) -> set[PeerName]:
            return set()

        def ipam_owners(self) -> Mapping[PeerName, int] | None:
            return None

        async def rmpeer(self, peer: PeerName) -> int:
            del peer
            return 0

    discovery = K8sDiscovery(config, _Quiet())
    discovery._api = await discovery._make_api_client()
    try:
        await discovery._list()
    except (ApiException, aiohttp.ClientError, OSError, TimeoutError, ValueError,
            RemoteProtocolError) as err:
        raise LocalError(f"--k8s: cannot list the nodes: {err}") from None
    finally:
        await discovery.stop()
    return sorted(discovery.view.nodes.values(), key=lambda n: n.name)


async def initial_ipalloc_init(config: K8sConfig, rng: random.Random | None = None) -> str:
    """``consensus=<nodes listed>`` for ``--ipalloc-init`` on a fresh node, as Weave's kube did.

    Lists until the API answers (backoff as discovery's, one log line per state change): a fresh
    router must not split the range on its own. A router with IPAM state in its data dir does
    not need this (its ring is restored).
    """
    health = ApiHealth(config, rng or random.Random())
    while True:
        try:
            nodes = await fetch_nodes(config)
        except LocalError as err:
            delay, event = health.failed(str(err), time.monotonic())
            if event is not None:
                log.warning("k8s: %s; waiting for the API before joining IPAM", err)
            await asyncio.sleep(delay)
            continue
        if health.ok is False:
            log.info("k8s: API server reachable again")
        return f"consensus={max(1, len(nodes))}"


def setup_k8s(router: Router, ipam: IpamAdmin | None, config: K8sConfig) -> K8sDiscovery:
    """Follow the node list for ``router`` (call before ``router.start()``).

    The router must run with ``RouterConfig(name=peer_name_for_node(config.node_name))`` so that
    other routers can tell its peer name from its node; a mismatch is refused here.
    ``ipam``: the IPAM service (status + rmpeer), None to only follow targets.
    """
    from weft.k8s.core import peer_name_for_node

    expected = peer_name_for_node(config.node_name)
    if router.identity.name != expected:
        raise ConfigError(
            f"--k8s: the router's peer name is {router.identity.name}, but node"
            f" {config.node_name!r} means {expected}; start it with --name {expected}"
        )
    discovery = K8sDiscovery(config, RouterMesh(router, ipam))

    async def on_startup(app: web.Application) -> None:
        del app
        await discovery.start()

    async def on_cleanup(app: web.Application) -> None:
        del app
        await discovery.stop()

    router.app.on_startup.append(on_startup)
    router.app.on_cleanup.append(on_cleanup)
    router.add_status_provider("k8s", discovery.status)
    return discovery
