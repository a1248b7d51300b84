"""The compiled CNI shim (weft/cni/shim.c) against a real router API in this process.

The router (``CniService`` with an in-memory allocator and the kernel replaced by the recording
fake of test_cni_server.py) runs on its own event loop thread, serving its HTTP API and the shim
socket exactly as ``python -m weft.cni.server`` does. The shim is compiled with the system C
compiler as ``weft setup-cni`` compiles it; the Python launcher is the one ``--python`` installs.
Both are run as a runtime runs a plugin: a process with the CNI environment and stdin.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.unit.test_cni_server import FakeKernel
from weft.cni import install
from weft.cni.server import (
    CniConfig,
    CniService,
    MemoryIpam,
    local_routes,
    serve_unix,
    setup_routes,
)
from weft.cni.shim_server import ShimServer, setup_shim_server, shim_socket_for
from weft.host import attach as kernel

ROOT = str(Path(install.__file__).resolve().parent.parent.parent)

pytestmark = pytest.mark.skipif(install.find_compiler() is None, reason="needs a C compiler")


class InProcessRouter:
    """The CNI API and the shim socket on an event loop in a thread."""

    def __init__(self, tmp: Path) -> None:
        self.api = str(tmp / "weft.sock")
        self.spool = str(tmp / "spool")
        self.ipam = MemoryIpam("10.32.0.0/12", reserved=("10.32.0.1",))
        self.service: CniService | None = None
        self.shim: ShimServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.service = CniService(self.ipam, CniConfig(spool_dir=self.spool, drain_interval=0.05))
        app = web.Application()
        setup_routes(app, self.service)
        get_shim = setup_shim_server(app, local_routes(self.service), self.api)
        runner = await serve_unix(app, self.api)
        self.shim = get_shim()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "router did not start"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def allocations(self) -> dict[str, str]:
        return dict(self.ipam.by_ident)


@dataclass
class Plugins:
    router: InProcessRouter
    shim: Path
    python: Path
    tmp: Path
    fake: FakeKernel


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugins]:
    tmp = tmp_path_factory.mktemp("shim")
    fake = FakeKernel()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("attach", "detach", "check", "bridge_info"):
            mp.setattr(kernel, name, getattr(fake, name))
        router = InProcessRouter(tmp)
        shim = tmp / "shim" / "weft"
        install.build_shim(shim, shim_socket_for(router.api), sys.executable, ROOT)
        python = tmp / "py" / "weft"
        python.parent.mkdir()
        python.write_text(install.launcher_text(install.interpreter(), ROOT))
        python.chmod(0o755)
        router.start()
        try:
            yield Plugins(router, shim, python, tmp, fake)
        finally:
            router.stop()


@dataclass
class Out:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


def call(exe: Path | str, command: str | None, stdin: bytes, **env: str) -> Out:
    full = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/proc/self/ns/net",  # the fake kernel does nothing in it
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/nonexistent",
    }
    if command is not None:
        full["CNI_COMMAND"] = command
    full.update(env)
    for key in [k for k, v in full.items() if v == "<unset>"]:
        del full[key]
    proc = subprocess.run([str(exe)], input=stdin, env=full, capture_output=True, timeout=60)
    return Out(proc.returncode, proc.stdout, proc.stderr)


def conf(p: Plugins, version: str = "1.0.0", **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "cniVersion": version,
        "name": "weftnet",
        "type": "weft",
        "socket": p.router.api,
        "spoolDir": p.router.spool,
    }
    body.update(extra)
    return json.dumps(body).encode()


FAKE_IPAM = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
sys.stderr.write("fake-ipam " + cmd + " " + os.environ.get("CNI_CONTAINERID", "") + "\\n")
if cmd == "ADD":
    print(json.dumps({{"cniVersion": conf["cniVersion"],
                      "ips": [{{"address": "192.168.50.7/24", "gateway": "192.168.50.1"}}]}}))
"""


