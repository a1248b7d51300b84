"""The daemon's composition: which overlay `--datapath` builds, and the parts plugged in."""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from weft.errors import ConfigError
from weft.overlay import NullOverlay
from weft.router import daemon
from weft.router.config import RouterConfig
from weft.router.router import Router


def config(tmp_path: Path, datapath: str) -> RouterConfig:
    return RouterConfig(
        data_dir=tmp_path, port=0, http_addr="127.0.0.1:0", api_socket=None, datapath=datapath
    )


class FakeOverlay(NullOverlay):
    def __init__(self) -> None:
        self.closed = False
        self.fallbacks: list[dict[str, Any]] = []

    def status(self) -> dict[str, Any]:
        # what the overlay switch reports; the metrics read fallbacks from here
        return {
            "datapath": "auto",
            "switch": {"datapaths": ["vxlan", "sleeve"], "fallback_reasons": self.fallbacks},
        }

    def setup_routes(self, app: web.Application, allocate: Any = None, release: Any = None) -> None:
        self.ipam_hooks = (allocate, release)

        async def ps(request: web.Request) -> web.Response:
            return web.json_response([])

        app.router.add_get("/ps", ps)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_sleeve(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    module = types.ModuleType("fake_sleeve")
    monkeypatch.setitem(sys.modules, "fake_sleeve", module)
    monkeypatch.setitem(daemon.OVERLAY_FACTORIES, "sleeve", ("fake_sleeve", "make_overlay"))
    yield module


def test_none_is_the_null_overlay(tmp_path: Path) -> None:
    assert isinstance(daemon.build_overlay(config(tmp_path, "none")), NullOverlay)


def test_sleeve_and_auto_use_the_factory(tmp_path: Path, fake_sleeve: Any) -> None:
    made: list[RouterConfig] = []

    def make_overlay(cfg: RouterConfig) -> FakeOverlay:
        made.append(cfg)
        return FakeOverlay()

    fake_sleeve.make_overlay = make_overlay
    for datapath in ("sleeve", "vxlan", "auto"):
        assert isinstance(daemon.build_overlay(config(tmp_path, datapath)), FakeOverlay)
    assert [c.datapath for c in made] == ["sleeve", "vxlan", "auto"]


def test_failing_sleeve_is_fatal_only_when_asked_for(tmp_path: Path, fake_sleeve: Any) -> None:
    def make_overlay(cfg: RouterConfig) -> FakeOverlay:
        raise PermissionError(1, "Operation not permitted")

    fake_sleeve.make_overlay = make_overlay
    with pytest.raises(ConfigError, match="--datapath sleeve is not available here"):
        daemon.build_overlay(config(tmp_path, "sleeve"))
    with pytest.raises(ConfigError, match="--datapath vxlan is not available here"):
        daemon.build_overlay(config(tmp_path, "vxlan"))
    assert isinstance(daemon.build_overlay(config(tmp_path, "auto")), NullOverlay)


async def test_compose_mounts_overlay_ui_and_metrics(tmp_path: Path) -> None:
    overlay = FakeOverlay()
    router = Router(config(tmp_path, "auto"), overlay, rng=random.Random(3))
    parts = daemon.compose(router)
    # IPAM runs, so attach/expose without an address get one from it
    assert parts.ipam is not None
    allocate, release = overlay.ipam_hooks
    assert callable(allocate) and callable(release)
    async with TestClient(TestServer(router.app)) as client:
        assert (await client.get("/ps")).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert "weft_connection_terminations" in metrics
        assert (await client.get("/ui/")).status == 200
    zero = 'weft_datapath_fallbacks_total{from_datapath="vxlan",reason="heartbeat_lost",'
    assert zero + 'to_datapath="sleeve"} 0.0' in metrics  # pre-seeded
    overlay.fallbacks.append({"from": "vxlan", "to": "sleeve", "reason": "mtu", "count": 1})
    async with TestClient(TestServer(router.status_app)) as client:
        text = await (await client.get("/metrics")).text()
        assert "weft_connection_terminations" in text
        assert 'from_datapath="vxlan",reason="mtu",to_datapath="sleeve"} 1.0' in text
        assert (await client.get("/status")).status == 200
    await router.stop()
    assert overlay.closed


async def test_compose_runs_ipam_and_cni_on_it(tmp_path: Path) -> None:
    import asyncio

    import aiohttp

    from weft.cni.ipam_adapter import ServiceIpam

    router = Router(config(tmp_path, "none"), rng=random.Random(4))
    parts = daemon.compose(router)
    assert parts.ipam is not None
    await router.start()
    try:
        base = f"http://127.0.0.1:{router.http_port}"
        async with aiohttp.ClientSession() as client:
            # a lone peer with no launch peers: consensus among 1, the ring is ours at once
            for _ in range(200):
                async with client.post(f"{base}/ip/c1") as resp:
                    status, text = resp.status, await resp.text()
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 200, text
            assert "10.32." in text
            async with client.get(f"{base}/status") as resp:
                doc = await resp.json()
            assert "ipam" in doc and "cni" in doc
            # the CNI handler is mounted and checks its bridge (none here: --datapath none)
            async with client.post(f"{base}/cni/status", json={"network": "weft"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["msg"] == "bridge weft does not exist"
        cni = ServiceIpam(parts.ipam)
        cidr = await asyncio.wait_for(cni.allocate("cni:weft:ctr:eth0", None), 30)
        assert cidr.startswith("10.3") and cidr.endswith("/12")
        assert await cni.allocate("cni:weft:ctr:eth0", None) == cidr  # idempotent
        assert await cni.lookup("cni:weft:ctr:eth0") == [cidr]
        assert await cni.idents("cni:weft:") == ["cni:weft:ctr:eth0"]
        await cni.release("cni:weft:ctr:eth0")
        await cni.release("cni:weft:ctr:eth0")  # idempotent
        assert await cni.lookup("cni:weft:ctr:eth0") == []
        assert (tmp_path / "ipam.db").exists()  # allocations survive restarts
    finally:
        await router.stop()


async def test_no_ipam_means_no_ip_routes(tmp_path: Path) -> None:
    from dataclasses import replace

    router = Router(replace(config(tmp_path, "none"), ipam=False), rng=random.Random(4))
    assert daemon.compose(router).ipam is None
    async with TestClient(TestServer(router.app)) as client:
        assert (await client.post("/ip/c1")).status in (404, 405)
        assert "ipam" not in await (await client.get("/status")).json()
    await router.stop()


def test_the_daemon_builds_the_overlay_switch() -> None:
    module, func = daemon.OVERLAY_FACTORIES["sleeve"]
    assert (module, func) == ("weft.switch.pump", "make_overlay")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))
