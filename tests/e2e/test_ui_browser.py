"""The topology page in headless Chromium (Playwright) against an in-process status server.

What a user would check by eye: a 3-peer mesh shows 3 peers and 3 connections with the right
datapath and encryption; a host cut off from the mesh changes the page without a reload; the page
survives garbage on its WebSocket and a router restart; the table finds and sorts peers. The
helpers ``graph_snapshot`` and ``wait_for_graph`` work against any URL, e.g. a live netns mesh.
Screenshots go to artifacts/ (gitignored).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from weft.ui.devserver import FakeStatusServer
from weft.ui.headless import chromium_path, launch_chromium
from weft.ui.server import HubConfig
from weft.ui.synthetic import peer_name, synthetic_status

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(chromium_path() is None, reason="needs chromium (apt-get install chromium)"),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
WAIT_MS = 15_000  # generous: two cores shared by many workers


# ---------------------------------------------------------------------------------------------
# Helpers usable against any weft page


async def graph_snapshot(page: Any) -> dict[str, Any]:
    """Nodes and edges as the page's graph holds them (``window.weftGraph.snapshot()``)."""
    snap: dict[str, Any] = await page.evaluate("() => window.weftGraph.snapshot()")
    return snap


async def wait_for(
    page: Any, js_predicate: str, arg: Any = None, timeout_ms: int = WAIT_MS
) -> None:
    await page.wait_for_function(js_predicate, arg=arg, timeout=timeout_ms)


async def wait_for_graph(page: Any, nodes: int, edges: int, timeout_ms: int = WAIT_MS) -> None:
    """Until the page is drawn and shows exactly ``nodes`` peers and ``edges`` connections."""
    await wait_for(
        page,
        """([n, e]) => window.weftGraph && window.weftGraph.ready &&
              window.weftGraph.snapshot().nodes.length === n &&
              window.weftGraph.snapshot().edges.length === e""",
        [nodes, edges],
        timeout_ms,
    )