def fake_ipam_dir(p: Plugins) -> Path:
    """A CNI_PATH directory with ``fake-ipam``, a delegated IPAM plugin."""
    ipam_dir = p.tmp / "ipam-bin"
    ipam_dir.mkdir(exist_ok=True)
    fake_ipam = ipam_dir / "fake-ipam"
    fake_ipam.write_text(FAKE_IPAM.format(python=sys.executable))
    fake_ipam.chmod(0o755)
    return ipam_dir


def scenario(p: Plugins, exe: Path) -> list[Out]:
    """Every kind of request, in an order that leaves the router as it found it."""
    ipam_dir = fake_ipam_dir(p)
    missing = str(p.tmp / "missing.sock")
    not_netns = p.tmp / "not-a-netns"
    not_netns.write_text("")
    outs = [
        call(exe, "VERSION", b'{"cniVersion": "0.4.0"}'),
        call(exe, "VERSION", b"\xff garbage"),
        call(exe, "VERSION", b""),
        call(exe, "ADD", b"\x00garbage"),
        call(exe, "DEL", b"[1, 2]"),
        call(exe, "ADD", conf(p), CNI_NETNS="<unset>", CNI_PATH="<unset>"),
        call(exe, "NOPE", conf(p)),
        call(exe, None, conf(p)),
        call(exe, "ADD", conf(p), CNI_CONTAINERID="bad id!"),
        call(exe, "ADD", conf(p), CNI_IFNAME="a/b"),
        call(exe, "ADD", conf(p, "0.2.0")),
        call(exe, "CHECK", conf(p, "0.3.1")),
        call(exe, "ADD", json.dumps({"cniVersion": "1.0.0", "type": "weft"}).encode()),
        call(exe, "ADD", conf(p, socket=123)),
        call(exe, "ADD", conf(p), CNI_NETNS="/nonexistent/netns"),
        call(exe, "ADD", conf(p), CNI_NETNS=str(not_netns)),
        call(exe, "ADD", conf(p, ipam={"type": "nope"})),
        call(exe, "STATUS", conf(p, "1.1.0", socket=missing)),
        call(exe, "ADD", conf(p, socket=missing)),
        call(exe, "STATUS", conf(p, "1.1.0")),
    ]
    added = call(exe, "ADD", conf(p, "0.3.1", dns={"nameservers": ["10.32.0.1"]}))
    outs.append(added)
    prev = added.json
    outs += [
        call(exe, "ADD", conf(p, "0.3.1")),  # the fake kernel does not refuse: same answer
        call(exe, "CHECK", conf(p, "0.4.0", prevResult=prev)),
        call(exe, "CHECK", conf(p, "0.4.0")),  # no prevResult: 7
        call(
            exe,
            "GC",
            conf(
                p,
                "1.1.0",
                **{"cni.dev/valid-attachments": [{"containerID": "c0ffee", "ifname": "eth0"}]},
            ),
        ),
        call(exe, "GC", conf(p, "1.1.0")),
        call(exe, "DEL", conf(p, "0.3.1", prevResult=prev)),
        call(exe, "DEL", conf(p, "0.3.1"), CNI_NETNS=""),
        call(exe, "ADD", conf(p, "1.1.0"), CNI_ARGS="IGNORE_UNKNOWN=1;IP=10.32.9.9"),
        call(exe, "DEL", conf(p, "1.1.0")),
        call(exe, "ADD", conf(p, ipam={"type": "fake-ipam"}), CNI_PATH=str(ipam_dir)),
        call(exe, "DEL", conf(p, ipam={"type": "fake-ipam"}), CNI_PATH=str(ipam_dir)),
        call(exe, "ADD", conf(p, pad="x" * 300_000)),  # more than a pipe's buffer
        call(exe, "DEL", conf(p, pad="x" * 300_000)),
    ]
    return outs


