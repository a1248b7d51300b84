"""The router's HTTP API (aiohttp), served on 127.0.0.1:6784 and on the unix socket.

Routes made here: ``GET /status`` and ``GET /report`` (the status model, same JSON), ``POST
/connect`` ``{"peers": [...], "replace": bool}``, ``POST /forget`` ``{"peers": [...]}``, ``POST
/stop``. Other parts add theirs to ``router.app`` before the router starts (UI, metrics, IPAM,
CNI, data plane).

Every error is JSON ``{"error": "<one line a user can act on>"}`` with a 4xx status for a bad
request and 5xx for a failure of ours; the CLI shows that line. Mutating requests from another
site are refused (``weft.ui.server.refuse_cross_site`` when the UI part is installed, else the
same Origin rule in :func:`_refuse_cross_site_fallback`). Before that, weft.router.access refuses
changes from callers who could not make them themselves (403) and requests naming another
``Host`` (421, DNS rebinding).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from weft import jsonlimit
from weft.errors import ConfigError, WeftError
from weft.gossip.peer import PeerName
from weft.router.access import AccessPolicy

__all__ = ["MAX_BODY", "jsonable", "make_app", "make_status_app", "read_json"]

log = logging.getLogger("weft.router.api")

MAX_BODY = 1 << 20  # bytes; every request body we take is small
MAX_PEERS = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Router(Protocol):
    """What the API drives of weft.router.router.Router (a Protocol: the router builds its apps
    from this module, so this module does not import it)."""

    def status(self) -> dict[str, Any]: ...

    def connect(self, peers: Iterable[str], replace: bool = False) -> list[str]: ...

    def forget(self, peers: Iterable[str]) -> list[str]: ...

    def request_stop(self) -> None: ...


def jsonable(value: Any) -> Any:
    """Make a status value JSON-safe: names as text, bytes as hex, tuples/sets as lists."""
    if isinstance(value, PeerName):
        return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((jsonable(v) for v in value), key=str)
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """WeftErrors become JSON errors (400 for ConfigError); bugs become a logged 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ConfigError as err:
        return _error(400, str(err))
    except WeftError as err:
        return _error(500, str(err))
    except Exception as err:
        log.exception("API %s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(err).__name__}: {err}")


@web.middleware
async def _refuse_cross_site_fallback(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Without the UI part: refuse mutating requests whose Origin is not the API's own."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _error(403, "cross-site request refused")
    return await handler(request)


def _cross_site_middleware() -> Middleware:
    try:
        from weft.ui.server import refuse_cross_site
    except ImportError:
        return _refuse_cross_site_fallback
    return refuse_cross_site


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body ({} when empty); 400 on anything else."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ConfigError(f"request body too large (max {MAX_BODY} bytes)")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ConfigError(f"request body too large (max {MAX_BODY} bytes)")
    if not raw.strip():
        return {}
    try:
        body = jsonlimit.loads(raw)
    except ValueError as err:
        raise ConfigError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ConfigError("request body must be a JSON object")
    return body


def _peers(body: Mapping[str, Any]) -> list[str]:
    peers = body.get("peers")
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise ConfigError('"peers" must be a list of addresses like "192.168.1.2:6783"')
    if len(peers) > MAX_PEERS:
        raise ConfigError(f"too many peers in one request (max {MAX_PEERS})")
    return peers


def make_app(router: Router, access: AccessPolicy | None = None) -> web.Application:
    """The API application for ``router`` (other parts add routes before the router starts).

    ``access`` (default: root, our uid and our group; loopback names) guards every route, the
    ones other parts add included: see weft/router/access.py."""
    guard = (access or AccessPolicy()).middleware()
    app = web.Application(
        middlewares=[guard, _cross_site_middleware(), _errors], client_max_size=MAX_BODY
    )

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response(router.status())

    async def connect(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise ConfigError('"replace" must be true or false')
        added = router.connect(_peers(body), replace=replace)
        return web.json_response({"targets": added})

    async def forget(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        removed = router.forget(_peers(body))
        return web.json_response({"forgotten": removed})

    async def stop(request: web.Request) -> web.StreamResponse:
        router.request_stop()
        return web.json_response({"stopping": True})

    app.router.add_get("/status", status)
    app.router.add_get("/report", status)
    app.router.add_post("/connect", connect)
    app.router.add_post("/forget", forget)
    app.router.add_post("/stop", stop)
    return app


def make_status_app(router: Router, access: AccessPolicy | None = None) -> web.Application:
    """The read-only app served on ``--status-addr``: ``GET /status`` and ``/report`` only
    (the daemon adds the UI, ``/ws`` and ``/metrics``). Nothing here changes the router's state.

    ``access`` (its ``bound_host`` the ``--status-addr`` host) applies the same Host allow-list
    as on the API: the status port shows the same status and live view, so a page rebinding
    its name to this host must not read it either (DNS rebinding, #14 item 9)."""
    guard = (access or AccessPolicy()).middleware()
    app = web.Application(middlewares=[guard, _errors], client_max_size=MAX_BODY)

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response(router.status())

    app.router.add_get("/status", status)
    app.router.add_get("/report", status)
    return app
