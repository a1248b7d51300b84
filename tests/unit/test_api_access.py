"""Who may change the router over its API (#14 item 1) and which Host names it answers (item 9).

The attacks are replayed as they were found: a real router serving TCP loopback and a unix
socket, and a client process running as ``nobody`` (``setpriv``) trying ``POST /stop`` and
``POST /cni/add`` with a namespace path of its choice. A page of another site rebinding its name
to 127.0.0.1 is a request with ``Host: evil.example``, on plain HTTP and on the ``/ws`` upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from weft.router import daemon
from weft.router.access import host_allowed, tcp_socket_owner
from weft.router.config import RouterConfig
from weft.router.router import Router

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as nobody",
)

# A stdlib-only HTTP client, run as nobody: prints {"status": ..., "body": ...}.
CLIENT = r"""
import http.client, json, socket, sys
mode, target, method, path, body = sys.argv[1:6]
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(target)
if mode == "tcp":
    conn = http.client.HTTPConnection("127.0.0.1", int(target), timeout=30)
else:
    conn = Unix("localhost", timeout=30)
conn.request(method, path, body=body.encode() or None,
             headers={"Content-Type": "application/json"})
r = conn.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""


async def as_nobody(mode: str, target: str, method: str, path: str, body: object = None) -> Any:
    """One request from a process of uid/gid nobody with no supplementary groups."""
    payload = "" if body is None else json.dumps(body)
    proc = await asyncio.create_subprocess_exec(
        "setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
        sys.executable, "-I", "-c", CLIENT, mode, target, method, path, payload,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    reply = json.loads(out)
    with contextlib.suppress(ValueError):
        reply["json"] = json.loads(reply["body"])
    return reply


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory nobody may traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="weft-access-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def start_router(world: Path, **kwargs: Any) -> Router:
    config = RouterConfig(
        nickname="access",
        data_dir=world / "data",
        port=0,
        listen_host="127.0.0.1",
        http_addr="127.0.0.1:0",
        api_socket=world / "weft.sock",
        datapath="none",
        discovery=False,
        **kwargs,
    ).validated()
    router = Router(config, rng=random.Random(7))
    daemon.compose(router)  # IPAM, CNI, UI and metrics, as `weft router` serves them
    await router.start()
    # Model a socket opened too widely (or a group the user is in): the API itself must still
    # check who is calling, not lean on the file mode alone.
    (world / "weft.sock").chmod(0o666)
    return router


@pytest.fixture
async def router(world_dir: Path) -> AsyncIterator[Router]:
    r = await start_router(world_dir)
    yield r
    await r.stop()


def targets(router: Router) -> list[tuple[str, str]]:
    return [("tcp", str(router.http_port)), ("unix", str(router.config.api_socket))]


CNI_ADD = {
    "containerId": "attacker1",
    "netns": "/run/netns/someone-elses",
    "ifname": "eth0",
    "network": "weft",
    "config": {"cniVersion": "1.0.0", "name": "weft", "type": "weft"},
}


async def test_nobody_cannot_stop_the_router_over_tcp_or_the_unix_socket(router: Router) -> None:
    for mode, target in targets(router):
        reply = await as_nobody(mode, target, "POST", "/stop", {})
        assert reply["status"] == 403, (mode, reply)
        error = reply["json"]["error"]
        assert error.startswith("permission denied: only root")
        assert "uid 65534" in error
        assert ("over TCP" if mode == "tcp" else "over the unix socket") in error
        # reading stays open to every local user, and the router is still there
        status = await as_nobody(mode, target, "GET", "/status")
        assert status["status"] == 200
        assert status["json"]["router"]["name"] == str(router.identity.name)
    assert not router._stopping


async def test_nobody_cannot_attach_into_a_namespace_of_its_choice(router: Router) -> None:
    for mode, target in targets(router):
        for path, body in (
            ("/cni/add", CNI_ADD),
            ("/attach", {"netns": CNI_ADD["netns"]}),
            ("/ip/attacker1", None),
            ("/connect", {"peers": ["192.0.2.1"]}),
        ):
            reply = await as_nobody(mode, target, "POST", path, body)
            assert reply["status"] == 403, (mode, path, reply)
            assert "permission denied" in reply["json"]["error"]
    assert "192.0.2.1" not in str(router.status())  # no target was added
    # root (this test process) still changes the router, over both transports
    base = f"http://127.0.0.1:{router.http_port}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/connect", json={"peers": ["192.0.2.7"]}) as resp,
    ):
        assert resp.status == 200, await resp.text()
    unix = aiohttp.UnixConnector(path=str(router.config.api_socket))
    async with aiohttp.ClientSession(connector=unix) as session:
        async with session.post("http://localhost/forget", json={"peers": ["192.0.2.7"]}) as resp:
            assert resp.status == 200, await resp.text()
        async with session.post("http://localhost/stop") as resp:
            assert resp.status == 200
    await asyncio.wait_for(router.wait_stopped(), 30)


