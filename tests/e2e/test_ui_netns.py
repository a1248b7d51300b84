"""The topology page against a live 3-host encrypted mesh in network namespaces (issue 7).

Chromium runs inside host 1's namespace (a wrapper executable enters it with `ip netns exec`;
Playwright talks to the browser over pipes, which cross namespaces), so the page reaches the
router's API on that host's loopback as a user on the host would. The page must show 3 peers and
3 connections with the right datapath and encryption; cutting host 3's underlay link must change
the page within seconds, without a reload. A screenshot is saved to artifacts/.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integ.hosts import Underlay, have_netns, underlay, wait_for
from weft.ui.headless import CHROMIUM_ARGS, chromium_path

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
    pytest.mark.skipif(chromium_path() is None, reason="needs chromium (apt-get install chromium)"),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PASSWORD = "ui-test-password"
WAIT_MS = 60_000  # generous: the machine has two shared cores


def _report(host: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(host.exec("weft", "report").stdout)
    return doc


@pytest.fixture(scope="module")
def mesh() -> Iterator[Underlay]:
    with underlay(3) as u:
        pw = u.base_dir / "password"
        pw.write_text(PASSWORD)
        for host in u.hosts:
            peers = [] if host.index == 1 else [u.hosts[0].ip]
            host.exec(
                "weft", "launch", "--nickname", f"host{host.index}",
                "--data-dir", str(host.data_dir), "--api-socket", "",
                "--password-file", str(pw), "--no-ipam",
                "--heartbeat-interval", "1", "--heartbeat-timeout", "3",
                *peers,
                timeout=120,
            )  # fmt: skip

        def full_mesh() -> bool:
            for host in u.hosts:
                conns = _report(host)["router"]["connections"]
                if sum(c["state"] == "established" for c in conns) != 2:
                    return False
            return True

        wait_for(full_mesh, timeout=90, what="3 routers fully meshed and established")
        try:
            yield u
        finally:
            for host in u.hosts:
                host.exec("weft", "stop", check=False, timeout=30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page(mesh: Underlay) -> AsyncIterator[Any]:
    chromium = chromium_path()
    assert chromium is not None
    wrapper = mesh.base_dir / "chromium-in-h1"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {mesh.hosts[0].ns} {chromium} "$@"\n')
    wrapper.chmod(0o755)
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(wrapper), headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            yield await context.new_page()
        finally:
            await browser.close()


async def _snapshot(page: Any) -> dict[str, Any]:
    snap: dict[str, Any] = await page.evaluate("() => window.weftGraph.snapshot()")
    return snap


async def test_a_silent_data_path_shows_degraded_and_recovers(page: Any, mesh: Underlay) -> None:
    """Host 3 drops everything but TCP from host 1: the control connection lives, the data path
    (vxlan/ESP or sleeve UDP) goes silent. The page shows that link degraded (the router says so
    after 3 s of silence; the bound here is generous, the time goes to bench.ui_load) and
    established again once the rule is gone."""
    h1, h3 = mesh.hosts[0], mesh.hosts[2]
    await page.goto("http://127.0.0.1:6784/ui")
    both = """(state) => { const s = window.weftGraph && window.weftGraph.ready &&
                                    window.weftGraph.snapshot();
                           if (!s || s.edges.length !== 3) return false;
                           const n = s.nodes.find(n => n.nickname === 'host3');
                           const own = s.nodes.find(n => n.classes.includes('local'));
                           const e = n && own && s.edges.find(e =>
                               [e.source, e.target].includes(n.name) &&
                               [e.source, e.target].includes(own.name));
                           return !!e && e.state === state; }"""
    await page.wait_for_function(both, arg="established", timeout=WAIT_MS)
    table = f"{mesh.prefix}ui"
    h3.sh(
        f"nft add table inet {table}"
        f" && nft add chain inet {table} in '{{ type filter hook input priority 0; }}'"
        f" && nft add rule inet {table} in ip saddr {h1.ip} meta l4proto != tcp drop"
    )
    try:
        await page.wait_for_function(both, arg="degraded", timeout=WAIT_MS)
        assert "degraded" in await page.inner_text("#banner")
    finally:
        h3.sh(f"nft delete table inet {table}", check=False)
    await page.wait_for_function(both, arg="established", timeout=WAIT_MS)


async def test_page_shows_the_live_mesh_and_follows_a_cut(page: Any, mesh: Underlay) -> None:
    await page.goto("http://127.0.0.1:6784/ui")
    await page.wait_for_function(
        """() => window.weftGraph && window.weftGraph.ready &&
                 window.weftGraph.snapshot().nodes.length === 3 &&
                 window.weftGraph.snapshot().edges.length === 3 &&
                 window.weftGraph.snapshot().edges.every(e => e.state === 'established')""",
        timeout=WAIT_MS,
    )
    snap = await _snapshot(page)
    assert {n["nickname"] for n in snap["nodes"]} == {"host1", "host2", "host3"}
    # host1's own connections: encrypted and on the datapath its status reports
    own = {c["peer"]: c for c in _report(mesh.hosts[0])["router"]["connections"]}
    local = next(n["name"] for n in snap["nodes"] if "local" in n["classes"])
    own_edges = [e for e in snap["edges"] if local in (e["source"], e["target"])]
    assert len(own_edges) == 2
    for edge in own_edges:
        other = edge["target"] if edge["source"] == local else edge["source"]
        assert edge["encrypted"] is True, edge
        assert edge["datapath"] == own[other]["datapath"] != "unknown", (edge, own[other])
    # every edge, the two between other hosts included, has the datapath its owners gossip
    assert all(e["datapath"] in ("ovs", "vxlan", "sleeve") for e in snap["edges"]), snap["edges"]
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "ui-netns-mesh.png"))

    loads = await page.evaluate("() => performance.getEntriesByType('navigation').length")
    mesh.hosts[2].cut()
    try:
        # host3 is dropped: only host1-host2 stays an established link on the page
        await page.wait_for_function(
            """() => { const s = window.weftGraph.snapshot();
                       const live = s.edges.filter(e => e.state === 'established');
                       return live.length === 1; }""",
            timeout=WAIT_MS,
        )
        await page.screenshot(path=str(ARTIFACTS / "ui-netns-cut.png"))
        # the same document changed: no reload happened
        assert (
            await page.evaluate("() => performance.getEntriesByType('navigation').length") == loads
        )
    finally:
        mesh.hosts[2].restore()