def test_shim_answers_byte_for_byte_like_the_python_plugin(plugins: Plugins) -> None:
    by_shim = scenario(plugins, plugins.shim)
    assert plugins.router.allocations() == {}
    by_python = scenario(plugins, plugins.python)
    assert plugins.router.allocations() == {}
    for i, (a, b) in enumerate(zip(by_shim, by_python, strict=True)):
        assert (a.rc, a.stdout) == (b.rc, b.stdout), f"request {i}: {a} != {b}"
    codes = [o.json.get("code") if o.rc else 0 for o in by_shim]
    # VERSION x3, garbage 6 6, env 4 4 4 4 4, version 1 1, name 7, socket 7, netns 3 3, ipam 7,
    # STATUS 50 via an unreachable socket, ADD 11 through it, STATUS 0, ADD ...
    assert codes[:21] == [0, 0, 0, 6, 6, 4, 4, 4, 4, 4, 1, 1, 7, 7, 3, 3, 7, 50, 11, 0, 0]
    assert by_shim[20].json["ips"][0]["version"] == "4"  # 0.3.1 result
    assert by_shim[23].json["code"] == 7 and by_shim[25].json["code"] == 7
    assert by_shim[28].json["ips"][0]["address"] == "10.32.9.9/12"
    assert by_shim[30].json["ips"][0]["address"] == "192.168.50.7/24"  # delegated IPAM
    assert all(o.rc == 0 for o in by_shim[20:23] + by_shim[24:25] + by_shim[26:]), codes
    # the delegated plugin ran in the router, its stderr reached the shim's
    assert b"fake-ipam ADD c0ffee" in by_shim[30].stderr
    assert b"fake-ipam DEL c0ffee" in by_shim[31].stderr


def test_the_router_opens_the_namespace_the_shim_passed(plugins: Plugins) -> None:
    out = call(plugins.shim, "ADD", conf(plugins), CNI_CONTAINERID="nsfd")
    assert out.rc == 0, out
    spec = plugins.fake.attached[out.json["interfaces"][1]["name"]]
    assert spec.netns.startswith(f"/proc/{os.getpid()}/fd/")  # the router's copy of the fd
    assert call(plugins.shim, "DEL", conf(plugins), CNI_CONTAINERID="nsfd").rc == 0


def test_twenty_parallel_adds_through_the_shim(plugins: Plugins) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        adds = list(
            pool.map(
                lambda i: call(plugins.shim, "ADD", conf(plugins), CNI_CONTAINERID=f"par{i}"),
                range(20),
            )
        )
    assert all(o.rc == 0 for o in adds), [o for o in adds if o.rc]
    addresses = {o.json["ips"][0]["address"] for o in adds}
    assert len(addresses) == 20
    assert len([k for k in plugins.router.allocations() if ":par" in k]) == 20
    with ThreadPoolExecutor(max_workers=20) as pool:
        dels = list(
            pool.map(
                lambda i: call(plugins.shim, "DEL", conf(plugins), CNI_CONTAINERID=f"par{i}"),
                range(20),
            )
        )
    assert all(o.rc == 0 for o in dels), dels
    assert plugins.router.allocations() == {}


# ------------------------------------------------------------------------------ router down


def shim_for(p: Plugins, name: str, shim_socket: str, **kw: Any) -> Path:
    out = p.tmp / name / "weft"
    if not out.exists():
        install.build_shim(out, shim_socket, kw.pop("python", sys.executable), ROOT, **kw)
    return out


def spool_files(p: Plugins) -> list[str]:
    try:
        return sorted(os.listdir(p.router.spool))
    except FileNotFoundError:
        return []


def down_conf(p: Plugins, **extra: Any) -> bytes:
    """The router's API is down too (a missing socket), the spool is the router's."""
    return conf(p, socket=str(p.tmp / "down.sock"), **extra)


@pytest.mark.parametrize("how", ["missing", "refused"])
def test_router_down_falls_back_to_python_add_11_del_spooled(plugins: Plugins, how: str) -> None:
    path = str(plugins.tmp / f"{how}-cni.sock")
    if how == "refused":  # a stale socket file nobody listens on
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
    shim = shim_for(plugins, f"down-{how}", path)
    cid = f"down-{how}"
    add = call(shim, "ADD", down_conf(plugins, pad="y" * 100_000), CNI_CONTAINERID=cid)
    assert add.rc == 1 and add.json["code"] == 11, add
    assert add.json["msg"] == "weft router is not reachable"
    deleted = call(shim, "DEL", down_conf(plugins), CNI_CONTAINERID=cid)
    assert deleted.rc == 0 and deleted.stdout == b"", deleted
    assert b"release spooled" in deleted.stderr
    name = f"weftnet:{cid}:eth0.json"
    assert name in spool_files(plugins)
    # the router replays it (nothing to release here) and empties the spool
    out = call(plugins.shim, "STATUS", conf(plugins, "1.1.0"))  # any request kicks the drain
    assert out.rc == 0
    deadline = 200
    while name in spool_files(plugins) and deadline:
        deadline -= 1
        threading.Event().wait(0.05)
    assert name not in spool_files(plugins)


