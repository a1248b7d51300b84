"""CNI ADD/DEL latency: weft's plugin against the reference bridge + host-local, same run.

    python -m bench.cni [--containers 30] [--json]

Needs root, network namespaces and Debian's containernetworking-plugins (/usr/lib/cni). Builds one
host namespace with a ``weft`` bridge (10.32.0.1/12) and the CNI-only router
(``python -m weft.cni.server``: the real /cni routes and kernel work, an in-memory allocator), and
one with nothing (the reference bridge plugin makes its own ``cnibr0``). This process then enters
each host namespace in turn (setns) and runs the plugins exactly as a runtime would: one process per
call, configuration on stdin, CNI_* in the environment. Calls alternate between weft and the
reference, container by container, so both see the same machine noise.

Reported per implementation: VERSION (pure start-up), ADD and DEL wall time, median and p95, in
milliseconds, and ADD's ratio weft/reference (target: at most 2). Figures, not assertions.
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


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", type=int, default=30)
    parser.add_argument("--json", action="store_true")
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

    try:
        weft_host, ref_host = netns("hw"), netns("hr")
        for host in (weft_host, ref_host):
            sh("ip", "-n", host, "link", "set", "lo", "up")
        sh("ip", "-n", weft_host, "link", "add", "weft", "type", "bridge")
        sh("ip", "-n", weft_host, "addr", "add", "10.32.0.1/12", "dev", "weft")
        sh("ip", "-n", weft_host, "link", "set", "weft", "up")
        done = install.install(str(tmp / "bin"), str(tmp / "net.d"))
        sock = str(tmp / "weft.sock")
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
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if time.monotonic() > deadline or router.poll() is not None:
                raise RuntimeError("weft CNI router did not start")
            time.sleep(0.05)

        weft_conf = {
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
            "weft": (str(done.launcher), weft_conf, weft_host, f"{tmp / 'bin'}:{REFERENCE}"),
            "reference": (str(REFERENCE / "bridge"), ref_conf, ref_host, str(REFERENCE)),
        }
        times: dict[str, dict[str, list[float]]] = {
            k: {"VERSION": [], "ADD": [], "DEL": []} for k in impls
        }
        containers = {k: [netns(f"{k[0]}{i}") for i in range(args.containers)] for k in impls}
        # one warm-up ADD/DEL each (page cache, bridge creation by the reference plugin)
        for name, (exe, conf, host, path) in impls.items():
            warm = netns(f"{name[0]}warm")
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
        if router is not None and router.poll() is None:
            os.killpg(router.pid, signal.SIGTERM)
            router.wait(timeout=30)
        for ns in reversed(namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    report: dict[str, Any] = {
        "containers": args.containers,
        "interpreter": install.interpreter(),
        "results": {
            name: {cmd: summary(values) for cmd, values in cmds.items()}
            for name, cmds in times.items()
        },
    }
    weft_add = report["results"]["weft"]["ADD"]["median_ms"]
    ref_add = report["results"]["reference"]["ADD"]["median_ms"]
    report["add_median_ratio"] = round(weft_add / ref_add, 2)
    report["target_add_ratio"] = 2.0
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'':10} {'VERSION med/p95':>18} {'ADD med/p95':>18} {'DEL med/p95':>18}")
        for name, cmds in report["results"].items():
            cells = [f"{c['median_ms']:7.1f}/{c['p95_ms']:7.1f} ms" for c in cmds.values()]
            print(f"{name:10} " + " ".join(f"{cell:>18}" for cell in cells))
        print(f"ADD median ratio weft/reference: {report['add_median_ratio']} (target <= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
