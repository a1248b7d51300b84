"""The NetworkPolicy read routes of the router's HTTP API (aiohttp), added by whoever enforces.

* ``GET /policy/explain?from=NS/POD|ADDR&to=NS/POD|ADDR[&port=80/TCP]``: the verdict of
  :func:`weft.policy.explain.explain` as JSON (its ``to_json``). ``port`` is ``N``, ``N/PROTO``
  (TCP, UDP, SCTP; TCP when left out) or a portless protocol such as ``ICMP``; without it, the
  question is every port and protocol. 400 with the reason for bad input, 503 until the enforcer
  has its first full view of the cluster.
* ``GET /policy/status``: the enforcer's status (free-form JSON).
* ``GET /policy/denied``: ``{"flows": [...]}``, the latest denied flows, newest last.

All are reads: the router's access policy (weft/router/access.py) lets every local user make
them, as ``/status``. Errors are ``{"error": "<one line>"}``, as everywhere in the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from weft.errors import ConfigError
from weft.policy.explain import explain
from weft.policy.model import ClusterView, IPAddress

__all__ = ["PolicyReader", "PolicySource", "add_policy_routes", "parse_port"]


class PolicyReader(Protocol):
    """The part of :class:`PolicySource` the routes cannot do without."""

    def cluster_view(self) -> ClusterView | None: ...  # None while not synced with the API yet

    def status(self) -> dict[str, Any]: ...  # reconciler status (free-form JSON)

    def denied_flows(self) -> list[dict[str, Any]]: ...  # last denied flows, newest last


@runtime_checkable
class PolicySource(PolicyReader, Protocol):
    """What the routes read from the enforcer; a :class:`PolicyReader` without
    ``node_addresses`` is served too, its explain then not knowing this node's addresses."""

    def node_addresses(self) -> Sequence[IPAddress]: ...  # this node's own addresses


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def parse_port(text: str | None) -> tuple[str | None, int | None]:
    """``"80"``, ``"80/udp"`` or a portless protocol (``"ICMP"``) -> (protocol, port); absent ->
    (None, None), every port and protocol. Port names are refused: the kernel matches numbers."""
    if text is None or not text.strip():
        return None, None
    number, sep, protocol = text.strip().partition("/")
    if not sep and not number.isdigit():  # a protocol without ports
        return number.upper(), None
    if not number.isdigit():
        raise ConfigError(f"port {text!r} must be a number like 80 or 80/TCP (not a port name)")
    return (protocol.upper() if sep else "TCP"), int(number)


def add_policy_routes(
    app: web.Application, source: PolicySource | PolicyReader, *, node: str | None = None
) -> None:
    """Add the ``/policy`` read routes for ``source`` to ``app`` (before the app starts).

    ``node``: the name of the node this router runs on, whose pods ``source.node_addresses()``
    always reach; without it (or without ``node_addresses``) explain does not know whose those
    addresses are and treats them as any other address.
    """

    async def explain_route(request: web.Request) -> web.Response:
        query = request.query
        source_text, dest_text = query.get("from"), query.get("to")
        if not source_text or not dest_text:
            return _error(400, "give both from=NS/POD|ADDRESS and to=NS/POD|ADDRESS")
        view = source.cluster_view()
        if view is None:
            return _error(
                503, "not synced with the Kubernetes API yet: no cluster view to explain against"
            )
        nodes: dict[str, list[IPAddress]] = {}
        if node is not None and isinstance(source, PolicySource):
            nodes[node] = list(source.node_addresses())
        try:
            protocol, port = parse_port(query.get("port"))
            verdict = explain(view, source_text, dest_text, protocol, port, node_addresses=nodes)
        except ConfigError as err:
            return _error(400, str(err))
        return web.json_response(verdict.to_json())

    async def status(request: web.Request) -> web.Response:
        return web.json_response(source.status())

    async def denied(request: web.Request) -> web.Response:
        return web.json_response({"flows": source.denied_flows()})

    app.router.add_get("/policy/explain", explain_route)
    app.router.add_get("/policy/status", status)
    app.router.add_get("/policy/denied", denied)
