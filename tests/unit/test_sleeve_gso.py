"""UDP GSO batching of per-frame datagrams (``gso_batches``): boundaries and an unchanged wire."""

from __future__ import annotations

import os

import pytest

from tests.unit.test_sleeve_core import ADDR, A, B, C, established_net, eth, mac
from weft.gossip.peer import PeerName
from weft.sleeve.core import (
    HEADER_SIZE,
    KIND_DATA,
    KIND_HEARTBEAT,
    VERSION,
    SleeveConfig,
    Transmit,
    gso_batches,
)

PER_FRAME = SleeveConfig(tap_vnet_hdr=False)


def single(size: int, peer: PeerName = B, fill: int = 0, kind: int = KIND_DATA) -> Transmit:
    head = bytes([VERSION << 4 | kind]) + bytes([fill]) * (min(size, HEADER_SIZE) - 1)
    return Transmit(peer, ADDR[peer], (head, bytes([fill + 1]) * (size - len(head))), 0)


def datagrams(t: Transmit) -> list[bytes]:
    buf = t.buffer
    seg = t.segment or len(buf)
    return [buf[i : i + seg] for i in range(0, len(buf), seg)]


def wire(ts: list[Transmit]) -> dict[tuple[str, int], list[bytes]]:
    out: dict[tuple[str, int], list[bytes]] = {}
    for t in ts:
        out.setdefault(t.addr, []).extend(datagrams(t))
    return out


def test_equal_datagrams_merge_and_a_shorter_last_one_closes_the_send() -> None:
    ts = [single(1434, fill=i) for i in range(5)] + [single(600, fill=9), single(1434, fill=10)]
    out = gso_batches(ts, 64, 65507)
    assert [(len(t.buffer), t.segment) for t in out] == [(5 * 1434 + 600, 1434), (1434, 0)]
    assert wire(out) == wire(ts)


def test_a_larger_datagram_starts_a_new_send() -> None:
    ts = [single(600), single(600), single(1434), single(1434)]
    out = gso_batches(ts, 64, 65507)
    assert [(len(t.buffer), t.segment) for t in out] == [(1200, 600), (2868, 1434)]
    assert wire(out) == wire(ts)


