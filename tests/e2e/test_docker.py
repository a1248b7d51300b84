"""A real dockerd using weft's network and IPAM plugin, across two hosts (network namespaces).

Host 1 runs a router with the Docker plugin (served on ``/run/docker/plugins/<prefix>d.sock``, a
per-run name) and a dockerd started by hand inside the host's namespace, with its own data and
exec roots and socket; host 2 runs a router (``weft launch``) with a namespace attached through
``weft attach``. The image is a busybox-static rootfs made into an image with ``docker import``
(no registry).

Shown: ``docker network create -d <plugin> --ipam-driver <plugin>`` (and without
``--ipam-driver``, refused with an error naming it); containers get mesh
addresses (the plugin's IPAM), a default route via their gateway (no docker_gwbridge) and reach
the namespace on host 2 over the mesh; ``docker rm`` releases the address; the router restarts
and the network, its containers and new ``docker run``\\ s still work.

The router on host 1 is composed as the daemon does (``compose``: data plane routes, IPAM, CNI)
plus ``setup_docker_plugin`` over the IPAM service (CNI's ``ServiceIpam`` adapter), until
``weft router --docker-plugin`` does this itself. IPAM is seeded with host 1 on both hosts, so
host 1 owns the range and addresses are predictable.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integ.hosts import Host, Underlay, have_netns, run, underlay, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.skipif(
        not (have_netns() and shutil.which("dockerd") and Path("/usr/bin/docker").exists()),
        reason="needs root, network namespaces and Debian's docker.io (dockerd + docker)",
    ),
]

DOCKER = "/usr/bin/docker"  # Debian's client, the same version as its dockerd
REMOTE_IP = "10.32.9.9/12"  # the namespace attached on host 2

# The router of host 1, run as `python -c LAUNCHER DATA_DIR PLUGIN PEER`.
H1_NAME = "02:00:00:00:0d:01"  # host 1's peer name: IPAM is seeded with it on both hosts

LAUNCHER = r"""
import asyncio, logging, signal, sys
from pathlib import Path
from weft.cni.ipam_adapter import ServiceIpam
from weft.docker.plugin import DockerPluginConfig
from weft.docker.server import setup_docker_plugin
from weft.gossip.peer import PeerName
from weft.router.config import RouterConfig
from weft.router.daemon import build_overlay, compose
from weft.router.router import Router

