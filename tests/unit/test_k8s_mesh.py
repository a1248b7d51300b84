"""--k8s on three real routers over loopback, with the real IPAM service, against the in-test API.

The routers listen on 127.0.1.{1,2,3} (one port for all, as nodes do) and are named from their
nodes; IPAM is ``IpamService`` wired with ``attach_to_router`` and ``consensus=<nodes listed>``
(as the daemon does in --k8s mode, from ``fetch_nodes``); discovery is ``setup_k8s`` with the
service as its IpamAdmin. The API server is test_k8s_discovery's FakeApi (real JSON shapes).

Shown: three fake nodes -> each router targets the other two and the mesh forms; one node is
deleted after its router dies -> exactly one survivor (the lowest-named) reclaims its space, and
``/status`` ``ipam`` shows no unreachable space on either survivor.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integ.hosts import wait_until
from tests.unit.test_k8s_discovery import FakeApi
from weft.ipam.service import IpamService, attach_to_router, config_from_flags
from weft.k8s.core import K8sConfig, peer_name_for_node
from weft.k8s.discovery import K8sDiscovery, fetch_nodes, setup_k8s
from weft.router.config import RouterConfig
from weft.router.router import Router

NODES = {"n1": "127.0.1.1", "n2": "127.0.1.2", "n3": "127.0.1.3"}


def free_port() -> int:
    """A TCP port free on every test address (checked on each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.1.1", 0))
            port = int(s.getsockname()[1])
        try:
            for ip in NODES.values():
                with socket.socket() as s:
                    s.bind((ip, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


class Node:
    def __init__(self, tmp: Path, name: str, api: FakeApi, port: int, quorum: int) -> None:
        self.name = name
        config = RouterConfig(
            name=peer_name_for_node(name),
            nickname=name,
            data_dir=tmp / name,
            port=port,
            listen_host=NODES[name],
            http_addr="127.0.0.1:0",
            api_socket=None,
            datapath="none",
            heartbeat_interval=0.5,
            heartbeat_timeout=3.0,
        )
        self.router = Router(config, rng=random.Random(name))
        self.ipam = IpamService(
            self.router.identity.name,
            config_from_flags("10.32.0.0/22", init=f"consensus={quorum}"),
            config.data_dir,
        )
        attach_to_router(self.router, self.ipam)
        self.k8s: K8sDiscovery = setup_k8s(
            self.router,
            self.ipam,
            K8sConfig(
                node_name=name,
                port=port,
                api_url=api.url,
                watch_timeout=30,
                retry_initial=0.05,
                retry_max=0.5,
                reclaim_interval=0.2,
            ),
        )

    def status(self) -> dict[str, Any]:
        return self.router.status()

    def established(self) -> set[str]:
        return {
            c["peer"] for c in self.status()["router"]["connections"] if c["state"] == "established"
        }


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    server = FakeApi()
    await server.start()
    try:
        yield server
    finally:
        await server.set_down(True)
        await server.stop()


async def test_three_nodes_mesh_and_a_deleted_node_is_reclaimed_once(
    api: FakeApi, tmp_path: Path
) -> None:
    for name, ip in NODES.items():
        await api.change("ADDED", name, ip)
    listed = await fetch_nodes(K8sConfig(node_name="n1", api_url=api.url))
    assert [(n.name, n.internal_ip) for n in listed] == sorted(NODES.items())
    port = free_port()
    nodes = {name: Node(tmp_path, name, api, port, quorum=len(listed)) for name in NODES}
    everyone = list(nodes.values())
    for node in nodes.values():
        await node.router.start()
    try:
        # three fake nodes -> three targets (each router dials the other two) -> a full mesh
        def targets(node: Node) -> set[str]:
            return {t["address"] for t in node.status()["router"]["targets"]}

        names = {name: str(peer_name_for_node(name)) for name in NODES}
        for name, node in nodes.items():
            want = {f"{ip}:{port}" for n, ip in NODES.items() if n != name}
            others = {names[n] for n in NODES if n != name}
            await wait_until(lambda: targets(node) == want, f"{name}'s targets")  # noqa: B023
            await wait_until(
                lambda: node.established() == others,  # noqa: B023
                f"{name} connected to both others",
            )
        await wait_until(lambda: all(n.ipam.ready() for n in nodes.values()), "IPAM consensus")
        got = [await nodes["n3"].ipam.allocate(f"pod-{i}") for i in range(3)]
        assert len({a.address for a in got}) == 3

        # n3's router goes away for good, then its node is deleted
        dead = nodes.pop("n3")
        await dead.router.stop()
        survivors = list(nodes.values())
        await wait_until(
            lambda: all(
                any(
                    e["peer"] == names["n3"] and not e["reachable"]
                    for e in s.status()["ipam"]["entries"]
                )
                for s in survivors
            ),
            "n3 unreachable in IPAM",
        )
        await api.change("DELETED", "n3")
        await wait_until(lambda: any(n.k8s.reclaimed for n in survivors), "a reclaim")

        def n3_space_gone(node: Node) -> bool:
            ipam = node.status()["ipam"]
            owned = sum(e["owned"] for e in ipam["entries"] if e["peer"] == names["n3"])
            return bool(ipam["unreachable"] == 0 and owned == 0)

        await wait_until(
            lambda: all(n3_space_gone(n) for n in survivors),
            "no unreachable space on the survivors",
        )
        await asyncio.sleep(1.0)  # every reclaim timer has run a few more times by now
        reclaimers = [n.name for n in survivors if n.k8s.reclaimed]
        expected = min(("n1", "n2"), key=peer_name_for_node)
        assert reclaimers == [expected]
        (entry,) = nodes[expected].k8s.reclaimed
        assert entry["node"] == "n3" and entry["peer"] == names["n3"] and entry["addresses"] > 0
        assert all(n.status()["k8s"]["api"] == "ok" for n in survivors)
        for node in survivors:
            assert targets(node) == {f"{NODES[n]}:{port}" for n in ("n1", "n2") if n != node.name}
    finally:
        for node in everyone:
            await node.router.stop()
            node.ipam.close()
