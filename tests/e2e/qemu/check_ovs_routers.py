"""Runs inside the test VM (Debian's kernel with openvswitch): two hosts (network namespaces)
running real weft routers with ``--datapath auto``, a container each. Prints one JSON object of
findings on the last line; tests/e2e/test_qemu_ovs_routers.py asserts on it.

Steps: the connection reaches datapath "ovs" (API and ``weft status connections``); the
containers ping each other (also full-size with DF) with flows in both datapaths (dumped with
weft.fastdp.ovs); an nftables rule dropping UDP 6784 on h2 moves the connection to sleeve with
the reason shown while a ping keeps answering; removing it moves the connection back to ovs; a
router killed with SIGKILL leaves its datapath behind and the restarted router removes it and
comes back on ovs.

Python under TCG is slow (router start takes seconds): every wait is condition-bounded and
generous. Heartbeats are fast (WEFT_FASTDP_HEARTBEAT) so the fallback takes seconds, with a
timeout long enough that a VM stalled by a loaded host does not flap.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.e2e.qemu import vm_hosts  # noqa: E402
from tests.e2e.qemu.vm_hosts import (  # noqa: E402
    api,
    connection,
    enter_netns,
    on_datapath,
)
from tests.e2e.qemu.vm_hosts import wait as wait_for  # noqa: E402
from tests.integ.hosts import Host, Underlay, run  # noqa: E402

ENV = {
    "WEFT_FASTDP_HEARTBEAT": "0.5,2,12",  # an emulated VM on a loaded host stalls for seconds
    "WEFT_FASTDP_RECOVERY_HOLD": "0.5",
    "PYTHONPATH": str(REPO),
}
NFT_TABLE = "wfovs"
results: dict[str, Any] = {}
marks: dict[str, float] = {}
START = time.monotonic()


def mark(name: str) -> None:
    marks[name] = round(time.monotonic() - START, 1)


def on(host: Host, nick: str, datapath: str) -> bool:
    return on_datapath(host, nick, datapath)


def start_router(host: Host, i: int, peer_ip: str, password: str | None = None) -> None:
    env = {**ENV, "WEFT_PASSWORD": password} if password else ENV
    vm_hosts.start_router(host, i, peer_ip, datapath="auto", env=env, heartbeat=("1", "30"))


def pings(ns: str, ip: str, *extra: str) -> bool:
    cmd = ["ip", "netns", "exec", ns, "ping", "-c1", "-W2", *extra, ip]
    return run(cmd, check=False, timeout=30).returncode == 0


def datapath_flows(ns: str) -> dict[str, Any]:
    """The flows of ``weft-dp`` in ``ns``, dumped with weft's own OVS client."""
    from weft.fastdp.ovs import OvsClient, SetTunnelAction

    enter_netns(ns)
    try:
        client = OvsClient()
        try:
            dp = client.find_datapath("weft-dp")
            if dp is None:
                return {"exists": False, "flows": []}
            vports = sorted(v.name for v in client.list_vports(dp))
            flows = []
            for f in client.dump_flows(dp):
                tun = f.key.tunnel
                flows.append(
                    {
                        "in_port": f.key.in_port,
                        "src": f.key.eth_src,
                        "dst": f.key.eth_dst,
                        "tun_id": tun.tun_id if tun else None,
                        "tun_src": tun.ipv4_src if tun else None,
                        "to_tunnel": [
                            a.tunnel.ipv4_dst for a in f.actions if isinstance(a, SetTunnelAction)
                        ],
                        "actions": len(f.actions),
                        "packets": f.packets,
                    }
                )
            return {"exists": True, "ifindex": dp.ifindex, "vports": vports, "flows": flows}
        finally:
            client.close()
    finally:
        enter_netns("")


