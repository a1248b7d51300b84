"""The pure FDB planner, the diff and the reconciler against a fake kernel."""

from __future__ import annotations

import errno

import pytest

from weft.errors import ConfigError
from weft.fastdp.errors import DatapathError, wrap_os_error
from weft.fastdp.fdb import (
    ZERO_MAC,
    FastPeer,
    FdbEntry,
    FdbPlanner,
    diff_fdb,
    mac_of_peer,
    normalize_mac,
)
from weft.fastdp.vxlan import FdbReconciler, VxlanConfig, overlay_mtu
from weft.gossip.peer import PeerName

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
C = PeerName.parse("02:00:00:00:00:0c")
D = PeerName.parse("02:00:00:00:00:0d")


def test_carrying_peer_gets_heartbeat_flood_and_mac_entries() -> None:
    plan = FdbPlanner(A).desired(
        {B: FastPeer("192.168.1.2", carrying=True)},
        {"AA:BB:CC:00:00:01": B},
    )
    assert plan == {
        FdbEntry(mac_of_peer(B), "192.168.1.2"),
        FdbEntry(ZERO_MAC, "192.168.1.2"),
        FdbEntry("aa:bb:cc:00:00:01", "192.168.1.2"),
    }


def test_probing_peer_gets_only_its_heartbeat_entry() -> None:
    plan = FdbPlanner(A).desired(
        {B: FastPeer("192.168.1.2", carrying=False)}, {"aa:bb:cc:00:00:01": B}
    )
    assert plan == {FdbEntry(str(B), "192.168.1.2")}


def test_macs_elsewhere_are_left_to_sleeve() -> None:
    planner = FdbPlanner(A)
    plan = planner.desired(
        {B: FastPeer("192.168.1.2", True), C: FastPeer("192.168.1.3", True)},
        {
            "aa:00:00:00:00:01": D,  # D has no direct fast connection: sleeve's
            "aa:00:00:00:00:02": A,  # ours: local, no entry
            "01:00:5e:00:00:01": B,  # multicast: flooded, never pinned
            "not-a-mac": B,
            "aa:00:00:00:00:03": C,
        },
    )
    assert {e.mac for e in plan if not e.is_flood and e.mac not in (str(B), str(C))} == {
        "aa:00:00:00:00:03"
    }
    assert {e.dst for e in plan if e.is_flood} == {"192.168.1.2", "192.168.1.3"}


def test_ourselves_and_bad_ips() -> None:
    planner = FdbPlanner(A)
    assert planner.desired({A: FastPeer("192.168.1.1", True)}, {}) == frozenset()
    with pytest.raises(ConfigError, match="not an IPv4"):
        planner.desired({B: FastPeer("not-ip", True)}, {})


def test_two_peers_sharing_an_ip_for_one_mac_is_refused() -> None:
    # Peer names are distinct MACs, so the only way to pin one MAC to two IPs is a MAC located
    # at a peer whose name equals another's MAC — refused rather than resolved arbitrarily.
    with pytest.raises(ConfigError, match="forwarded to both"):
        FdbPlanner(A).desired(
            {B: FastPeer("192.168.1.2", True), C: FastPeer("192.168.1.3", True)},
            {str(B): C},
        )


def test_diff_is_sorted_and_minimal() -> None:
    cur = {FdbEntry(ZERO_MAC, "10.0.0.2"), FdbEntry("aa:00:00:00:00:01", "10.0.0.2")}
    want = {FdbEntry(ZERO_MAC, "10.0.0.3"), FdbEntry("aa:00:00:00:00:01", "10.0.0.3")}
    d = diff_fdb(cur, want)
    assert d.remove == tuple(sorted(cur))
    assert d.add == tuple(sorted(want))
    assert diff_fdb(want, want).empty


