"""HTTP routes for the host side of the data plane (docs/ARCHITECTURE.md, "HTTP API").

``POST /expose`` ``{"cidr": "10.32.0.1/12" | null}`` -> ``{"addresses": [...]}``;
``POST /hide`` ``{"cidr": ...}`` -> ``{"addresses": [...]}``;
``POST /attach`` ``{"netns", "ip": [cidr...], "ifname": "ethwe", "mtu": null}``
-> ``{"netns", "ifname", "host_ifname", "mac", "addresses"}``;
``POST /detach`` ``{"netns"}`` -> ``{"detached": bool}``;
``GET /ps`` -> ``[{"netns", "ifname", "host_ifname", "mac", "addresses"}]``.

Bad requests raise :class:`~weft.errors.ConfigError` (the router's error middleware makes them a
400 JSON body); kernel work runs in a worker thread, one call at a time.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from weft import jsonlimit
from weft.errors import ConfigError
from weft.host.bridge import Bridge

__all__ = ["netns_ident", "setup_routes"]

_MAX_BODY = 64 * 1024


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise ConfigError("request body too large")
    try:
        body = jsonlimit.loads(raw or b"{}")
    except ValueError as err:
        raise ConfigError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ConfigError("request body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f'"{key}" must be a non-empty string')
    return value


def netns_ident(netns: str) -> str:
    """The IPAM ident of an attached namespace, given as an ``ip netns`` name or a path.

    The allocator's idents hold no '/', and a namespace attached by name must be released when
    detached by its /run/netns path (and the other way round), so both forms give
    ``netns:<name>``. Other paths (``/proc/PID/ns/net``, a runtime's bind mount) are quoted
    under their own prefix, which no name can produce.
    """
    if "/" not in netns:
        return f"netns:{netns}"
    path = os.path.normpath(netns)
    parent, name = os.path.split(path)
    if name and os.path.realpath(parent) == os.path.realpath("/run/netns"):
        return f"netns:{name}"
    ident = "netns-path:" + urllib.parse.quote(path, safe="")
    if len(ident) > 256:  # the allocator's limit
        raise ConfigError(f"namespace path too long ({len(path)} characters): {path[:60]}...")
    return ident


Allocate = Callable[[str], Awaitable[list[str]]]
Release = Callable[[str], Awaitable[None]]


def setup_routes(
    app: web.Application,
    bridge: Bridge,
    allocate: Allocate | None = None,
    release: Release | None = None,
) -> None:
    """Add /expose, /hide, /attach, /detach and /ps for ``bridge`` to ``app`` (before start).

    ``allocate(ident)`` (optional, e.g. the IPAM allocator) supplies CIDRs when a request names
    none: ``ident`` is :func:`netns_ident` of the namespace for an attach and ``"weft:expose"``
    for the host.
    ``release(ident)`` is awaited after a detach. Without them a CIDR is required.
    """
    lock = asyncio.Lock()

    async def run(fn: Any, *args: Any) -> Any:
        async with lock:
            return await asyncio.to_thread(fn, *args)

    async def expose(request: web.Request) -> web.Response:
        body = await _body(request)
        cidr = body.get("cidr")
        if cidr is not None and not isinstance(cidr, str):
            raise ConfigError('"cidr" must be a CIDR string or null')
        if not cidr and allocate is not None:
            got = await allocate("weft:expose")
            cidr = got[0] if got else None
        return web.json_response({"addresses": await run(bridge.expose, cidr)})

    async def hide(request: web.Request) -> web.Response:
        body = await _body(request)
        return web.json_response({"addresses": await run(bridge.hide, _str(body, "cidr"))})

    async def attach(request: web.Request) -> web.Response:
        body = await _body(request)
        netns = _str(body, "netns")
        ips = body.get("ip") or []
        if isinstance(ips, str):
            ips = [ips]
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ConfigError('"ip" must be a list of CIDR strings')
        ifname = _str(body, "ifname", "ethwe") if body.get("ifname") is not None else "ethwe"
        mtu = body.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool)):
            raise ConfigError('"mtu" must be an integer or null')
        if not ips and allocate is not None:
            ips = await allocate(netns_ident(netns))
        att = await run(bridge.attach, netns, ips, ifname, mtu)
        return web.json_response(att.as_dict())

    async def detach(request: web.Request) -> web.Response:
        body = await _body(request)
        netns = _str(body, "netns")
        ident = netns_ident(netns)  # before the veth goes: a bad path changes nothing
        done = await run(bridge.detach, netns)
        if not done:
            raise ConfigError(f"{netns} is not attached")
        if release is not None:
            await release(ident)
        return web.json_response({"detached": True})

    async def ps(request: web.Request) -> web.Response:
        return web.json_response(await run(bridge.ps))

    app.router.add_post("/expose", expose)
    app.router.add_post("/hide", hide)
    app.router.add_post("/attach", attach)
    app.router.add_post("/detach", detach)
    app.router.add_get("/ps", ps)
