"""Runs inside the test VM (Debian's kernel, openvswitch and esp4 loaded): exercises
weft.fastdp.ovs and the capability probe against the real kernel and prints one JSON object of
findings on the last line; tests/e2e/test_qemu_fastdp.py asserts on it.

Kept as one script so the VM boots once and Python imports (slow under TCG) happen once.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from tests.e2e.qemu.vm_hosts import enter_netns
from weft.fastdp.capabilities import probe_capabilities
from weft.fastdp.esp import ESP_OVERHEAD, EspPair, XfrmClient, esp_key
from weft.fastdp.heartbeat import decode_probe, encode_probe
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
    resolve_families,
)
from weft.fastdp.ovs_datapath import OvsConfig, OvsDatapath
from weft.fastdp.ovs_flows import OvsPeer
from weft.fastdp.vxlan import NETWORK_VNI, HeartbeatSocket, VxlanConfig, VxlanDatapath
from weft.gossip.peer import PeerName

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


def sh(script: str) -> None:
    subprocess.run(["sh", "-ec", script], check=True)


def two_hosts() -> None:
    """Two hosts (netns) on a veth underlay, a container each on bridge weft, and the OVS
    datapath of each built by OvsDatapath, whose flows come from miss upcalls."""
    sh(
        """
        for h in 1 2; do ip netns add h$h; ip netns add c$h; done
        ip link add u1 netns h1 type veth peer name u2 netns h2
        for h in 1 2; do
          ip -n h$h link set lo up; ip -n c$h link set lo up
          ip -n h$h addr add 192.168.5.$h/24 dev u$h; ip -n h$h link set u$h up
          ip -n h$h link add weft type bridge; ip -n h$h link set weft up
          ip -n h$h link add ve$h type veth peer name ethwe netns c$h
          ip -n h$h link set ve$h master weft mtu 1450 up
          ip -n c$h link set ethwe mtu 1450 address 0a:00:00:00:00:0$h up
          ip -n c$h addr add 10.40.0.$h/24 dev ethwe
        done
        """
    )
    from pyroute2 import NetNS

    families = resolve_families()
    names = {1: PeerName.parse("02:00:00:00:00:01"), 2: PeerName.parse("02:00:00:00:00:02")}
    ips = {1: "192.168.5.1", 2: "192.168.5.2"}
    hosts: dict[int, OvsDatapath] = {}
    for h in (1, 2):
        enter_netns(f"h{h}")
        client = OvsClient(families)  # its sockets live in h's namespace
        enter_netns("")
        ovs = OvsDatapath(NetNS(f"h{h}"), OvsConfig(), names[h], h, ips[h], client)
        results[f"mesh_mtu_{h}"] = ovs.start()
        ovs.set_peers({names[3 - h]: OvsPeer(ips[3 - h], 3 - h, carrying=True)})
        hosts[h] = ovs
    heartbeats: list[tuple[int, int]] = []

    def pump(timeout: float) -> None:
        ready, _, _ = select.select(list(hosts.values()), [], [], timeout)
        for h, ovs in hosts.items():
            if ovs in ready:
                heartbeats.extend((h, p.size) for p in ovs.handle_upcalls())

    def run_while_pumping(args: list[str], limit: float = 60) -> int:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + limit
        while proc.poll() is None and time.monotonic() < deadline:
            pump(0.05)
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def probes(frames: list[bytes]) -> list[tuple[int, int]]:
        before = len(heartbeats)
        for frame in frames:
            hosts[1].send_probe(names[2], frame)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pump(0.1)
        return heartbeats[before:]

    ping = ["ip", "netns", "exec", "c1", "ping", "-c", "3", "-W", "3", "10.40.0.2"]
    big = ["ip", "netns", "exec", "c2", "ping", "-c", "2", "-W", "3", "-M", "do", "-s", "1422"]
    results["mesh_ping"] = run_while_pumping(ping)
    results["mesh_ping_full_mtu"] = run_while_pumping([*big, "10.40.0.1"])
    # A fast-path heartbeat probe: a full-size frame through h1's tunnel towards h2.
    results["mesh_probes"] = probes([encode_probe(names[1], names[2], 1, 1450 + 14)])
    results["mesh_status"] = {h: ovs.status() for h, ovs in hosts.items()}
    results["mesh_flows"] = {
        h: sorted(
            f"in={f.key.in_port} {f.key.eth_src}>{f.key.eth_dst} "
            f"tun={f.key.tunnel.tun_id if f.key.tunnel else None} pk={f.packets}"
            for f in ovs.client.dump_flows(ovs.client.find_datapath("weft-dp"))  # type: ignore[arg-type]
        )
        for h, ovs in hosts.items()
    }
    results["mesh_macs"] = {
        h: {m: str(w) for m, w in (ovs.planner.macs if ovs.planner else {}).items()}
        for h, ovs in hosts.items()
    }
    esp_checks(names, ips, lambda: run_while_pumping(ping), probes)
    # Interop: h2 switches to the Linux VXLAN datapath; h1 keeps OVS with the network VNI.
    hosts.pop(2).stop()
    vx = VxlanDatapath(NetNS("h2"), VxlanConfig(local_ip=ips[2]), names[2])
    results["interop_mtu"] = vx.start()
    vx.peer_started(names[1], ips[1])
    vx.peer_carrying(names[1], True)
    vx.macs_changed({"0a:00:00:00:00:01": names[1]})
    hosts[1].set_peers({names[2]: OvsPeer(ips[2], 2, carrying=True, vni=NETWORK_VNI)})
    enter_netns("h2")
    hb_sock = HeartbeatSocket("vxlan-weft")
    enter_netns("")
    results["interop_ping"] = run_while_pumping(ping)
    results["interop_ping_full_mtu"] = run_while_pumping([*big, "10.40.0.1"])
    # Heartbeats both ways: OVS -> Linux (packet socket), Linux -> OVS (miss upcall).
    results["interop_probe_to_linux"] = hosts[1].send_probe(
        names[2], encode_probe(names[1], names[2], 7, 1450 + 14)
    )
    results["interop_probe_to_ovs"] = hb_sock.send(encode_probe(names[2], names[1], 8, 1450 + 14))
    got_linux: list[list[int]] = []
    before = len(heartbeats)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (got_linux and len(heartbeats) > before):
        pump(0.1)
        for frame in hb_sock.receive():
            p = decode_probe(frame, names[2])
            if p is not None:
                got_linux.append([p.seq, p.size])
    results["interop_probes_at_linux"] = got_linux
    results["interop_probes_at_ovs"] = heartbeats[before:]
    hb_sock.close()
    vx.stop()
    for ovs in hosts.values():
        ovs.stop()
        ovs.client.close()
    results["mesh_left"] = subprocess.run(
        ["ip", "-n", "h1", "-br", "link"], capture_output=True, text=True
    ).stdout


def esp_checks(
    names: dict[int, PeerName],
    ips: dict[int, str],
    ping: Callable[[], int],
    probes: Callable[[list[bytes]], list[tuple[int, int]]],
) -> None:
    """With ESP between the hosts, the underlay carries ESP and no plain UDP 6784."""
    xfrm = {}
    spis = {}
    for h in (1, 2):
        enter_netns(f"h{h}")
        xfrm[h] = XfrmClient()
        xfrm[h].remove_stale()
        spis[h] = xfrm[h].alloc_spi(ips[h], ips[3 - h])  # exchanged over control in weft
    enter_netns("")
    data_key = {1: os.urandom(32), 2: os.urandom(32)}  # h's send key = the other's recv key
    for h in (1, 2):
        o = 3 - h
        pair = EspPair(ips[h], ips[o], in_spi=spis[h], out_spi=spis[o])
        xfrm[h].install(pair, send_key=esp_key(data_key[h]), recv_key=esp_key(data_key[o]))
    enter_netns("h2")
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    cap.bind(("u2", 0))
    cap.setblocking(False)
    enter_netns("")
    results["esp_ping"] = ping()
    # Full-size probes: 1450 no longer fits with ESP (DF), 1450 - ESP_OVERHEAD does.
    results["esp_probes"] = probes(
        [
            encode_probe(names[1], names[2], 2, 1450 + 14),
            encode_probe(names[1], names[2], 3, 1450 - ESP_OVERHEAD + 14),
        ]
    )
    esp = plain = 0
    while True:
        try:
            frame = cap.recv(65536)
        except BlockingIOError:
            break
        if frame[12:14] != b"\x08\x00":
            continue
        proto = frame[23]
        ihl = (frame[14] & 0x0F) * 4
        if proto == 50:
            esp += 1
        elif proto == 17 and struct.unpack_from("!H", frame, 14 + ihl + 2)[0] == 6784:
            plain += 1
    cap.close()
    results["esp_wire"] = {"esp": esp, "plain_vxlan": plain}
    for h in (1, 2):
        o = 3 - h
        enter_netns(f"h{h}")
        xfrm[h].remove(EspPair(ips[h], ips[o], in_spi=spis[h], out_spi=spis[o]))
        results[f"esp_state_after_remove_{h}"] = (
            subprocess.run(["ip", "xfrm", "state"], capture_output=True, text=True).stdout
            + subprocess.run(["ip", "xfrm", "policy"], capture_output=True, text=True).stdout
        )
    # Stale cleanup: install again, then a fresh client removes everything of ours.
    enter_netns("h1")
    spi = xfrm[1].alloc_spi(ips[1], ips[2])
    xfrm[1].install(EspPair(ips[1], ips[2], spi, 0x4242), esp_key(b"a" * 32), esp_key(b"b" * 32))
    fresh = XfrmClient()
    results["esp_stale_removed"] = list(fresh.remove_stale())
    fresh.close()
    enter_netns("")
    for c in xfrm.values():
        c.close()


def stale_cleanup_without_the_part() -> None:
    """What a router that starts no OVS part (password, --datapath vxlan) does at start: a
    datapath and veth left by an earlier router are removed (weft.fastdp.ovs_part)."""
    from weft.fastdp.ovs_part import remove_stale_ovs

    sh(
        """
        ip netns add stale
        ip -n stale link add weft type bridge
        ip -n stale link add vethwe-b type veth peer name vethwe-dp
        ip -n stale link set vethwe-b master weft
        """
    )
    enter_netns("stale")
    try:
        client = OvsClient()
        dp = client.create_datapath("weft-dp")
        client.create_vport(dp, VportType.NETDEV, "vethwe-dp")
        client.close()
        results["stale_part_removed"] = remove_stale_ovs(OvsConfig(bridge="weft"))
        client = OvsClient()
        results["stale_part_left"] = client.find_datapath("weft-dp") is not None
        client.close()
        links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        results["stale_part_links"] = sorted(
            line.split("@")[0].split()[0] for line in links.splitlines()
        )
        results["stale_part_again"] = remove_stale_ovs(OvsConfig(bridge="weft"))
    finally:
        enter_netns("")
        subprocess.run(["ip", "netns", "del", "stale"], check=False)


def main() -> None:
    t0 = step("start")
    try:
        results["capabilities"] = probe_capabilities().status()
        step("capabilities")
        ovs_checks()
        step("ovs")
        two_hosts()
        step("two_hosts")
        stale_cleanup_without_the_part()
        step("stale_cleanup")
    except Exception:
        results["error"] = traceback.format_exc()
    results["seconds"] = {k: round(v - t0, 2) for k, v in timings.items()}
    print(json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
