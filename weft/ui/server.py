"""HTTP routes of the topology page: ``/ui`` (static page), ``/ws`` (live status), ``/metrics``.

Live updates are deliberately simple: the WebSocket carries the *whole* status model every time it
changes, never diffs. The router calls :meth:`StatusHub.notify` whenever anything it shows may have
changed (cheap, synchronous, call it as often as you like); the hub coalesces notifications so a
client gets at most one push per ``min_interval`` (250 ms by default), renders the status once per
push for all clients, skips pushes whose JSON is byte-identical to the last one, and lets a slow
client skip intermediate versions instead of queueing them. A full document cannot go out of sync
the way a stream of patches can, a reconnecting page needs nothing but the next message, and at
1,000 peers the document is a few hundred kilobytes: fine for a local tool at 4 pushes a second.

Server -> client messages (JSON text frames)::

    {"type": "status", "incarnation": "<hex>", "seq": <int>, "status": {...}}
    {"type": "pong"}                                      # reply to {"type": "ping"}
    {"type": "error", "error": "<why a client message was refused>"}

``incarnation`` is random per hub (so per router process) and ``seq`` grows by one per distinct
status; a page ignores a status whose (incarnation, seq) it has already seen or passed, and accepts
any seq from a new incarnation (the router restarted). Client -> server messages are optional:
``{"type": "ping"}`` and ``{"type": "refresh"}`` (send the current status again). Anything else,
malformed or oversized, gets an error reply and changes nothing.

Cross-site protection: :func:`refuse_cross_site` is an aiohttp middleware for the router's API that
refuses mutating requests coming from another site; ``/ws`` applies the same origin check itself,
so a web page elsewhere cannot read the mesh's status through the user's browser. The page itself
is read-only by design (``GET /ui``, ``/ws``, ``/metrics``; it sends no POST), so it needs no
credential; on the router's API, weft.router.access additionally refuses changes from callers
other than root or the API group and requests whose ``Host`` is not a name of the API (DNS
rebinding), ``/ws`` included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from weft import jsonlimit
from weft.errors import ConfigError
from weft.ui.metrics import Metrics

__all__ = [
    "HUB_KEY",
    "METRICS_KEY",
    "STATIC_DIR",
    "Coalescer",
    "HubConfig",
    "StatusHub",
    "add_metrics_route",
    "add_ui_routes",
    "is_cross_site",
    "metrics_of",
    "refuse_cross_site",
    "setup_routes",
]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

GetStatus = Callable[[], Mapping[str, Any]]

_MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sec-Fetch-Site values that mean "this request was not started by a page from another origin":
# "none" is the user typing a URL or a bookmark; "same-site" is another port or subdomain, which
# for a local API is just as foreign as another site.
_SAFE_FETCH_SITES = frozenset({"same-origin", "none"})


# ---------------------------------------------------------------------------------------------
# Coalescing (pure: takes `now`, no loop, no clock)


@dataclass
class Coalescer:
    """Turns a burst of change notifications into at most one flush per ``min_interval``.

    ``notify(now)`` returns the deadline at which the caller must call ``flush_due`` when a flush
    became pending (None when one already was); ``flush_due(now)`` says whether to flush now and,
    if so, starts a new interval. The first notification after a quiet period flushes at once.
    """

    min_interval: float
    _last_flush: float = field(default=-math.inf, init=False)
    _pending: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not self.min_interval >= 0:
            raise ConfigError(f"min_interval must be >= 0 seconds, got {self.min_interval!r}")

    @property
    def pending(self) -> bool:
        return self._pending

    @property
    def next_flush_at(self) -> float:
        """The earliest time the next flush may happen."""
        return self._last_flush + self.min_interval

    def notify(self, now: float) -> float | None:
        if self._pending:
            return None
        self._pending = True
        return max(now, self._last_flush + self.min_interval)

    def flush_due(self, now: float) -> bool:
        if not self._pending or now < self._last_flush + self.min_interval:
            return False
        self._pending = False
        self._last_flush = now
        return True


# ---------------------------------------------------------------------------------------------
# The hub


@dataclass(frozen=True)
class HubConfig:
    """Tuning of the live-update WebSocket."""

    # Minimum seconds between two status pushes; notifications in between are coalesced.
    min_interval: float = 0.25
    # Seconds between WebSocket pings; a client that does not answer within as long is dropped.
    heartbeat: float = 20.0
    # Most simultaneous /ws clients; more get HTTP 503 (each one holds a copy of the status).
    max_clients: int = 64
    # Largest message a client may send us, in bytes (clients only send tiny control messages).
    max_client_message: int = 4096

    def __post_init__(self) -> None:
        if not self.min_interval >= 0:
            raise ConfigError(f"min_interval must be >= 0 seconds, got {self.min_interval!r}")
        if not self.heartbeat > 0:
            raise ConfigError(f"heartbeat must be > 0 seconds, got {self.heartbeat!r}")
        if self.max_clients < 1:
            raise ConfigError(f"max_clients must be at least 1, got {self.max_clients!r}")
        if self.max_client_message < 64:
            raise ConfigError(
                f"max_client_message must be at least 64 bytes, got {self.max_client_message!r}"
            )


class _Client:
    """One connected page: a wake-up event, the seq it last got, and a few queued replies."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.sent_seq = -1
        self.force = False
        self.replies: deque[str] = deque(maxlen=8)  # a flood of bad messages drops old replies


