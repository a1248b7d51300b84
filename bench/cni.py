"""CNI ADD/DEL latency: weft's plugin against the reference bridge + host-local, same run.

    python -m bench.cni [--containers 30] [--router] [--python] [--json]

Needs root, network namespaces and Debian's containernetworking-plugins (/usr/lib/cni). Builds one
host namespace with a ``weft`` bridge (10.32.0.1/12) and the CNI-only router
(``python -m weft.cni.server``: the real /cni routes and kernel work, an in-memory allocator), and
one with nothing (the reference bridge plugin makes its own ``cnibr0``). This process then enters
each host namespace in turn (setns) and runs the plugins exactly as a runtime would: one process per
call, configuration on stdin, CNI_* in the environment. Calls alternate between weft and the
reference, container by container, so both see the same machine noise.

weft is installed with ``weft setup-cni`` (what users get: the compiled shim when a C compiler is
there, which hands each call to the router's ``cni.sock``, else the Python launcher; the report
says which). ``--python`` adds ``weft-python``: the Python launcher (``setup-cni --python``) on the
same CNI-only router, for comparison.

``--router`` adds the real router (``weft launch``: mesh, sleeve, IPAM committing each
allocation to SQLite before answering) as ``weft-router``, next to ``weft`` (the CNI-only router,
an in-memory allocator: the plugin and kernel path alone).

Reported per implementation: VERSION (pure start-up), ADD and DEL wall time, median and p95, in
milliseconds, and each median's ratio to the reference's (target for ADD: at most 2). Figures,
not assertions.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from weft.cni import install

REFERENCE = Path("/usr/lib/cni")
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this (single-threaded) process, and the plugins it starts, inside ``ns``."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(f"/var/run/netns/{ns}")
        yield
    finally:
        if _libc.setns(home, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(home)


def call(exe: str, command: str, conf: dict[str, Any], cid: str, netns: str, path: str) -> float:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": path,
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [exe], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=120
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{exe} {command} failed: {proc.stdout!r} {proc.stderr!r}")
    return took * 1000


def kind(exe: str) -> str:
    """``shim`` (an ELF binary: the compiled shim) or ``python`` (the launcher script)."""
    with open(exe, "rb") as f:
        return "shim" if f.read(4) == b"\x7fELF" else "python"


def api(sock: str, method: str, route: str, body: Any = None) -> Any:
    """One request to the router's API on its unix socket (raises on an error status)."""
    import http.client
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(sock)

    conn = Conn("localhost", timeout=60)
    try:
        deadline = time.monotonic() + 60
        while True:
            conn.request(method, route, body=None if body is None else json.dumps(body))
            response = conn.getresponse()
            data = response.read()
            if response.status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the ring is not ready yet
        if response.status >= 400:
            raise RuntimeError(f"{method} {route}: {response.status} {data!r}")
        return json.loads(data) if data else None
    finally:
        conn.close()