async def main(data_dir, plugin, peer, name):
    config = RouterConfig(name=PeerName.parse(name), data_dir=data_dir, nickname="h1",
                          api_socket=data_dir / "weft.sock", datapath="sleeve", peers=(peer,),
                          ipalloc_init=f"seed={name}", heartbeat_interval=0.5,
                          heartbeat_timeout=3)
    router = Router(config, build_overlay(config))
    parts = compose(router)  # data plane routes, IPAM (+ CNI), UI
    setup_docker_plugin(router, ServiceIpam(parts.ipam), DockerPluginConfig(
        name=plugin, state_path=data_dir / "docker-networks.json"))
    await router.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, router.request_stop)
    print("router started", flush=True)
    await router.wait_stopped()

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("weft.docker").setLevel(logging.DEBUG)  # every plugin call, for failures
asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
"""


@dataclass
class Env:
    u: Underlay
    h1: Host
    h2: Host
    plugin: str
    sock: str
    router1: subprocess.Popen[bytes] | None = None

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        proc = run([DOCKER, "-H", f"unix://{self.sock}", *args], check=check, timeout=timeout)
        return proc.stdout.strip()

    def start_router1(self) -> None:
        self.router1 = self.h1.spawn(
            sys.executable, "-c", LAUNCHER, str(self.h1.data_dir), self.plugin, self.h2.ip,
            H1_NAME,
            log=self.h1.data_dir / "router.log",
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        socket = Path(f"/run/docker/plugins/{self.plugin}.sock")
        wait_for(lambda: socket.is_socket() or self.router1_died(), timeout=60,
                 what="the plugin socket")
        assert not self.router1_died(), self.logs()

    def router1_died(self) -> bool:
        return self.router1 is not None and self.router1.poll() is not None

    def stop_router1(self) -> None:
        assert self.router1 is not None
        self.router1.send_signal(signal.SIGTERM)
        self.router1.wait(timeout=30)

    def ipam_state(self) -> dict[str, str]:
        """ident -> CIDR of host 1's allocations (``GET /ip`` on its API socket)."""
        conn = _UnixHTTP(str(self.h1.data_dir / "weft.sock"))
        try:
            conn.request("GET", "/ip")
            doc = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        return {a["container_id"]: a["cidr"] for a in doc["allocations"]}

    def logs(self) -> str:
        out = []
        for name in ("router.log", "dockerd.log"):
            path = self.h1.data_dir / name
            if path.exists():
                out.append(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(out)


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        self.sock = sock


def weft(host: Host, *args: str) -> str:
    proc = host.exec(sys.executable, "-m", "weft.cli.main", *args, timeout=90)
    return proc.stdout


def busybox_tar(path: Path) -> None:
    """A rootfs with busybox-static and the applets the test uses."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in ("sh", "ping", "ip", "sleep", "cat", "ifconfig", "route"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)


def start_dockerd(env: Env, driver: str) -> subprocess.Popen[bytes]:
    root = env.h1.data_dir / "docker"
    # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup mounts dockerd
    # needs; only the network namespace changes.
    log = open(env.h1.data_dir / "dockerd.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [
            "nsenter", f"--net=/run/netns/{env.h1.ns}", "dockerd",
            "--data-root", str(root / "data"),
            "--exec-root", str(root / "exec"),
            "--pidfile", str(root / "docker.pid"),
            "-H", f"unix://{env.sock}",
            "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--bridge=none",
            f"--storage-driver={driver}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    env.h1.procs.append(proc)  # killed by Underlay.close if still running

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        return run([DOCKER, "-H", f"unix://{env.sock}", "info"], check=False).returncode == 0

    wait_for(ready, timeout=90, what="dockerd to answer")
    return proc


def unmount_under(root: Path) -> None:
    """Lazily unmount what a killed dockerd left mounted under ``root`` (deepest first)."""
    prefix = str(root) + "/"
    with open("/proc/mounts", encoding="utf-8") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        run(["umount", "-l", point], check=False)


def stop_dockerd(env: Env, proc: subprocess.Popen[bytes]) -> None:
    with suppress(Exception):
        ids = env.docker("ps", "-aq", check=False).split()
        if ids:
            env.docker("rm", "-f", *ids, check=False)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with underlay(2) as u:
        h1, h2 = u.hosts
        e = Env(u, h1, h2, plugin=f"{u.prefix}d", sock=str(u.base_dir / "docker.sock"))
        dockerd: subprocess.Popen[bytes] | None = None
        try:
            d2 = h2.data_dir
            weft(h2, "launch", "--nickname", "h2", "--data-dir", str(d2), "--api-socket",
                 str(d2 / "weft.sock"), "--datapath", "sleeve", "--heartbeat-interval", "0.5",
                 "--heartbeat-timeout", "3", "--ipalloc-init", f"seed={H1_NAME}", h1.ip)
            remote = h2.add_netns("c")
            weft(h2, "attach", "--ip", REMOTE_IP, remote)
            e.start_router1()
            dockerd = start_dockerd(e, "overlay2")
            if dockerd.poll() is not None:  # no overlayfs here: the slow but sure driver
                dockerd = start_dockerd(e, "vfs")
            assert dockerd.poll() is None, e.logs()
            tar = u.base_dir / "busybox.tar"
            busybox_tar(tar)
            run([DOCKER, "-H", f"unix://{e.sock}", "import", str(tar), "wfbusybox"])
            yield e
        finally:
            if dockerd is not None:
                stop_dockerd(e, dockerd)
            unmount_under(h1.data_dir / "docker")
            if e.router1 is not None and e.router1.poll() is None:
                with suppress(Exception):
                    e.stop_router1()
            with suppress(FileNotFoundError):
                os.unlink(f"/run/docker/plugins/{e.plugin}.sock")
    shutil.rmtree(u.base_dir, ignore_errors=True)


def container_ip(env: Env, name: str) -> str:
    doc: list[dict[str, Any]] = json.loads(env.docker("inspect", name))
    nets = doc[0]["NetworkSettings"]["Networks"]
    return str(nets["wnet"]["IPAddress"])


def pings(env: Env, name: str, address: str) -> bool:
    proc = run([DOCKER, "-H", f"unix://{env.sock}", "exec", name, "ping", "-c", "1", "-W", "1",
                address], check=False, timeout=30)
    return proc.returncode == 0


def test_docker_network_across_hosts_release_and_router_restart(env: Env) -> None:
    try:
        _scenario(env)
    except BaseException:
        print(env.logs())
        raise


def _scenario(env: Env) -> None:
    remote = REMOTE_IP.split("/")[0]
    # a request the plugin refuses: the user sees the plugin's reason
    bad = run([DOCKER, "-H", f"unix://{env.sock}", "network", "create", "-d", env.plugin,
               "--ipam-driver", env.plugin, "--ipv6", "--subnet", "fd00:77::/64", "bad"],
              check=False)
    assert bad.returncode != 0 and "IPv6 is not supported by weft" in bad.stderr, bad.stderr
    # without --ipam-driver, Docker's own IPAM would give every host the same addresses:
    # refused, and the error Docker prints names the missing flag
    plain = run([DOCKER, "-H", f"unix://{env.sock}", "network", "create", "-d", env.plugin,
                 "plain"], check=False)
    assert plain.returncode != 0, plain.stdout
    assert f"--ipam-driver {env.plugin}" in plain.stderr, plain.stderr
    assert "plain" not in env.docker("network", "ls", "--format", "{{.Name}}").split()
    env.docker("network", "create", "-d", env.plugin, "--ipam-driver", env.plugin, "wnet")
    assert "docker_gwbridge" not in env.docker("network", "ls")
    env.docker("run", "-d", "--name", "c1", "--network", "wnet", "wfbusybox", "sleep", "3600")
    ip1 = container_ip(env, "c1")
    assert ip1 == "10.32.0.2", ip1  # 10.32.0.1 is the network's gateway
    addr = env.docker("exec", "c1", "ip", "-o", "-4", "addr", "show", "dev", "ethwe0")
    assert "10.32.0.2/12" in addr
    assert "default via 10.32.0.1" in env.docker("exec", "c1", "ip", "route")
    assert "docker_gwbridge" not in env.docker("network", "ls")
    # across the mesh to the namespace attached on host 2
    wait_for(lambda: pings(env, "c1", remote), timeout=60, what="c1 -> host 2 over the mesh")
    # and the host reaches its containers through its gateway address on the bridge
    assert env.h1.exec("ping", "-c", "1", "-W", "2", ip1, check=False).returncode == 0

    # docker rm releases the address
    env.docker("run", "-d", "--name", "c2", "--network", "wnet", "wfbusybox", "sleep", "3600")
    ip2 = container_ip(env, "c2")
    assert ip2 == "10.32.0.3"
    assert any(c.startswith("10.32.0.3/") for c in env.ipam_state().values())
    env.docker("rm", "-f", "c2")
    wait_for(lambda: not any(c.startswith("10.32.0.3/") for c in env.ipam_state().values()),
             timeout=30, what="c2's address released")
    assert env.h1.exec("sh", "-c", "ip -o link | grep -c vwd", check=False).stdout.strip() == "1"

    # the router restarts: Docker does not replay CreateNetwork, the plugin remembers it
    env.stop_router1()
    env.start_router1()
    assert "wnet" in env.docker("network", "ls")
    env.docker("run", "-d", "--name", "c3", "--network", "wnet", "wfbusybox", "sleep", "3600")
    ip3 = container_ip(env, "c3")
    assert ip3 == "10.32.0.3", ip3  # the released address, handed out again
    wait_for(lambda: pings(env, "c3", remote), timeout=60, what="c3 -> host 2 after restart")
    assert pings(env, "c1", remote)  # the container from before the restart still works
    assert pings(env, "c3", ip1)
    env.docker("rm", "-f", "c1", "c3")
    env.docker("network", "rm", "wnet")
    wait_for(lambda: env.ipam_state() == {}, timeout=30,
             what=f"every address released (left: {env.ipam_state()})")
