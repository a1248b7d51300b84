"""weft.policy.http: the /policy read routes through aiohttp's test client (no listener)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.policy_support import ip, ns, pod, policy, view_of
from weft.policy.http import add_policy_routes, parse_port
from weft.policy.model import ClusterView, IPAddress


class MemorySource:
    """An in-memory PolicySource."""

    def __init__(self, view: ClusterView | None) -> None:
        self.view = view
        self.flows: list[dict[str, Any]] = []

    def cluster_view(self) -> ClusterView | None:
        return self.view

    def node_addresses(self) -> Sequence[IPAddress]:
        return [ip("192.168.0.1")]

    def status(self) -> dict[str, Any]:
        return {"synced": self.view is not None, "passes": 3}

    def denied_flows(self) -> list[dict[str, Any]]:
        return self.flows


def cluster() -> ClusterView:
    return view_of(
        [ns("x"), ns("y")],
        [pod("x", "a", "10.0.0.1", node="n1"), pod("y", "b", "10.0.1.2", node="n2")],
        [policy("x", "web", ingress=[{"ports": [{"port": 80}]}])],
    )


@pytest.fixture
def source() -> MemorySource:
    return MemorySource(cluster())


@pytest.fixture
async def client(source: MemorySource) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    add_policy_routes(app, source, node="n1")
    async with TestClient(TestServer(app)) as c:
        yield c


async def explain(client: TestClient[Any, Any], **query: str) -> tuple[int, Any]:
    resp = await client.get("/policy/explain", params=query)
    return resp.status, await resp.json()


async def test_explain_returns_the_verdict(client: TestClient[Any, Any]) -> None:
    status, doc = await explain(client, **{"from": "y/b", "to": "x/a", "port": "80/TCP"})
    assert status == 200 and doc["allowed"] is True
    assert doc["ingress"]["allowed_by"][0]["policy"] == "x/web"
    status, doc = await explain(client, **{"from": "y/b", "to": "x/a", "port": "81"})
    assert status == 200 and doc["verdict"] == "denied" and doc["protocol"] == "TCP"
    assert "no rule allows 10.0.1.2 TCP/81" in doc["reason"]
    status, doc = await explain(client, **{"from": "10.0.1.2", "to": "x/a"})  # every port
    assert status == 200 and doc["allowed"] is False and doc["port"] is None
    status, doc = await explain(client, **{"from": "y/b", "to": "x/a", "port": "icmp"})
    assert status == 200 and doc["protocol"] == "ICMP" and doc["allowed"] is False


async def test_explain_knows_this_nodes_addresses(client: TestClient[Any, Any]) -> None:
    _, doc = await explain(client, **{"from": "192.168.0.1", "to": "x/a", "port": "81"})
    assert doc["allowed"] is True and "node n1" in doc["always_allowed"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"to": "x/a"}, "give both from="),
        ({"from": "x/a", "to": ""}, "give both from="),
        ({"from": "x/zz", "to": "x/a"}, "no pod x/zz"),
        ({"from": "y/b", "to": "nonsense"}, "neither NAMESPACE/POD nor an IP address"),
        ({"from": "y/b", "to": "x/a", "port": "http/TCP"}, "not a port name"),
        ({"from": "y/b", "to": "x/a", "port": "70000"}, "not a port number"),
        ({"from": "y/b", "to": "x/a", "port": "80/GRE"}, "GRE has no ports"),
        ({"from": "1.2.3.4", "to": "5.6.7.8"}, "neither 1.2.3.4 nor 5.6.7.8"),
    ],
)
async def test_bad_input_is_400_with_the_reason(
    client: TestClient[Any, Any], query: dict[str, str], message: str
) -> None:
    status, doc = await explain(client, **query)
    assert status == 400 and message in doc["error"]


async def test_503_until_synced(source: MemorySource, client: TestClient[Any, Any]) -> None:
    source.view = None
    status, doc = await explain(client, **{"from": "y/b", "to": "x/a"})
    assert status == 503 and "not synced" in doc["error"]


async def test_status_and_denied(source: MemorySource, client: TestClient[Any, Any]) -> None:
    resp = await client.get("/policy/status")
    assert resp.status == 200 and await resp.json() == {"synced": True, "passes": 3}
    assert await (await client.get("/policy/denied")).json() == {"flows": []}
    source.flows.append({"direction": "ingress", "source": "10.0.1.2", "port": 81})
    assert (await (await client.get("/policy/denied")).json())["flows"][0]["port"] == 81


def test_parse_port() -> None:
    assert parse_port(None) == (None, None) and parse_port(" ") == (None, None)
    assert parse_port("80") == ("TCP", 80) and parse_port("53/udp") == ("UDP", 53)
    assert parse_port("ICMP") == ("ICMP", None)


class ReaderOnly:
    """A source without node_addresses (as an enforcer may be): served, without the node rule."""

    def cluster_view(self) -> ClusterView | None:
        return cluster()

    def status(self) -> dict[str, Any]:
        return {}

    def denied_flows(self) -> list[dict[str, Any]]:
        return []


async def test_a_source_without_node_addresses_is_served() -> None:
    app = web.Application()
    add_policy_routes(app, ReaderOnly(), node="n1")
    async with TestClient(TestServer(app)) as c:
        status, doc = await explain(c, **{"from": "192.168.0.1", "to": "x/a", "port": "81"})
    assert status == 200 and doc["allowed"] is False and doc["always_allowed"] is None
