"""Runs inside the test VM (Debian's kernel, openvswitch and esp4 loaded): exercises
weft.fastdp.ovs and the capability probe against the real kernel and prints one JSON object of
findings on the last line; tests/e2e/test_qemu_fastdp.py asserts on it.

Kept as one script so the VM boots once and Python imports (slow under TCG) happen once.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

from weft.fastdp.capabilities import probe_capabilities
from weft.fastdp.ovs import (
    FlowKey,
    OutputAction,
    OvsClient,
    SetTunnelAction,
    TunnelKey,
    Upcall,
    VportType,
    exact_mask,
    pair_vni,
)

DP = "weft-e2e-dp"
results: dict[str, Any] = {}
timings: dict[str, float] = {}


def step(name: str) -> float:
    now = time.monotonic()
    timings[name] = now
    return now


def ovs_checks() -> None:
    client = OvsClient()
    results["upcall_pid"] = client.upcall_pid
    # A datapath left by a "crashed" router is found and removed.
    results["stale_removed_before"] = client.remove_stale(DP)
    dp = client.create_datapath(DP)
    results["dp"] = {"name": dp.name, "ifindex": dp.ifindex, "features": dp.user_features}
    results["dp_found"] = client.find_datapath(DP) is not None
    vx = client.create_vport(dp, VportType.VXLAN, "vxlan-6784", dst_port=6784)
    internal = client.create_vport(dp, VportType.INTERNAL, "wfe2e-int")
    vports = client.list_vports(dp)
    results["vports"] = sorted((v.name, v.type_name, v.dst_port) for v in vports)
    results["vxlan_port_no"] = vx.port_no
    results["internal_port_no"] = internal.port_no

    # Egress: frames from the internal port to a remote MAC are tunnelled to the peer.
    tunnel = TunnelKey(tun_id=pair_vni(1, 2), ipv4_src="10.9.0.1", ipv4_dst="10.9.0.2", ttl=64)
    out_key = FlowKey(
        in_port=internal.port_no, eth_src="02:00:00:00:01:01", eth_dst="02:00:00:00:02:02"
    )
    client.install_flow(dp, out_key, [SetTunnelAction(tunnel), OutputAction(vx.port_no)])
    # Ingress: what arrives from the peer's tunnel goes to the internal port.
    in_key = FlowKey(
        in_port=vx.port_no,
        eth_dst="02:00:00:00:01:01",
        tunnel=TunnelKey(tun_id=pair_vni(2, 1), ipv4_src="10.9.0.2", ipv4_dst="10.9.0.1", ttl=64),
    )
    client.install_flow(dp, in_key, [OutputAction(internal.port_no)])
    # Replacing actions of an identical flow is allowed (no error, still one flow).
    client.install_flow(dp, in_key, [OutputAction(internal.port_no)])
    flows = client.dump_flows(dp)
    results["flow_count"] = len(flows)
    got = client.get_flow(dp, out_key)
    results["get_flow"] = None
    if got is not None:
        results["get_flow"] = {
            "in_port": got.key.in_port,
            "eth_dst": got.key.eth_dst,
            "actions": [repr(a) for a in got.actions],
            "mask_eth_src": got.mask.eth_src if got.mask else None,
        }
    tun_flow = next((f for f in flows if f.key.tunnel is not None), None)
    results["tunnel_flow"] = None
    if tun_flow is not None and tun_flow.key.tunnel is not None:
        results["tunnel_flow"] = {
            "tun_id": tun_flow.key.tunnel.tun_id,
            "src": tun_flow.key.tunnel.ipv4_src,
            "dst": tun_flow.key.tunnel.ipv4_dst,
        }
    results["expected_mask_in_port"] = exact_mask(out_key).in_port

    # Miss upcall: a frame entering the internal port with no matching flow comes up to us.
    subprocess.run(["ip", "link", "set", "wfe2e-int", "up"], check=True)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind(("wfe2e-int", 0))
    frame = bytes.fromhex("ffffffffffff02000000030388b5") + b"weft-miss".ljust(50, b"\0")
    sock.send(frame)
    sock.close()
    upcalls: list[Upcall] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not upcalls:
        upcalls = [u for u in client.receive_upcalls() if u.packet[:14] == frame[:14]]
        if not upcalls:
            time.sleep(0.05)
    results["upcall"] = None
    if upcalls:
        up = upcalls[0]
        results["upcall"] = {
            "miss": up.is_miss,
            "in_port": up.key.in_port,
            "eth_src": up.key.eth_src,
            "ethertype": up.key.ethertype,
            "len": len(up.packet),
        }
    # Packet execute: send the frame out of the vxlan vport with tunnel metadata (as a
    # fast-path heartbeat would). Success means the kernel accepted key and actions.
    client.execute(dp, frame, [SetTunnelAction(tunnel), OutputAction(vx.port_no)])
    results["execute_ok"] = True

    results["deleted_flow"] = client.delete_flow(dp, in_key)
    results["flows_after_delete"] = len(client.dump_flows(dp))
    client.flush_flows(dp)
    results["flows_after_flush"] = len(client.dump_flows(dp))
    results["dp_stats_flows"] = next(
        (d.flows for d in client.list_datapaths() if d.name == DP), None
    )
    # Errors name the operation.
    try:
        client.create_datapath(DP)
        results["duplicate_error"] = None
    except Exception as err:
        results["duplicate_error"] = str(err)
    results["deleted"] = client.delete_datapath(DP)
    results["found_after_delete"] = client.find_datapath(DP) is not None
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    results["devices_left"] = [n for n in (DP, "vxlan-6784", "wfe2e-int") if n in links]
    # Stale cleanup: a datapath left behind by a client that "crashed".
    crashed = OvsClient()
    crashed.create_datapath(DP)
    crashed.close()
    fresh = OvsClient()
    results["stale_removed"] = fresh.remove_stale(DP)
    fresh.close()
    client.close()


def main() -> None:
    t0 = step("start")
    try:
        results["capabilities"] = probe_capabilities().status()
        step("capabilities")
        ovs_checks()
        step("ovs")
    except Exception:
        results["error"] = traceback.format_exc()
    results["seconds"] = {k: round(v - t0, 2) for k, v in timings.items()}
    print(json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
