"""The topology page against real routers: three encrypted routers on 127.0.0.1 in this process.

Not the netns mesh of issue 7 (the lead points tests/e2e/test_ui_browser.py's helpers at that),
but the real status model end to end: the router's /status through setup_routes and /ws into
the page. Stopping a router shows on the page without a reload, and restarting the router that
serves the page is survived by the page reconnecting on its own.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_ui_browser import (
    PageProblems,
    edge_between,
    graph_snapshot,
    wait_for,
    wait_for_graph,
)
from tests.integ.hosts import wait_until
from weft.router.config import RouterConfig
from weft.router.daemon import compose
from weft.router.router import Router
from weft.ui.headless import chromium_path, launch_chromium
from weft.ui.metrics import connection_counts

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(chromium_path() is None, reason="needs chromium (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_router(tmp: Path, i: int, *peers: str, http_port: int = 0) -> Router:
    config = RouterConfig(
        nickname=f"r{i}",
        data_dir=tmp / f"r{i}",
        port=0,
        listen_host="127.0.0.1",
        http_addr=f"127.0.0.1:{http_port}",
        api_socket=None,
        password=b"ui test",
        peers=peers,
        datapath="none",
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
    )
    router = Router(config, rng=random.Random(2000 + i))
    compose(router)  # the daemon's wiring: /ui, /ws, /metrics and status notifications
    return router


def established(router: Router) -> set[str]:
    return {
        str(c["peer"])
        for c in router.status()["router"]["connections"]
        if c["state"] == "established"
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        b = await launch_chromium(pw)
        try:
            yield b
        finally:
            await b.close()


async def test_live_routers_on_the_page(browser: Any, tmp_path: Path) -> None:
    routers: list[Router] = []
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        http_port = free_port()
        r0 = make_router(tmp_path, 0, http_port=http_port)
        await r0.start()
        routers.append(r0)
        for i in (1, 2):  # a chain; r2 finds r0 through gossip
            r = make_router(tmp_path, i, f"127.0.0.1:{routers[-1].port}")
            await r.start()
            routers.append(r)
        names = [str(r.identity.name) for r in routers]
        await wait_until(
            lambda: all(established(r) == set(names) - {str(r.identity.name)} for r in routers),
            "a full mesh of 3 routers",
        )

        page = await context.new_page()
        problems = PageProblems(page)
        await page.goto(f"http://127.0.0.1:{http_port}/ui")
        await wait_for_graph(page, 3, 3, timeout_ms=30_000)
        snap = await graph_snapshot(page)
        for other in names[1:]:
            e = edge_between(snap, names[0], other)
            assert (e["state"], e["datapath"], e["encrypted"]) == ("established", "none", True)
        # The edge between the two others is known from their gossiped records only (issue
        # #17): drawn with its datapath and encryption all the same.
        await wait_for(
            page,
            """(pair) => window.weftGraph.snapshot().edges.some(e =>
                 [e.source, e.target].includes(pair[0]) && [e.source, e.target].includes(pair[1])
                 && e.datapath === 'none')""",
            names[1:],
            timeout_ms=30_000,
        )
        snap = await graph_snapshot(page)
        e = edge_between(snap, names[1], names[2])
        assert (e["state"], e["datapath"], e["encrypted"]) == ("established", "none", True)
        assert all(e["datapath"] == "none" for e in snap["edges"])
        assert await page.is_hidden("#legend .lg-unknown")
        assert await page.is_visible("#legend .lg-none")

        # /metrics agrees with /status.
        import aiohttp

        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{http_port}"
            status = await (await http.get(base + "/status")).json()
            text = await (await http.get(base + "/metrics")).text()
        gauges = {
            (s.labels["state"], s.labels["datapath"], s.labels["encryption"]): int(s.value)
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "weft_connections" and s.value
        }
        assert gauges == connection_counts(status) == {("established", "none", "yes"): 2}

        # A router goes away: the page changes without a reload.
        await page.evaluate("() => { window.__sameDocument = true; }")
        await routers[2].stop()
        await wait_for(
            page,
            """(gone) => { const s = window.weftGraph.snapshot();
                 return !s.edges.some(e => (e.source === gone || e.target === gone) &&
                                           e.state === 'established' &&
                                           !e.classes.includes('unreachable')); }""",
            names[2],
            timeout_ms=30_000,
        )
        assert await page.evaluate("() => window.__sameDocument === true")

        # The router serving the page restarts (same HTTP port): the page reconnects by itself.
        before = await page.evaluate("() => window.weftGraph.incarnation")
        await r0.stop()
        await wait_for(page, "() => window.weftGraph.connection === 'down'", timeout_ms=30_000)
        restarted = make_router(tmp_path, 0, f"127.0.0.1:{routers[1].port}", http_port=http_port)
        await restarted.start()
        routers[0] = restarted
        await wait_for(
            page,
            "(b) => window.weftGraph.incarnation !== b && window.weftGraph.connection === 'live'",
            before,
            timeout_ms=45_000,
        )
        await wait_until(
            lambda: str(routers[1].identity.name) in established(restarted),
            "the restarted router to reconnect",
        )
        await wait_for(
            page,
            """(pair) => window.weftGraph.snapshot().edges.some(e =>
                 [e.source, e.target].includes(pair[0]) && [e.source, e.target].includes(pair[1])
                 && e.state === 'established')""",
            [names[0], names[1]],
            timeout_ms=30_000,
        )
        assert await page.evaluate("() => window.__sameDocument === true")
        assert problems.errors == []
    finally:
        await context.close()
        await asyncio.gather(*(r.stop() for r in routers), return_exceptions=True)
