"""A fake Kubernetes API server for tests that real clients (kubernetes_asyncio) talk to.

Nodes, namespaces, pods and networkpolicies with one resourceVersion counter and a change history:
LIST, WATCH (``?watch=true&resourceVersion=N``, bookmarks at the end of a watch, 410 Gone on
request), GET of one pod. Objects are changed through :meth:`FakeKubeApi.put` and
:meth:`FakeKubeApi.delete` on the test's event loop; the server can be set "down" (503).
Namespaces get the ``kubernetes.io/metadata.name`` label as the real API server sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

__all__ = ["FakeKubeApi", "status_object"]

_PATHS = {  # kind -> (list path, list kind, object kind)
    "nodes": ("/api/v1/nodes", "NodeList", "Node"),
    "namespaces": ("/api/v1/namespaces", "NamespaceList", "Namespace"),
    "pods": ("/api/v1/pods", "PodList", "Pod"),
    "networkpolicies": (
        "/apis/networking.k8s.io/v1/networkpolicies", "NetworkPolicyList", "NetworkPolicy"
    ),
}


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


class FakeKubeApi:
    def __init__(self) -> None:
        self.version = 1
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in _PATHS}
        self.history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {k: [] for k in _PATHS}
        self.changed = asyncio.Condition()
        self.down = False
        self.expire_next_watch: set[str] = set()
        self.forbidden: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (kind or path, LIST/WATCH/GET)
        self.runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ life cycle

    def app(self) -> web.Application:
        app = web.Application()
        for kind, (path, _, _) in _PATHS.items():
            app.router.add_get(path, self._handler(kind))
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}", self._get_pod)
        return app

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on 127.0.0.1 (a free port), or on ``sock`` (e.g. bound inside a netns)."""
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site: web.BaseSite
        if sock is None:
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
        else:
            site = web.SockSite(self.runner, sock)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------ changes

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def put(self, kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns the stored copy."""
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        if kind == "namespaces":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        stored.setdefault("kind", _PATHS[kind][2])
        key = _key(stored)
        event = "MODIFIED" if key in self.objects[kind] else "ADDED"
        self.objects[kind][key] = stored
        self.history[kind].append((self.version, event, copy.deepcopy(stored)))
        await self._notify()
        return stored

    async def patch(self, kind: str, namespace: str, name: str, **changes: Any) -> None:
        """Replace top-level sections (``metadata`` is merged) of an existing object."""
        obj = copy.deepcopy(self.objects[kind][(namespace, name)])
        for section, value in changes.items():
            if section == "metadata":
                obj["metadata"].update(value)
            else:
                obj[section] = value
        await self.put(kind, obj)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        obj = self.objects[kind].pop((namespace, name))
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.history[kind].append((self.version, "DELETED", obj))
        await self._notify()

    async def expire_watch(self, kind: str) -> None:
        """The next (or the open) watch of ``kind`` ends with 410 Gone."""
        self.expire_next_watch.add(kind)
        await self._notify()

    async def set_down(self, down: bool) -> None:
        self.down = down
        await self._notify()

    # ------------------------------------------------------------------ serving

    def _refusal(self, kind: str) -> web.Response | None:
        if self.down:
            return web.json_response(
                status_object(503, "ServiceUnavailable", "the server is shutting down"),
                status=503)
        if kind in self.forbidden:
            return web.json_response(status_object(
                403, "Forbidden", f"{kind} is forbidden: User cannot list resource {kind}"),
                status=403)
        return None

    async def _get_pod(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("pods", "GET"))
        refusal = self._refusal("pods")
        if refusal is not None:
            return refusal
        key = (request.match_info["namespace"], request.match_info["name"])
        obj = self.objects["pods"].get(key)
        if obj is None:
            return web.json_response(
                status_object(404, "NotFound", f'pods "{key[1]}" not found'), status=404)
        return web.json_response(obj)

    def _handler(self, kind: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(kind, request)

        return handle

    async def _serve(self, kind: str, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch", "").lower() in ("true", "1")  # Go's ParseBool
        self.requests.append((kind, "WATCH" if watch else "LIST"))
        refusal = self._refusal(kind)
        if refusal is not None:
            return refusal
        if not watch:
            return web.json_response({
                "kind": _PATHS[kind][1], "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": list(self.objects[kind].values()),
            })
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(obj: Mapping[str, Any]) -> None:
            await resp.write(json.dumps(obj).encode() + b"\n")

        deadline = time.monotonic() + timeout
        sent = since
        while not self.down:
            if kind in self.expire_next_watch:  # this watch (open or new) ends with 410 Gone
                self.expire_next_watch.discard(kind)
                await send({"type": "ERROR", "object": status_object(
                    410, "Expired", f"too old resource version: {since} ({self.version})")})
                return resp
            for version, event, obj in self.history[kind]:
                if version > sent:
                    await send({"type": event, "object": obj})
                    sent = version
            left = deadline - time.monotonic()
            if left <= 0:
                await send({"type": "BOOKMARK", "object": {
                    "kind": _PATHS[kind][2], "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(sent)}}})
                break
            async with self.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), left)
        return resp