def edge_between(snap: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    for e in snap["edges"]:
        if {e["source"], e["target"]} == {a, b}:
            found: dict[str, Any] = e
            return found
    pairs = [(e["source"], e["target"]) for e in snap["edges"]]
    raise AssertionError(f"no edge {a} - {b} in {pairs}")


def node(snap: dict[str, Any], name: str) -> dict[str, Any]:
    for n in snap["nodes"]:
        if n["name"] == name:
            found: dict[str, Any] = n
            return found
    raise AssertionError(f"no node {name}")


def cut_off(status: dict[str, Any], index: int) -> dict[str, Any]:
    """The status after peer ``index`` lost its underlay: the others dropped it, it is stale."""
    status = json.loads(json.dumps(status))
    gone = peer_name(index + 1)
    router = status["router"]
    for p in router["peers"]:
        if p["name"] != gone:
            p["connections"] = [c for c in p["connections"] if c["name"] != gone]
    for c in router["connections"]:
        if c["peer"] == gone:
            c["state"] = "failed"
            c["info"] = "heartbeats unanswered for 60s"
    return status


# ---------------------------------------------------------------------------------------------
# Fixtures: one browser per module, one fresh page and status server per test


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        b = await launch_chromium(pw)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def server() -> AsyncIterator[FakeStatusServer]:
    srv = FakeStatusServer(
        synthetic_status(3, datapaths=("vxlan", "sleeve"), encrypted=True),
        HubConfig(min_interval=0.05),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class PageProblems:
    """Console errors and uncaught exceptions of a page (CSP violations show up as errors)."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and "weft: cannot show this status" not in msg.text:
            self.errors.append(f"console: {msg.text}")


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    p = await context.new_page()
    p.problems = PageProblems(p)
    try:
        yield p
    finally:
        await context.close()


async def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name))


# ---------------------------------------------------------------------------------------------
# Tests


async def test_three_peers_drawn_with_datapath_and_encryption(
    page: Any, server: FakeStatusServer
) -> None:
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    snap = await graph_snapshot(page)
    a, b, c = (peer_name(i) for i in (1, 2, 3))
    assert {n["name"] for n in snap["nodes"]} == {a, b, c}
    assert "local" in node(snap, a)["classes"]
    ab, ac, bc = edge_between(snap, a, b), edge_between(snap, a, c), edge_between(snap, b, c)
    assert (ab["datapath"], ab["encrypted"], ab["state"]) == ("vxlan", True, "established")
    assert (ac["datapath"], ac["encrypted"], ac["state"]) == ("sleeve", True, "established")
    assert "dp-vxlan" in ab["classes"] and "enc" in ab["classes"]
    assert ab["label"] == "vxlan · encrypted"
    assert ac["label"] == "sleeve · encrypted"
    # b - c is known from the gossiped records only (issue #17): drawn with its datapath too,
    # and "not reported" is not in the legend when no edge lacks a datapath.
    assert (bc["datapath"], bc["encrypted"], bc["state"]) == ("sleeve", True, "established")
    assert bc["label"] == "sleeve · encrypted" and "dp-sleeve" in bc["classes"]
    assert all(e["datapath"] not in ("unknown", "", None) for e in snap["edges"])
    assert await page.is_hidden("#legend .lg-unknown")
    assert await page.is_hidden("#legend .lg-none")
    assert "host-0001" in await page.inner_text("#self-name")
    assert await page.is_hidden("#banner")
    await screenshot(page, "ui-3-peers.png")
    assert page.problems.errors == []


async def test_cut_host_changes_page_without_reload(page: Any, server: FakeStatusServer) -> None:
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    await page.evaluate("() => { window.__sameDocument = true; }")
    updates = await page.evaluate("() => window.weftGraph.updates")

    server.set_status(cut_off(server.get_status(), 2))
    # the update must arrive without a reload, within wait_for's bound (no wall-clock assertion)
    await wait_for(
        page,
        """(before) => window.weftGraph.updates > before &&
              window.weftGraph.snapshot().nodes.some(
                  n => n.name === 'ce:00:00:00:00:03' && n.classes.includes('unreachable'))""",
        updates,
    )
    assert await page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    snap = await graph_snapshot(page)
    a, c = peer_name(1), peer_name(3)
    ac = edge_between(snap, a, c)
    assert ac["state"] == "failed" and "st-failed" in ac["classes"]
    banner = await page.inner_text("#banner")
    assert "partitioned into 2 parts" in banner and "1 peer unreachable" in banner
    await screenshot(page, "ui-3-peers-cut.png")

    # Click the failed connection: the details give the reason.
    await page.evaluate("(id) => window.weftGraph.select(id)", ac["id"])
    details = await page.inner_text("#details")
    assert "heartbeats unanswered" in details and "failed" in details
    assert page.problems.errors == []


async def test_peer_details_show_ipam_and_containers(page: Any, server: FakeStatusServer) -> None:
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    await page.evaluate("(id) => window.weftGraph.select(id)", "n:" + peer_name(1))
    details = await page.inner_text("#details")
    uid = server.get_status()["router"]["uid"]
    assert uid > 2**53  # not exact as a JS number: the page must keep the digits
    for expected in (
        peer_name(1),
        "host-0001",
        "this router",
        "Address space (10.32.0.0/12)",
        "aa:bb:cc:00:00:01",
        "10.32.0.2/12",
        "Connections (2)",
        str(uid),
        "Our connections (2)",
        "vxlan, encrypted, MTU 1376",
    ):
        assert expected in details, expected
    # A remote peer: no containers section, its ranges and free count.
    await page.evaluate("(id) => window.weftGraph.select(id)", "n:" + peer_name(2))
    details = await page.inner_text("#details")
    assert "host-0002" in details and "Containers" not in details and "free" in details
    assert page.problems.errors == []


async def test_survives_malformed_and_stale_messages(page: Any, server: FakeStatusServer) -> None:
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    hook = "window.weftGraph"
    seq, inc = await page.evaluate(f"() => [{hook}.seq, {hook}.incarnation]")
    garbage: list[Any] = [
        "not json at all",
        "[]",
        "null",
        {"type": "status"},
        {"type": "status", "seq": seq + 1, "incarnation": inc, "status": 5},
        {"type": "wat"},
        {"type": "status", "seq": seq, "incarnation": inc, "status": {"router": {}}},  # stale
        # Valid but odd (as from another router process): shown, with no usable peers.
        {
            "type": "status",
            "seq": 1,
            "incarnation": "elsewhere",
            "status": {"router": {"peers": "x", "connections": [None, 5, {"peer": {}}]}},
        },
    ]
    for g in garbage:
        await page.evaluate(f"(d) => {hook}.receive(d)", g if isinstance(g, str) else json.dumps(g))
    stats = await page.evaluate(f"() => {hook}.stats")
    assert stats["malformed"] >= 5 and stats["stale"] >= 1
    assert (await graph_snapshot(page))["nodes"] == []
    # The real router's next status (a new incarnation to the page again) is shown.
    server.set_status(cut_off(server.get_status(), 2))
    await wait_for(
        page,
        "() => window.weftGraph.snapshot().edges.some(e => e.state === 'failed')",
    )
    snap = await graph_snapshot(page)
    assert len(snap["nodes"]) == 3
    unexpected = [e for e in page.problems.errors if "cannot show" not in e]
    assert unexpected == []


async def test_reconnects_after_router_restart(page: Any, server: FakeStatusServer) -> None:
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    await page.evaluate("() => { window.__sameDocument = true; }")
    first_incarnation = await page.evaluate("() => window.weftGraph.incarnation")
    port = server.port
    await server.stop()
    await wait_for(page, "() => window.weftGraph.connection === 'down'")
    # A "new router process" on the same port, with a bigger mesh.
    restarted = FakeStatusServer(synthetic_status(5, seed=3), HubConfig(min_interval=0.05))
    await restarted.start(port)
    try:
        await wait_for_graph(page, 5, len(_links(restarted.get_status())), timeout_ms=30_000)
        assert await page.evaluate("() => window.__sameDocument === true")
        assert await page.evaluate("() => window.weftGraph.incarnation") != first_incarnation
        assert await page.evaluate("() => window.weftGraph.connection") == "live"
    finally:
        await restarted.stop()


async def test_table_search_and_sort(page: Any) -> None:
    srv = FakeStatusServer(synthetic_status(300, partitions=2, seed=7))
    await srv.start()
    try:
        await page.goto(srv.url + "/ui")
        await wait_for(page, "() => window.weftGraph && window.weftGraph.ready")
        await page.click("#tabs button[data-view=peers]")
        await wait_for(page, "() => window.weftGraph.tableRows === 300")
        assert "300 rows" in await page.inner_text("#table-count")
        # Virtual scrolling: far fewer than 300 rows are in the DOM.
        assert await page.locator("#table-body tr.row").count() < 120
        await page.fill("#table-search", "host-0123")
        await wait_for(page, "() => window.weftGraph.tableRows === 1")
        assert "host-0123" in await page.inner_text("#table-body")
        await page.fill("#table-search", "unreachable")
        await wait_for(page, "() => window.weftGraph.tableRows === 150")
        await page.fill("#table-search", "")
        await wait_for(page, "() => window.weftGraph.tableRows === 300")
        # Virtual scrolling: at the very bottom the last peer is rendered and in view.
        await page.click("#table-head th[data-key=nickname]")  # ascending
        await page.evaluate(
            "() => { const s = document.getElementById('table-scroll');"
            " s.scrollTop = s.scrollHeight; }"
        )
        await wait_for(
            page,
            """() => { const rows = document.querySelectorAll('#table-body tr.row');
                 const last = rows[rows.length - 1];
                 if (!last || !last.textContent.includes('host-0300')) return false;
                 const s = document.getElementById('table-scroll').getBoundingClientRect();
                 const r = last.getBoundingClientRect();
                 return r.bottom <= s.bottom + 1 && r.top >= s.top; }""",
        )
        await page.evaluate("() => { document.getElementById('table-scroll').scrollTop = 0; }")
        # Sort by nickname twice: descending puts host-0300 first.
        await page.click("#table-head th[data-key=name]")
        await page.click("#table-head th[data-key=nickname]")
        await page.click("#table-head th[data-key=nickname]")
        first = await page.inner_text("#table-body tr.row >> nth=0")
        assert "host-0300" in first
        # Clicking a row shows that peer's details.
        await page.click("#table-body tr.row >> nth=0")
        assert "host-0300" in await page.inner_text("#details")
        await screenshot(page, "ui-table-300.png")
        assert page.problems.errors == []
    finally:
        await srv.stop()


def _links(status: dict[str, Any]) -> set[frozenset[str]]:
    return {
        frozenset((p["name"], c["name"]))
        for p in status["router"]["peers"]
        for c in p["connections"]
    }


async def test_tables_work_without_the_graph_library(page: Any, server: FakeStatusServer) -> None:
    await page.route("**/static/graph.js", lambda route: route.abort())
    await page.goto(server.url + "/ui")
    await wait_for(page, "() => window.weftGraph && window.weftGraph.ready")
    assert "did not load" in await page.inner_text("#graph")
    await page.click("#tabs button[data-view=connections]")
    await wait_for(page, "() => window.weftGraph.tableRows === 3")
    body = await page.inner_text("#table-body")
    assert "vxlan" in body and "sleeve" in body and "encrypted" in body


async def test_connections_table_lists_dials_to_unknown_peers(
    page: Any, server: FakeStatusServer
) -> None:
    status = json.loads(json.dumps(server.get_status()))
    status["router"]["connections"].append(
        {
            "peer": None,
            "nickname": None,
            "address": "10.9.9.9:6783",
            "outbound": True,
            "state": "failed",
            "info": "wrong password: confirm did not open (3 times)",
            "encrypted": True,
            "datapath": None,
            "mtu": None,
            "since": 12.3,
        }
    )
    server.set_status(status)
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    assert "1 connection failed" in await page.inner_text("#banner")
    await page.click("#tabs button[data-view=connections]")
    await wait_for(page, "() => window.weftGraph.tableRows === 4")
    await page.fill("#table-search", "10.9.9.9")
    await wait_for(page, "() => window.weftGraph.tableRows === 1")
    await page.click("#table-body tr.row >> nth=0")
    details = await page.inner_text("#details")
    assert "wrong password" in details and "10.9.9.9:6783" in details and "failed" in details
    assert page.problems.errors == []


async def test_live_mesh_from_env(page: Any) -> None:
    """Point the page at a running router: ``WEFT_UI_URL=http://10.x.y.z:6784 pytest -k live``.

    ``WEFT_UI_PEERS`` (default 3) peers and as many links for a full mesh of 3 (override with
    ``WEFT_UI_LINKS``), every own connection established; ``WEFT_UI_DATAPATH`` (e.g. sleeve) and
    ``WEFT_UI_ENCRYPTED`` (1/0), when set, must hold for every own connection.
    """
    import os

    url = os.environ.get("WEFT_UI_URL")
    if not url:
        pytest.skip("set WEFT_UI_URL to a live router's API address")
    peers = int(os.environ.get("WEFT_UI_PEERS", "3"))
    links = int(os.environ.get("WEFT_UI_LINKS", str(peers * (peers - 1) // 2)))
    await page.goto(url.rstrip("/") + "/ui")
    await wait_for_graph(page, peers, links, timeout_ms=60_000)
    snap = await graph_snapshot(page)
    local = next(n["name"] for n in snap["nodes"] if "local" in n["classes"])
    own = [e for e in snap["edges"] if local in (e["source"], e["target"])]
    assert own and all(e["state"] == "established" for e in own), own
    datapath, encrypted = os.environ.get("WEFT_UI_DATAPATH"), os.environ.get("WEFT_UI_ENCRYPTED")
    if datapath:
        assert all(e["datapath"] == datapath for e in own), own
    if encrypted is not None:
        assert all(e["encrypted"] == (encrypted == "1") for e in own), own
    await screenshot(page, "ui-live.png")
    assert page.problems.errors == []


async def test_labels_say_what_is_known(page: Any, server: FakeStatusServer) -> None:
    """Issue #17 item 4: failed edges, redial rows, peer counts, reporters, held links, columns."""
    status = json.loads(json.dumps(server.get_status()))
    a, b, c = (peer_name(i) for i in (1, 2, 3))
    router = status["router"]
    router["software"] = "9.8.7"
    # b and c run a weft from before the gossiped link attributes: b - c has no datapath.
    for p in router["peers"]:
        for conn in p["connections"]:
            if {p["name"], conn["name"]} == {b, c}:
                for key in ("datapath", "encrypted", "mtu", "data_state"):
                    conn.pop(key, None)
    long_reason = "encrypted: kernel ESP refused by the peer, using sleeve"
    router["connections"][0]["info"] = long_reason
    # A redial row next to the live connection to b, and a dial to an address with no peer yet.
    router["connections"].append(
        {
            "peer": b,
            "nickname": "host-0002",
            "address": "192.168.0.2:6783",
            "outbound": True,
            "state": "retrying",
            "info": "connection refused",
            "encrypted": False,
            "datapath": None,
            "mtu": None,
            "since": 3.0,
        }
    )
    router["connections"].append(
        {
            "peer": None,
            "nickname": None,
            "address": "10.9.9.9:6783",
            "outbound": True,
            "state": "failed",
            "info": "connection refused",
            "encrypted": False,
            "datapath": None,
            "mtu": None,
            "since": 3.0,
        }
    )
    server.set_status(status)
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    # Two peers, both connected: dial rows are not peers.
    assert "2/2 connected peers" in await page.inner_text("#summary")

    # The link b - c is reported by both records: the details say so.
    snap = await graph_snapshot(page)
    bc = edge_between(snap, b, c)
    assert bc["label"] == "encrypted", bc  # its datapath is not reported: not named
    await page.evaluate("(id) => window.weftGraph.select(id)", bc["id"])
    details = await page.inner_text("#details")
    assert "not reported" in details and "neither" not in details
    assert "host-0002: outbound" in details and "host-0003: inbound" in details
    assert await page.is_visible("#legend .lg-unknown")  # listed once an edge lacks it

    # Connections table: the dial row has no handshake yet, the Reason is not cut.
    await page.click("#tabs button[data-view=connections]")
    await wait_for(page, "() => window.weftGraph.tableRows === 4")
    await page.fill("#table-search", "10.9.9.9")
    await wait_for(page, "() => window.weftGraph.tableRows === 1")
    assert "no handshake yet" in await page.inner_text("#table-body")
    assert "plain" not in await page.inner_text("#table-body")
    await page.fill("#table-search", "kernel ESP")
    await wait_for(
        page,
        "() => document.getElementById('table-body').textContent"
        ".includes('kernel ESP') && window.weftGraph.tableRows === 1",
    )
    cut = await page.evaluate(
        """() => { const td = [...document.querySelectorAll('#table-body tr.row td')].pop();
             return [td.textContent, td.scrollWidth > td.clientWidth]; }"""
    )
    assert cut == [long_reason, False], cut
    await screenshot(page, "ui-connections-reason.png")

    # Peers table: the record version is called that; the software version is shown.
    await page.fill("#table-search", "")
    await page.click("#tabs button[data-view=peers]")
    await wait_for(page, "() => window.weftGraph.tableRows === 3")
    head = await page.inner_text("#table-head")
    assert "Record version" in head and "Software" in head
    await page.fill("#table-search", "host-0001")
    await wait_for(page, "() => window.weftGraph.tableRows === 1")
    assert "9.8.7" in await page.inner_text("#table-body")
    await page.click("#tabs button[data-view=graph]")

    # The local connection to c fails: the edge says "failed", not "none · encrypted · failed".
    failed = cut_off(server.get_status(), 2)
    for conn in failed["router"]["connections"]:
        if conn["peer"] == c:
            conn.update(datapath=None, encrypted=False, mtu=None)
    for rec in failed["router"]["peers"]:
        if rec["name"] == c:
            rec["connections"] = []
    server.set_status(failed)
    await wait_for(
        page,
        """(c) => window.weftGraph.snapshot().edges.some(
              e => (e.source === c || e.target === c) && e.state === 'failed')""",
        c,
    )
    snap = await graph_snapshot(page)
    ac = edge_between(snap, a, c)
    assert ac["label"] == "failed", ac
    # b - c vanished from both records: held (faint) a moment, then gone, not flipped back.
    held = edge_between(snap, b, c)
    assert "held" in held["classes"], held
    await page.evaluate("(id) => window.weftGraph.select(id)", held["id"])
    details = await page.inner_text("#details")
    assert "no longer reported" in details
    await wait_for_graph(page, 3, 2)
    await page.evaluate("(id) => window.weftGraph.select(id)", held["id"])
    assert "This connection is gone" in await page.inner_text("#details")
    assert page.problems.errors == []


# ---------------------------------------------------------------------------------------------
# Big meshes on the canvas (#17 item 3): what a user sees, through window.weftGraph.seen()


def _overlaps(labels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    bad = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if (
                a["x0"] < b["x1"] - 0.5
                and b["x0"] < a["x1"] - 0.5
                and a["y0"] < b["y1"] - 0.5
                and b["y0"] < a["y1"] - 0.5
            ):
                bad.append((a["text"], b["text"]))
    return bad


async def _seen(page: Any) -> dict[str, Any]:
    seen: dict[str, Any] = await page.evaluate("() => window.weftGraph.seen()")
    return seen


def _node_labels(seen: dict[str, Any]) -> list[dict[str, Any]]:
    return [lb for lb in seen["labels"] if lb["kind"] == "node"]


async def test_thousand_peers_zoom_shows_labels_and_focus_shows_links(page: Any) -> None:
    status = synthetic_status(1000, seed=5)
    srv = FakeStatusServer(status)
    await srv.start()
    try:
        await page.goto(srv.url + "/ui")
        await wait_for_graph(page, 1000, len(_links(status)))
        await wait_for(page, "() => window.weftGraph.seen().frames > 0")
        overview = await _seen(page)
        assert _overlaps(overview["labels"]) == []
        # Zoom in with the wheel over the middle of the graph: more peers get their name.
        box = await page.locator("#graph").bounding_box()
        await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(4):
            await page.mouse.wheel(0, -500)
        await wait_for(page, "(k) => window.weftGraph.seen().k > k * 4", overview["k"])
        await wait_for(
            page,
            "(n) => window.weftGraph.seen().labels.filter(l => l.kind === 'node').length > n",
            len(_node_labels(overview)),
        )
        zoomed = await _seen(page)
        labels = _node_labels(zoomed)
        assert len(labels) >= 15, labels
        assert _overlaps(zoomed["labels"]) == []
        assert all(lb["text"].startswith("host-") for lb in labels)
        await screenshot(page, "ui-1000-zoomed.png")

        # Find a peer: it is selected, brought into view, and its neighbours and links are
        # highlighted and labelled.
        name = peer_name(500)
        record = next(p for p in status["router"]["peers"] if p["name"] == name)
        neighbours = {c["name"] for c in record["connections"]}
        await page.fill("#graph-search", "host-0500")
        await wait_for(page, "(id) => window.weftGraph.seen().focus[0] === id", "n:" + name)
        seen = await _seen(page)
        assert {"n:" + n for n in neighbours} <= set(seen["focus"])
        nicks = {p["nickname"] for p in status["router"]["peers"] if p["name"] in neighbours}
        shown = {lb["text"] for lb in _node_labels(seen)}
        assert nicks | {"host-0500"} <= shown, (nicks, shown)
        own = {
            e["id"]
            for e in (await graph_snapshot(page))["edges"]
            if name in (e["source"], e["target"])
        }
        assert own and own <= set(seen["focusEdges"])
        assert f"Connections ({len(neighbours)})" in await page.inner_text("#details")
        await screenshot(page, "ui-1000-focus.png")

        # Click a neighbour on the canvas: it becomes the selection.
        other = sorted(neighbours)[0]
        pos = await page.evaluate("(id) => window.weftGraph.screenPos(id)", "n:" + other)
        if not pos["inView"]:
            await page.evaluate("(id) => window.weftGraph.select(id)", "n:" + other)
            pos = await page.evaluate("(id) => window.weftGraph.screenPos(id)", "n:" + other)
        await page.mouse.click(pos["x"], pos["y"])
        await wait_for(page, "(id) => window.weftGraph.seen().focus[0] === id", "n:" + other)
        assert other in await page.inner_text("#details")
        assert page.problems.errors == []
    finally:
        await srv.stop()


async def test_grouping_by_zone_bundles_links_between_groups(page: Any) -> None:
    status = synthetic_status(1000, seed=5, zones=4)
    srv = FakeStatusServer(status)
    await srv.start()
    try:
        await page.goto(srv.url + "/ui")
        await wait_for(page, "() => window.weftGraph && window.weftGraph.ready")
        await page.select_option("#group-by", "label:zone")
        await wait_for(page, "() => window.weftGraph.seen().groups.length === 4")
        await page.click("#btn-fit")
        await page.click("#btn-zoom-out")
        await wait_for(page, "() => window.weftGraph.seen().mode === 'overview'")
        seen = await _seen(page)
        groups = {lb["text"] for lb in seen["labels"] if lb["kind"] == "group"}
        assert groups == {f"zone-{z} · 250 peers" for z in range(4)}, groups
        bundles = [lb["text"] for lb in seen["labels"] if lb["kind"] == "bundle"]
        assert bundles and all(t.endswith(" links") or t.endswith(" link") for t in bundles)
        assert _overlaps(seen["labels"]) == []
        await screenshot(page, "ui-1000-zones.png")
        assert page.problems.errors == []
    finally:
        await srv.stop()


async def test_small_mesh_stable_positions_and_readable_labels(
    page: Any, browser: Any, server: FakeStatusServer
) -> None:
    await page.goto(server.url + "/ui")
    await wait_for_graph(page, 3, 3)
    await wait_for(page, "() => window.weftGraph.seen().frames > 0")
    seen = await _seen(page)
    # Every peer is named; link labels are drawn but never over a peer's label.
    assert {lb["text"].split("\n")[0] for lb in _node_labels(seen)} == {
        "host-0001",
        "host-0002",
        "host-0003",
    }
    assert [lb for lb in seen["labels"] if lb["kind"] == "edge"]
    assert _overlaps(seen["labels"]) == []
    first = await page.evaluate("() => window.weftGraph.positions()")
    # The same picture after a reload and in a fresh browser profile (no remembered layout).
    await page.reload()
    await wait_for_graph(page, 3, 3)
    assert await page.evaluate("() => window.weftGraph.positions()") == first
    context = await browser.new_context(viewport={"width": 900, "height": 600})
    try:
        fresh = await context.new_page()
        await fresh.goto(server.url + "/ui")
        await wait_for_graph(fresh, 3, 3)
        assert await fresh.evaluate("() => window.weftGraph.positions()") == first
    finally:
        await context.close()
    # A peer cut off moves to its own group; the others stay where they were.
    server.set_status(cut_off(server.get_status(), 2))
    await wait_for(page, "() => window.weftGraph.seen().groups.length === 2")
    after = await page.evaluate("() => window.weftGraph.positions()")
    for name in (peer_name(1), peer_name(2)):
        assert after["n:" + name] == first["n:" + name]
    assert page.problems.errors == []


def thin_view_status() -> dict[str, Any]:
    """A 4-peer status with what the thin views show: the switch's why and history, failures,
    drops, IPAM with ranges and a peer held by an unreachable router."""
    status = synthetic_status(4, datapaths=("vxlan", "sleeve"), encrypted=False)
    a, b, c = peer_name(1), peer_name(2), peer_name(3)
    status["router"]["connections"].append(
        {
            "peer": None,
            "nickname": None,
            "address": "10.0.0.99:6783",
            "outbound": True,
            "state": "retrying",
            "info": "cannot connect: connection refused",
            "encrypted": False,
            "datapath": None,
            "mtu": None,
            "since": 4.0,
        }
    )
    status["overlay"] = {
        "datapath": "auto",
        "drops": {"tampered": 3, "replayed": 0},
        "switch": {
            "datapaths": ["vxlan", "sleeve"],
            "note": "ovs: openvswitch module not loaded",
            "capabilities": {
                "openvswitch": {"available": False, "detail": "module not loaded"},
                "vxlan": {"available": True, "detail": "vxlan links can be created"},
                "esp": {"available": True, "detail": "ok"},
            },
            "connections": {
                b: {
                    "chosen": "vxlan",
                    "notes": [],
                    "paths": {
                        "vxlan": {"healthy": True, "peer_healthy": True, "reason": ""},
                        "sleeve": {"healthy": True, "peer_healthy": None, "reason": ""},
                    },
                },
                c: {
                    "chosen": "sleeve",
                    "notes": [],
                    "paths": {
                        "vxlan": {
                            "healthy": False,
                            "peer_healthy": True,
                            "reason": "silent: heartbeats through the tunnel unanswered for 3s",
                        },
                        "sleeve": {"healthy": True, "peer_healthy": None, "reason": ""},
                    },
                },
            },
            "history": [
                {
                    "at": 1_700_000_000.0,
                    "peer": c,
                    "kind": "fallback",
                    "from": "vxlan",
                    "to": "sleeve",
                    "reason": "heartbeat_lost",
                    "info": "vxlan: silent: heartbeats through the tunnel unanswered for 3s",
                }
            ],
        },
    }
    status["ipam"]["ready"] = True
    for entry in status["ipam"]["entries"]:
        entry["ranges"] = [f"10.32.{entry['owned'] // 4096}.0-10.32.15.255"]
        entry["ranges_more"] = 0
    assert a in {e["peer"] for e in status["ipam"]["entries"]}
    return status


async def test_thin_views_why_addresses_events_pause_and_shared_links(page: Any) -> None:
    """Item 5 and 6 of issue #17: the plaintext warning, the data path's why on the local peer,
    the mesh-wide address view, the events panel with column filters, pause, and a selection
    that survives in the URL."""
    status = thin_view_status()
    srv = FakeStatusServer(status, HubConfig(min_interval=0.05))
    await srv.start()
    try:
        await page.goto(srv.url + "/ui")
        await wait_for_graph(
            page,
            4,
            len(
                {
                    frozenset((p["name"], c["name"]))
                    for p in status["router"]["peers"]
                    for c in p["connections"]
                }
            ),
        )
        assert "Plaintext mesh" in await page.inner_text("#banner")
        assert "updated" in await page.inner_text("#updated")

        await page.evaluate("(id) => window.weftGraph.select(id)", "n:" + peer_name(1))
        details = await page.inner_text("#details")
        assert "Data path" in details and "openvswitch no (module not loaded)" in details
        assert "vxlan: not healthy — silent: heartbeats through the tunnel" in details
        assert "vxlan → sleeve (heartbeat_lost)" in details
        assert "addresses" in details and "range divided" in details

        await page.click("#tabs button[data-view=addresses]")
        await wait_for(page, "() => document.querySelectorAll('#table-body tr.row').length === 4")
        note = await page.inner_text("#table-note")
        total = sum(e["owned"] for e in status["ipam"]["entries"])
        assert f"owned {total:,}" in note and "1,048,576 addresses" in note
        assert "10.32." in await page.inner_text("#table-body")

        await page.click("#tabs button[data-view=events]")
        await wait_for(page, "() => document.querySelectorAll('#table-body tr.row').length === 3")
        events = await page.inner_text("#table-body")
        assert "fallback" in events and "heartbeat_lost" in events
        assert "dial failed" in events and "connection refused" in events
        assert "sleeve drops" in events and "tampered" in events
        one_row = """(text) => document.querySelectorAll('#table-body tr.row').length === 1 &&
            document.getElementById('table-body').textContent.includes(text)"""
        await page.fill("#table-search", "datapath:vxlan")
        await wait_for(page, one_row, "heartbeat_lost")
        await page.fill("#table-search", "state:retrying")
        await wait_for(page, one_row, "connection refused")

        # Selecting a row puts it in the URL; opening that URL elsewhere shows the same.
        await page.click("#table-body tr.row")
        await wait_for(page, "() => window.location.hash.includes('sel=')")
        url = page.url
        assert "view=events" in url and "q=state%3Aretrying" in url
        other = await page.context.new_page()
        await other.goto(url)
        await wait_for(other, "() => window.weftGraph && window.weftGraph.updates > 0")
        await wait_for(other, "() => document.querySelectorAll('#table-body tr.row').length === 1")
        assert await other.input_value("#table-search") == "state:retrying"
        assert await other.get_attribute("#tabs button[data-view=events]", "aria-selected") == (
            "true"
        )
        await other.close()

        # Pause: a new status is not applied until resumed, and the page says one is waiting.
        await page.click("#btn-pause")
        before = await page.evaluate("() => window.weftGraph.updates")
        changed = json.loads(json.dumps(status))
        changed["overlay"]["drops"]["oversize"] = 7
        srv.set_status(changed)
        await wait_for(
            page, "() => document.getElementById('updated').textContent.includes('waiting')"
        )
        assert await page.evaluate("() => window.weftGraph.updates") == before
        await page.click("#btn-pause")
        await wait_for(page, "(b) => window.weftGraph.updates > b", before)
        await page.fill("#table-search", "")
        await wait_for(
            page, "() => document.getElementById('table-body').textContent.includes('oversize')"
        )
        await screenshot(page, "ui-events.png")
        assert page.problems.errors == []
    finally:
        await srv.stop()
