"""The page's HTTP side: /ui and its assets, the /ws live status stream, the cross-site guard."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from weft.errors import ConfigError
from weft.ui.server import Coalescer, HubConfig, StatusHub, refuse_cross_site, setup_routes
from weft.ui.synthetic import synthetic_status

RECEIVE_TIMEOUT = 10.0  # generous bound on waiting for a message that must come

# ---------------------------------------------------------------------------------------------
# Coalescer: pure, clock stepped by hand


def test_first_notify_flushes_at_once_then_rate_limited() -> None:
    c = Coalescer(min_interval=0.25)
    assert c.notify(10.0) == 10.0
    assert c.notify(10.0) is None  # already pending: same deadline
    assert c.flush_due(10.0)
    assert not c.flush_due(10.0)  # nothing pending any more
    assert c.notify(10.1) == pytest.approx(10.25)  # within the interval: wait for its end
    assert not c.flush_due(10.2)
    assert c.notify(10.2) is None
    assert c.flush_due(10.25)
    assert not c.pending
    assert c.notify(20.0) == 20.0  # quiet for long: immediate again


def test_burst_of_notifications_gives_one_flush_per_interval() -> None:
    c = Coalescer(min_interval=1.0)
    flushes = 0
    deadline: float | None = None
    now = 0.0
    while now < 10.0:  # a notification every 10 ms for 10 s
        d = c.notify(now)
        if d is not None:
            deadline = d
        if deadline is not None and c.flush_due(now):
            flushes += 1
            deadline = None
        now = round(now + 0.01, 2)
    assert 10 <= flushes <= 11


@pytest.mark.parametrize(
    "kwargs",
    [{"min_interval": -1}, {"heartbeat": 0}, {"max_clients": 0}, {"max_client_message": 10}],
)
def test_bad_hub_config_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        HubConfig(**kwargs)


def test_bad_coalescer_interval_is_refused() -> None:
    with pytest.raises(ConfigError):
        Coalescer(float("nan"))


# ---------------------------------------------------------------------------------------------
# A test app


class Source:
    """A settable status; ``fail`` makes get_status raise (a buggy producer)."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.calls = 0
        self.fail = False

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("status producer bug")
        return self.status


async def make_client(
    source: Source, config: HubConfig | None = None
) -> tuple[TestClient[web.Request, web.Application], StatusHub]:
    app = web.Application(middlewares=[refuse_cross_site])
    hub = StatusHub(source, config or HubConfig(min_interval=0.0))
    setup_routes(app, source, hub=hub)

    async def connect(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_post("/connect", connect)
    app.router.add_put("/connect", connect)
    app.router.add_delete("/connect", connect)
    app.router.add_get("/connect", connect)
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
    await client.start_server()
    return client, hub


Env = tuple[TestClient[web.Request, web.Application], StatusHub, Source]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    source = Source(synthetic_status(3))
    client, hub = await make_client(source)
    try:
        yield client, hub, source
    finally:
        await client.close()


async def receive_json(ws: Any) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), RECEIVE_TIMEOUT)
    assert msg.type == WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


# ---------------------------------------------------------------------------------------------
# /ui and assets


async def test_ui_redirects_and_serves_page_with_csp(env: Env) -> None:
    client, _, _ = env
    resp = await client.get("/ui", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    resp = await client.get("/ui")
    assert resp.status == 200
    text = await resp.text()
    assert "static/app.js" in text and "static/graph.js" in text
    assert "http" not in text.replace("http-equiv", "")  # no CDN, nothing off-box
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path", ["app.js", "graph.js", "style.css", "favicon.svg"]
)
async def test_static_assets_are_served(env: Env, path: str) -> None:
    client, _, _ = env
    resp = await client.get("/ui/static/" + path)
    assert resp.status == 200
    assert len(await resp.read()) > 100


async def test_static_does_not_escape_its_directory(env: Env) -> None:
    client, _, _ = env
    for path in (
        "/ui/static/../server.py",
        "/ui/static/%2e%2e/server.py",
        "/ui/static/../../errors.py",
    ):
        resp = await client.get(path)
        assert resp.status in (403, 404), path


# ---------------------------------------------------------------------------------------------
# /ws


async def test_ws_sends_status_then_update_after_notify(env: Env) -> None:
    client, hub, source = env
    ws = await client.ws_connect("/ws")
    first = await receive_json(ws)
    assert first["type"] == "status" and first["seq"] == 1
    assert first["incarnation"] == hub.incarnation
    assert first["status"] == source.status

    source.status = synthetic_status(4)
    hub.notify()
    second = await receive_json(ws)
    assert second["seq"] == 2 and len(second["status"]["router"]["peers"]) == 4
    await ws.close()