async def test_a_member_of_the_api_group_may_change_the_router(world_dir: Path) -> None:
    router = await start_router(world_dir, api_group="nogroup")
    try:
        assert os.stat(world_dir / "weft.sock").st_gid == pwd.getpwnam("nobody").pw_gid
        for mode, target in targets(router):
            reply = await as_nobody(mode, target, "POST", "/forget", {"peers": ["192.0.2.9"]})
            assert reply["status"] == 200, (mode, reply)
    finally:
        await router.stop()


def test_the_owner_of_a_loopback_socket_is_found_and_a_closed_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, peer = server.accept()
        with accepted:
            here = accepted.getsockname()
            assert tcp_socket_owner(peer, here) == os.geteuid()
            assert tcp_socket_owner((peer[0], peer[1] ^ 1), here) is None
            # a client that closed first is listed orphaned with uid 0: never taken as root
            client.close()
            assert tcp_socket_owner(peer, here) is None


def test_host_allow_list() -> None:
    for ok in ("127.0.0.1:6784", "localhost:6784", "LOCALHOST", "[::1]:6784", "app.localhost",
               "127.0.0.2", "10.1.2.3:6784"):
        assert host_allowed(ok, "10.1.2.3"), ok
    for bad in ("evil.example", "evil.example:6784", "10.1.2.4:6784", "localhost.evil.example",
                "127.0.0.1.evil.example"):
        assert not host_allowed(bad, "10.1.2.3"), bad
    assert host_allowed("router.lan:6784", "127.0.0.1", ["Router.lan"])
    assert host_allowed("192.0.2.5", "0.0.0.0") and not host_allowed("evil.example", "0.0.0.0")


async def test_a_rebound_name_is_refused_on_http_and_on_the_websocket(router: Router) -> None:
    base = f"http://127.0.0.1:{router.http_port}"
    evil = {"Host": f"evil.example:{router.http_port}"}
    async with aiohttp.ClientSession() as session:
        for path in ("/status", "/report", "/metrics", "/ui/", "/ip", "/ws"):
            async with session.get(f"{base}{path}", headers=evil) as resp:
                assert resp.status == 421, path
                assert "evil.example" in (await resp.json())["error"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{base}/ws", headers=evil)
        assert refused.value.status == 421
        # the page's own names still work, the live view included
        async with session.get(f"{base}/status", headers={"Host": "localhost"}) as resp:
            assert resp.status == 200
        async with session.ws_connect(f"{base}/ws") as ws:
            msg = await asyncio.wait_for(ws.receive_json(), 30)
            assert msg["type"] == "status"


async def test_extra_api_names_are_accepted_when_configured(world_dir: Path) -> None:
    router = await start_router(world_dir, api_allow_hosts=("router.lan",))
    try:
        base = f"http://127.0.0.1:{router.http_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/status", headers={"Host": "router.lan"}) as resp:
                assert resp.status == 200
            async with session.get(f"{base}/status", headers={"Host": "other.lan"}) as resp:
                assert resp.status == 421
    finally:
        await router.stop()


async def test_weft_stop_as_nobody_is_refused_with_the_reason(router: Router) -> None:
    """The CLI as an unprivileged user: reads work, a change gets one clear line and exit 1."""
    repo = Path(__file__).resolve().parents[2]
    addr = f"127.0.0.1:{router.http_port}"

    async def weft(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
            sys.executable, "-m", "weft.cli.main", *args, "--http-addr", addr,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(repo)},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return int(proc.returncode or 0), out.decode(), err.decode()

    code, out, _ = await weft("status")
    assert code == 0 and str(router.identity.name) in out
    code, _, err = await weft("stop")
    assert code == 1
    assert err.startswith("weft stop: permission denied: only root")
    assert "uid 65534 over TCP" in err and "Traceback" not in err
    assert not router._stopping


async def test_a_rebound_name_is_refused_on_the_status_port_too(world_dir: Path) -> None:
    """``--status-addr`` serves the same status, ``/metrics`` and live ``/ws`` (for scraping
    from other hosts, often bound to 0.0.0.0, so reachable at 127.0.0.1 from any local page):
    a page rebinding its name to this host must be refused there as on the API."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        sport = probe.getsockname()[1]
    router = await start_router(world_dir, status_addr=f"0.0.0.0:{sport}")
    try:
        base = f"http://127.0.0.1:{sport}"
        evil = {"Host": f"evil.example:{sport}"}
        async with aiohttp.ClientSession() as session:
            for path in ("/status", "/report", "/metrics", "/ui/", "/ws"):
                async with session.get(f"{base}{path}", headers=evil) as resp:
                    assert resp.status == 421, path
                    assert "evil.example" in (await resp.json())["error"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{base}/ws", headers=evil)
            assert refused.value.status == 421
            # scrapers by IP (any literal: bound to a wildcard) and local names still work
            for host in (f"127.0.0.1:{sport}", f"192.0.2.10:{sport}", "localhost"):
                async with session.get(f"{base}/metrics", headers={"Host": host}) as resp:
                    assert resp.status == 200, host
            async with session.ws_connect(f"{base}/ws") as ws:
                msg = await asyncio.wait_for(ws.receive_json(), 30)
                assert msg["type"] == "status"
    finally:
        await router.stop()
