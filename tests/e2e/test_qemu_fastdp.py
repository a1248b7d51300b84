"""Kernel datapaths on Debian's own kernel (openvswitch, vxlan, esp4) booted in qemu.

One VM boot for the whole module: tests/e2e/qemu/check_ovs.py runs inside and reports JSON;
the tests below assert on it. Skipped where qemu, the kernel package or busybox are missing.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.qemu.harness import run_check, vm_marks

pytestmark = vm_marks()


@pytest.fixture(scope="module")
def vm() -> dict[str, Any]:
    report, result = run_check("check_ovs.py")
    report["boot_seconds"] = result.seconds
    print(f"VM run took {result.seconds:.1f}s; inside: {report.get('seconds')}")
    assert "error" not in report, report["error"]
    return report


def test_capabilities_report_openvswitch_vxlan_and_esp(vm: dict[str, Any]) -> None:
    caps = vm["capabilities"]
    assert caps["openvswitch"]["available"], caps["openvswitch"]["detail"]
    assert caps["esp"]["available"], caps["esp"]["detail"]
    assert caps["vxlan"]["available"]
    assert caps["fast_datapaths"] == ["ovs", "vxlan"]


def test_datapath_and_vports(vm: dict[str, Any]) -> None:
    assert vm["dp"]["name"] == "weft-e2e-dp" and vm["dp"]["features"] == 3
    assert vm["dp_found"]
    assert sorted(map(tuple, vm["vports"])) == [
        ("vxlan-6784", "vxlan", 6784),
        ("weft-e2e-dp", "internal", None),  # the datapath's local port
        ("wfe2e-int", "internal", None),
    ]


def test_flows_install_and_read_back(vm: dict[str, Any]) -> None:
    assert vm["flow_count"] == 2  # re-installing an identical flow replaced it
    got = vm["get_flow"]
    assert got["in_port"] == vm["internal_port_no"]
    assert got["eth_dst"] == "02:00:00:00:02:02"
    assert got["actions"][0].startswith("SetTunnelAction(tunnel=TunnelKey(tun_id=8193")
    assert got["actions"][1] == f"OutputAction(port={vm['vxlan_port_no']})"
    assert vm["tunnel_flow"] == {"tun_id": 0x1002, "src": "10.9.0.2", "dst": "10.9.0.1"}


def test_miss_upcall_and_execute(vm: dict[str, Any]) -> None:
    up = vm["upcall"]
    assert up is not None, "no miss upcall arrived"
    assert up["miss"] and up["in_port"] == vm["internal_port_no"]
    assert up["eth_src"] == "02:00:00:00:03:03" and up["ethertype"] == 0x88B5
    assert vm["execute_ok"]


def test_delete_flush_errors_and_stale_cleanup(vm: dict[str, Any]) -> None:
    assert vm["deleted_flow"] and vm["flows_after_delete"] == 1
    assert vm["flows_after_flush"] == 0 and vm["dp_stats_flows"] == 0
    assert vm["duplicate_error"] == "create OVS datapath weft-e2e-dp: File exists (EEXIST)"
    assert vm["deleted"] and not vm["found_after_delete"] and vm["devices_left"] == []
    assert vm["stale_removed"]


def test_containers_ping_over_ovs_tunnels_decided_by_the_planner(vm: dict[str, Any]) -> None:
    assert vm["mesh_ping"] == 0, vm["mesh_status"]
    assert vm["mesh_ping_full_mtu"] == 0  # 1450-byte DF packets cross the tunnel
    c1, c2 = "0a:00:00:00:00:01", "0a:00:00:00:00:02"
    flows1, flows2 = vm["mesh_flows"]["1"], vm["mesh_flows"]["2"]
    # h1: container 1 -> tunnel (in port 2 = bridge), and from h2's tunnel (VNI 2 | 1 << 12).
    assert any(f.startswith(f"in=2 {c1}>{c2} tun=None") for f in flows1)
    assert any(f.startswith(f"in=1 {c2}>{c1} tun={0x1002}") for f in flows1)
    assert any(f.startswith(f"in=1 {c1}>{c2} tun={0x2001}") for f in flows2)
    unicast = [f for f in flows1 + flows2 if f"{c1}>{c2}" in f or f"{c2}>{c1}" in f]
    assert all(not f.endswith("pk=0") for f in unicast)  # the pings went through them
    assert vm["mesh_macs"]["1"][c2] == "02:00:00:00:00:02"
    assert vm["mesh_macs"]["2"][c1] == "02:00:00:00:00:01"


def test_full_size_heartbeat_probe_crosses_the_ovs_tunnel(vm: dict[str, Any]) -> None:
    # Host 2 got the 1464-byte probe as a miss on its vxlan port, no flow installed for it.
    assert vm["mesh_probes"] == [[2, 1464]]
    status = vm["mesh_status"]["2"]
    assert status["probes_received"] == 1 and status["errors"] == 0, status
    assert status["flows"] and status["flows"] >= 2 and status["mtu"] == 1450


def test_ovs_datapath_start_and_stop(vm: dict[str, Any]) -> None:
    assert vm["mesh_mtu_1"] == vm["mesh_mtu_2"] == 1450
    # stop() removed the datapath, its vports and the veth pair into the bridge.
    for name in ("weft-dp", "vxlan-6784", "vethwe-b", "vethwe-dp"):
        assert name not in vm["mesh_left"]


def test_esp_wire_carries_only_esp_and_the_mtu_shrinks(vm: dict[str, Any]) -> None:
    assert vm["esp_ping"] == 0
    wire = vm["esp_wire"]
    assert wire["esp"] > 0 and wire["plain_vxlan"] == 0, wire
    # With ESP the 1450-byte probe cannot cross (DF); 1450 - ESP_OVERHEAD does.
    assert vm["esp_probes"] == [[2, 1410 + 14]]
    assert vm["esp_state_after_remove_1"] == "" and vm["esp_state_after_remove_2"] == ""
    assert vm["esp_stale_removed"] == [2, 2]  # inbound + outbound SA, in + out policy


def test_ovs_host_and_linux_vxlan_host_interoperate(vm: dict[str, Any]) -> None:
    assert vm["interop_mtu"] == 1450
    assert vm["interop_ping"] == 0 and vm["interop_ping_full_mtu"] == 0
    assert vm["interop_probe_to_linux"] and vm["interop_probe_to_ovs"]
    assert vm["interop_probes_at_linux"] == [[7, 1464]]  # via the packet socket on vxlan-weft
    assert vm["interop_probes_at_ovs"] == [[1, 1464]]  # as a heartbeat miss at host 1


def test_stale_datapath_removed_where_no_ovs_part_starts(vm: dict[str, Any]) -> None:
    assert vm["stale_part_removed"] == ["weft-dp", "vethwe-b"]
    assert not vm["stale_part_left"]
    assert vm["stale_part_links"] == ["lo", "weft"]  # the veth pair went with vethwe-b
    assert vm["stale_part_again"] == []  # nothing left to find
