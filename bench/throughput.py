"""Sleeve throughput against the kernel, in one run on the same namespaces (needs root).

Two host namespaces on a 1500-MTU veth underlay (``tests/integ/hosts.py``), one container per host,
and iperf3 TCP for each of:

* ``raw``        host to host over the underlay;
* ``vxlan``      a hand-made kernel VXLAN (bridge + vxlan + veth per host) between two containers;
* ``sleeve``     weft's sleeve, plain (super-frames: TAP offloads, UDP GSO/GRO);
* ``encrypted``  the same with a password (AES-256-GCM per sealed unit);
* ``per-frame``  the per-frame path, plain: what two peers without super-frames negotiate (no
                 virtio_net_hdr on the wire, one frame per datagram), with the local offloads as
                 syscall batching when the kernel has them: UDP GSO/GRO and in-order TCP
                 segments merged into one TAP write (the datagrams on the wire are the same);
* ``per-frame-strict``  the same with ``WEFT_SLEEVE_LOCAL_OFFLOADS=off``: no UDP GSO/GRO and no
                 TCP coalescing into the TAP, one frame per syscall (what a kernel without them
                 gets);
* ``fastdp``     weft's Linux VXLAN fast datapath (``--datapath vxlan``: the overlay switch puts
                 the connection on the kernel's vxlan device; the routers only keep its FDB).

Each weft row says in ``local_features`` what its routers used (mode, TAP offloads, UDP GSO/GRO,
TCP coalescing into the TAP = ``tap_gro``).

Each figure is the median of ``--runs`` iperf3 runs of ``--seconds``; for the weft modes also the
CPU seconds per second of each router, Gbit/s per router CPU-second, drop counters and syscall
counts, and a kernel VXLAN run interleaved before each weft run (a second ratio that follows the
machine's drifting load). The targets
(issue 3) are ratios to kernel VXLAN in the same run: sleeve >= 0.30, encrypted >= 0.22,
per-frame >= 0.045 (judged on the ``per-frame`` row; ``per-frame-strict`` has no target and is
reported for comparison); and (issue 6) the fast datapath >= 0.90. The machine may be shared:
compare only figures of one run.

    python -m bench.throughput [--json] [--runs 3] [--seconds 5] [--modes sleeve,encrypted]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from tests.integ.hosts import Host, Underlay, run, underlay, wait_for

TARGETS = {"sleeve": 0.30, "encrypted": 0.22, "per-frame": 0.045, "fastdp": 0.90}
WEFT_MODES = ("sleeve", "encrypted", "per-frame", "per-frame-strict", "fastdp")


def iperf(client_ns: str, server_ns: str, ip: str, seconds: float) -> dict[str, float]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out: dict[str, Any] = {}
        for _ in range(50):  # the server needs a moment to listen
            proc = run(
                ["ip", "netns", "exec", client_ns, "iperf3", "-c", ip, "-t", str(seconds), "-J"],
                check=False,
                timeout=seconds + 30,
            )
            try:
                out = json.loads(proc.stdout)
            except ValueError:
                out = {}
            if "end" in out and "sum_received" in out["end"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"iperf3 to {ip} failed: {out.get('error', proc.stderr)}")
        end = out["end"]
        return {
            "gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
        }
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _status(host: Host) -> dict[str, Any]:
    proc = host.exec("curl", "-s", "--max-time", "2", "http://127.0.0.1:6784/status", check=False)
    if proc.returncode != 0 or not proc.stdout:
        return {}
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def _pings(ns: str, ip: str) -> bool:
    return run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", ip], check=False).returncode == 0


def _established(host: Host, datapath: str = "sleeve") -> bool:
    conns = _status(host).get("router", {}).get("connections", [])
    return any(c.get("state") == "established" and c.get("datapath") == datapath for c in conns)


def _measure(
    name: str,
    client_ns: str,
    server_ns: str,
    ip: str,
    args: argparse.Namespace,
    routers: list[tuple[Host, subprocess.Popen[bytes]]] | None = None,
    baseline: tuple[str, str] | None = None,
) -> dict[str, Any]:
    runs = []
    base_runs: list[float] = []
    cpu: list[list[float]] = [[] for _ in routers or []]
    for _ in range(args.runs):
        if baseline is not None:  # kernel VXLAN right before each run: the load drifts
            base_runs.append(iperf(baseline[0], baseline[1], "10.99.0.2", args.seconds)["gbps"])
        before = [_cpu_seconds(p.pid) for _, p in routers or []]
        t0 = time.monotonic()
        runs.append(iperf(client_ns, server_ns, ip, args.seconds))
        wall = time.monotonic() - t0
        for i, (_, p) in enumerate(routers or []):
            cpu[i].append((_cpu_seconds(p.pid) - before[i]) / wall)
    result: dict[str, Any] = {
        "gbps": [round(r["gbps"], 3) for r in runs],
        "median_gbps": round(statistics.median(r["gbps"] for r in runs), 3),
        "retransmits": [int(r["retransmits"]) for r in runs],
    }
    if base_runs:
        result["vxlan_interleaved_gbps"] = [round(g, 3) for g in base_runs]
        result["vxlan_interleaved_median"] = round(statistics.median(base_runs), 3)
    if routers:
        result["router_cpu"] = [round(statistics.median(c), 2) for c in cpu]
        total_cpu = sum(statistics.median(c) for c in cpu)
        result["gbit_per_router_cpu_second"] = round(
            result["median_gbps"] / max(total_cpu, 1e-9), 2
        )
        overlays = [_status(h).get("overlay", {}) for h, _ in routers]
        result["local_features"] = [
            {k: o.get(k) for k in ("mode", "tap_offload", "gso", "gro", "tap_gro")}
            for o in overlays
        ]
        result["drops"] = [o.get("drops", {}) for o in overlays]
        result["syscalls"] = [o.get("syscalls", {}) for o in overlays]
        result["batching"] = [_batching(o) for o in overlays]
    line = f"{name:>10}: {result['median_gbps']:7.3f} Gbit/s  {result['gbps']}"
    if result.get("batching"):
        line += "  " + "  ".join(
            f"h{i + 1}: {b['messages_per_udp_send']} msg/send,"
            f" {b['frames_per_tap_write']} frames/write"
            for i, b in enumerate(result["batching"])
        )
    print(line, file=sys.stderr)
    return result


def _batching(overlay: dict[str, Any]) -> dict[str, float | None]:
    """How many sleeve messages one UDP send carried and frames one TAP write, over the run.

    These depend on the load and the kernel (GSO, TAP offloads), so they are figures to print,
    never something a test asserts.
    """
    calls = overlay.get("syscalls", {})
    stats = overlay.get("stats", {})

    def per(num: str, den: str) -> float | None:
        n, d = stats.get(num), calls.get(den)
        return round(n / d, 2) if isinstance(n, int) and isinstance(d, int) and d else None

    return {
        "messages_per_udp_send": per("messages_out", "udp_send"),
        "frames_per_tap_write": per("tap_frames_out", "tap_write"),
    }


def handmade_vxlan(u: Underlay) -> tuple[str, str]:
    """A hand-made kernel VXLAN between two containers; returns their namespaces."""
    names = []
    for i, host in enumerate(u.hosts[:2]):
        other = u.hosts[1 - i]
        ns = host.add_netns("vx")
        names.append(ns)
        host.sh(
            f"ip link add vx0 type vxlan id 42 remote {other.ip} dstport 4789 dev eth0"
            " && ip link add vxbr type bridge && ip link set vx0 master vxbr"
            " && ip link add vxh type veth peer name vxc"
            f" && ip link set vxc netns {ns} && ip link set vxh master vxbr"
            " && ip link set vx0 up && ip link set vxbr up && ip link set vxh up"
        )
        run(["ip", "-n", ns, "link", "set", "vxc", "name", "eth0", "mtu", "1450", "up"])
        run(["ip", "-n", ns, "addr", "add", f"10.99.0.{i + 1}/24", "dev", "eth0"])
    return names[0], names[1]


def _start_routers(u: Underlay, mode: str) -> list[tuple[Host, subprocess.Popen[bytes]]]:
    per_frame = mode.startswith("per-frame")
    env = {
        "WEFT_SLEEVE_MODE": "per-frame" if per_frame else "super-frames",
        "WEFT_SLEEVE_LOCAL_OFFLOADS": "off" if mode == "per-frame-strict" else "auto",
    }
    if mode == "encrypted":
        env["WEFT_PASSWORD"] = "bench-password"
    else:
        env["WEFT_PASSWORD"] = ""
    datapath = "vxlan" if mode == "fastdp" else "sleeve"
    out = []
    for i, host in enumerate(u.hosts[:2]):
        peers = [h.ip for h in u.hosts[:2] if h is not host]
        log = host.data_dir / f"router-{mode}.log"
        proc = host.spawn(
            sys.executable,
            "-m",
            "weft.cli.main",
            "router",
            "--data-dir",
            str(host.data_dir),
            "--api-socket",
            "",
            "--datapath",
            datapath,
            "--nickname",
            f"h{i + 1}",
            *peers,
            log=log,
            env=env,
        )
        out.append((host, proc))
    for host, _ in out:
        wait_for(
            partial(_established, host, datapath), timeout=60, what=f"{mode} established"
        )
    return out


def _stop(routers: list[tuple[Host, subprocess.Popen[bytes]]]) -> None:
    for _, proc in routers:
        proc.terminate()
    for _, proc in routers:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _attach(u: Underlay) -> tuple[str, str]:
    names = []
    for i, host in enumerate(u.hosts[:2]):
        ns = f"{host.ns}-c1"
        if ns not in u.namespaces:
            host.add_netns("c1")
            host.exec(
                sys.executable,
                "-m",
                "weft.host.bridge",
                "attach",
                ns,
                "--ip",
                f"10.32.0.{i + 1}/12",
            )
        names.append(ns)
    return names[0], names[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--modes", default="raw,vxlan," + ",".join(WEFT_MODES), help="comma-separated subset"
    )
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, Any] = {"runs": args.runs, "seconds": args.seconds, "loadavg_start": None}
    results["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    with underlay(2) as u:
        h1, h2 = u.hosts
        if "raw" in modes:
            results["raw"] = _measure("raw", h1.ns, h2.ns, h2.ip, args)
        baseline = None
        if "vxlan" in modes:
            v1, v2 = handmade_vxlan(u)
            baseline = (v1, v2)
            results["vxlan"] = _measure("vxlan", v1, v2, "10.99.0.2", args)
        for mode in WEFT_MODES:
            if mode not in modes:
                continue
            routers = _start_routers(u, mode)
            try:
                c1, c2 = _attach(u)
                wait_for(partial(_pings, c1, "10.32.0.2"), timeout=30, what="container ping")
                results[mode] = _measure(mode, c1, c2, "10.32.0.2", args, routers, baseline)
                st = _status(h1).get("overlay", {}).get("links", {})
                results[mode]["link"] = next(iter(st.values()), None)
            finally:
                _stop(routers)
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if "vxlan" in results:
        base = results["vxlan"]["median_gbps"]
        results["ratios_to_vxlan"] = {
            m: round(results[m]["median_gbps"] / base, 4) for m in WEFT_MODES if m in results
        }
        # The same ratio against the VXLAN runs interleaved with each mode's runs (fairer when
        # the machine's load drifts during the benchmark).
        results["ratios_to_interleaved_vxlan"] = {
            m: round(results[m]["median_gbps"] / results[m]["vxlan_interleaved_median"], 4)
            for m in WEFT_MODES
            if m in results and results[m].get("vxlan_interleaved_median")
        }
        results["targets"] = TARGETS
        results["meets_targets"] = {
            m: results["ratios_to_vxlan"][m] >= TARGETS[m]
            for m in results["ratios_to_vxlan"]
            if m in TARGETS
        }
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for key in ("raw", "vxlan", *WEFT_MODES):
            if key in results:
                r = results[key]
                extra = f" cpu {r['router_cpu']}" if "router_cpu" in r else ""
                if "local_features" in r:
                    extra += f" local {r['local_features'][0]}"
                print(f"{key:>10} {r['median_gbps']:8.3f} Gbit/s{extra}")
        if "ratios_to_vxlan" in results:
            print("ratios to kernel VXLAN:", results["ratios_to_vxlan"], "targets:", TARGETS)
            print("ratios to interleaved VXLAN runs:", results["ratios_to_interleaved_vxlan"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
