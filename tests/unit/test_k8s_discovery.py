"""--k8s against an in-test Kubernetes API server, with the real kubernetes_asyncio client.

The fake server speaks the API's real JSON shapes for the two calls discovery makes:

LIST ``GET /api/v1/nodes[?labelSelector=...]`` -> 200::

    {"kind": "NodeList", "apiVersion": "v1",
     "metadata": {"resourceVersion": "12"},
     "items": [{"kind": "Node", "apiVersion": "v1",
                "metadata": {"name": "n1", "uid": "...", "resourceVersion": "10",
                             "creationTimestamp": "2026-11-28T00:00:00Z", "labels": {...}},
                "spec": {"podCIDR": "10.244.1.0/24"},
                "status": {"addresses": [{"type": "InternalIP", "address": "127.0.1.1"},
                                         {"type": "Hostname", "address": "n1"}],
                           "conditions": [{"type": "Ready", "status": "True", ...}],
                           "nodeInfo": {"kubeletVersion": "v1.30.0", ...}}}]}

WATCH ``GET /api/v1/nodes?watch=true&resourceVersion=12&timeoutSeconds=N
&allowWatchBookmarks=true`` -> 200, ``Transfer-Encoding: chunked``, one JSON object per line,
each ``{"type": "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK", "object": <Node>}`` for every
change after the given resourceVersion (a BOOKMARK's object carries only
``metadata.resourceVersion``); the server ends the stream after ``timeoutSeconds``. A
resourceVersion that is too old gets one line ``{"type": "ERROR", "object": {"kind": "Status",
"apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version:
3 (9)", "reason": "Expired", "code": 410}}`` and the end of the stream.

Errors (API down, here "503 Service Unavailable") are a ``Status`` object with the HTTP code.

IPAM is the real allocator cores on weft/ipam/sim.py's in-memory gossip network (time simulated),
three peers named after their nodes; the mesh is a fake that records targets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import pytest

from tests.fake_k8s import FakeKubeApi
from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.ipam.allocator import InitMode, IpamConfig
from weft.ipam.sim import SimNet
from weft.k8s.core import K8sConfig, peer_name_for_node
from weft.k8s.discovery import K8sDiscovery, fetch_nodes, initial_ipalloc_init, setup_k8s
from weft.router.config import RouterConfig
from weft.router.router import Router


def node_object(name: str, ip: str | None, version: int) -> dict[str, Any]:
    addresses = [{"type": "Hostname", "address": name}]
    if ip is not None:
        addresses.insert(0, {"type": "InternalIP", "address": ip})
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": f"00000000-0000-0000-0000-{abs(hash(name)) % 10**12:012d}",
            "resourceVersion": str(version),
            "creationTimestamp": "2026-11-28T00:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
        },
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "addresses": addresses,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": "2026-11-28T00:00:00Z"}],
            "nodeInfo": {"kubeletVersion": "v1.30.0", "osImage": "Debian GNU/Linux 12",
                         "machineID": "0" * 32, "systemUUID": "0" * 32},
        },
    }


class FakeApi(FakeKubeApi):
    """tests/fake_k8s.py's server, spoken to in nodes: ``change(type, name, ip)``."""

    async def change(self, kind: str, name: str, ip: str | None = None) -> None:
        if kind == "DELETED":
            await self.delete("nodes", "", name)
        else:
            await self.put("nodes", node_object(name, ip, self.version))

    @property
    def requests_for_nodes(self) -> list[str]:
        return [how for kind, how in self.requests if kind == "nodes"]


class SimMesh:
    """K8sMesh over a SimNet peer: targets recorded, IPAM calls go to the real allocator."""

    def __init__(self, net: SimNet, name: PeerName) -> None:
        self.net = net
        self.name = name
        self.targets: list[tuple[str, ...]] = []
        self.rmpeers: list[PeerName] = []

    @property
    def local_peer(self) -> PeerName:
        return self.name

    def set_targets(self, addresses: Sequence[str]) -> None:
        self.targets.append(tuple(addresses))

    def reachable_peers(self) -> set[PeerName]:
        return set(self.net.reachable_from(self.name))

    def ipam_owners(self) -> Mapping[PeerName, int] | None:
        if self.name not in self.net.peers:
            return None  # a router without IPAM
        status = self.net.call(self.name, lambda a: a.status())
        if not status["ready"]:
            return None
        return {PeerName.parse(e["peer"]): e["owned"] for e in status["entries"]}

    async def rmpeer(self, peer: PeerName) -> int:
        self.rmpeers.append(peer)
        taken: int = self.net.call(self.name, lambda a: a.rmpeer(peer, self.net.now))
        return taken


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


