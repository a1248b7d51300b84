"""Real weft routers on the OVS datapath, in Debian's own kernel booted in qemu.

One VM boot for the module: tests/e2e/qemu/check_ovs_routers.py runs inside (two hosts as
network namespaces, `weft router --datapath auto` each, a container each, openvswitch loaded)
and reports JSON; the tests below assert on it. Skipped where qemu, the kernel package or
busybox are missing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.e2e.qemu.harness import run_check, vm_marks

NETWORK_VNI = 0xFFFFFF

pytestmark = vm_marks()


def switch_builds_ovs_with_a_password() -> bool:
    """Whether ``weft.switch.pump`` builds the OVS part for an encrypted router on a kernel
    with openvswitch and ESP (then the VM also runs the encrypted scenario). Nothing touches
    the kernel: parts start with their first connection."""
    from weft.fastdp.capabilities import Capabilities, Feature
    from weft.fastdp.heartbeat import HeartbeatConfig
    from weft.switch.pump import FastPartContext, _build_fast_parts

    async def build() -> bool:
        yes = Feature(True, "")
        caps = Capabilities(openvswitch=yes, vxlan=yes, esp=yes)
        ctx = FastPartContext(None, "auto", caps, "weft", None, 1376, HeartbeatConfig(), True)
        parts, _ = _build_fast_parts(ctx)
        for part in parts:
            part.close()
        return any(part.name == "ovs" for part in parts)

    return asyncio.run(build())


@pytest.fixture(scope="module")
def vm() -> dict[str, Any]:
    esp = switch_builds_ovs_with_a_password()
    report, result = run_check(
        "check_ovs_routers.py",
        modules=("openvswitch", "vxlan", "esp4", "xfrm_user", "bridge", "veth", "tun", "nf_tables"),
        env={"WEFT_E2E_OVS_ESP": "1" if esp else "0"},
        memory_mb=1536,
    )
    print(f"VM run took {result.seconds:.1f}s; inside: {report.get('seconds')}s {report['marks']}")
    if "error" in report:
        logs = "\n".join(f"--- {h} ---\n{text}" for h, text in report.get("logs", {}).items())
        raise AssertionError(f"{report['error']}\n{logs}")
    return report


def test_the_connection_reaches_the_ovs_datapath(vm: dict[str, Any]) -> None:
    row = vm["row_on_ovs"]
    assert row["datapath"] == "ovs" and row["state"] == "established", row
    assert row["mtu"] == 1450 and row["info"] == ""
    lines = [line for line in vm["status_connections"].splitlines() if "h2" in line]
    assert len(lines) == 1 and "ovs" in lines[0], vm["status_connections"]
    switch = vm["switch"]
    assert vm["overlay_datapath"] == "auto"
    assert switch["datapaths"] == ["ovs", "sleeve"]  # one datapath on UDP 6784: no vxlan
    assert switch["capabilities"]["openvswitch"]["available"]
    ovs = switch["ovs"]
    assert ovs["datapath"] == "weft-dp" and ovs["mtu"] == 1450 and ovs["problem"] == ""
    assert ovs["vni"] == NETWORK_VNI and ovs["port"] == 6784


def test_containers_ping_over_ovs_with_flows_in_the_datapath(vm: dict[str, Any]) -> None:
    assert vm["ping"] and vm["ping_back"]
    assert vm["ping_full_size_df"]  # 1376-byte IP packets with DF (the container MTU)
    c1, c2 = vm["macs"]["c1"], vm["macs"]["c2"]
    for host, src, dst, peer_ip in (("h1", c1, c2, "192.168.66.2"), ("h2", c2, c1, "192.168.66.1")):
        dump = vm[f"flows_{host}"]
        assert dump["exists"] and dump["vports"] == ["vethwe-dp", "vxlan-6784", "weft-dp"]
        flows = dump["flows"]
        outbound = [f for f in flows if f["src"] == src and f["dst"] == dst and f["tun_id"] is None]
        inbound = [f for f in flows if f["src"] == dst and f["dst"] == src and f["tun_id"]]
        # Towards the other container: into the tunnel to that host only (its MAC is known).
        assert outbound and outbound[0]["to_tunnel"] == [peer_ip], flows
        assert inbound and inbound[0]["tun_id"] == NETWORK_VNI, flows
        assert inbound[0]["tun_src"] == peer_ip
        assert outbound[0]["packets"] > 0 and inbound[0]["packets"] > 0, flows
    kernel = vm["ovs_status_h1"]["ovs"]["kernel"]
    assert kernel["upcalls"] > 0 and kernel["probes_received"] > 0 and kernel["errors"] == 0


def test_blocking_udp_6784_falls_back_to_sleeve_and_returns(vm: dict[str, Any]) -> None:
    row, other = vm["row_blocked"], vm["row_blocked_h2"]
    assert row["datapath"] == "sleeve" and other["datapath"] == "sleeve"
    info = row["info"] + " | " + other["info"]
    assert "ovs:" in info and "using sleeve" in info, info
    assert "6784" in info, info
    assert vm["ping_on_sleeve"]
    assert vm["fallbacks"].get("ovs->sleeve", 0) >= 1
    back = vm["row_back"]
    assert back["datapath"] == "ovs" and back["info"] == "" and vm["ping_back_on_ovs"]
    pings = vm["ping_through_fallback"]
    print(f"pings through the fallback: {pings}")
    # Traffic kept flowing: the one ping flow was answered before its longest gap and after it
    # (how long the gap is depends on the emulated VM's load: a figure, printed above).
    assert pings["answered_before_longest_gap"] > 0, pings
    assert pings["answered_after_longest_gap"] > 0, pings


def test_a_restarted_router_removes_the_stale_datapath(vm: dict[str, Any]) -> None:
    left = vm["left_after_kill"]
    assert left["exists"], "SIGKILL should leave the datapath behind"
    assert vm["restart_log_stale"], "the restarted router did not say it cleaned up"
    assert "weft-dp" in vm["restart_log_stale"][0] and "vethwe-b" in vm["restart_log_stale"][0]
    ovs = vm["ovs_status_after_restart"]["ovs"]
    assert ovs["stale_removed"] == ["weft-dp", "vethwe-b"]
    after = vm["after_restart"]
    assert after["exists"] and after["ifindex"] != vm["ifindex_before"]
    assert vm["ping_after_restart"]


def test_with_a_password_the_ovs_wire_carries_only_esp(vm: dict[str, Any]) -> None:
    if "esp_skipped" in vm:
        pytest.skip(vm["esp_skipped"])
    row = vm["esp_row"]
    assert row["datapath"] == "ovs" and row["state"] == "established", row
    assert row["data_encrypted"] is True
    assert row["mtu"] == 1410  # 1500 - 50 (VXLAN) - 40 (ESP)
    ovs = vm["esp_switch"]["ovs"]
    assert ovs["encrypted"] and ovs["esp"]["fatal"] == "" and ovs["esp"]["error"] == ""
    link = next(iter(ovs["esp"]["links"].values()))
    assert link["in_spi"] and link["out_spi"] and link["installs"] >= 1
    assert vm["esp_ping"] and vm["esp_ping_full_size_df"]
    wire = vm["esp_wire"]
    assert wire["esp"] >= 20 and wire["plain_vxlan"] == 0, wire  # 10 pings, both ways
    guard = vm["esp_guard"]  # plain VXLAN is dropped
    assert "udp dport 6784" in guard and "ipsec missing" in guard and "drop" in guard, guard
    flows = vm["esp_flows_h1"]["flows"]
    assert any(f["tun_id"] == NETWORK_VNI and f["packets"] > 0 for f in flows), flows
