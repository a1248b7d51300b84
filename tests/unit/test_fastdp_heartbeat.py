"""Fast-path heartbeat frames, acks and the sender's state machine (clock stepped by hand)."""

from __future__ import annotations

import struct

import pytest

from weft.errors import ConfigError, RemoteProtocolError
from weft.fastdp.heartbeat import (
    ETHERTYPE_WEFT,
    HEARTBEAT_BPF_FILTER,
    FastPathHeartbeat,
    HealthChanged,
    HeartbeatConfig,
    HeartbeatState,
    ProbeAck,
    decode_ack,
    decode_probe,
    encode_ack,
    encode_probe,
)
from weft.gossip.peer import PeerName

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
CFG = HeartbeatConfig(interval=1.0, healthy_interval=5.0, timeout=15.0)


def test_probe_frame_layout_and_round_trip() -> None:
    frame = encode_probe(A, B, seq=7, size=1464)
    assert len(frame) == 1464
    assert frame[0:6] == bytes.fromhex("02000000000b")  # to B's name
    assert frame[6:12] == bytes.fromhex("02000000000a")
    assert frame[12:14] == struct.pack("!H", ETHERTYPE_WEFT)
    assert frame[14:18] == b"wfhb"
    probe = decode_probe(frame, B)
    assert probe is not None and (probe.src, probe.seq, probe.size) == (A, 7, 1464)


def test_decode_probe_ignores_what_is_not_for_us() -> None:
    frame = encode_probe(A, B, seq=1, size=100)
    assert decode_probe(frame, A) is None  # addressed to B
    assert decode_probe(frame[:20], B) is None
    assert decode_probe(frame[:12] + b"\x08\x00" + frame[14:], B) is None
    assert decode_probe(frame[:14] + b"xxxx" + frame[18:], B) is None
    truncated = decode_probe(frame[:60], B)
    assert truncated is not None and truncated.size == 60


def test_ack_round_trip_and_bad_acks() -> None:
    assert decode_ack(encode_ack(9, 1464)) == ProbeAck(9, 1464)
    with pytest.raises(RemoteProtocolError):
        decode_ack(b"short")
    with pytest.raises(RemoteProtocolError):
        decode_ack(b"nope" + encode_ack(1, 1)[4:])


def test_bpf_filter_is_four_instructions_matching_the_ethertype() -> None:
    assert len(HEARTBEAT_BPF_FILTER) == 32
    code, _jt, _jf, k = struct.unpack_from("HBBI", HEARTBEAT_BPF_FILTER, 8)
    assert (code, k) == (0x15, ETHERTYPE_WEFT)


def state(hb: FastPathHeartbeat) -> HeartbeatState:
    return hb.state  # a call, so mypy does not narrow across the steps of a test


def events(hb: FastPathHeartbeat) -> list[HealthChanged]:
    out = []
    while (ev := hb.next_event()) is not None:
        out.append(ev)
    return out


def run_until(hb: FastPathHeartbeat, start: float, end: float) -> list[tuple[int, int]]:
    """Fire timers from ``start`` to ``end`` and collect the probes."""
    probes: list[tuple[int, int]] = []
    now = start
    while True:
        t = max(hb.get_timer(), now)
        if t > end:
            return probes
        now = t
        hb.handle_timer(now)
        probes += hb.probes_to_send()


def test_pending_then_healthy_on_first_full_size_ack() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=0.0)
    assert state(hb) is HeartbeatState.PENDING and hb.get_timer() == 0.0
    hb.handle_timer(0.0)
    [(seq, size)] = hb.probes_to_send()
    assert size == 1464 and hb.get_timer() == 1.0
    assert hb.last_ack is None and hb.rtt is None
    hb.ack_received(ProbeAck(seq, size), 0.05)
    assert state(hb) is HeartbeatState.HEALTHY
    assert hb.last_ack == 0.05 and hb.rtt == pytest.approx(0.05)  # probe sent at 0.0
    assert events(hb) == [HealthChanged(HeartbeatState.HEALTHY, "")]
    # Healthy probing is slower: 1.0 (already scheduled), then every 5 s.
    probes = run_until(hb, 0.05, 15.0)
    assert len(probes) == 3
    assert state(hb) is HeartbeatState.HEALTHY


def test_never_answered_becomes_unhealthy_with_reason_at_timeout() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=100.0)
    probes = run_until(hb, 100.0, 114.99)
    assert state(hb) is HeartbeatState.PENDING and len(probes) == 15
    run_until(hb, 114.99, 115.0)
    assert state(hb) is HeartbeatState.UNHEALTHY
    [ev] = events(hb)
    assert "UDP 6784 blocked" in ev.reason and "1450" in ev.reason


