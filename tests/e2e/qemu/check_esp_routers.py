"""Runs inside the test VM (Debian's kernel: esp4, vxlan): two hosts (network namespaces) run
real weft routers with the same password and ``--datapath vxlan`` (forced: where the kernel has
openvswitch, and asking for its genl family loads it, ``auto`` prefers the OVS part, which
tests/e2e/test_qemu_ovs_routers.py covers), one container each. Prints one
JSON object of findings on the last line; tests/e2e/test_qemu_esp_routers.py asserts on it.

A packet capture on host 2's underlay interface runs from before the routers start until they
stop: it must see ESP and never plain UDP 6784 nor the pings' marker payload.

Python is slow under TCG: every wait is bounded by a condition with a generous timeout.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.e2e.qemu import vm_hosts  # noqa: E402
from tests.e2e.qemu.vm_hosts import api, connection, on_datapath  # noqa: E402
from tests.integ.hosts import Host, Underlay  # noqa: E402

PASSWORD = "qemu-esp-routers"
ENV = {
    "WEFT_PASSWORD": PASSWORD,
    "WEFT_FASTDP_HEARTBEAT": "0.5,2,12",  # an emulated VM on a loaded host stalls for seconds
    "WEFT_FASTDP_RECOVERY_HOLD": "0.5",
    "PYTHONPATH": str(REPO),
}
MARKER = "5745465445535021"  # "WEFTESP!" as ping's payload pattern
MARKER_BYTES = bytes.fromhex(MARKER)


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return vm_hosts.wait(predicate, timeout, what, interval=0.5)


def on_esp_vxlan(host: Host, nick: str) -> bool:
    return on_datapath(host, nick, "vxlan", encrypted=True)


def xfrm(host: Host) -> dict[str, int]:
    state = host.exec("ip", "xfrm", "state", check=False).stdout
    policy = host.exec("ip", "xfrm", "policy", check=False).stdout
    return {
        "states": sum(1 for line in state.splitlines() if line.startswith("src ")),
        "policies": sum(1 for line in policy.splitlines() if line.startswith("src ")),
    }


def ping(ns: str, ip: str, *extra: str) -> int:
    cmd = ["ip", "netns", "exec", ns, "ping", "-c", "3", "-W", "3", "-p", MARKER, *extra, ip]
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode


def parse_pcap(path: Path) -> dict[str, int]:
    """Count ESP, plain UDP 6784 and frames holding the marker in a pcap (Ethernet)."""
    data = path.read_bytes() if path.exists() else b""
    out = {"frames": 0, "esp": 0, "plain_udp_6784": 0, "marker": 0}
    if len(data) < 24:
        return out
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    pos = 24
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from(f"{endian}IIII", data, pos)
        frame = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        out["frames"] += 1
        if MARKER_BYTES in frame:
            out["marker"] += 1
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        proto, ihl = frame[23], (frame[14] & 0x0F) * 4
        if proto == 50:
            out["esp"] += 1
        elif proto == 17 and struct.unpack_from("!H", frame, 14 + ihl + 2)[0] == 6784:
            out["plain_udp_6784"] += 1
    return out


def start_router(host: Host, i: int, peer_ip: str) -> None:
    vm_hosts.start_router(host, i, peer_ip, datapath="vxlan", env=ENV, heartbeat=("2", "60"))


def run(results: dict[str, Any]) -> None:
    u = Underlay(2, net=84, base_dir=Path("/tmp/wfesp"))
    h1, h2 = u.hosts
    capture: subprocess.Popen[bytes] | None = None
    pcap = u.base_dir / "underlay.pcap"
    try:
        # The capture runs before the routers exist: nothing plain may ever cross.
        capture = subprocess.Popen(
            ["ip", "netns", "exec", h2.ns, "tcpdump", "-i", "eth0", "-n", "-U", "-s", "256",
             "-w", str(pcap), "udp port 6784 or ip proto 50"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert capture.stderr is not None
        err_fd = capture.stderr.fileno()
        wait(lambda: b"listening" in os.read(err_fd, 4096), 60, "tcpdump")
        for i, host in enumerate(u.hosts, 1):
            start_router(host, i, (h2 if host is h1 else h1).ip)
        containers = vm_hosts.attach_containers(
            u.hosts, "10.32.84", up_timeout=300, attach_timeout=120, interval=0.5
        )
        results["t_routers_up"] = round(time.monotonic() - results["t0"], 1)
        wait(lambda: on_esp_vxlan(h1, "h2") and on_esp_vxlan(h2, "h1"), 240, "vxlan over ESP")
        results["t_on_vxlan"] = round(time.monotonic() - results["t0"], 1)
        results["row_1"] = connection(h1, "h2")
        results["row_2"] = connection(h2, "h1")
        overlay = api(h1, "/status").get("overlay", {}).get("switch", {})
        results["vxlan_status_1"] = overlay.get("vxlan")
        results["xfrm_up"] = {"1": xfrm(h1), "2": xfrm(h2)}
        results["guard_1"] = h1.exec("nft", "list", "table", "inet", "weft-esp", check=False).stdout
        (c1, _), (c2, ip2) = containers
        results["ping"] = wait(lambda: ping(c1, ip2) == 0, 60, "containers ping") and 0
        results["ping_full_size"] = ping(c1, ip2, "-s", "1348", "-M", "do")
        results["ping_back"] = ping(c2, containers[0][1])
        results["row_1_after"] = connection(h1, "h2")
        for host in u.hosts:
            api(host, "/stop", {})
        for i, host in enumerate(u.hosts, 1):
            for proc in host.procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    results[f"router_{i}_did_not_exit"] = True
        results["xfrm_after_stop"] = {"1": xfrm(h1), "2": xfrm(h2)}
        results["guard_after_stop"] = h1.exec(
            "nft", "list", "table", "inet", "weft-esp", check=False
        ).returncode
        results["vxlan_after_stop"] = h1.exec(
            "ip", "link", "show", "vxlan-weft", check=False
        ).returncode
    finally:
        if capture is not None:
            capture.send_signal(signal.SIGINT)
            try:
                capture.wait(timeout=30)
            except subprocess.TimeoutExpired:
                capture.kill()
        results["wire"] = parse_pcap(pcap)
        for i, host in enumerate(u.hosts, 1):
            log = host.data_dir / "router.log"
            if log.exists():
                results[f"log_{i}"] = log.read_text(errors="replace")[-4000:]
        u.close()


def main() -> None:
    results: dict[str, Any] = {"t0": time.monotonic()}
    try:
        run(results)
    except BaseException as err:
        results["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    results["seconds"] = round(time.monotonic() - results.pop("t0"), 1)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
