"""The overlay switch's per-connection choice (weft.switch.core), clock stepped by hand."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.errors import LocalError, RemoteProtocolError
from weft.switch.core import (
    MAX_MACS,
    PART_OVS,
    PART_SLEEVE,
    PART_SWITCH,
    PART_VXLAN,
    DatapathChanged,
    MacsAnnounced,
    PathState,
    PathSwitch,
    SwitchConfig,
    decode_switch_message,
    encode_macs,
    encode_path_state,
    split_envelope,
    wrap,
)

UNANSWERED = "heartbeats through the tunnel unanswered for 10s (UDP 6784 blocked?)"


def events(sw: PathSwitch) -> list[DatapathChanged]:
    out = []
    while (e := sw.next_event()) is not None:
        out.append(e)
    return out


def both_healthy(sw: PathSwitch, now: float) -> None:
    sw.path_state("vxlan", True, "", now)
    sw.peer_state("vxlan", True, now)


def test_starts_on_sleeve_and_adopts_vxlan_once_both_ends_are_healthy() -> None:
    sw = PathSwitch(["vxlan", "sleeve"], 0.0)
    assert sw.chosen == "sleeve"
    assert events(sw) == [DatapathChanged(None, "sleeve", "")]
    sw.path_state("sleeve", True, "", 0.1)
    assert sw.carrying and events(sw) == []
    sw.path_state("vxlan", True, "", 0.5)
    assert sw.chosen == "sleeve"  # the peer has not confirmed its direction yet
    assert "the peer's heartbeats" in sw.info
    sw.peer_state("vxlan", True, 0.6)
    assert sw.chosen == "vxlan"  # first adoption: no hold
    assert events(sw) == [DatapathChanged("sleeve", "vxlan", "vxlan: healthy at both ends")]
    assert sw.info == ""
    assert sw.get_timer() is None


def test_missed_heartbeats_fall_back_at_once_and_return_after_the_hold() -> None:
    sw = PathSwitch(["vxlan", "sleeve"], 0.0, SwitchConfig(recovery_hold=2.0))
    sw.path_state("sleeve", True, "", 0.0)
    both_healthy(sw, 1.0)
    events(sw)
    sw.path_state("vxlan", False, UNANSWERED, 20.0)
    assert sw.chosen == "sleeve" and sw.carrying
    assert events(sw) == [
        DatapathChanged("vxlan", "sleeve", f"vxlan: {UNANSWERED}", "heartbeat_lost")
    ]
    assert sw.info == f"vxlan: {UNANSWERED}; using sleeve"
    assert sw.get_timer() is None  # nothing to wait for while vxlan is down
    sw.path_state("vxlan", True, "", 30.0)
    assert sw.chosen == "sleeve"  # held back
    assert sw.get_timer() == 32.0
    assert "returning after 2s" in sw.info
    sw.handle_timer(31.9)
    assert sw.chosen == "sleeve"
    sw.handle_timer(32.0)
    assert sw.chosen == "vxlan"
    assert events(sw) == [DatapathChanged("sleeve", "vxlan", "vxlan: healthy at both ends")]


def test_flapping_during_the_hold_restarts_it() -> None:
    sw = PathSwitch(["vxlan", "sleeve"], 0.0, SwitchConfig(recovery_hold=2.0))
    both_healthy(sw, 0.0)
    sw.path_state("vxlan", False, UNANSWERED, 5.0)
    sw.path_state("vxlan", True, "", 6.0)
    sw.path_state("vxlan", False, UNANSWERED, 7.0)
    sw.path_state("vxlan", True, "", 7.5)
    sw.handle_timer(8.0)
    assert sw.chosen == "sleeve"
    assert sw.get_timer() == 9.5
    sw.handle_timer(9.5)
    assert sw.chosen == "vxlan"


def test_the_peer_losing_its_direction_moves_us_too() -> None:
    sw = PathSwitch(["vxlan", "sleeve"], 0.0, SwitchConfig(recovery_hold=1.0))
    sw.path_state("sleeve", True, "", 0.0)
    both_healthy(sw, 0.0)
    events(sw)
    sw.peer_state("vxlan", False, 3.0)  # its probes to us are dropped (e.g. our inbound rule)
    assert sw.chosen == "sleeve"
    (event,) = events(sw)
    assert event.reason == "vxlan: the peer's heartbeats through the tunnel are not answered"
    assert event.code == "peer_heartbeat_lost"
    sw.peer_state("vxlan", True, 4.0)
    sw.handle_timer(5.0)
    assert sw.chosen == "vxlan"


def test_forced_datapath_has_no_fallback() -> None:
    sw = PathSwitch(["vxlan"], 0.0)
    assert sw.chosen == "vxlan" and not sw.carrying
    both_healthy(sw, 1.0)
    assert sw.carrying and sw.info == ""
    sw.path_state("vxlan", False, UNANSWERED, 20.0)
    assert sw.chosen == "vxlan" and not sw.carrying
    assert sw.info == f"vxlan: {UNANSWERED}; no fallback (datapath vxlan forced)"


def test_forced_sleeve_and_a_peer_without_vxlan() -> None:
    sw = PathSwitch(["sleeve"], 0.0)
    sw.note("vxlan: the peer has no vxlan datapath")
    sw.path_state("sleeve", True, "", 0.5)
    assert sw.chosen == "sleeve" and sw.carrying
    assert sw.info == "vxlan: the peer has no vxlan datapath; using sleeve"
    with pytest.raises(LocalError):
        sw.path_state("vxlan", True, "", 1.0)
    sw.peer_state("vxlan", True, 1.0)  # a confused peer: ignored, nothing to agree on
    assert sw.chosen == "sleeve"


def test_unavailable_path_never_carries() -> None:
    sw = PathSwitch(["vxlan", "sleeve"], 0.0)
    sw.unavailable("vxlan", "encrypted: kernel has no ESP", 0.0)
    both_healthy(sw, 1.0)
    assert sw.chosen == "sleeve"
    sw.path_state("sleeve", True, "", 1.0)
    assert sw.info == "encrypted: kernel has no ESP; using sleeve"


def test_sleeve_down_and_vxlan_down_says_both() -> None:
    sw = PathSwitch(["vxlan", "sleeve"], 0.0)
    sw.path_state("vxlan", False, UNANSWERED, 15.0)
    sw.path_state("sleeve", False, "heartbeats unanswered for 60s", 60.0)
    assert not sw.carrying
    assert sw.info == f"vxlan: {UNANSWERED}; sleeve: heartbeats unanswered for 60s"


def test_ovs_before_vxlan_before_sleeve() -> None:
    sw = PathSwitch(["ovs", "vxlan", "sleeve"], 0.0)
    sw.path_state("vxlan", True, "", 0.0)
    sw.peer_state("vxlan", True, 0.0)
    assert sw.chosen == "vxlan"
    sw.path_state("ovs", True, "", 1.0)
    sw.peer_state("ovs", True, 1.0)
    assert sw.chosen == "ovs"
    sw.path_state("ovs", False, "gone", 2.0)
    assert sw.chosen == "vxlan"


def test_bad_candidate_lists() -> None:
    for bad in ([], ["sleeve", "vxlan"], ["vxlan", "vxlan"]):
        with pytest.raises(LocalError):
            PathSwitch(bad, 0.0)


def test_envelope_and_messages_round_trip() -> None:
    assert split_envelope(wrap(PART_VXLAN, b"abc")) == (PART_VXLAN, b"abc")
    assert split_envelope(wrap(PART_SLEEVE, b"")) == (PART_SLEEVE, b"")
    for bad in (b"", b"\x09x"):
        with pytest.raises(RemoteProtocolError):
            split_envelope(bad)
    assert decode_switch_message(encode_path_state("vxlan", True)) == PathState("vxlan", True)
    assert decode_switch_message(encode_path_state("ovs", False)) == PathState("ovs", False)
    macs = ["02:42:ac:11:00:02", "aa:bb:cc:dd:ee:ff"]
    assert decode_switch_message(encode_macs(macs)) == MacsAnnounced(frozenset(macs))
    many = [f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(MAX_MACS + 5)]
    decoded = decode_switch_message(encode_macs(many))
    assert isinstance(decoded, MacsAnnounced) and len(decoded.macs) == MAX_MACS
    assert (PART_SWITCH, PART_OVS) == (2, 3)
    assert split_envelope(wrap(PART_OVS, b"o")) == (PART_OVS, b"o")


@given(st.binary(max_size=64))
def test_switch_messages_decode_or_raise_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_switch_message(data)


def test_fallback_codes_for_a_short_probe_and_an_unavailable_path() -> None:
    sw = PathSwitch(["ovs", "vxlan", "sleeve"], 0.0)
    sw.path_state("sleeve", True, "", 0.0)
    for name in ("ovs", "vxlan"):
        sw.path_state(name, True, "", 0.0)
        sw.peer_state(name, True, 0.0)
    assert sw.chosen == "ovs"
    events(sw)
    sw.path_state("ovs", False, "tunnel delivered 1000 of 1464 bytes; MTU 1450 too large", 1.0)
    assert [(e.old, e.new, e.code) for e in events(sw)] == [("ovs", "vxlan", "mtu")]
    sw.unavailable("vxlan", "vxlan: ESP setup failed", 2.0)
    assert [(e.old, e.new, e.code) for e in events(sw)] == [("vxlan", "sleeve", "unavailable")]
    assert sw.status()["notes"] == []
