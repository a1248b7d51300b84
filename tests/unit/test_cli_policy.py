"""`weft policy explain|denied|status` against add_policy_routes served on a real port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.unit.policy_support import ip, ns, pod, policy, view_of
from weft.cli import main as cli
from weft.cli.policy import render_denied, render_explain, render_status
from weft.policy.explain import explain
from weft.policy.http import add_policy_routes
from weft.policy.model import ClusterView, IPAddress

FLOW: dict[str, Any] = {
    "time": 1_700_000_000.0,
    "last": 1_700_000_001.0,
    "count": 3,
    "direction": "ingress",
    "source": "10.0.1.2",
    "source_pod": "y/b",
    "destination": "10.0.0.1",
    "destination_pod": "x/a",
    "protocol": "TCP",
    "port": 81,
    "isolated_pod": "x/a",
    "policies": ["x/web"],
}


def cluster() -> ClusterView:
    return view_of(
        [ns("x"), ns("y")],
        [pod("x", "a", "10.0.0.1", node="n1"), pod("y", "b", "10.0.1.2", node="n2")],
        [
            policy(
                "x", "web", ingress=[{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]
            )
        ],
    )


class MemorySource:
    def __init__(self) -> None:
        self.view: ClusterView | None = cluster()
        self.flows = [FLOW]

    def cluster_view(self) -> ClusterView | None:
        return self.view

    def node_addresses(self) -> Sequence[IPAddress]:
        return [ip("192.168.0.1")]

    def status(self) -> dict[str, Any]:
        return {"synced": True, "local_pods": 1, "last_error": None}

    def denied_flows(self) -> list[dict[str, Any]]:
        return self.flows


@pytest.fixture
def source() -> MemorySource:
    return MemorySource()


@pytest.fixture
async def addr(source: MemorySource) -> AsyncIterator[str]:
    app = web.Application()
    add_policy_routes(app, source, node="n1")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"127.0.0.1:{server.port}"
    await server.close()


async def weft(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_explain_prints_the_verdict_and_the_rules(
    addr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await weft(
        capsys, "policy", "explain", "--http-addr", addr, "--from", "y/b", "--to", "x/a",
        "--port", "80/TCP",
    )  # fmt: skip
    assert code == 0
    assert out.splitlines() == [
        "ALLOWED: y/b (10.0.1.2) -> x/a (10.0.0.1) TCP/80",
        "  egress of y/b: not isolated (no policy selects it for Egress): allowed",
        "  ingress of x/a: isolated by x/web: allowed",
        "    allowed by x/web ingress rule 0: from namespaceSelector {} (all); ports 80/TCP",
    ]
    # --http-addr before the subcommand works too
    code, out, _ = await weft(
        capsys, "policy", "--http-addr", addr, "explain", "--from", "10.0.1.2", "--to", "x/a",
        "--port", "81",
    )  # fmt: skip
    assert code == 0
    assert out.splitlines()[0] == "DENIED: y/b (10.0.1.2) -> x/a (10.0.0.1) TCP/81"
    assert "    no rule allows 10.0.1.2 TCP/81" in out.splitlines()
    assert "    x/web ingress rule 0 allows 10.0.1.2 on other ports only: 80/TCP" in out


async def test_explain_json_is_the_routes_json(
    addr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await weft(
        capsys, "policy", "explain", "--json", "--http-addr", addr, "--from", "192.168.0.1",
        "--to", "x/a",
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    assert (
        doc
        == explain(
            cluster(), "192.168.0.1", "x/a", node_addresses={"n1": [ip("192.168.0.1")]}
        ).to_json()
    )
    assert doc["allowed"] is True and "kubelet" in doc["always_allowed"]


async def test_errors_are_one_line(
    addr: str, source: MemorySource, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await weft(
        capsys, "policy", "explain", "--http-addr", addr, "--from", "x/zz", "--to", "x/a"
    )
    assert code == 1 and out == ""
    assert err.startswith("weft policy: no pod x/zz in the cluster view") and err.count("\n") == 1
    source.view = None
    code, _, err = await weft(
        capsys, "policy", "explain", "--http-addr", addr, "--from", "y/b", "--to", "x/a"
    )
    assert code == 1 and "not synced with the Kubernetes API yet" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["policy", "explain", "--http-addr", addr, "--from", "y/b"])
    assert exc.value.code == 2 and "--to" in capsys.readouterr().err


async def test_denied_and_status(addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await weft(capsys, "policy", "denied", "--http-addr", addr)
    assert code == 0 and out.rstrip("\n") == render_denied({"flows": [FLOW]})
    code, out, _ = await weft(capsys, "policy", "denied", "--http-addr", addr, "--json")
    assert json.loads(out) == {"flows": [FLOW]}
    code, out, _ = await weft(capsys, "policy", "status", "--http-addr", addr)
    assert out.splitlines() == ["last_error: null", "local_pods: 1", "synced: true"]
    code, out, _ = await weft(capsys, "policy", "status", "--http-addr", addr, "--json")
    assert json.loads(out)["local_pods"] == 1


def test_renderings() -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(FLOW["time"]))
    table = render_denied({"flows": [FLOW, {**FLOW, "port": None, "protocol": "ICMP"}]})
    lines = table.splitlines()
    assert lines[0].split() == ["TIME", "DIRECTION", "SOURCE", "DESTINATION", "PORT", "PACKETS",
                                "DENIED", "BY"]  # fmt: skip
    assert lines[1].split() == [*when.split(), "ingress", "y/b", "x/a", "81/TCP", "3", "x/a",
                                "(x/web)"]  # fmt: skip
    assert lines[2].split()[5] == "ICMP"
    assert render_denied({"flows": []}) == "no denied flows"
    assert "no NetworkPolicy status" in render_status({})
    verdict = explain(cluster(), "x/a", "x/a", "ICMP").to_json()
    assert render_explain(verdict).splitlines()[:2] == [
        "ALLOWED: x/a (10.0.0.1) -> x/a (10.0.0.1) ICMP",
        "  always allowed: same pod: x/a always reaches itself",
    ]
    verdict = explain(cluster(), "203.0.113.1", "y/b").to_json()
    assert "  egress: 203.0.113.1 is not a pod: no egress to check" in render_explain(verdict)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["policy"], ["policy", "explain"], ["policy", "denied"], ["policy", "status"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: weft {' '.join(argv)}" in out
    with pytest.raises(SystemExit):
        cli.main(["policy", "explain", "--help"])
    assert "--from NS/POD|ADDR" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "policy" in capsys.readouterr().out


def test_policy_cli_import_stays_cheap() -> None:
    code = (
        "import sys, weft.cli.main, weft.cli.policy; weft.cli.main.build_parser(); "
        "print(sorted(m for m in ('aiohttp', 'weft.policy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"