@pytest.mark.parametrize(("max_segments", "max_bytes"), [(4, 65507), (64, 1434 * 3 + 10)])
def test_segment_and_byte_limits(max_segments: int, max_bytes: int) -> None:
    ts = [single(1434, fill=i) for i in range(10)]
    out = gso_batches(ts, max_segments, max_bytes)
    per_send = min(max_segments, max_bytes // 1434)
    assert [len(datagrams(t)) for t in out] == [per_send] * (10 // per_send) + (
        [10 % per_send] if 10 % per_send else []
    )
    assert all(len(t.buffer) <= max_bytes for t in out)
    assert wire(out) == wire(ts)


def test_addresses_interleaved_keep_their_order_and_other_sends_pass_unchanged() -> None:
    frag = Transmit(B, ADDR[B], (b"x" * 1000, b"y" * 500), 1000)
    ts = [single(800, B, 1), single(800, C, 2), single(800, B, 3), frag, single(800, B, 4)]
    ts.append(single(800, C, 5))
    out = gso_batches(ts, 64, 65507)
    assert wire(out) == wire(ts)
    assert frag in out
    assert [t.segment for t in out if t.addr == ADDR[C]] == [800]
    assert len(out) == 4  # B(1,3), C(2,5), the fragmented send, B(4)
    assert gso_batches([single(800)], 64, 65507) == [single(800)]


@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize("gro", [True, False])
def test_per_frame_datagrams_batched_arrive_one_by_one(encrypted: bool, gro: bool) -> None:
    """Each frame is still its own (sealed) datagram: the receiver opens them separately, with
    GRO (one coalesced buffer) or without (the kernel re-cut the send)."""
    net = established_net([(A, B)], encrypted=encrypted, config=PER_FRAME, gro=gro)
    net.learn(B, mac(2))
    core_a = net.cores[A]
    room = core_a.link_status(B)["mtu"]  # type: ignore[index]
    frames = [eth(mac(2), mac(1), os.urandom(room)) for _ in range(7)]
    frames.append(eth(mac(2), mac(1), os.urandom(100)))  # the short last datagram
    frames.append(eth(mac(2), mac(1), os.urandom(room)))
    for f in frames:
        core_a.frame_from_tap(f, net.now)
    core_a.flush()
    ts = core_a.take_transmits()
    assert len(ts) == len(frames)
    batched = gso_batches(ts, 64, 65507)
    assert [t.segment for t in batched] == [len(ts[0].buffer), 0]
    before = len(net.wire)
    for t in batched:
        net._carry(A, t)
    net.settle()
    assert len(net.wire) - before == len(frames)
    assert net.tap[B] == frames
    assert not net.cores[B].drops
    if encrypted:  # every datagram sealed on its own: distinct counters, none in clear
        assert all(frames[0][20:60] not in d for _, _, d in net.wire[before:])


def test_mtu_change_mid_batch_splits_the_send() -> None:
    net = established_net([(A, B)], encrypted=True, config=PER_FRAME)
    net.learn(B, mac(2))
    core_a = net.cores[A]
    room = core_a.link_status(B)["mtu"]  # type: ignore[index]
    big = [eth(mac(2), mac(1), os.urandom(room)) for _ in range(3)]
    for f in big:
        core_a.frame_from_tap(f, net.now)
    core_a.send_too_big(B, core_a.link_status(B)["pmtu"], net.now)  # type: ignore[index]
    small_room = core_a.link_status(B)["mtu"]  # type: ignore[index]
    assert small_room < room
    small = [eth(mac(2), mac(1), os.urandom(small_room)) for _ in range(3)]
    for f in small:
        core_a.frame_from_tap(f, net.now)
    core_a.flush()
    ts = core_a.take_transmits()
    batched = gso_batches(ts, 64, 65507)
    sizes = [len(d) for t in batched for d in datagrams(t)]
    assert sizes == [len(t.buffer) for t in ts]
    # the first smaller datagram may still close the first send (GSO's short last segment)
    assert [len(datagrams(t)) for t in batched] == [4, 2]
    assert [t.segment for t in batched] == [len(ts[0].buffer), len(ts[3].buffer)]
    for t in batched:
        net._carry(A, t)
    net.settle()
    assert net.tap[B] == big + small


def test_heartbeats_are_never_merged() -> None:
    """PMTU probes must cross the path as the datagrams they are: a ladder of probes, then the
    regular heartbeat at the confirmed size, then data; only the data may merge."""
    probes = [single(s, kind=KIND_HEARTBEAT) for s in (1472, 1472, 548)]
    data = [single(1200, fill=i) for i in range(3)]
    out = gso_batches([*probes, *data], 64, 65507)
    assert out[:3] == probes
    assert [(len(t.buffer), t.segment) for t in out[3:]] == [(3600, 1200)]


def test_real_probe_ladder_is_sent_unmerged() -> None:
    net = established_net([(A, B)], encrypted=False, config=PER_FRAME)
    core = net.cores[A]
    core.send_too_big(B, 1400, net.now)  # the search starts again: a ladder of probes
    net.now += 1.0
    core.handle_timer(net.now)
    ts = core.take_transmits()
    assert len(ts) > 1
    assert gso_batches(ts, 64, 65507) == ts


@pytest.mark.parametrize("tap_vnet_hdr", [True, False])
def test_frames_from_tap_decides_like_frame_by_frame(tap_vnet_hdr: bool) -> None:
    """The batched TAP entry reuses the previous frame's decision only when it must be the same:
    the outputs equal those of frame_from_tap called for each frame."""
    cfg = SleeveConfig(tap_vnet_hdr=tap_vnet_hdr)
    nets = [established_net([(A, B), (A, C)], encrypted=False, config=cfg) for _ in range(2)]
    for net in nets:
        net.learn(B, mac(2))
        net.learn(C, mac(3))
    pad = bytes(10) if tap_vnet_hdr else b""
    room = nets[0].cores[A].link_status(B)["mtu"]  # type: ignore[index]
    payloads = [os.urandom(room), os.urandom(room), os.urandom(60)]
    frames = [pad + eth(mac(2), mac(1), p) for p in payloads]
    frames += [pad + eth(mac(3), mac(1), payloads[0]), pad + eth(mac(3), mac(1), payloads[1])]
    frames += [pad + eth(mac(3), mac(1), b"")[:-1]]  # a runt with the same addresses
    frames += [pad + eth(b"\xff" * 6, mac(1), b"arp"), pad + eth(mac(3), mac(1), b"x" * 50)]
    frames += [pad + eth(mac(9), mac(1), b"unknown"), pad + eth(mac(9), mac(1), b"unknown2")]
    frames += [pad + eth(mac(2), mac(4), b"y" * 200)]
    frames += [pad + eth(mac(2), mac(4), b"z" * 1000)]
    one, batched = nets
    for f in frames:
        one.cores[A].frame_from_tap(f, one.now)
    batched.cores[A].frames_from_tap(frames, batched.now)
    outs = []
    for net in nets:
        core = net.cores[A]
        core.flush()
        outs.append(
            (
                [(t.addr, t.buffer, t.segment) for t in core.take_transmits()],
                dict(core.drops),
                core.tap_frames_in,
                len(core.macs),
            )
        )
    assert outs[0] == outs[1]
    assert outs[0][1].get("tap_runt") == 1