class FakeKernel:
    def __init__(self) -> None:
        self.entries: set[FdbEntry] = set()
        self.log: list[str] = []
        self.fail_on: FdbEntry | None = None

    def fdb_entries(self) -> frozenset[FdbEntry]:
        return frozenset(self.entries)

    def fdb_add(self, entry: FdbEntry) -> None:
        if entry == self.fail_on:
            raise DatapathError(f"add FDB entry {entry.mac}", "No space", errno.ENOSPC)
        if not entry.is_flood:  # replace semantics for unicast MACs, like the kernel
            self.entries = {e for e in self.entries if e.mac != entry.mac}
        self.entries.add(entry)
        self.log.append(f"+{entry.mac}>{entry.dst}")

    def fdb_remove(self, entry: FdbEntry) -> None:
        self.entries.discard(entry)
        self.log.append(f"-{entry.mac}>{entry.dst}")


def test_reconciler_converges_and_is_idempotent() -> None:
    kernel = FakeKernel()
    kernel.entries = {FdbEntry(ZERO_MAC, "10.0.0.9")}  # stale, e.g. a peer that left
    rec = FdbReconciler(kernel)
    planner = FdbPlanner(A)
    want = planner.desired({B: FastPeer("10.0.0.2", True)}, {"aa:00:00:00:00:01": B})
    diff = rec.apply(want)
    assert kernel.entries == want
    assert kernel.log[0] == f"-{ZERO_MAC}>10.0.0.9"  # removals first
    assert len(diff.add) == 3
    kernel.log.clear()
    assert rec.apply(want).empty
    assert kernel.log == []


def test_reconciler_failure_is_retried_from_kernel_state() -> None:
    kernel = FakeKernel()
    rec = FdbReconciler(kernel)
    want = FdbPlanner(A).desired({B: FastPeer("10.0.0.2", True)}, {})
    kernel.fail_on = FdbEntry(ZERO_MAC, "10.0.0.2")
    with pytest.raises(DatapathError, match="add FDB entry"):
        rec.apply(want)
    kernel.fail_on = None
    rec.apply(want)
    assert kernel.entries == want


def test_mac_location_moving_to_another_peer() -> None:
    kernel = FakeKernel()
    rec = FdbReconciler(kernel)
    planner = FdbPlanner(A)
    peers = {B: FastPeer("10.0.0.2", True), C: FastPeer("10.0.0.3", True)}
    rec.apply(planner.desired(peers, {"aa:00:00:00:00:01": B}))
    rec.apply(planner.desired(peers, {"aa:00:00:00:00:01": C}))
    assert FdbEntry("aa:00:00:00:00:01", "10.0.0.3") in kernel.entries
    assert FdbEntry("aa:00:00:00:00:01", "10.0.0.2") not in kernel.entries


def test_normalize_mac() -> None:
    assert normalize_mac("AA-BB-CC-DD-EE-FF") == "aa:bb:cc:dd:ee:ff"
    for bad in ("aa:bb", "zz:bb:cc:dd:ee:ff", "aabbccddeeff"):
        with pytest.raises(ConfigError):
            normalize_mac(bad)


def test_mtu_and_config_validation() -> None:
    assert overlay_mtu(1500) == 1450
    assert overlay_mtu(9000) == 8950
    with pytest.raises(ConfigError, match="below"):
        overlay_mtu(600)
    with pytest.raises(ConfigError, match="characters"):
        VxlanConfig(name="a-much-too-long-name")
    with pytest.raises(ConfigError, match="VNI"):
        VxlanConfig(vni=1 << 24)
    assert VxlanConfig(extra_overhead=40).overhead == 90
    with pytest.raises(ConfigError, match="below"):
        VxlanConfig(underlay_mtu=700, extra_overhead=100)
    with pytest.raises(ConfigError, match="negative"):
        VxlanConfig(extra_overhead=-1)


def test_wrapped_errors_name_the_operation() -> None:
    err = wrap_os_error("create vxlan device vx", OSError(errno.EEXIST, "File exists"))
    assert str(err) == "create vxlan device vx: File exists (EEXIST)"
    assert err.errno == errno.EEXIST and err.op == "create vxlan device vx"
    assert str(wrap_os_error("op", ValueError("weird"))) == "op: weird"
