"""A status server without a router: serves the page over a status you set by hand.

Used by the page's browser tests and its benchmark, and handy when working on the page::

    python3 -m weft.ui.devserver --peers 1000 --port 6790     # then open http://127.0.0.1:6790/ui

It serves ``/status`` too (plain JSON, as the router's API does) so tools can be pointed at it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from weft.ui.metrics import Metrics
from weft.ui.server import HubConfig, StatusHub, refuse_cross_site, setup_routes
from weft.ui.synthetic import synthetic_status

__all__ = ["FakeStatusServer"]


class FakeStatusServer:
    """An aiohttp app on 127.0.0.1 serving /ui, /ws, /metrics and /status for a settable status."""

    def __init__(self, status: Mapping[str, Any], hub_config: HubConfig | None = None) -> None:
        self._status: dict[str, Any] = copy.deepcopy(dict(status))
        self.app = web.Application(middlewares=[refuse_cross_site])
        self.metrics = Metrics(get_status=self.get_status)
        self.hub = StatusHub(self.get_status, hub_config)
        setup_routes(self.app, self.get_status, hub=self.hub, metrics=self.metrics)
        self.app.router.add_get("/status", self._handle_status)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def get_status(self) -> dict[str, Any]:
        return self._status

    def set_status(self, status: Mapping[str, Any]) -> None:
        """Replace the status and tell the hub (live clients get it within ``min_interval``)."""
        self._status = copy.deepcopy(dict(status))
        self.hub.notify()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle_status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._status)


async def _serve(args: argparse.Namespace) -> None:
    status = synthetic_status(
        args.peers, partitions=args.partitions, encrypted=not args.plain, zones=args.zones
    )
    server = FakeStatusServer(status)
    url = await server.start(args.port)
    print(f"serving a {args.peers}-peer synthetic mesh at {url}/ui  (Ctrl-C stops)")
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--peers", type=int, default=12, help="peers in the synthetic mesh")
    parser.add_argument("--partitions", type=int, default=1, help="disconnected parts")
    parser.add_argument("--zones", type=int, default=0, help="peers labelled zone-0..N-1")
    parser.add_argument("--plain", action="store_true", help="an unencrypted mesh")
    parser.add_argument("--port", type=int, default=6790, help="port on 127.0.0.1")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
