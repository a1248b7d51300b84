"""The asyncio face of IPAM: the service the router owns, and its HTTP routes.

:class:`IpamService` wraps the allocator core with the SQLite store (``<data dir>/ipam.db``),
the loop's clock and timer, and the "ipam" gossip channel; API calls return when the answer is
committed. :func:`setup_routes` adds the HTTP API; :func:`attach_to_router` does all the wiring
against the router's public composition API (see docs/ARCHITECTURE.md "Router composition").

HTTP (JSON bodies; errors are ``{"error": "..."}``):

=========================================  ===================================================
``POST /ip/{id}``                          allocate in the default subnet (idempotent per id)
``POST /ip/{id}/{addr}/{prefix}``          allocate in the subnet ``addr/prefix``
``PUT /ip/{id}/{addr}/{prefix}``           claim that exact address (static IPs, restarts)
``DELETE /ip/{id}``                        release everything ``id`` holds (idempotent)
``GET /ip/{id}``                           what ``id`` holds (404 if nothing)
``GET /ip``                                every allocation on this peer
``POST /rmpeer/{name}``                    take over a dead peer's space -> ``{"taken": n}``
``POST /ipam/reset``                       hand our space to a live peer and forget IPAM state
=========================================  ===================================================

Status codes: 400 bad input (CIDR, address outside the range...), 404 unknown container or peer,
409 address held by another container / peer still reachable, 503 not ready, timed out or full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from weft.errors import ConfigError, LocalError, WeftError
from weft.gossip.channel import GossipHandler, GossipSender
from weft.gossip.peer import PeerName
from weft.ipam.allocator import (
    DEFAULT_RANGE,
    AddressInUseError,
    Allocation,
    AllocationFailed,
    AllocationSucceeded,
    Allocator,
    ConsensusReached,
    InitMode,
    IpamConfig,
    IpamEvent,
    NotReadyError,
    PeerReachableError,
    RangeFullError,
    RequestTimeoutError,
    RingConflictDetected,
    SpaceDonated,
    UnknownPeerError,
    parse_address,
)
from weft.ipam.node import IpamNode, MemoryStore, Store
from weft.ipam.store import SqliteStore

__all__ = [
    "IpamService",
    "attach_to_router",
    "config_from_flags",
    "install",
    "render_status",
    "setup_routes",
]

log = logging.getLogger("weft.ipam")

CHANNEL = "ipam"


def config_from_flags(
    ipalloc_range: str | None = None,
    default_subnet: str | None = None,
    init: str | None = None,
    initial_peers: int = 0,
) -> IpamConfig:
    """Build the config from ``--ipalloc-range``, ``--ipalloc-default-subnet`` and
    ``--ipalloc-init``. Without ``--ipalloc-init`` the default is, as in Weave,
    ``consensus=N`` with N = the number of peers given on the command line + 1."""
    rng = _network(ipalloc_range, "--ipalloc-range") if ipalloc_range else DEFAULT_RANGE
    sub = _network(default_subnet, "--ipalloc-default-subnet") if default_subnet else None
    mode = InitMode.parse(init) if init else InitMode("consensus", initial_peers + 1)
    return IpamConfig(range=rng, default_subnet=sub, init=mode)


def _network(text: str, what: str) -> IPv4Network:
    try:
        return IPv4Network(text, strict=True)
    except ValueError as err:
        raise ConfigError(f"{what} {text!r} is not a valid IPv4 CIDR: {err}") from None


class IpamService:
    """IPAM for one router. Construct, ``attach(sender)``, then use from the event loop.

    ``data_dir``: where ``ipam.db`` lives (None: memory only, for tests). ``clock``: monotonic
    seconds (the loop's clock by default). ``resolve_peer``: maps a nickname to a peer name for
    ``rmpeer`` (None: names only).
    """

    def __init__(
        self,
        name: PeerName,
        config: IpamConfig,
        data_dir: Path | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        store: Store | None = None,
        resolve_peer: Callable[[str], PeerName | None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        if store is None:
            store = (
                SqliteStore.in_dir(data_dir, peer=str(name))
                if data_dir is not None
                else MemoryStore()
            )
        state = store.load()
        allocator = Allocator(name, config, clock(), state=state)
        self.node = IpamNode(allocator, store, clock)
        self.node.listeners.append(self._on_event)
        # gossip arriving through the mesh pumps the node directly: re-arm our timer after it too
        self.node.after_pump.append(self._rearm)
        self.resolve_peer = resolve_peer
        self._futures: dict[int, asyncio.Future[Allocation]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_reachable: set[PeerName] | None = None
        self._pump_soon = False
        if state is not None:
            log.info(
                "ipam: restored %d allocations and a ring of %d spans from %s",
                len(allocator.allocations()),
                len(allocator.ring),
                "the data dir" if data_dir else "memory",
            )
        self._pump()

    @property
    def allocator(self) -> Allocator:
        return self.node.allocator

    def ready(self) -> bool:
        """True once the ring exists (allocation can succeed without waiting for consensus)."""
        return self.allocator.ready

    @property
    def handler(self) -> GossipHandler:
        """The "ipam" channel handler to register on the mesh."""
        return self.node

    def attach(self, sender: GossipSender) -> None:
        """Connect to the mesh (``router.register_channel("ipam", service.handler)``)."""
        self.node.attach(sender)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(LocalError("IPAM is shutting down"))
        self._futures.clear()
        self.node.store.close()

    # ----- plumbing ----------------------------------------------------------------------------

    def _pump(self) -> None:
        self.node.pump()  # re-arms the timer (after_pump)

    def _rearm(self) -> None:
        t = self.allocator.get_timer()
        if t == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = t
        if t is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop yet: the first call from the loop arms it
        self._timer = loop.call_later(max(0.0, t - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.node.handle_timer()

    def _on_event(self, ev: IpamEvent) -> None:
        if isinstance(ev, AllocationSucceeded):
            fut = self._futures.pop(ev.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev.allocation)
        elif isinstance(ev, AllocationFailed):
            fut = self._futures.pop(ev.request_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(ev.error)
        elif isinstance(ev, RingConflictDetected):
            log.error("ipam: %s", ev.message)
        elif isinstance(ev, ConsensusReached):
            log.info("ipam: ring ready, range split among %d peers", len(ev.seeds))
        elif isinstance(ev, SpaceDonated):
            log.info("ipam: gave %d addresses to peer %s", ev.addresses, ev.recipient)

    async def _wait(self, start: Callable[[float], int]) -> Allocation:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Allocation] = loop.create_future()
        rid = start(self.clock())  # validation errors raise here, before anything changed
        self._futures[rid] = fut
        # Group commit: requests that arrive in the same loop iteration share one transaction;
        # answers are still delivered only after it is committed (pump persists first).
        if not self._pump_soon:
            self._pump_soon = True
            loop.call_soon(self._deferred_pump)
        return await fut

    def _deferred_pump(self) -> None:
        self._pump_soon = False
        self._pump()

    # ----- API ---------------------------------------------------------------------------------

    async def allocate(self, container_id: str, subnet: str | None = None) -> Allocation:
        """An address for ``container_id`` (the same one again if it has one in that subnet)."""
        net = self.allocator.parse_subnet(subnet)
        return await self._wait(lambda now: self.allocator.allocate(container_id, net, now))

    async def claim(self, container_id: str, address: str, subnet: str | None) -> Allocation:
        """Claim exactly ``address`` (in ``subnet``, default: the default subnet)."""
        addr = parse_address(address)
        net = self.allocator.parse_subnet(subnet)
        if addr not in self.config.range:
            raise ConfigError(f"address {addr} is outside the IPAM range {self.config.range}")
        return await self._wait(lambda now: self.allocator.claim(container_id, addr, net, now))

    def release(self, container_id: str) -> list[Allocation]:
        try:
            return self.allocator.release(container_id, self.clock())
        finally:
            self._pump()

    def lookup(self, container_id: str) -> list[Allocation]:
        return self.allocator.lookup(container_id)

    def allocations(self) -> list[Allocation]:
        return self.allocator.allocations()

    def peers_changed(self, reachable: Iterable[PeerName]) -> None:
        """The set of peers reachable over the mesh (call on every topology/route change)."""
        names = set(reachable)
        if names == self._last_reachable:
            return
        self._last_reachable = names
        self.allocator.peers_changed(names, self.clock())
        self._pump()

    def parse_peer(self, text: str) -> PeerName:
        try:
            return PeerName.parse(text)
        except ConfigError:
            if self.resolve_peer is not None:
                found = self.resolve_peer(text)
                if found is not None:
                    return found
            raise UnknownPeerError(
                f"unknown peer {text!r}: give a peer name like 6e:1f:aa:00:12:ff or a nickname "
                "of a peer this router knows"
            ) from None

    def rmpeer(self, peer: str | PeerName) -> int:
        """Take over the space of a peer that is gone for good; returns addresses taken over."""
        name = peer if isinstance(peer, PeerName) else self.parse_peer(peer)
        try:
            taken = self.allocator.rmpeer(name, self.clock())
        finally:
            self._pump()
        log.warning("ipam: rmpeer %s: took over %d addresses", name, taken)
        return taken

    def reset(self) -> PeerName | None:
        """Hand our space to a reachable peer and wipe our IPAM state; stop the router after."""
        try:
            to = self.allocator.reset(self.clock())
        finally:
            self._pump()
        log.warning("ipam: reset: handed our space to %s", to if to is not None else "nobody")
        return to

    def status(self) -> dict[str, Any]:
        """The ``ipam`` object of ``/status``."""
        return self.allocator.status()


def render_status(ipam: dict[str, Any]) -> str:
    """``weft status ipam``: the ``ipam`` status object as a human table."""
    lines = [
        f"range {ipam['range']}  default subnet {ipam['default_subnet']}  init {ipam['init']}",
        f"ready {'yes' if ipam['ready'] else 'no'}  allocated here {ipam['allocated']}  "
        f"unreachable {ipam['unreachable']}",
    ]
    if ipam.get("consensus"):
        c = ipam["consensus"]
        lines.append(f"consensus: {c['participants']} participants heard of, quorum {c['quorum']}")
    if ipam.get("conflict"):
        lines.append(f"CONFLICT: {ipam['conflict']}")
    lines.append(f"{'PEER':<19} {'OWNED':>9} {'FREE':>9}  REACHABLE")
    for e in ipam["entries"]:
        lines.append(
            f"{e['peer']:<19} {e['owned']:>9} {e['free']:>9}  {'yes' if e['reachable'] else 'NO'}"
        )
    for p in ipam["pending"]:
        lines.append(f"pending {p['kind']} {p['container_id']}: {p['reason']}")
    return "\n".join(lines)


# ----- HTTP --------------------------------------------------------------------------------


def _status_for(err: WeftError) -> int:
    if isinstance(err, UnknownPeerError):
        return 404
    if isinstance(err, ConfigError):
        return 400
    if isinstance(err, AddressInUseError | PeerReachableError | LocalError):
        return 409
    if isinstance(err, RequestTimeoutError | RangeFullError | NotReadyError):
        return 503
    return 500


def _error(err: WeftError) -> web.Response:
    return web.json_response({"error": str(err)}, status=_status_for(err))


def setup_routes(app: web.Application, service: IpamService) -> None:
    """Add the IPAM HTTP routes (see the module docstring) to ``app``."""

    def subnet_of(request: web.Request) -> str | None:
        addr = request.match_info.get("addr")
        prefix = request.match_info.get("prefix")
        return None if addr is None else f"{addr}/{prefix}"

    async def allocate(request: web.Request) -> web.Response:
        try:
            got = await service.allocate(request.match_info["cid"], subnet_of(request))
        except WeftError as err:
            return _error(err)
        return web.json_response(got.to_json())

    async def claim(request: web.Request) -> web.Response:
        info = request.match_info
        try:
            net = IPv4Network(f"{info['addr']}/{info['prefix']}", strict=False)
        except ValueError as err:
            return _error(ConfigError(f"invalid address {info['addr']}/{info['prefix']}: {err}"))
        try:
            got = await service.claim(info["cid"], info["addr"], str(net))
        except WeftError as err:
            return _error(err)
        return web.json_response(got.to_json())

    async def release(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        try:
            freed = service.release(cid)
        except WeftError as err:
            return _error(err)
        return web.json_response({"container_id": cid, "released": [a.cidr for a in freed]})

    async def lookup(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        found = service.lookup(cid)
        if not found:
            return web.json_response(
                {"error": f"container {cid} has no address on this peer"}, status=404
            )
        return web.json_response(
            {"container_id": cid, "addresses": [a.to_json() for a in found]}
        )

    async def all_allocations(request: web.Request) -> web.Response:
        return web.json_response({"allocations": [a.to_json() for a in service.allocations()]})

    async def rmpeer(request: web.Request) -> web.Response:
        try:
            taken = service.rmpeer(request.match_info["name"])
        except WeftError as err:
            return _error(err)
        return web.json_response({"peer": request.match_info["name"], "taken": taken})

    async def reset(request: web.Request) -> web.Response:
        try:
            to = service.reset()
        except WeftError as err:
            return _error(err)
        return web.json_response({"handed_to": None if to is None else str(to)})

    app.router.add_post("/ip/{cid}", allocate)
    app.router.add_post("/ip/{cid}/{addr}/{prefix}", allocate)
    app.router.add_put("/ip/{cid}/{addr}/{prefix}", claim)
    app.router.add_delete("/ip/{cid}", release)
    app.router.add_get("/ip/{cid}", lookup)
    app.router.add_get("/ip", all_allocations)
    app.router.add_post("/rmpeer/{name}", rmpeer)
    app.router.add_post("/ipam/reset", reset)


# ----- wiring into the router --------------------------------------------------------------


class _Routes(Protocol):
    def unicast_table(self) -> dict[PeerName, PeerName]: ...


class _Mesh(Protocol):
    @property
    def routes_all(self) -> _Routes: ...


class RouterLike(Protocol):
    """The parts of :class:`weft.router.router.Router` IPAM plugs into."""

    app: web.Application

    @property
    def mesh(self) -> Any: ...

    def register_channel(self, name: str, handler: GossipHandler) -> GossipSender: ...

    def add_status_provider(self, key: str, fn: Callable[[], Any]) -> None: ...

    def on_status_changed(self, callback: Callable[[], None]) -> None: ...

    def status(self) -> dict[str, Any]: ...


def install(
    router: Any,
    *,
    ipalloc_range: str | None = None,
    default_subnet: str | None = None,
    init: str | None = None,
) -> IpamService:
    """One call for the daemon's ``compose``: build the service from the launch flags (state in
    ``router.config.data_dir``) and :func:`attach_to_router` it. Returns the service."""
    config = config_from_flags(
        ipalloc_range, default_subnet, init, initial_peers=len(router.config.peers)
    )
    service = IpamService(router.identity.name, config, Path(router.config.data_dir))
    attach_to_router(router, service)
    return service


def attach_to_router(router: RouterLike, service: IpamService) -> None:
    """Wire ``service`` into ``router`` before ``router.start()``.

    Registers the "ipam" gossip channel, the HTTP routes, the ``ipam`` status key, keeps the
    reachable peer set current (for donor choice and "unreachable" in status) and lets
    ``rmpeer`` take nicknames.
    """
    service.attach(router.register_channel(CHANNEL, service.handler))
    setup_routes(router.app, service)
    router.add_status_provider("ipam", service.status)

    def reachable() -> None:
        try:
            table = router.mesh.routes_all.unicast_table()
        except Exception:  # the mesh is the router's; never let IPAM break its callbacks
            log.exception("ipam: could not read the mesh routes")
            return
        service.peers_changed(PeerName(int(n)) for n in table if n != service.name)

    def by_nickname(text: str) -> PeerName | None:
        for peer in router.status().get("router", {}).get("peers", []):
            if peer.get("nickname") == text:
                return PeerName.parse(str(peer["name"]))
        return None

    service.resolve_peer = by_nickname
    router.on_status_changed(reachable)
