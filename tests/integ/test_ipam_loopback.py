"""IPAM on real routers over loopback: consensus, concurrent HTTP allocations, restart, rmpeer.

Three routers on 127.0.0.1 (random ports), each with an IpamService wired in through
``attach_to_router`` and its SQLite store in the router's data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integ.hosts import wait_until
from weft.ipam.service import IpamService, attach_to_router, config_from_flags
from weft.router.config import RouterConfig
from weft.router.router import Router


class Host:
    def __init__(self, tmp: Path, i: int, *peers: str) -> None:
        config = RouterConfig(
            nickname=f"r{i}",
            data_dir=tmp / f"r{i}",
            port=0,
            listen_host="127.0.0.1",
            http_addr="127.0.0.1:0",
            api_socket=None,
            peers=peers,
            datapath="none",
            heartbeat_interval=1.0,
            heartbeat_timeout=5.0,
        )
        self.router = Router(config, rng=random.Random(2000 + i))
        self.ipam = IpamService(
            self.router.identity.name,
            config_from_flags("10.32.0.0/22", init="consensus=3"),
            config.data_dir,
        )
        attach_to_router(self.router, self.ipam)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.router.port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.router.http_port}{path}"

    async def stop(self) -> None:
        await self.router.stop()
        self.ipam.close()


@pytest.fixture
async def hosts() -> AsyncIterator[list[Host]]:
    made: list[Host] = []
    yield made
    for h in made:
        with contextlib.suppress(Exception):
            await h.stop()


async def call(session: aiohttp.ClientSession, method: str, url: str) -> tuple[int, Any]:
    async with session.request(method, url) as r:
        return r.status, await r.json()


async def test_three_routers_allocate_restart_and_rmpeer(tmp_path: Path, hosts: list[Host]) -> None:
    h1 = Host(tmp_path, 1)
    hosts.append(h1)
    await h1.router.start()
    h2 = Host(tmp_path, 2, h1.addr)
    hosts.append(h2)
    await h2.router.start()
    h3 = Host(tmp_path, 3, h2.addr)
    hosts.append(h3)
    await h3.router.start()
    await wait_until(lambda: all(h.ipam.status()["ready"] for h in hosts), "IPAM consensus")
    seeds = {tuple(h.ipam.status()["seeds"]) for h in hosts}
    assert len(seeds) == 1 and len(next(iter(seeds))) == 3

    async with aiohttp.ClientSession() as s:
        # concurrent allocations on all three hosts: no address twice
        results = await asyncio.gather(
            *(
                call(s, "POST", h.url(f"/ip/{h.router.config.nickname}-c{i}"))
                for i in range(20)
                for h in hosts
            )
        )
        assert all(code == 200 for code, _ in results), results
        addresses = [body["address"] for _, body in results]
        assert len(set(addresses)) == len(addresses) == 60
        status, body = await call(s, "GET", hosts[0].url("/status"))
        assert status == 200 and body["ipam"]["ready"]
        assert sorted(e["peer"] for e in body["ipam"]["entries"]) == sorted(
            str(h.router.identity.name) for h in hosts
        )

        # restart host 1 from its data dir: allocations intact and re-claimed
        before = {a.container_id: a.cidr for a in h1.ipam.allocations()}
        await h1.stop()
        hosts.remove(h1)
        h1b = Host(tmp_path, 1, h2.addr)
        hosts.append(h1b)
        assert {a.container_id: a.cidr for a in h1b.ipam.allocations()} == before
        await h1b.router.start()
        code, body = await call(s, "POST", h1b.url("/ip/r1-c0"))
        assert code == 200 and body["cidr"] == before["r1-c0"]

        # host 3 goes away for good; rmpeer on host 2 takes its space
        gone = h3.router.identity.name
        await h3.stop()
        hosts.remove(h3)

        def unreachable() -> bool:
            entries = h2.ipam.status()["entries"]
            return any(e["peer"] == str(gone) and not e["reachable"] for e in entries)

        await wait_until(unreachable, "host 3 unreachable in ipam status")
        code, body = await call(s, "POST", h2.url("/rmpeer/nobody"))
        assert code == 404 and "unknown peer" in body["error"]
        code, body = await call(s, "POST", h2.url(f"/rmpeer/{gone}"))
        assert code == 200 and body["taken"] > 0
        await wait_until(
            lambda: str(gone) not in {e["peer"] for e in h1b.ipam.status()["entries"]},
            "the takeover to reach host 1",
        )
        assert h2.ipam.status()["unreachable"] == 0