def wire_count(ns: str, dev: str, busy: Callable[[], subprocess.Popen[str]]) -> dict[str, int]:
    """What crosses ``dev`` in ``ns`` (both directions) while ``busy()``'s process runs: ESP
    packets and plain UDP to or from port 6784 (VXLAN)."""
    enter_netns(ns)
    try:
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        cap.bind((dev, 0))
    finally:
        enter_netns("")
    counts = {"esp": 0, "plain_vxlan": 0}
    proc = busy()
    try:
        while True:
            ready, _, _ = select.select([cap], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            frame = cap.recv(65536)
            if frame[12:14] != b"\x08\x00":
                continue
            proto, ihl = frame[23], (frame[14] & 0x0F) * 4
            if proto == 50:
                counts["esp"] += 1
            elif proto == 17:
                sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
                if 6784 in (sport, dport):
                    counts["plain_vxlan"] += 1
    finally:
        cap.close()
        proc.communicate(timeout=60)
    return counts


def mac_of(ns: str) -> str:
    return run(["ip", "-n", ns, "-br", "link", "show", "ethwe"]).stdout.split()[2]


def kill_router(host: Host) -> None:
    for proc in host.procs:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    host.procs.clear()


def ping_log(out: str) -> dict[str, Any]:
    answered = [line for line in out.splitlines() if "bytes from" in line]
    seqs = sorted(int(line.split("icmp_seq=")[1].split()[0]) for line in answered)
    gaps = [b - a - 1 for a, b in itertools.pairwise(seqs)]
    # where the longest run of lost pings ends: answers on both sides of it mean the one ping
    # flow kept (or got back) its path through the fallback and the return
    split = max(range(len(gaps)), key=gaps.__getitem__) + 1 if gaps else len(seqs)
    return {
        "answered": len(seqs),
        "last": seqs[-1] if seqs else 0,
        "longest_gap": max(gaps, default=0),
        "answered_before_longest_gap": split,
        "answered_after_longest_gap": len(seqs) - split,
    }


def scenario(u: Underlay) -> None:
    h1, h2 = u.hosts
    start_router(h1, 1, h2.ip)
    start_router(h2, 2, h1.ip)
    containers = vm_hosts.attach_containers(
        u.hosts, "10.32.0", up_timeout=300, attach_timeout=120
    )  # Python under TCG on a loaded host: minutes
    mark("routers_up")
    (c1, ip1), (c2, ip2) = containers
    wait_for(lambda: on(h1, "h2", "ovs") and on(h2, "h1", "ovs"), 120, "h1<->h2 on ovs")
    mark("on_ovs")
    results["row_on_ovs"] = connection(h1, "h2")
    results["status_connections"] = h1.exec(
        sys.executable, "-m", "weft.cli.main", "status", "connections", timeout=60
    ).stdout
    overlay = api(h1, "/status").get("overlay", {})
    results["overlay_datapath"] = overlay.get("datapath")
    results["switch"] = overlay.get("switch", {})

    # Containers ping over the OVS datapath; flows appear in both datapaths.
    wait_for(lambda: pings(c1, ip2), 60, "c1 pings c2")
    results["ping"] = pings(c1, ip2)
    results["ping_full_size_df"] = pings(c1, ip2, "-s", "1348", "-M", "do")
    results["ping_back"] = pings(c2, ip1)
    results["macs"] = {"c1": mac_of(c1), "c2": mac_of(c2)}
    results["flows_h1"] = datapath_flows(h1.ns)
    results["flows_h2"] = datapath_flows(h2.ns)
    results["ovs_status_h1"] = api(h1, "/status").get("overlay", {}).get("switch", {})
    mark("pinged")

    # Block UDP 6784 on h2: the connection moves to sleeve, with the reason; pings go on.
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", c1, "ping", "-i", "0.2", "-W", "2", ip2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1.0)
        h2.sh(
            f"nft add table inet {NFT_TABLE}"
            f" && nft add chain inet {NFT_TABLE} in '{{ type filter hook input priority 0; }}'"
            f" && nft add rule inet {NFT_TABLE} in udp dport 6784 drop"
        )
        mark("blocked")
        try:
            wait_for(
                lambda: on(h1, "h2", "sleeve") and on(h2, "h1", "sleeve"), 90, "h1<->h2 on sleeve"
            )
            mark("on_sleeve")
            results["row_blocked"] = connection(h1, "h2")
            results["row_blocked_h2"] = connection(h2, "h1")
            results["ping_on_sleeve"] = bool(wait_for(lambda: pings(c1, ip2), 60, "sleeve ping"))
            results["fallbacks"] = api(h1, "/status")["overlay"]["switch"].get("fallbacks")
        finally:
            h2.sh(f"nft delete table inet {NFT_TABLE}", check=False)
        mark("unblocked")
        wait_for(lambda: on(h1, "h2", "ovs") and on(h2, "h1", "ovs"), 90, "h1<->h2 back on ovs")
        mark("back_on_ovs")
        results["row_back"] = connection(h1, "h2")
        results["ping_back_on_ovs"] = bool(wait_for(lambda: pings(c1, ip2), 60, "ovs ping"))
        time.sleep(1.0)
    finally:
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=30)
    results["ping_through_fallback"] = ping_log(out)

    # A crashed router leaves its datapath; the restarted one removes it and builds a new one.
    before = datapath_flows(h1.ns)
    kill_router(h1)
    results["left_after_kill"] = datapath_flows(h1.ns)
    results["ifindex_before"] = before.get("ifindex")
    log_before = (h1.data_dir / "router.log").read_text(errors="replace")
    start_router(h1, 1, h2.ip)
    mark("restarted")
    wait_for(lambda: on(h1, "h2", "ovs") and on(h2, "h1", "ovs"), 120, "restarted h1 on ovs")
    mark("restart_on_ovs")
    log_after = (h1.data_dir / "router.log").read_text(errors="replace")[len(log_before) :]
    results["restart_log_stale"] = [
        line for line in log_after.splitlines() if "earlier router left" in line
    ]
    results["after_restart"] = datapath_flows(h1.ns)
    switch = api(h1, "/status").get("overlay", {}).get("switch", {})
    results["ovs_status_after_restart"] = switch
    results["ping_after_restart"] = bool(wait_for(lambda: pings(c1, ip2), 60, "ping after restart"))
    mark("done")
    if os.environ.get("WEFT_E2E_OVS_ESP") == "1":
        encrypted(u, containers)
    else:
        results["esp_skipped"] = "this switch does not build the OVS part with a password"


