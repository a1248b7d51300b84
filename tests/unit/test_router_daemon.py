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
from weft.router import daemon
from weft.router.config import RouterConfig
from weft.router.overlay import NullOverlay
from weft.router.router import Router


def config(tmp_path: Path, datapath: str) -> RouterConfig:
    return RouterConfig(
        data_dir=tmp_path, port=0, http_addr="127.0.0.1:0", api_socket=None, datapath=datapath
    )


class FakeOverlay(NullOverlay):
    def __init__(self) -> None:
        self.closed = False

    def setup_routes(self, app: web.Application) -> None:
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
    for datapath in ("sleeve", "auto"):
        assert isinstance(daemon.build_overlay(config(tmp_path, datapath)), FakeOverlay)
    assert [c.datapath for c in made] == ["sleeve", "auto"]


def test_failing_sleeve_is_fatal_only_when_asked_for(tmp_path: Path, fake_sleeve: Any) -> None:
    def make_overlay(cfg: RouterConfig) -> FakeOverlay:
        raise PermissionError(1, "Operation not permitted")

    fake_sleeve.make_overlay = make_overlay
    with pytest.raises(ConfigError, match="--datapath sleeve is not available here"):
        daemon.build_overlay(config(tmp_path, "sleeve"))
    assert isinstance(daemon.build_overlay(config(tmp_path, "auto")), NullOverlay)


async def test_compose_mounts_overlay_ui_and_metrics(tmp_path: Path) -> None:
    overlay = FakeOverlay()
    router = Router(config(tmp_path, "auto"), overlay, rng=random.Random(3))
    daemon.compose(router)
    async with TestClient(TestServer(router.app)) as client:
        assert (await client.get("/ps")).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert "weft_connection_terminations" in metrics
        assert (await client.get("/ui/")).status == 200
    async with TestClient(TestServer(router.status_app)) as client:
        assert "weft_connection_terminations" in await (await client.get("/metrics")).text()
        assert (await client.get("/status")).status == 200
    await router.stop()
    assert overlay.closed