def test_healthy_path_that_stops_answering_moves_to_unhealthy_and_back() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=0.0)
    hb.handle_timer(0.0)
    [(seq, size)] = hb.probes_to_send()
    hb.ack_received(ProbeAck(seq, size), 0.1)
    events(hb)
    # Nothing answered from 0.1 on: unhealthy exactly at 15.1, not before.
    probes = run_until(hb, 0.1, 15.0)
    assert state(hb) is HeartbeatState.HEALTHY
    probes += run_until(hb, 15.0, 15.1)
    assert state(hb) is HeartbeatState.UNHEALTHY
    [ev] = events(hb)
    assert ev.reason == "silent: heartbeats through the tunnel unanswered for 15s"
    # Timer keeps firing only for probes, once per interval while unhealthy (no busy loop).
    assert hb.get_timer() > 15.1
    more = run_until(hb, 15.1, 20.1)
    assert 4 <= len(more) <= 6
    last_seq, last_size = more[-1]
    hb.ack_received(ProbeAck(last_seq, last_size), 20.2)
    # hysteresis: one answer does not end it, the next one in a row does
    assert state(hb) is HeartbeatState.UNHEALTHY and events(hb) == []
    [(seq, size)] = run_until(hb, 20.2, 21.2)
    hb.ack_received(ProbeAck(seq, size), 21.3)
    assert state(hb) is HeartbeatState.HEALTHY
    assert events(hb) == [HealthChanged(HeartbeatState.HEALTHY, "")]


def test_defaults_show_a_silent_path_within_3s_and_a_lost_probe_does_not_flap() -> None:
    """Issue #17 item 1: before, the defaults (a probe every 5 s, 15 s timeout) kept a cut
    tunnel healthy for 15 s. Now probes go every second and 3 s of silence is unhealthy."""
    hb = FastPathHeartbeat(HeartbeatConfig(), mtu=1450, now=0.0)
    now = last_answer = 0.0
    answered = 0
    # answer everything for 10 s, except one probe: still healthy throughout
    while now < 10.0:
        now = max(hb.get_timer(), now)
        hb.handle_timer(now)
        for seq, size in hb.probes_to_send():
            answered += 1
            if answered != 5:
                hb.ack_received(ProbeAck(seq, size), now + 0.01)
                last_answer = now + 0.01
        if answered > 1:
            assert state(hb) is HeartbeatState.HEALTHY
    events(hb)
    cut = last_answer  # the tunnel is cut right after the last answer
    while state(hb) is HeartbeatState.HEALTHY:
        now = max(hb.get_timer(), now)
        hb.handle_timer(now)
        hb.probes_to_send()
    assert now - cut <= 3.0
    assert "silent" in hb.reason


def test_short_ack_means_the_mtu_does_not_fit() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=0.0)
    hb.handle_timer(0.0)
    [(seq, _)] = hb.probes_to_send()
    hb.ack_received(ProbeAck(seq, 1200), 0.1)
    assert state(hb) is HeartbeatState.UNHEALTHY
    assert "1200 of 1464" in hb.reason


def test_unknown_and_stale_acks_are_ignored() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=0.0)
    hb.handle_timer(0.0)
    [(seq, size)] = hb.probes_to_send()
    hb.ack_received(ProbeAck(seq + 100, size), 0.1)  # never sent
    assert state(hb) is HeartbeatState.PENDING
    hb.mtu_changed(1400, 0.2)  # the probe in flight proves nothing for the new MTU
    hb.ack_received(ProbeAck(seq, size), 0.3)
    assert state(hb) is HeartbeatState.PENDING
    hb.handle_timer(0.3)
    [(seq2, size2)] = hb.probes_to_send()
    assert size2 == 1414
    hb.ack_received(ProbeAck(seq2, size2), 0.4)
    hb.ack_received(ProbeAck(seq2, size2), 0.5)  # duplicate: harmless
    assert state(hb) is HeartbeatState.HEALTHY


def test_mtu_change_while_healthy_reprobes() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=0.0)
    hb.handle_timer(0.0)
    [(seq, size)] = hb.probes_to_send()
    hb.ack_received(ProbeAck(seq, size), 0.1)
    events(hb)
    hb.mtu_changed(9000 - 50, 1.0)
    assert state(hb) is HeartbeatState.PENDING and hb.get_timer() == 1.0
    [ev] = events(hb)
    assert "8950" in ev.reason


def test_outstanding_probes_are_bounded() -> None:
    hb = FastPathHeartbeat(CFG, mtu=1450, now=0.0)
    run_until(hb, 0.0, 500.0)
    assert state(hb) is HeartbeatState.UNHEALTHY
    hb.ack_received(ProbeAck(1, 1464), 500.0)  # long forgotten
    assert state(hb) is HeartbeatState.UNHEALTHY


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        HeartbeatConfig(interval=0)
    with pytest.raises(ConfigError):
        HeartbeatConfig(healthy_interval=20.0, timeout=15.0)
    with pytest.raises(ConfigError):
        FastPathHeartbeat(CFG, mtu=10, now=0.0)
    with pytest.raises(ConfigError):
        encode_probe(A, B, 1, 10)
