"""Encrypted fast datapath end to end: two real weft routers with a password on Debian's own
kernel (esp4, vxlan) booted in qemu.

One VM boot for the module: tests/e2e/qemu/check_esp_routers.py runs inside (two hosts as network
namespaces, a container each) and reports JSON; the tests below assert on
it. ``--datapath vxlan`` is forced (``auto`` would prefer OVS where the kernel loads it). Shown:
the connection runs on vxlan with ESP (encrypted, MTU 1410, info names ESP), the
containers ping (also full-size with DF), a capture on the underlay from before the routers start
until they stop sees ESP and never plain UDP 6784 or the pings' payload, and stopping the
routers leaves no xfrm state, policy, guard table or vxlan device. Skipped where qemu, the
kernel package or busybox are missing.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.qemu.harness import run_check, vm_marks

# openvswitch is not needed here; tun for the sleeve.
MODULES = ("vxlan", "esp4", "xfrm_user", "bridge", "veth", "tun", "nf_tables")

pytestmark = vm_marks()


@pytest.fixture(scope="module")
def vm() -> dict[str, Any]:
    report, result = run_check("check_esp_routers.py", modules=MODULES, memory_mb=1536)
    print(
        f"VM run took {result.seconds:.1f}s; inside: {report.get('seconds')}s, routers up at "
        f"{report.get('t_routers_up')}s, on vxlan+ESP at {report.get('t_on_vxlan')}s; "
        f"underlay capture {report.get('wire')}"
    )
    if "error" in report:
        logs = "\n".join(f"--- h{i} ---\n{report.get(f'log_{i}', '')}" for i in (1, 2))
        pytest.fail(f"{report['error']}\n{logs}")
    return report


def test_the_connection_runs_on_vxlan_over_esp(vm: dict[str, Any]) -> None:
    for key in ("row_1", "row_2"):
        row = vm[key]
        assert row["datapath"] == "vxlan" and row["state"] == "established", row
        assert row["data_encrypted"] is True and row["mtu"] == 1410, row
        assert "ESP" in row["info"], row
    status = vm["vxlan_status_1"]
    assert status["encrypted"] is True and status["mtu"] == 1410
    link = next(iter(status["esp"]["links"].values()))
    assert link["installs"] == 1 and link["out_spi"] and not link["failed"], status["esp"]
    # One SA per direction and the in/out policies (plus the kernel's own socket policies: none).
    assert vm["xfrm_up"] == {"1": {"states": 2, "policies": 2}, "2": {"states": 2, "policies": 2}}
    # The strict guard: no plain UDP 6784 from anyone while a password is set.
    assert "udp dport 6784 meta ipsec missing" in vm["guard_1"], vm["guard_1"]
    assert "saddr" not in vm["guard_1"], vm["guard_1"]


def test_containers_ping_over_esp(vm: dict[str, Any]) -> None:
    assert vm["ping"] == 0 and vm["ping_back"] == 0
    assert vm["ping_full_size"] == 0  # 1376-byte DF packets fit the 1410 ESP path
    assert vm["row_1_after"]["datapath"] == "vxlan"


def test_the_underlay_carries_esp_and_nothing_plain(vm: dict[str, Any]) -> None:
    wire = vm["wire"]
    assert wire["esp"] > 0, wire  # heartbeats and pings crossed, encrypted (how many: load)
    assert wire["plain_udp_6784"] == 0, wire
    assert wire["marker"] == 0, wire


def test_stopping_the_routers_removes_esp(vm: dict[str, Any]) -> None:
    assert not vm.get("router_1_did_not_exit") and not vm.get("router_2_did_not_exit")
    assert vm["xfrm_after_stop"] == {
        "1": {"states": 0, "policies": 0},
        "2": {"states": 0, "policies": 0},
    }
    assert vm["guard_after_stop"] != 0  # the nftables table is gone
    assert vm["vxlan_after_stop"] != 0  # and the device