async def test_ws_skips_unchanged_status(env: Env) -> None:
    client, hub, source = env
    ws = await client.ws_connect("/ws")
    assert (await receive_json(ws))["seq"] == 1
    hub.notify()  # nothing changed: no push
    hub.notify()
    await ws.send_str('{"type": "ping"}')
    assert (await receive_json(ws)) == {"type": "pong"}
    source.status = synthetic_status(5)
    hub.notify()
    nxt = await receive_json(ws)
    assert nxt["seq"] == 2 and len(nxt["status"]["router"]["peers"]) == 5
    await ws.close()


async def test_ws_survives_malformed_client_messages(env: Env) -> None:
    client, hub, source = env
    ws = await client.ws_connect("/ws")
    await receive_json(ws)
    for bad in ("garbage", "[1,2]", '{"type": 5}', '{"type": "subscribe"}', "{}"):
        await ws.send_str(bad)
        reply = await receive_json(ws)
        assert reply["type"] == "error" and reply["error"]
    await ws.send_bytes(b"\x00\x01")
    assert (await receive_json(ws))["type"] == "error"
    # Still fully working: refresh re-sends the current status, updates still arrive.
    await ws.send_str('{"type": "refresh"}')
    again = await receive_json(ws)
    assert again["type"] == "status" and again["seq"] == 1
    source.status = synthetic_status(2)
    hub.notify()
    assert (await receive_json(ws))["seq"] == 2
    await ws.close()


async def test_ws_oversized_client_message_closes_only_that_client(env: Env) -> None:
    client, hub, source = env
    good = await client.ws_connect("/ws")
    await receive_json(good)
    bad = await client.ws_connect("/ws")
    await receive_json(bad)
    await bad.send_str("x" * (hub.config.max_client_message + 1))
    msg = await asyncio.wait_for(bad.receive(), RECEIVE_TIMEOUT)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    source.status = synthetic_status(6)
    hub.notify()
    assert (await receive_json(good))["seq"] == 2
    await good.close()


async def test_ws_every_client_gets_updates(env: Env) -> None:
    client, hub, source = env
    sockets = [await client.ws_connect("/ws") for _ in range(3)]
    for ws in sockets:
        assert (await receive_json(ws))["seq"] == 1
    assert hub.client_count == 3
    source.status = synthetic_status(7)
    hub.notify()
    for ws in sockets:
        assert (await receive_json(ws))["seq"] == 2
        await ws.close()


async def test_ws_buggy_status_producer_does_not_kill_the_stream() -> None:
    source = Source(synthetic_status(3))
    source.fail = True
    client, hub = await make_client(source)
    try:
        ws = await client.ws_connect("/ws")
        await ws.send_str('{"type": "ping"}')
        assert (await receive_json(ws)) == {"type": "pong"}  # connected, no status yet
        source.fail = False
        hub.notify()
        first = await receive_json(ws)
        assert first["type"] == "status" and first["status"] == source.status
        await ws.close()
    finally:
        await client.close()


async def test_ws_refuses_cross_site_and_too_many_clients() -> None:
    source = Source(synthetic_status(2))
    client, _ = await make_client(source, HubConfig(min_interval=0.0, max_clients=1))
    try:
        resp = await client.get("/ws", headers={"Origin": "http://evil.example"})
        assert resp.status == 403 and "error" in await resp.json()
        own = f"http://{client.host}:{client.port}"
        ws = await client.ws_connect("/ws", headers={"Origin": own})
        await receive_json(ws)
        with pytest.raises(Exception):  # noqa: B017  (aiohttp's handshake error type varies)
            await client.ws_connect("/ws")
        await ws.close()
    finally:
        await client.close()


async def test_hub_close_closes_clients(env: Env) -> None:
    client, hub, _ = env
    ws = await client.ws_connect("/ws")
    await receive_json(ws)
    await hub.close()
    msg = await asyncio.wait_for(ws.receive(), RECEIVE_TIMEOUT)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    hub.notify()  # ignored after close, no error


