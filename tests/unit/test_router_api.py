"""The router's HTTP API and composition hooks, through aiohttp's test client (no listener)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from weft.errors import ConfigError
from weft.router.config import RouterConfig
from weft.router.router import Router


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make(tmp_path: Path, **kwargs: Any) -> Router:
    settings: dict[str, Any] = {
        "nickname": "api",
        "data_dir": tmp_path,
        "port": 0,
        "listen_host": "127.0.0.1",
        "http_addr": "127.0.0.1:0",
        "api_socket": None,
        "datapath": "none",
        **kwargs,
    }
    config = RouterConfig(**settings)
    return Router(config, rng=random.Random(5))


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[Router]:
    r = make(tmp_path)
    yield r
    await r.stop()


@pytest.fixture
async def client(router: Router) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(router.app)) as c:
        yield c


async def test_status_has_the_documented_model(
    router: Router, client: TestClient[Any, Any]
) -> None:
    resp = await client.get("/status")
    assert resp.status == 200
    doc = await resp.json()
    r = doc["router"]
    for key in ("name", "nickname", "uid", "version", "encryption", "port"):
        assert key in r
    assert r["name"] == str(router.identity.name) and r["nickname"] == "api"
    assert r["encryption"] is False
    assert [p["name"] for p in r["peers"]] == [r["name"]]
    assert set(r["peers"][0]) >= {"name", "nickname", "uid", "version", "short_id", "connections"}
    assert r["connections"] == [] and r["targets"] == []
    assert doc["overlay"] == {"datapath": "none"}
    assert await (await client.get("/report")).json() == doc


async def test_connect_forget_and_persisted_targets(
    tmp_path: Path, router: Router, client: TestClient[Any, Any]
) -> None:
    port = closed_port()
    resp = await client.post("/connect", json={"peers": [f"127.0.0.1:{port}", "127.0.0.2"]})
    assert resp.status == 200
    assert await resp.json() == {"targets": [f"127.0.0.1:{port}", "127.0.0.2:6783"]}
    targets = {t["address"] for t in router.status()["router"]["targets"]}
    assert targets == {f"127.0.0.1:{port}", "127.0.0.2:6783"}
    assert set(json.loads((tmp_path / "targets.json").read_text())) == targets

    resp = await client.post("/connect", json={"peers": ["127.0.0.3"], "replace": True})
    assert resp.status == 200
    await client.post("/forget", json={"peers": ["127.0.0.3"]})
    assert json.loads((tmp_path / "targets.json").read_text()) == []

    # a restarted router without peers on its command line dials the persisted targets
    await client.post("/connect", json={"peers": [f"127.0.0.1:{port}"]})
    again = make(tmp_path)
    try:
        await again.start()
        assert again.identity.name == router.identity.name  # the name is kept
        assert again.identity.uid != router.identity.uid  # a new incarnation
        addresses = {t["address"] for t in again.status()["router"]["targets"]}
        assert addresses == {f"127.0.0.1:{port}"}
    finally:
        await again.stop()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),  # was a 500 with a traceback (RecursionError)
        (b'{"peers": ' + b"[" * 65 + b"]" * 65 + b"}", "nested too deeply"),
        (b"[1]", "must be a JSON object"),
        (b"{}", '"peers" must be a list'),
        (b'{"peers": "10.0.0.1"}', '"peers" must be a list'),
        (b'{"peers": ["10.0.0.1:http"]}', "port must be a number"),
        (b'{"peers": ["10.0.0.1"], "replace": "yes"}', '"replace" must be true or false'),
    ],
)
async def test_bad_requests_get_a_400_with_a_reason(
    client: TestClient[Any, Any], body: bytes, message: str
) -> None:
    resp = await client.post("/connect", data=body)
    assert resp.status == 400
    assert message in (await resp.json())["error"]


async def test_cross_site_requests_are_refused(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/connect", json={"peers": ["127.0.0.9"]}, headers={"Origin": "http://evil.example"}
    )
    assert resp.status == 403
    assert "error" in await resp.json()
    # reading status is not a state change
    resp = await client.get("/status", headers={"Origin": "http://evil.example"})
    assert resp.status == 200


async def test_status_providers_and_change_callbacks(
    router: Router, client: TestClient[Any, Any]
) -> None:
    router.add_status_provider("ipam", lambda: {"free": 3})

    def broken() -> object:
        raise RuntimeError("boom")

    router.add_status_provider("broken", broken)
    with pytest.raises(ConfigError):
        router.add_status_provider("router", dict)
    doc = await (await client.get("/status")).json()
    assert doc["ipam"] == {"free": 3}
    assert doc["broken"] == {"error": "RuntimeError: boom"}

    calls: list[int] = []
    router.on_status_changed(lambda: calls.append(1))
    for _ in range(3):
        router.status_changed()
    assert calls == []  # never synchronously inside the caller
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls == [1]  # coalesced: a burst of changes is one callback
    router.status_changed()
    await asyncio.sleep(0)
    assert calls == [1, 1]


async def test_stop_endpoint_stops_the_router(tmp_path: Path) -> None:
    import aiohttp

    router = make(tmp_path / "s", api_socket=tmp_path / "api.sock")
    await router.start()
    try:
        # the same API on the unix socket (what the CNI plugin uses) and on TCP
        conn = aiohttp.UnixConnector(path=str(tmp_path / "api.sock"))
        async with (
            aiohttp.ClientSession(connector=conn) as session,
            session.get("http://weft/status") as resp,
        ):
            assert (await resp.json())["router"]["name"] == str(router.identity.name)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{router.http_port}/stop") as resp,
        ):
            assert resp.status == 200
        await asyncio.wait_for(router.wait_stopped(), 10)
        assert not (tmp_path / "api.sock").exists()
    finally:
        await router.stop()


async def test_status_port_is_read_only(tmp_path: Path) -> None:
    import aiohttp

    router = make(tmp_path, status_addr="127.0.0.1:0")
    await router.start()
    try:
        base = f"http://127.0.0.1:{router.status_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/status") as resp:
                assert (await resp.json())["router"]["name"] == str(router.identity.name)
            for path in ("/connect", "/forget", "/stop"):
                async with session.post(f"{base}{path}", json={"peers": []}) as resp:
                    assert resp.status in (404, 405)
        async with (  # the real API still answers: nothing was stopped
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{router.http_port}/status") as resp,
        ):
            assert resp.status == 200
    finally:
        await router.stop()