NODES = {"n1": "127.0.1.1", "n2": "127.0.1.2", "n3": "127.0.1.3"}


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    server = FakeApi()
    await server.start()
    try:
        yield server
    finally:
        await server.set_down(True)
        await server.stop()


def config(api: FakeApi, node: str, **kw: Any) -> K8sConfig:
    base: dict[str, Any] = {"node_name": node, "api_url": api.url, "watch_timeout": 5,
                            "retry_initial": 0.02, "retry_max": 0.1, "reclaim_interval": 0.05}
    base.update(kw)
    return K8sConfig(**base)


async def test_nodes_become_targets_and_a_deleted_node_is_reclaimed_by_one_peer(
    api: FakeApi,
) -> None:
    for name, ip in NODES.items():
        await api.change("ADDED", name, ip)
    peers = {name: peer_name_for_node(name) for name in NODES}
    net = SimNet(seed=3)
    ipam = IpamConfig(range=ipaddress.IPv4Network("10.32.0.0/22"),
                      init=InitMode(kind="seed", seeds=tuple(sorted(peers.values()))))
    for p in peers.values():
        net.add_peer(p, ipam)
    net.run_for(2.0)
    # n3 hands out some addresses before its node goes away
    for i in range(5):
        cid = f"c{i}"
        net.call(peers["n3"], lambda a: a.allocate(cid, None, net.now))  # noqa: B023
    net.run_for(2.0)

    meshes = {name: SimMesh(net, p) for name, p in peers.items()}
    found = {name: K8sDiscovery(config(api, name), mesh) for name, mesh in meshes.items()}
    observer_mesh = SimMesh(net, peer_name_for_node("elsewhere"))
    observer = K8sDiscovery(config(api, "elsewhere"), observer_mesh)
    for d in [*found.values(), observer]:
        await d.start()
    try:
        # three fake nodes -> three targets (each router dials the other two)
        all_targets = {f"{ip}:6783" for ip in NODES.values()}
        await wait_for(
            lambda: all(m.targets for m in meshes.values()) and bool(observer_mesh.targets),
            "targets from the node list",
        )
        assert set(observer_mesh.targets[-1]) == all_targets
        for name, mesh in meshes.items():
            assert set(mesh.targets[-1]) == all_targets - {f"{NODES[name]}:6783"}
        before = net.call(peers["n1"], lambda a: a.status())
        dead_owned = next(e["owned"] for e in before["entries"] if e["peer"] == str(peers["n3"]))
        assert dead_owned > 0

        # n3's router dies, then its node is deleted
        net.crash(peers["n3"])
        del meshes["n3"]
        await found.pop("n3").stop()
        await api.change("DELETED", "n3")
        await wait_for(lambda: all(len(m.targets[-1]) == 1 for m in meshes.values()),
                       "the deletion to reach both survivors")
        await wait_for(lambda: any(m.rmpeers for m in meshes.values()), "a reclaim")
        net.run_for(5.0)  # gossip the ring change
        # give any second (wrong) reclaimer every chance to act
        await asyncio.sleep(0.3)
        reclaimers = [name for name, m in meshes.items() if m.rmpeers]
        expected = min(("n1", "n2"), key=lambda n: peers[n])
        assert reclaimers == [expected]
        assert meshes[expected].rmpeers == [peers["n3"]]  # exactly once
        assert found[expected].reclaimed[0]["node"] == "n3"
        for name in ("n1", "n2"):
            status = net.call(peers[name], lambda a: a.status())
            assert status["unreachable"] == 0, status  # `weft status ipam`: none unreachable
            assert all(e["peer"] != str(peers["n3"]) or e["owned"] == 0
                       for e in status["entries"])
        assert observer_mesh.rmpeers == []  # not a listed node: never decides
    finally:
        for d in [*found.values(), observer]:
            await d.stop()


