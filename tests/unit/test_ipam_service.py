"""IpamService, its HTTP routes and SQLite persistence (including a real kill -9)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from weft.errors import ConfigError
from weft.gossip.channel import GossipData, GossipHandler, GossipSender
from weft.gossip.peer import PeerName
from weft.ipam.allocator import InitMode, IpamConfig, IpamData
from weft.ipam.paxos import NO_PROPOSAL, Claim
from weft.ipam.service import (
    IpamService,
    attach_to_router,
    config_from_flags,
    render_status,
    setup_routes,
)
from weft.ipam.store import SqliteStore

A = PeerName(0x020000000001)
B = PeerName(0x020000000002)


async def client_for(service: IpamService) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    setup_routes(app, service)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[IpamService]:
    service = IpamService(A, IpamConfig(), tmp_path)
    yield service
    service.close()


@pytest.fixture
async def http(svc: IpamService) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await client_for(svc)
    yield client
    await client.close()


async def test_allocate_claim_release_over_http(
    svc: IpamService, http: TestClient[web.Request, web.Application]
) -> None:
    r = await http.post("/ip/c1")
    assert r.status == 200
    body = await r.json()
    assert body == {"container_id": "c1", "address": "10.32.0.1", "cidr": "10.32.0.1/12",
                    "subnet": "10.32.0.0/12"}
    assert (await (await http.post("/ip/c1")).json())["cidr"] == "10.32.0.1/12"
    r = await http.post("/ip/c2/10.32.4.0/24")
    assert (await r.json())["cidr"] == "10.32.4.1/24"
    r = await http.put("/ip/c3/10.32.0.77/12")
    assert r.status == 200 and (await r.json())["address"] == "10.32.0.77"
    r = await http.get("/ip/c1")
    assert (await r.json())["addresses"][0]["cidr"] == "10.32.0.1/12"
    r = await http.get("/ip")
    assert [a["container_id"] for a in (await r.json())["allocations"]] == ["c1", "c2", "c3"]
    r = await http.delete("/ip/c1")
    assert (await r.json())["released"] == ["10.32.0.1/12"]
    assert (await http.delete("/ip/c1")).status == 200  # idempotent
    assert (await http.get("/ip/c1")).status == 404
    status = svc.status()
    assert status["range"] == "10.32.0.0/12" and status["ready"]
    table = render_status(status).splitlines()
    assert table[2].split() == ["PEER", "OWNED", "FREE", "REACHABLE"]
    assert table[3].split() == [str(A), str(1 << 20), str((1 << 20) - 4), "yes"]
    assert status["entries"] == [
        {
            "peer": str(A),
            "owned": 1 << 20,
            "free": (1 << 20) - 2 - 2,
            "reachable": True,
            "ranges": ["10.32.0.0-10.47.255.255"],
            "ranges_more": 0,
        }
    ]


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("POST", "/ip/x/10.32.4.0/33", 400, "invalid subnet"),
        ("POST", "/ip/x/10.32.4.1/24", 400, "host bits set"),
        ("POST", "/ip/x/192.168.0.0/24", 400, "outside the IPAM range"),
        ("PUT", "/ip/x/10.99.0.1/12", 400, "outside the IPAM range"),
        ("PUT", "/ip/x/10.32.0.300/12", 400, "invalid address"),
        ("PUT", "/ip/x/10.32.0.0/12", 400, "network or broadcast"),
        ("PUT", "/ip/other/10.32.0.1/12", 409, "held by container c1"),
        ("POST", "/rmpeer/02:00:00:00:00:99", 404, "unknown peer"),
        ("POST", "/rmpeer/not-a-peer", 404, "unknown peer"),
        ("POST", f"/rmpeer/{A}", 400, "cannot rmpeer ourselves"),
    ],
)
async def test_bad_input_is_4xx_and_changes_nothing(
    svc: IpamService,
    http: TestClient[web.Request, web.Application],
    method: str,
    path: str,
    status: int,
    words: str,
) -> None:
    assert (await http.post("/ip/c1")).status == 200
    ring_before = svc.allocator.ring.entries()
    held_before = dict(svc.allocator.held())
    r = await http.request(method, path)
    assert r.status == status
    assert words in (await r.json())["error"]
    assert svc.allocator.ring.entries() == ring_before
    assert dict(svc.allocator.held()) == held_before


async def test_waits_while_not_ready_then_503(tmp_path: Path) -> None:
    cfg = IpamConfig(init=InitMode("observer"), request_timeout=0.2)
    service = IpamService(A, cfg, None)
    client = await client_for(service)
    try:
        r = await client.post("/ip/c1")
        assert r.status == 503
        assert "timed out" in (await r.json())["error"]
        assert service.status()["ready"] is False
    finally:
        await client.close()
        service.close()


async def test_allocations_survive_restart(tmp_path: Path) -> None:
    first = IpamService(A, IpamConfig(), tmp_path)
    got = [await first.allocate(f"c{i}") for i in range(5)]
    first.release("c2")
    first.close()
    second = IpamService(A, IpamConfig(), tmp_path)
    try:
        assert [a.container_id for a in second.allocations()] == ["c0", "c1", "c3", "c4"]
        assert (await second.allocate("c3")).address == got[3].address
        assert (await second.allocate("new")).address == got[2].address  # the freed one
        assert second.allocator.ring.entries() == first.allocator.ring.entries()
    finally:
        second.close()


def test_kill_9_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        from weft.gossip.peer import PeerName
        from weft.ipam.allocator import IpamConfig
        from weft.ipam.service import IpamService

        async def main():
            s = IpamService(PeerName({int(A)}), IpamConfig(), Path({str(tmp_path)!r}))
            for i in range(50):
                a = await s.allocate(f"c{{i}}")
                print(a.cidr, flush=True)   # acknowledged
            s.release("c7")
            print("released", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    acked = proc.stdout.split()
    assert acked[-1] == "released" and len(acked) == 51
    state = SqliteStore.in_dir(tmp_path).load()
    assert state is not None
    stored = {cid: addr for cid, items in state.allocations.items() for addr, _ in items}
    assert len(stored) == 49 and "c7" not in stored
    service = IpamService(A, IpamConfig(), tmp_path)
    try:
        cidrs = {a.container_id: a.cidr for a in service.allocations()}
        for i, cidr in enumerate(acked[:50]):
            if i != 7:
                assert cidrs[f"c{i}"] == cidr
    finally:
        service.close()


def test_config_from_flags() -> None:
    cfg = config_from_flags("10.40.0.0/16", "10.40.1.0/24", None, initial_peers=2)
    assert str(cfg.range) == "10.40.0.0/16" and str(cfg.subnet) == "10.40.1.0/24"
    assert cfg.init == InitMode("consensus", 3)
    assert config_from_flags(init="observer").init.kind == "observer"
    for bad in (("10.40.0.1/16", None, None), ("bogus", None, None),
                (None, "10.64.0.0/24", None), (None, None, "sometimes")):
        with pytest.raises(ConfigError):
            config_from_flags(*bad)


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def gossip(self, data: GossipData) -> None:
        self.sent.append(("gossip", data))

    def broadcast(self, data: GossipData) -> None:
        self.sent.append(("broadcast", data))

    def unicast(self, dst: PeerName, payload: bytes) -> None:
        self.sent.append(("unicast", dst))


class FakeRoutes:
    def __init__(self) -> None:
        self.table: dict[PeerName, PeerName] = {}

    def unicast_table(self) -> dict[PeerName, PeerName]:
        return dict(self.table)


class FakeMesh:
    def __init__(self) -> None:
        self.routes_all = FakeRoutes()


class FakeRouter:
    def __init__(self) -> None:
        self.app = web.Application()
        self.mesh = FakeMesh()
        self.channels: dict[str, GossipHandler] = {}
        self.providers: dict[str, Callable[[], Any]] = {}
        self.callbacks: list[Callable[[], None]] = []
        self.sender = FakeSender()

    def register_channel(self, name: str, handler: GossipHandler) -> GossipSender:
        self.channels[name] = handler
        return self.sender

    def add_status_provider(self, key: str, fn: Callable[[], Any]) -> None:
        self.providers[key] = fn

    def on_status_changed(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def status(self) -> dict[str, Any]:
        return {"router": {"peers": [{"name": str(B), "nickname": "hostb"}]}}


async def test_attach_to_router_wires_channel_routes_status_and_reachability() -> None:
    router = FakeRouter()
    service = IpamService(A, IpamConfig(init=InitMode("seed", seeds=(A, B))), None)
    try:
        attach_to_router(router, service)
        assert router.channels["ipam"] is service.handler
        assert router.providers["ipam"]()["seeds"] == [str(A), str(B)]
        router.mesh.routes_all.table = {B: B}
        for cb in router.callbacks:
            cb()
        assert all(e["reachable"] for e in service.status()["entries"])
        router.mesh.routes_all.table = {}
        for cb in router.callbacks:
            cb()
        assert service.status()["unreachable"] > 0
        assert service.rmpeer("hostb") > 0  # by nickname
        assert service.allocator.ring.owners() == {A}
        assert any(kind == "gossip" for kind, _ in router.sender.sent)
        paths = {r.resource.canonical for r in router.app.router.routes() if r.resource}
        assert "/ip/{cid}" in paths and "/rmpeer/{name}" in paths
    finally:
        service.close()


async def test_timers_armed_by_gossip_fire() -> None:
    # B (lower name than A) is heard of through gossip only, then goes silent: A must fall
    # back to proposing itself after consensus_fallback, a timer armed on the gossip path.
    low = PeerName(0x020000000000)
    cfg = IpamConfig(init=InitMode("consensus", 2), consensus_fallback=0.05)
    service = IpamService(A, cfg, None)
    sender = FakeSender()
    try:
        service.attach(sender)
        payload = IpamData(claims={low: Claim()}).encode()[0]
        service.handler.on_gossip(payload)

        def proposed() -> bool:
            for kind, data in sender.sent:
                if kind == "gossip" and isinstance(data, IpamData):
                    mine = data.claims.get(A)
                    if mine is not None and mine.promise != NO_PROPOSAL:
                        return True
            return False

        for _ in range(100):
            if proposed():
                break
            await asyncio.sleep(0.02)
        assert proposed()
    finally:
        service.close()