def setup_cni(bin_dir: Path, conf_dir: Path, api_socket: str, *extra: str) -> str:
    """``weft setup-cni`` as a user runs it; returns what it said on stderr ('' normally)."""
    argv = [sys.executable, "-m", "weft.cli.main", "setup-cni", "--bin-dir", str(bin_dir)]
    proc = subprocess.run(
        [*argv, "--conf-dir", str(conf_dir), "--api-socket", api_socket, *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stderr.strip()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--router", action="store_true", help="also the real router (weft launch: IPAM on SQLite)"
    )
    parser.add_argument(
        "--python", action="store_true", help="also the Python launcher (setup-cni --python)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not (REFERENCE / "bridge").exists():
        print("needs root and /usr/lib/cni (containernetworking-plugins)", file=sys.stderr)
        return 2

    prefix = f"wfb{secrets.token_hex(2)}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    namespaces: list[str] = []
    router: subprocess.Popen[bytes] | None = None

    def netns(name: str) -> str:
        full = f"{prefix}-{name}"
        sh("ip", "netns", "add", full)
        namespaces.append(full)
        return full

    def wait_socket(path: str, proc: subprocess.Popen[bytes] | None) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"no router socket at {path}")
            time.sleep(0.05)

    full_host: str | None = None
    try:
        weft_host, ref_host = netns("hw"), netns("hr")
        for host in (weft_host, ref_host):
            sh("ip", "-n", host, "link", "set", "lo", "up")
        sh("ip", "-n", weft_host, "link", "add", "weft", "type", "bridge")
        sh("ip", "-n", weft_host, "addr", "add", "10.32.0.1/12", "dev", "weft")
        sh("ip", "-n", weft_host, "link", "set", "weft", "up")
        sock = str(tmp / "weft.sock")
        notes = {"weft": setup_cni(tmp / "bin", tmp / "net.d", sock)}
        launcher = str(tmp / "bin" / "weft")
        plugin_kind = {"weft": kind(launcher)}
        router = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                weft_host,
                sys.executable,
                "-m",
                "weft.cni.server",
                "--socket",
                sock,
                "--reserve",
                "10.32.0.1",
                "--spool-dir",
                str(tmp / "spool"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_socket(sock, router)
        path = f"{tmp / 'bin'}:{REFERENCE}"
        weft_conf: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "weftbench",
            "type": "weft",
            "socket": sock,
            "spoolDir": str(tmp / "spool"),
        }
        ref_conf: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "refbench",
            "type": "bridge",
            "bridge": "cnibr0",
            "isGateway": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(tmp / "host-local"),
                "ranges": [[{"subnet": "10.88.0.0/16"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
        impls: dict[str, tuple[str, dict[str, Any], str, str]] = {
            "weft": (launcher, weft_conf, weft_host, path),
            "reference": (str(REFERENCE / "bridge"), ref_conf, ref_host, str(REFERENCE)),
        }
        if args.python:
            setup_cni(tmp / "py-bin", tmp / "py-net.d", sock, "--python")
            py_path = f"{tmp / 'py-bin'}:{REFERENCE}"
            py_conf = dict(weft_conf, name="pybench")
            impls["weft-python"] = (str(tmp / "py-bin" / "weft"), py_conf, weft_host, py_path)
            plugin_kind["weft-python"] = kind(str(tmp / "py-bin" / "weft"))
        if args.router:
            # the real router: mesh, sleeve data plane, IPAM with its SQLite store, CNI
            full_host = netns("hf")
            sh("ip", "-n", full_host, "link", "set", "lo", "up")
            full_sock = str(tmp / "full" / "weft.sock")
            name = "02:00:00:00:0b:01"
            sh(
                "ip",
                "netns",
                "exec",
                full_host,
                sys.executable,
                "-m",
                "weft.cli.main",
                "launch",
                "--name",
                name,
                "--ipalloc-init",
                f"seed={name}",
                "--data-dir",
                str(tmp / "full"),
                "--api-socket",
                full_sock,
                "--datapath",
                "sleeve",
            )
            wait_socket(full_sock, None)
            api(full_sock, "PUT", "/ip/weft-expose/10.32.0.1/12")  # the gateway, as in weft
            api(full_sock, "POST", "/expose", {"cidr": "10.32.0.1/12"})
            full_conf = dict(weft_conf, name="fullbench", socket=full_sock)
            # its own install: the shim is built for the socket beside this router's API socket
            notes["weft-router"] = setup_cni(tmp / "full-bin", tmp / "full-net.d", full_sock)
            full_path = f"{tmp / 'full-bin'}:{REFERENCE}"
            full_exe = str(tmp / "full-bin" / "weft")
            impls["weft-router"] = (full_exe, full_conf, full_host, full_path)
            plugin_kind["weft-router"] = kind(full_exe)
        times: dict[str, dict[str, list[float]]] = {
            k: {"VERSION": [], "ADD": [], "DEL": []} for k in impls
        }
        containers = {
            k: [netns(f"{k[0]}{k[-1]}{i}") for i in range(args.containers)] for k in impls
        }
        # one warm-up ADD/DEL each (page cache, bridge creation by the reference plugin)
        for name, (exe, conf, host, path) in impls.items():
            warm = netns(f"{name[0]}{name[-1]}warm")
            with inside(host):
                call(exe, "ADD", conf, "warm", f"/var/run/netns/{warm}", path)
                call(exe, "DEL", conf, "warm", f"/var/run/netns/{warm}", path)
        for i in range(args.containers):
            for name, (exe, conf, host, path) in impls.items():
                ns_path = f"/var/run/netns/{containers[name][i]}"
                with inside(host):
                    times[name]["VERSION"].append(
                        call(exe, "VERSION", {"cniVersion": "1.0.0"}, "v", ns_path, path)
                    )
                    times[name]["ADD"].append(call(exe, "ADD", conf, f"c{i}", ns_path, path))
        for i in range(args.containers):
            for name, (exe, conf, host, path) in impls.items():
                ns_path = f"/var/run/netns/{containers[name][i]}"
                with inside(host):
                    times[name]["DEL"].append(call(exe, "DEL", conf, f"c{i}", ns_path, path))
    finally:
        if full_host is not None:
            subprocess.run(
                ["ip", "netns", "exec", full_host, sys.executable, "-m", "weft.cli.main", "stop"],
                capture_output=True,
            )
        if router is not None and router.poll() is None:
            os.killpg(router.pid, signal.SIGTERM)
            router.wait(timeout=30)
        for ns in reversed(namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    report: dict[str, Any] = {
        "containers": args.containers,
        "interpreter": install.interpreter(),
        "plugin": plugin_kind,
        "setup_cni_notes": {k: v for k, v in notes.items() if v},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "results": {
            name: {cmd: summary(values) for cmd, values in cmds.items()}
            for name, cmds in times.items()
        },
    }
    ref_add = report["results"]["reference"]["ADD"]["median_ms"]
    report["add_median_ratio"] = {
        name: round(cmds["ADD"]["median_ms"] / ref_add, 2)
        for name, cmds in report["results"].items()
        if name != "reference"
    }
    ref = report["results"]["reference"]
    report["median_ratio"] = {
        name: {c: round(v["median_ms"] / ref[c]["median_ms"], 2) for c, v in cmds.items()}
        for name, cmds in report["results"].items()
        if name != "reference"
    }
    report["target_add_ratio"] = 2.0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'':12} {'VERSION med/p95':>18} {'ADD med/p95':>18} {'DEL med/p95':>18}")
        for name, cmds in report["results"].items():
            cells = [f"{c['median_ms']:7.1f}/{c['p95_ms']:7.1f} ms" for c in cmds.values()]
            print(f"{name:12} " + " ".join(f"{cell:>18}" for cell in cells))
        for name, ratio in report["add_median_ratio"].items():
            print(
                f"ADD median ratio {name}/reference: {ratio} (target <= 2); all medians: "
                f"{report['median_ratio'][name]}; plugin: {plugin_kind[name]}"
            )
        for name, note in report["setup_cni_notes"].items():
            print(f"setup-cni ({name}): {note}")
        print(f"load average at the end: {report['load_average']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