async def test_hub_coalesces_bursts_into_few_pushes() -> None:
    source = Source(synthetic_status(3))
    client, hub = await make_client(source, HubConfig(min_interval=0.2))
    try:
        ws = await client.ws_connect("/ws")
        await receive_json(ws)
        calls_before = source.calls
        for i in range(50):  # 50 changes in one go
            source.status = synthetic_status(3, seed=i + 1)
            hub.notify()
        last = await receive_json(ws)
        while last["status"] != source.status:
            last = await receive_json(ws)
        # One immediate flush plus at most one after the interval, not 50 renders.
        assert source.calls - calls_before <= 2
        assert last["seq"] <= 3
        await ws.close()
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# refuse_cross_site


CrossCase = tuple[str, Callable[[str], dict[str, str]], int]

CROSS_CASES: list[CrossCase] = [
    ("no browser headers (curl, CLI)", lambda own: {}, 200),
    ("same origin", lambda own: {"Origin": own}, 200),
    ("same origin, fetch metadata",
     lambda own: {"Origin": own, "Sec-Fetch-Site": "same-origin"}, 200),
    ("typed URL", lambda own: {"Sec-Fetch-Site": "none"}, 200),
    ("other site", lambda own: {"Origin": "http://evil.example"}, 403),
    ("other port", lambda own: {"Origin": own.rsplit(":", 1)[0] + ":1"}, 403),
    ("other scheme", lambda own: {"Origin": own.replace("http:", "https:")}, 403),
    ("opaque origin", lambda own: {"Origin": "null"}, 403),
    ("garbage origin", lambda own: {"Origin": "::::"}, 403),
    ("fetch metadata cross-site", lambda own: {"Sec-Fetch-Site": "cross-site"}, 403),
    ("fetch metadata same-site", lambda own: {"Sec-Fetch-Site": "same-site"}, 403),
    ("forged origin, honest fetch metadata",
     lambda own: {"Origin": own, "Sec-Fetch-Site": "cross-site"}, 403),
]


@pytest.mark.parametrize("case", CROSS_CASES, ids=[c[0] for c in CROSS_CASES])
async def test_refuse_cross_site_on_mutating_requests(env: Env, case: CrossCase) -> None:
    client, _, _ = env
    own = f"http://{client.host}:{client.port}"
    _, make_headers, expected = case
    for method in ("POST", "PUT", "DELETE"):
        resp = await client.request(method, "/connect", headers=make_headers(own), json={})
        assert resp.status == expected, method
        body = await resp.json()
        assert ("error" in body) == (expected == 403)


async def test_safe_methods_pass_even_cross_site(env: Env) -> None:
    client, _, _ = env
    resp = await client.get("/connect", headers={"Origin": "http://evil.example"})
    assert resp.status == 200


async def test_dns_rebinding_is_refused(env: Env) -> None:
    client, _, _ = env
    # A page on evil.example whose name now resolves to 127.0.0.1 looks same-origin...
    host = f"evil.example:{client.port}"
    resp = await client.post(
        "/connect", headers={"Host": host, "Origin": f"http://{host}"}, json={}
    )
    assert resp.status == 403 and "localhost" in (await resp.json())["error"]
    # ...while localhost and IP literals are fine.
    for name in (f"localhost:{client.port}", f"127.0.0.1:{client.port}", f"[::1]:{client.port}"):
        resp = await client.post(
            "/connect", headers={"Host": name, "Origin": f"http://{name}"}, json={}
        )
        assert resp.status == 200, name


async def test_no_rendering_without_clients(env: Env) -> None:
    client, hub, source = env
    calls = source.calls
    for i in range(5):
        source.status = synthetic_status(3, seed=i + 10)
        hub.notify()
    # Let the coalescing timer fire: a WebSocket round trip needs more than one loop turn.
    ws = await client.ws_connect("/ws")
    first = await receive_json(ws)
    assert first["status"] == source.status  # a new client gets the current status...
    assert source.calls - calls == 1  # ...rendered once for it, never for the empty room
    await ws.close()


async def test_non_finite_numbers_become_null(env: Env) -> None:
    client, _, source = env
    source.status = {"router": {"name": "x", "rate": float("nan"), "list": [float("inf"), 1.5]}}
    ws = await client.ws_connect("/ws")
    msg = await asyncio.wait_for(ws.receive(), RECEIVE_TIMEOUT)
    assert "NaN" not in msg.data and "Infinity" not in msg.data
    status = json.loads(msg.data)["status"]
    assert status == {"router": {"name": "x", "rate": None, "list": [None, 1.5]}}
    await ws.close()


def test_notify_without_a_running_loop_is_harmless() -> None:
    hub = StatusHub(Source({}))
    hub.notify()  # e.g. from setup code before the loop runs: ignored, never raises
    assert hub.seq == 0