class StatusHub:
    """Pushes the status model to every ``/ws`` client, coalesced (see the module docstring).

    Runs on the event loop; ``notify`` may be called from any code on the loop, never blocks and
    never raises. ``get_status`` is called on the loop, at most once per ``min_interval`` plus once
    per new client, and must return a JSON-able mapping quickly.
    """

    def __init__(self, get_status: GetStatus, config: HubConfig | None = None) -> None:
        self._get_status = get_status
        self.config = config or HubConfig()
        self.incarnation = secrets.token_hex(8)
        self._coalescer = Coalescer(self.config.min_interval)
        self._timer: asyncio.TimerHandle | None = None
        self._status_json: str | None = None
        self._message: str | None = None
        self._seq = 0
        self._clients: set[_Client] = set()
        self._sockets: set[web.WebSocketResponse] = set()
        self._closed = False

    # -- what the router calls ------------------------------------------------------------

    def notify(self) -> None:
        """The status may have changed: push it to clients soon (coalesced)."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop running: no client can be connected either
            return
        deadline = self._coalescer.notify(loop.time())
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer)

    async def close(self) -> None:
        """Close every client socket (idempotent); later notifications are ignored."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"router shutting down")

    # -- introspection (tests, debugging) -----------------------------------------------------

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def message(self) -> str | None:
        """The last status message sent (or to be sent), serialized."""
        return self._message

    # -- internals ---------------------------------------------------------------------------

    def _on_timer(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        if self._coalescer.flush_due(loop.time()):
            if self._clients:  # nobody watching: render nothing (a new client renders afresh)
                self._refresh()
        elif self._coalescer.pending:  # woke early (clock granularity): try again at the deadline
            self._timer = loop.call_at(self._coalescer.next_flush_at, self._on_timer)

    def _refresh(self) -> bool:
        """Render the status; if it changed, bump seq and wake every client. True if it worked."""
        try:
            status_json = _to_json(self._get_status())
        except Exception:  # a bug in a status producer must not kill the live view
            log.exception("rendering the status for /ws failed")
            return False
        if status_json == self._status_json:
            return True
        self._status_json = status_json
        self._seq += 1
        self._message = (
            f'{{"type":"status","incarnation":"{self.incarnation}",'
            f'"seq":{self._seq},"status":{status_json}}}'
        )
        for client in self._clients:
            client.wake.set()
        return True

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws``: the live status stream."""
        if is_cross_site(request):
            return _json_error(403, "cross-site WebSocket refused: open the page from this router")
        if self._closed:
            return _json_error(503, "router shutting down")
        if len(self._clients) >= self.config.max_clients:
            return _json_error(503, f"too many live clients (max {self.config.max_clients})")
        ws = web.WebSocketResponse(
            heartbeat=self.config.heartbeat, max_msg_size=self.config.max_client_message
        )
        try:
            await ws.prepare(request)
        except ConnectionError:  # the page went away during the handshake
            return ws
        client = _Client()
        self._clients.add(client)
        self._sockets.add(ws)
        self._refresh()  # a new client gets the freshest status even if nobody notified
        client.wake.set()
        sender = asyncio.create_task(self._send_loop(ws, client))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._client_message(client, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._reply(client, {"type": "error", "error": "binary messages not accepted"})
                elif msg.type == WSMsgType.ERROR:  # e.g. oversized message: aiohttp closes it
                    log.debug("/ws client error: %s", ws.exception())
                    break
                if sender.done():
                    break
        finally:
            self._clients.discard(client)
            self._sockets.discard(ws)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            if not ws.closed:
                with contextlib.suppress(Exception):  # the peer may be gone mid-close
                    await ws.close()
        return ws

    def _client_message(self, client: _Client, data: str) -> None:
        try:
            msg = jsonlimit.loads(data)
        except ValueError:
            self._reply(client, {"type": "error", "error": "message is not JSON"})
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "ping":
            self._reply(client, {"type": "pong"})
        elif kind == "refresh":
            self._refresh()
            client.force = True
            client.wake.set()
        else:
            self._reply(client, {"type": "error", "error": "unknown message type"})

    def _reply(self, client: _Client, msg: dict[str, Any]) -> None:
        client.replies.append(json.dumps(msg))
        client.wake.set()

    async def _send_loop(self, ws: web.WebSocketResponse, client: _Client) -> None:
        """The only task writing to ``ws``: replies first, then the newest status if unsent.

        A failed write (the client vanished) closes the socket, which ends the reading side.
        """
        try:
            while not ws.closed:
                await client.wake.wait()
                client.wake.clear()
                while client.replies:
                    await ws.send_str(client.replies.popleft())
                message = self._message
                if message is not None and (client.force or client.sent_seq != self._seq):
                    client.force = False
                    client.sent_seq = self._seq
                    await ws.send_str(message)
        except (ConnectionError, RuntimeError) as err:  # aiohttp's reset errors are both kinds
            log.debug("/ws client went away while sending: %s", err)
            with contextlib.suppress(Exception):
                await ws.close()


def _to_json(status: Mapping[str, Any]) -> str:
    """Compact JSON a browser can parse: NaN and infinities (not JSON) become null."""
    try:
        return json.dumps(status, separators=(",", ":"), default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(status), separators=(",", ":"), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Cross-site protection


def _default_port(scheme: str) -> int:
    return 443 if scheme in ("https", "wss") else 80


def _split_origin(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` -> (scheme, host, port) lowercased; None if not an origin."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or not rest or "/" in rest:
        return None
    return (scheme.lower(), *_split_host(rest, scheme.lower()))


def _split_host(hostport: str, scheme: str) -> tuple[str, int]:
    hostport = hostport.strip().lower()
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port_s = hostport.partition(":")
    else:  # bare name or bare (unbracketed) IPv6
        host, port_s = hostport, ""
    try:
        port = int(port_s) if port_s else _default_port(scheme)
    except ValueError:
        port = -1
    return host, port


def _own_origin(request: web.Request) -> tuple[str, str, int]:
    scheme = request.scheme.lower()
    host, port = _split_host(request.host, scheme)
    return scheme, host, port


def is_cross_site(request: web.Request) -> bool:
    """True when a browser says this request comes from a page of another origin.

    ``Origin`` present and not exactly this server's own origin (scheme, host, port as the
    request's ``Host`` names it; ``null`` counts as foreign), or ``Sec-Fetch-Site`` present and
    neither ``same-origin`` nor ``none``. Requests without either header (curl, the CLI, the CNI
    plugin) are not cross-site: only browsers send them, and browsers always do for such requests.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.strip().lower() not in _SAFE_FETCH_SITES:
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    parsed = _split_origin(origin)
    return parsed is None or parsed != _own_origin(request)


def _host_is_local_name(request: web.Request) -> bool:
    """The Host header names this machine by IP literal or ``localhost`` (not a DNS name)."""
    host, _ = _split_host(request.host, request.scheme)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refuse_cross_site(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp middleware: 403 ``{"error": ...}`` for cross-site POST/PUT/PATCH/DELETE.

    Refused: a browser request from another origin (see :func:`is_cross_site`), and a browser
    request (one carrying ``Origin``) whose ``Host`` is a DNS name other than ``localhost``: that
    is how DNS rebinding makes a foreign page look same-origin, and the API's own clients address
    it by IP or ``localhost``. Safe methods (GET, HEAD, OPTIONS) pass untouched.
    """
    if request.method in _MUTATING_METHODS:
        if is_cross_site(request):
            return _json_error(403, "cross-site request refused: only same-origin pages and "
                                    "local clients may change the router's state")
        if "Origin" in request.headers and not _host_is_local_name(request):
            return _json_error(403, "request refused: address the API by IP or localhost, "
                                    f"not by the name {request.host!r}")
    return await handler(request)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---------------------------------------------------------------------------------------------
# Routes

_SECURITY_HEADERS = {
    # The page runs only its own scripts and talks only to its own origin (WebSocket included).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_ui_routes(app: web.Application, hub: StatusHub) -> None:
    """``GET /ui`` (redirects to ``/ui/``), ``GET /ui/`` (the page), ``/ui/static/*``, ``/ws``."""
    index = STATIC_DIR / "index.html"

    async def ui_redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def ui_index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(index, headers=_SECURITY_HEADERS)

    app.router.add_get("/ui", ui_redirect)
    app.router.add_get("/ui/", ui_index)
    app.router.add_static("/ui/static/", STATIC_DIR, follow_symlinks=False)
    app.router.add_get("/ws", hub.handle_ws)

    async def _close_hub(_app: web.Application) -> None:
        await hub.close()

    app.on_shutdown.append(_close_hub)


def add_metrics_route(app: web.Application, metrics: Metrics) -> None:
    """``GET /metrics`` in the Prometheus text format, from ``metrics``' own registry."""

    async def handle_metrics(request: web.Request) -> web.StreamResponse:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/metrics", handle_metrics)


HUB_KEY = web.AppKey("weft_ui_hub", StatusHub)
METRICS_KEY = web.AppKey("weft_metrics", Metrics)


def setup_routes(
    app: web.Application,
    get_status: GetStatus,
    *,
    hub: StatusHub | None = None,
    metrics: Metrics | None = None,
) -> StatusHub:
    """Add ``/ui``, ``/ui/static``, ``/ws`` and ``/metrics`` to ``app``; return the hub.

    The router keeps the returned hub and calls ``hub.notify()`` whenever its status may have
    changed. Without ``metrics`` one is made reading ``get_status``; a given one that reads no
    status yet is bound to ``get_status``. Either way it is ``metrics_of(app)``, for the parts
    that count things. Pass a shared ``hub`` and ``metrics`` when several apps (e.g.
    127.0.0.1:6784 and the :6782 status port) serve the same router.
    """
    if hub is None:
        hub = StatusHub(get_status)
    if metrics is None:
        metrics = Metrics(get_status=get_status)
    elif metrics.get_status is None:
        metrics.bind_status(get_status)
    app[HUB_KEY] = hub
    app[METRICS_KEY] = metrics
    add_ui_routes(app, hub)
    add_metrics_route(app, metrics)
    return hub


def metrics_of(app: web.Application) -> Metrics:
    """The :class:`Metrics` that ``setup_routes`` installed on ``app`` (KeyError if none)."""
    return app[METRICS_KEY]