async def test_unreachable_api_keeps_targets_retries_and_logs_once(
    api: FakeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="weft.k8s")
    for name, ip in NODES.items():
        await api.change("ADDED", name, ip)
    net = SimNet(seed=1)
    mesh = SimMesh(net, peer_name_for_node("n1"))
    d = K8sDiscovery(config(api, "n1"), mesh)
    await d.start()
    try:
        await wait_for(lambda: bool(mesh.targets), "targets")
        assert len(mesh.targets[-1]) == 2
        await api.set_down(True)
        await wait_for(lambda: d.health.failures >= 4, "several failed retries")
        assert len(mesh.targets[-1]) == 2  # the mesh keeps what it knew
        assert d.status()["api"] == "unreachable" and "503" in (d.status()["last_error"] or "")
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()
                    and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        # a node added while the API was down shows up once it is back
        api.down = False
        await api.change("ADDED", "n4", "127.0.1.4")
        await wait_for(lambda: len(mesh.targets[-1]) == 3, "the new node after recovery")
        recovered = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(recovered) == 1
        assert d.status()["api"] == "ok" and d.health.failures == 0
    finally:
        await d.stop()


async def test_expired_watch_relists_without_counting_a_failure(api: FakeApi) -> None:
    await api.change("ADDED", "n1", NODES["n1"])
    net = SimNet(seed=1)
    mesh = SimMesh(net, peer_name_for_node("n2"))
    d = K8sDiscovery(config(api, "n2"), mesh)
    api.expire_next_watch.add("nodes")
    await d.start()
    try:
        await wait_for(lambda: d.lists >= 2, "a relist after 410 Gone")
        assert d.health.failures == 0 and d.health.ok is True
        await api.change("ADDED", "n3", NODES["n3"])
        await wait_for(lambda: len(mesh.targets[-1]) == 2, "watch events after the relist")
        assert api.requests_for_nodes[:3] == ["LIST", "WATCH", "LIST"]
    finally:
        await d.stop()


async def test_setup_k8s_drives_a_real_router(api: FakeApi, tmp_path: Any) -> None:
    for name, ip in NODES.items():
        await api.change("ADDED", name, ip)
    wrong = Router(RouterConfig(data_dir=tmp_path / "w", port=0, http_addr="127.0.0.1:0",
                                api_socket=None))
    with pytest.raises(ConfigError, match="start it with --name"):
        setup_k8s(wrong, None, config(api, "n1"))
    router = Router(RouterConfig(name=peer_name_for_node("n1"), data_dir=tmp_path / "r",
                                 port=0, listen_host="127.0.0.1", http_addr="127.0.0.1:0",
                                 api_socket=None))
    setup_k8s(router, None, config(api, "n1", port=1))  # port 1: dials fail at once
    await router.start()
    try:
        def targets() -> set[str]:
            return {t["address"] for t in router.status()["router"]["targets"]}

        await wait_for(lambda: targets() == {"127.0.1.2:1", "127.0.1.3:1"}, "router targets")
        assert router.status()["k8s"]["api"] == "ok"
        assert [n["name"] for n in router.status()["k8s"]["nodes"]] == ["n1", "n2", "n3"]
        await api.change("DELETED", "n2")
        await wait_for(lambda: targets() == {"127.0.1.3:1"}, "target of the deleted node gone")
    finally:
        await router.stop()


async def test_initial_ipalloc_init_waits_for_the_api(api: FakeApi) -> None:
    for name, ip in NODES.items():
        await api.change("ADDED", name, ip)
    await api.set_down(True)
    task = asyncio.ensure_future(initial_ipalloc_init(config(api, "n1")))
    await wait_for(lambda: api.requests_for_nodes.count("LIST") >= 3, "retried LISTs")
    assert not task.done()
    await api.set_down(False)
    assert await asyncio.wait_for(task, 20) == "consensus=3"
    with pytest.raises(ConfigError, match="no Kubernetes API configuration"):
        await fetch_nodes(K8sConfig(node_name="n1"))  # not in a pod, no kubeconfig