def test_version_and_garbage_when_the_router_is_down(plugins: Plugins) -> None:
    shim = shim_for(plugins, "down-missing", str(plugins.tmp / "missing-cni.sock"))
    out = call(shim, "VERSION", b'{"cniVersion": "0.3.0"}')
    assert out.rc == 0 and out.json["cniVersion"] == "0.3.0"
    out = call(shim, "ADD", b"garbage")
    assert out.rc == 1 and out.json["code"] == 6


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class OneShotServer:
    """A shim socket that misbehaves: hangs up before reading, or acknowledges and hangs up."""

    def __init__(self, path: str, ack: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.ack = ack
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if self.ack:  # the whole request, then the acknowledgement, then nothing
                    header = _read(conn, 20)
                    _read(conn, int.from_bytes(header[12:16]) + int.from_bytes(header[16:20]))
                    conn.sendall(b"A")

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def test_router_hanging_up_before_taking_the_request_falls_back(plugins: Plugins) -> None:
    path = str(plugins.tmp / "hangup-cni.sock")
    server = OneShotServer(path, ack=False)
    try:
        shim = shim_for(plugins, "hangup", path)
        # the Python plugin then reaches the router over its HTTP API, with the same stdin
        add = call(shim, "ADD", conf(plugins, pad="z" * 200_000), CNI_CONTAINERID="hangup")
        assert add.rc == 0, add
        assert "cni:weftnet:hangup:eth0" in plugins.router.allocations()
        deleted = call(shim, "DEL", conf(plugins), CNI_CONTAINERID="hangup")
        assert deleted.rc == 0, deleted
        assert "cni:weftnet:hangup:eth0" not in plugins.router.allocations(), deleted
    finally:
        server.close()


def test_router_taking_the_request_without_answering(plugins: Plugins) -> None:
    path = str(plugins.tmp / "noanswer-cni.sock")
    server = OneShotServer(path, ack=True)
    try:
        shim = shim_for(plugins, "noanswer", path)
        add = call(shim, "ADD", conf(plugins), CNI_CONTAINERID="noanswer")
        assert add.rc == 1 and add.json["code"] == 11, add
        assert add.json["msg"] == "no answer from the weft router"
        assert path in add.json["details"]
        assert "cni:weftnet:noanswer:eth0" not in plugins.router.allocations()
        deleted = call(shim, "DEL", conf(plugins), CNI_CONTAINERID="noanswer")
        assert deleted.rc == 0 and b"release spooled" in deleted.stderr
        assert "weftnet:noanswer:eth0.json" in spool_files(plugins)
    finally:
        server.close()


def test_python_missing_is_still_a_cni_error(plugins: Plugins) -> None:
    shim = shim_for(plugins, "nopython", str(plugins.tmp / "x.sock"), python="/nonexistent/py")
    out = call(shim, "ADD", conf(plugins))
    assert out.rc == 1 and out.json["code"] == 11 and "/nonexistent/py" in out.json["details"]


def test_shim_socket_is_root_only(plugins: Plugins) -> None:
    mode = os.stat(shim_socket_for(plugins.router.api)).st_mode & 0o777
    assert mode == 0o600


def test_malformed_request_is_closed_without_an_acknowledgement(plugins: Plugins) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(shim_socket_for(plugins.router.api))
        sock.sendall(b"HTTP" + b"\0" * 16)
        assert sock.recv(1) == b""


# ------------------------------------------------------------------------------ Kubernetes


def test_kubernetes_install_uses_a_matching_prebuilt_shim(tmp_path: Path) -> None:
    from weft.k8s.install import build_prebuilt_shim, install_on_host

    runtime_dir = str(tmp_path / "opt" / "weft")
    bin_dir = tmp_path / "cni" / "bin"
    api = str(tmp_path / "run" / "weft.sock")
    prebuilt = tmp_path / "image" / "weft"
    build_prebuilt_shim(prebuilt, runtime_dir, api)
    install_on_host(
        Path("/"),
        runtime_dir=runtime_dir,
        bin_dir=str(bin_dir),
        conf_dir=str(tmp_path / "cni" / "net.d"),
        socket=api,
        prebuilt_shim=str(prebuilt),
    )
    plugin = bin_dir / "weft"
    assert plugin.read_bytes() == prebuilt.read_bytes()
    # no router: the shim runs the copied Python with the copied package
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [str(plugin)], input=b'{"cniVersion": "0.4.0"}', env=env, capture_output=True, timeout=30
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["cniVersion"] == "0.4.0", proc
    # built for another socket: not used, the launcher instead
    install_on_host(
        Path("/"),
        runtime_dir=runtime_dir,
        bin_dir=str(bin_dir),
        conf_dir=str(tmp_path / "cni" / "net.d"),
        socket=str(tmp_path / "elsewhere" / "weft.sock"),
        prebuilt_shim=str(prebuilt),
    )
    assert plugin.read_bytes().startswith(b"#!")


# ------------------------------------------------------------------------------ declining


def test_router_declines_what_needs_the_callers_files(
    plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another mount namespace, a delegated IPAM plugin or another router's socket is the
    caller's to run: the router says "P" and the shim runs the Python plugin (here one that
    cannot start, to tell who answered)."""
    from weft.cni import shim_server

    shim = shim_for(
        plugins, "nopython-live", shim_socket_for(plugins.router.api), python="/nonexistent/py"
    )
    ipam_dir = fake_ipam_dir(plugins)
    delegated = conf(plugins, ipam={"type": "fake-ipam"})
    # same mount namespace: the router runs even the delegated plugin
    out = call(shim, "ADD", delegated, CNI_CONTAINERID="decl", CNI_PATH=str(ipam_dir))
    assert out.rc == 0 and out.json["ips"][0]["address"] == "192.168.50.7/24", out
    assert call(shim, "DEL", delegated, CNI_CONTAINERID="decl", CNI_PATH=str(ipam_dir)).rc == 0

    monkeypatch.setattr(shim_server, "same_mount_namespace", lambda pid: False)
    out = call(shim, "ADD", delegated, CNI_CONTAINERID="decl", CNI_PATH=str(ipam_dir))
    assert out.rc == 1 and "/nonexistent/py" in out.json["details"], out  # declined
    out = call(shim, "STATUS", conf(plugins, "1.1.0", socket=str(plugins.tmp / "other.sock")))
    assert out.rc == 1 and "/nonexistent/py" in out.json["details"], out  # declined
    out = call(shim, "ADD", conf(plugins), CNI_CONTAINERID="decl")  # weft's: still served
    assert out.rc == 0, out
    assert call(shim, "DEL", conf(plugins), CNI_CONTAINERID="decl").rc == 0
    assert call(shim, "VERSION", b"{}").rc == 0
    assert call(shim, "ADD", b"garbage").json["code"] == 6


# ------------------------------------------------------------------------------ setup-cni


def test_setup_cni_without_a_compiler_installs_the_launcher_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    argv = ["--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "net.d")]
    assert install.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no C compiler" in err and "Python launcher" in err
    assert (tmp_path / "bin" / "weft").read_bytes().startswith(b"#!")


def test_setup_cni_compiles_the_shim_for_the_socket_beside_the_api_socket(tmp_path: Path) -> None:
    done = install.install(
        str(tmp_path / "bin"), str(tmp_path / "net.d"), socket="/srv/weft-x/api.sock"
    )
    assert done.shim and not done.note
    binary = done.launcher.read_bytes()
    assert binary.startswith(b"\x7fELF") and b"/srv/weft-x/cni.sock\0" in binary
    conf = json.loads(done.conflist.read_text())
    assert conf["plugins"][0]["socket"] == "/srv/weft-x/api.sock"