def encrypted(u: Underlay, containers: list[tuple[str, str]]) -> None:
    """Both routers again, with a password: the connection on ovs runs over ESP; the wire
    between the hosts carries ESP and no plain VXLAN."""
    h1, h2 = u.hosts
    (c1, _), (_, ip2) = containers
    for host in (h1, h2):
        kill_router(host)
    password = "e2e-ovs-esp-password"
    start_router(h1, 1, h2.ip, password)
    start_router(h2, 2, h1.ip, password)
    mark("encrypted_restarted")
    for host in (h1, h2):
        wait_for(partial(api, host, "/status"), 120, "encrypted router up")
    switch = api(h1, "/status").get("overlay", {}).get("switch", {})
    if "ovs" not in switch.get("datapaths", []):
        results["esp_skipped"] = f"no OVS part with a password: {switch.get('note')!r}"
        return
    try:
        wait_for(
            lambda: on(h1, "h2", "ovs") and on(h2, "h1", "ovs"), 150, "encrypted h1<->h2 on ovs"
        )
    except AssertionError:
        results["esp_row"] = connection(h1, "h2")
        results["esp_switch"] = api(h1, "/status").get("overlay", {}).get("switch", {})
        raise
    mark("encrypted_on_ovs")
    results["esp_row"] = connection(h1, "h2")
    results["esp_switch"] = api(h1, "/status").get("overlay", {}).get("switch", {})
    results["esp_ping"] = bool(wait_for(lambda: pings(c1, ip2), 60, "encrypted ping"))
    results["esp_ping_full_size_df"] = pings(c1, ip2, "-s", "1348", "-M", "do")

    def pinging() -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", c1, "ping", "-c", "10", "-i", "0.2", "-W", "2", ip2],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    results["esp_wire"] = wire_count(h1.ns, "eth0", pinging)
    results["esp_flows_h1"] = datapath_flows(h1.ns)
    results["esp_guard"] = h1.exec("nft", "list", "table", "inet", "weft-esp", check=False).stdout
    mark("encrypted_done")


def main() -> None:
    u = Underlay(2, net=66, base_dir=Path("/tmp/weft-ovs-routers"))
    try:
        scenario(u)
    except BaseException:
        results["error"] = traceback.format_exc()
    finally:
        logs = {}
        for host in u.hosts:
            log = host.data_dir / "router.log"
            if log.exists():
                logs[host.ns.rsplit("-", 1)[1]] = log.read_text(errors="replace")[-5000:]
        if "error" in results:
            results["logs"] = logs
        u.close()
    results["marks"] = marks
    results["seconds"] = round(time.monotonic() - START, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
