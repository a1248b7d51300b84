"""weft's VXLAN fast datapath against a hand-made kernel VXLAN, in one run (needs root, iperf3).

Two host namespaces on a 1500-MTU veth underlay (``tests/integ/hosts.py``), and iperf3 TCP
between two containers for each of:

* ``vxlan``       a hand-made kernel VXLAN (bridge + vxlan + veth per host, UDP 4789, MTU 1450);
* ``weft-vxlan``  two weft routers with the overlay switch (``--datapath auto``, no password),
                  once every connection is on vxlan; containers attached by weft (MTU 1376).

The two alternate run by run (the machine's load drifts; compare figures of one run only). Each
figure is the median of ``--runs`` iperf3 runs of ``--seconds``. Target (issue 6): weft-vxlan at
0.9 or more of the hand-made VXLAN. Also printed: each router's CPU seconds per second during the
weft runs (should be ~0: the kernel forwards) and the sleeve's TAP frame count (should not grow).

    python -m bench.fastdp [--json] [--runs 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.throughput import handmade_vxlan, iperf
from tests.integ.hosts import Host, Underlay, run, underlay, wait_for

TARGET = 0.9
REPO = Path(__file__).resolve().parents[1]


def status(host: Host) -> dict[str, Any]:
    proc = host.exec("curl", "-s", "--max-time", "2", "http://127.0.0.1:6784/status", check=False)
    if proc.returncode != 0 or not proc.stdout:
        return {}
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def on_vxlan(host: Host) -> bool:
    rows = status(host).get("router", {}).get("connections", [])
    return any(r.get("state") == "established" and r.get("datapath") == "vxlan" for r in rows)


def api_post(host: Host, path: str, body: dict[str, Any]) -> bool:
    proc = host.exec(
        "curl", "-s", "-f", "--max-time", "10", "-X", "POST",
        "-H", "Content-Type: application/json", "-d", json.dumps(body),
        f"http://127.0.0.1:6784{path}", check=False,
    )  # fmt: skip
    return proc.returncode == 0


def start_weft(u: Underlay) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    procs = []
    for i, host in enumerate(u.hosts[:2]):
        peers = [h.ip for h in u.hosts[:2] if h is not host]
        args = ["-m", "weft.cli.main", "router", "--data-dir", str(host.data_dir)]
        args += ["--api-socket", "", "--datapath", "auto", "--nickname", f"h{i + 1}", *peers]
        env = {"WEFT_PASSWORD": "", "PYTHONPATH": str(REPO)}
        procs.append(host.spawn(sys.executable, *args, log=host.data_dir / "router.log", env=env))
    names = []
    for i, host in enumerate(u.hosts[:2]):
        wait_for(partial(on_vxlan, host), timeout=60, what=f"h{i + 1} on vxlan")
        ns = host.add_netns("c")
        body = {"netns": ns, "ip": [f"10.32.0.{i + 1}/12"]}
        wait_for(partial(api_post, host, "/attach", body), timeout=30, what="attach")
        names.append(ns)
    return procs, names[0], names[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pings(ns: str, ip: str) -> bool:
    return run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", ip], check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"runs": args.runs, "seconds": args.seconds}
    results["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    with underlay(2) as u:
        v1, v2 = handmade_vxlan(u)
        procs, c1, c2 = start_weft(u)
        wait_for(partial(pings, c1, "10.32.0.2"), timeout=30, what="container ping")
        frames_before = status(u.hosts[0]).get("overlay", {}).get("stats", {})
        hand: list[float] = []
        weft: list[float] = []
        cpu: list[list[float]] = [[], []]
        for _ in range(args.runs):
            hand.append(iperf(v1, v2, "10.99.0.2", args.seconds)["gbps"])
            before = [cpu_seconds(p.pid) for p in procs]
            t0 = time.monotonic()
            weft.append(iperf(c1, c2, "10.32.0.2", args.seconds)["gbps"])
            wall = time.monotonic() - t0
            for i, p in enumerate(procs):
                cpu[i].append((cpu_seconds(p.pid) - before[i]) / wall)
        frames_after = status(u.hosts[0]).get("overlay", {}).get("stats", {})
        rows = status(u.hosts[0]).get("router", {}).get("connections", [])
        results["weft_connection"] = next((r for r in rows if r.get("peer")), None)
    results["vxlan"] = {"gbps": [round(g, 3) for g in hand], "median": statistics.median(hand)}
    results["weft-vxlan"] = {
        "gbps": [round(g, 3) for g in weft],
        "median": statistics.median(weft),
        "router_cpu": [round(statistics.median(c), 3) for c in cpu],
        "sleeve_tap_frames_during": int(frames_after.get("tap_frames_in", 0))
        - int(frames_before.get("tap_frames_in", 0)),
    }
    ratio = results["weft-vxlan"]["median"] / results["vxlan"]["median"]
    results["ratio"] = round(ratio, 4)
    results["target"] = TARGET
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"hand-made vxlan {results['vxlan']['median']:.3f} Gbit/s {results['vxlan']['gbps']}\n"
        f"weft vxlan      {results['weft-vxlan']['median']:.3f} Gbit/s "
        f"{results['weft-vxlan']['gbps']} router cpu {results['weft-vxlan']['router_cpu']}\n"
        f"ratio {ratio:.3f} (target >= {TARGET})",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
