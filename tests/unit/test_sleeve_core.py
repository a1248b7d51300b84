"""SleeveCore without I/O: several cores wired by an in-test network, the clock stepped by hand."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.gossip.peer import PeerName
from weft.sleeve.core import (
    HEADER_SIZE,
    VERSION,
    VNET_HDR_SIZE,
    LinkEstablished,
    SleeveConfig,
    SleeveCore,
    TapFrame,
    Transmit,
    complete_checksum,
    features_of,
    icmp_too_big,
    remote_sleeve,
)

A, B, C = PeerName(0x020000000001), PeerName(0x020000000002), PeerName(0x020000000003)
ADDR = {A: ("10.0.0.1", 6783), B: ("10.0.0.2", 6783), C: ("10.0.0.3", 6783)}
KEYS = {(x, y): os.urandom(32) for x in (A, B, C) for y in (A, B, C) if x != y}


def flat(frame: TapFrame) -> bytes:
    return b"".join(frame) if isinstance(frame, tuple) else bytes(frame)


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


def eth(dst: bytes, src: bytes, payload: bytes, ethertype: bytes = b"\x08\x00") -> bytes:
    return dst + src + ethertype + payload


def vnet(frame: bytes, gso_type: int = 0, flags: int = 0, start: int = 0, off: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, 0, 0, start, off) + frame


class Routes:
    """A static RoutesView: next hops by table."""

    def __init__(
        self, unicast: dict[PeerName, PeerName], broadcast: dict[PeerName, list[PeerName]]
    ) -> None:
        self.unicast = unicast
        self.broadcast = broadcast

    def unicast_next_hop(self, dst: PeerName) -> PeerName | None:
        return self.unicast.get(dst)

    def broadcast_next_hops(self, src: PeerName) -> list[PeerName]:
        return list(self.broadcast.get(src, []))

    def may_relay(self, src: PeerName, via: PeerName) -> bool:
        return via == src or self.unicast.get(src) == via  # (symmetric paths in these tests)


class Net:
    """Cores joined by a lossless in-memory UDP network and control connections."""

    def __init__(
        self,
        links: list[tuple[PeerName, PeerName]],
        *,
        encrypted: bool = True,
        config: SleeveConfig | None = None,
        configs: dict[PeerName, SleeveConfig] | None = None,
        gro: bool = True,
    ) -> None:
        self.now = 1000.0
        names = sorted({p for link in links for p in link})
        self.cores = {
            p: SleeveCore(p, (configs or {}).get(p, config or SleeveConfig()), rng=Random(p))
            for p in names
        }
        self.by_addr = {ADDR[p]: p for p in names}
        self.source = {p: ADDR[p] for p in names}  # where a core's datagrams come from (NAT)
        self.path_limit: dict[tuple[PeerName, PeerName], int] = {}
        self.blocked: set[tuple[PeerName, PeerName]] = set()
        self.tap: dict[PeerName, list[bytes]] = {p: [] for p in names}
        self.established: list[tuple[PeerName, PeerName]] = []
        self.wire: list[tuple[PeerName, PeerName, bytes]] = []  # every datagram sent
        self.tamper: Callable[[bytes], bytes] | None = None
        self.gro = gro
        for x, y in links:
            for a, b in ((x, y), (y, x)):
                core = self.cores[a]
                core.add_link(
                    b,
                    ADDR[b],
                    self.now,
                    send_key=KEYS[(a, b)] if encrypted else None,
                    recv_key=KEYS[(b, a)] if encrypted else None,
                    superframes=self.cores[b].config.tap_vnet_hdr,
                )

    def step(self, dt: float = 0.0) -> None:
        self.now += dt
        for core in self.cores.values():
            timer = core.get_timer()
            if timer is not None and timer <= self.now:
                core.handle_timer(self.now)
        self.settle()

    def settle(self) -> None:
        for _ in range(100):
            busy = False
            for name, core in self.cores.items():
                core.flush()
                for t in core.take_transmits():
                    busy = True
                    self._carry(name, t)
                for peer, msg in core.take_control():
                    busy = True
                    self.cores[peer].control_received(name, msg, self.now)
                self.tap[name].extend(flat(f) for f in core.take_tap_frames())
                while (ev := core.next_event()) is not None:
                    if isinstance(ev, LinkEstablished):
                        self.established.append((name, ev.peer))
            if not busy:
                return
        raise AssertionError("network did not settle")

    def _carry(self, src: PeerName, t: Transmit) -> None:
        dst = self.by_addr[t.addr]
        seg = t.segment or len(t.buffer)
        dgrams = [t.buffer[i : i + seg] for i in range(0, len(t.buffer), seg)]
        assert all(len(d) <= 65507 for d in dgrams)
        limit = self.path_limit.get((src, dst))
        kept = [d for d in dgrams if limit is None or len(d) <= limit]
        if (src, dst) in self.blocked:
            kept = []
        self.wire.extend((src, dst, d) for d in kept)
        if self.tamper is not None:
            kept = [self.tamper(d) for d in kept]
        core = self.cores[dst]
        if self.gro and kept == dgrams and t.segment:
            core.datagrams_received(t.buffer, self.source[src], self.now, t.segment)
        else:
            for d in kept:
                core.datagrams_received(d, self.source[src], self.now)

    def run(self, seconds: float, dt: float = 0.1) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(dt)

    def learn(self, owner: PeerName, m: bytes) -> None:
        """Make every core learn that ``m`` lives behind ``owner`` (a broadcast from it)."""
        frame = eth(b"\xff" * 6, m, b"hello")
        self.send(owner, vnet(frame) if self.cores[owner].config.tap_vnet_hdr else frame)
        for name in self.tap:
            self.tap[name].clear()

    def send(self, at: PeerName, frame: bytes) -> None:
        self.cores[at].frame_from_tap(frame, self.now)
        self.settle()


def established_net(links: list[tuple[PeerName, PeerName]], **kw: object) -> Net:
    net = Net(links, **kw)  # type: ignore[arg-type]
    net.run(5.0)
    return net


def test_heartbeats_establish_and_pmtu_settles_at_underlay() -> None:
    net = Net([(A, B)])
    assert net.cores[A].link_status(B)["state"] == "pending"  # type: ignore[index]
    net.run(3.0)
    assert sorted(net.established) == [(A, B), (B, A)]
    status = net.cores[A].link_status(B)
    assert status is not None
    assert status["state"] == "established"
    assert status["pmtu"] == 1472 and not status["searching"]
    assert status["mtu"] == 1472 - HEADER_SIZE - 24 - 17 - VNET_HDR_SIZE - 14
    per_frame = SleeveConfig(tap_vnet_hdr=False)
    enc = established_net([(A, B)], config=per_frame).cores[A].link_status(B)
    assert enc is not None and enc["mtu"] == 1390  # Weave's encrypted tunnel MTU
    plain = established_net([(A, B)], encrypted=False, config=per_frame).cores[A].link_status(B)
    assert plain is not None and plain["mtu"] == 1414  # Weave's plain tunnel MTU


def test_pmtu_search_finds_a_smaller_path_and_reprobes_when_it_shrinks() -> None:
    net = Net([(A, B)])
    net.path_limit[(A, B)] = 1252  # the far side's underlay is MTU 1280
    net.run(10.0)
    status = net.cores[A].link_status(B)
    assert status is not None and not status["searching"]
    assert 1252 - 8 < status["pmtu"] <= 1252
    assert net.cores[B].link_status(A)["pmtu"] == 1472  # type: ignore[index]
    # The path shrinks later: full-size heartbeats vanish, the sleeve searches again.
    net.path_limit[(A, B)] = 1000
    net.run(40.0, dt=0.5)
    status = net.cores[A].link_status(B)
    assert status is not None and 1000 - 8 < status["pmtu"] <= 1000
    assert status["state"] == "established"


def test_send_too_big_restarts_the_search_below_the_refused_size() -> None:
    net = established_net([(A, B)])
    net.path_limit[(A, B)] = 1100
    net.cores[A].send_too_big(B, 1400, net.now)
    net.run(6.0)
    status = net.cores[A].link_status(B)
    assert status is not None and 1100 - 8 < status["pmtu"] <= 1100


def test_failed_after_heartbeat_timeout_and_back() -> None:
    net = established_net([(A, B)])
    net.blocked.add((A, B))
    net.run(61.0, dt=1.0)
    assert net.cores[A].link_status(B)["state"] == "failed"  # type: ignore[index]
    net.blocked.clear()
    net.run(12.0, dt=1.0)
    assert net.cores[A].link_status(B)["state"] == "established"  # type: ignore[index]


def _state(net: Net, a: PeerName, b: PeerName) -> str:
    status = net.cores[a].link_status(b)
    assert status is not None
    return str(status["state"])


def test_a_cut_link_is_degraded_within_3s_keeps_its_mtu_and_recovers_after_two_answers() -> None:
    """Issue #17 item 1: before, a cut link stayed "established" for the 60 s heartbeat timeout,
    and 15 s in, PMTU discovery read the silence as a smaller path (1472 -> 548 bytes)."""
    net = established_net([(A, B)])
    net.run(20.0)
    cut = net.now
    net.blocked |= {(A, B), (B, A)}
    net.run(1.0, dt=0.05)
    assert _state(net, A, B) == "established"  # one heartbeat period: not yet
    seen = None
    while net.now < cut + 3.0:
        net.step(0.05)
        if seen is None and _state(net, A, B) == "degraded":
            seen = net.now
    assert seen is not None and seen - cut <= 3.0 + 1e-6
    status = net.cores[A].link_status(B)
    assert status is not None and "silent" in status["info"]
    net.run(15.0, dt=0.25)
    assert _state(net, A, B) == "failed"
    net.run(60.0, dt=0.5)
    status = net.cores[A].link_status(B)
    assert status is not None and status["pmtu"] == 1472  # silence is not a smaller path
    net.blocked.clear()
    states = []
    for _ in range(100):
        net.step(0.05)
        states.append(_state(net, A, B))
    assert states[-1] == "established"
    assert states[0] != "established"  # hysteresis: the first answer alone does not end it
    assert net.cores[A].link_status(B)["pmtu"] == 1472  # type: ignore[index]


def test_one_lost_heartbeat_does_not_flap_the_link() -> None:
    net = established_net([(A, B)])
    net.run(20.0)
    net.blocked.add((A, B))
    net.run(1.2, dt=0.05)  # about one heartbeat lost
    net.blocked.clear()
    for _ in range(200):
        net.step(0.05)
        assert _state(net, A, B) == "established"
    assert net.cores[A].link_status(B)["pmtu"] == 1472  # type: ignore[index]


def test_a_path_that_comes_back_smaller_after_an_outage_is_found() -> None:
    net = established_net([(A, B)])
    net.blocked.add((A, B))
    net.run(20.0, dt=0.25)
    assert _state(net, A, B) == "failed"
    net.blocked.clear()
    net.path_limit[(A, B)] = 1000
    net.run(30.0, dt=0.25)
    status = net.cores[A].link_status(B)
    assert status is not None and status["state"] == "established"
    assert 1000 - 8 < status["pmtu"] <= 1000


def test_blocked_udp_never_establishes() -> None:
    net = Net([(A, B)])
    net.blocked.add((A, B))
    net.run(5.0)
    assert (A, B) not in net.established and (B, A) in net.established


@pytest.mark.parametrize("encrypted", [True, False])
@pytest.mark.parametrize("gro", [True, False])
def test_superframe_crosses_fragmented_and_arrives_identical(encrypted: bool, gro: bool) -> None:
    net = established_net([(A, B)], encrypted=encrypted, gro=gro)
    net.learn(B, mac(2))
    payload = os.urandom(65000)
    frame = vnet(eth(mac(2), mac(1), payload), gso_type=1, flags=1, start=34, off=16)
    net.send(A, frame)
    assert net.tap[B] == [frame]
    # 65000+ bytes in 1472-byte datagrams, sent as a couple of GSO buffers.
    assert net.cores[B].stats["reassembled"] == 1
    assert not net.cores[B].drops


def test_small_frames_are_batched_into_one_datagram() -> None:
    net = established_net([(A, B)], encrypted=True)
    net.learn(B, mac(2))
    before = len(net.wire)
    frames = [vnet(eth(mac(2), mac(1), bytes([i]) * 60)) for i in range(10)]
    for f in frames:
        net.cores[A].frame_from_tap(f, net.now)
    net.settle()
    assert len(net.wire) - before == 1
    assert net.tap[B] == frames


def test_fragments_out_of_order_duplicated_and_lost() -> None:
    net = established_net([(A, B)], encrypted=True, gro=False)
    net.learn(B, mac(2))
    core_a, core_b = net.cores[A], net.cores[B]
    frame = vnet(eth(mac(2), mac(1), os.urandom(20000)))
    core_a.frame_from_tap(frame, net.now)
    core_a.flush()
    dgrams = []
    for t in core_a.take_transmits():
        seg = t.segment or len(t.buffer)
        dgrams += [t.buffer[i : i + seg] for i in range(0, len(t.buffer), seg)]
    assert len(dgrams) > 10
    shuffled = [*dgrams[::-1], dgrams[3]]
    for d in shuffled:
        core_b.datagrams_received(d, ADDR[A], net.now)
    assert [flat(f) for f in core_b.take_tap_frames()] == [frame]
    assert core_b.drops["replayed"] == 1  # the duplicate after completion: counter already used
    # A message missing one fragment is freed after the timeout, and counted.
    core_a.frame_from_tap(frame, net.now)
    core_a.flush()
    dgrams = []
    for t in core_a.take_transmits():
        seg = t.segment or len(t.buffer)
        dgrams += [t.buffer[i : i + seg] for i in range(0, len(t.buffer), seg)]
    for d in dgrams[1:]:
        core_b.datagrams_received(d, ADDR[A], net.now)
    core_b.datagrams_received(dgrams[2], ADDR[A], net.now)
    assert core_b.drops["duplicate"] == 1
    assert core_b.status(net.now)["reassembly_bytes"] > 0
    net.step(3.0)
    assert core_b.drops["reassembly_timeout"] == 1
    assert core_b.status(net.now)["reassembly_bytes"] == 0
    assert core_b.take_tap_frames() == []


def test_overlapping_fragment_is_dropped_alone() -> None:
    net = established_net([(A, B)], encrypted=False, gro=False)
    core_b = net.cores[B]
    a_bytes = A.to_bytes(6, "big")
    hdr = struct.Struct(">B6sQIIHH")
    core_b.datagrams_received(hdr.pack(0x21, a_bytes, 77, 3000, 0, 0, 3) + bytes(1000), ADDR[A], 0)
    # index 1 claims offset 900: overlaps fragment 0.
    core_b.datagrams_received(
        hdr.pack(0x21, a_bytes, 77, 3000, 900, 1, 3) + bytes(1000), ADDR[A], 0
    )
    assert core_b.drops["malformed"] == 1
    # sleeve v2: the cut follows from (length, count), so a fragment that does not fit it is
    # dropped on its own and cannot take the message down with it (#14 item 2)
    assert core_b.status(net.now)["reassembly_bytes"] == 3000
    net.step(3.0)
    assert core_b.status(net.now)["reassembly_bytes"] == 0
    assert core_b.drops["reassembly_timeout"] == 1


def test_bad_packets_are_dropped_and_counted_by_reason() -> None:
    net = established_net([(A, B)], encrypted=True)
    net.learn(B, mac(2))
    core_b = net.cores[B]
    hdr = struct.Struct(">B6sQIIHH")
    a_bytes = A.to_bytes(6, "big")
    core_b.datagrams_received(b"\x21abc", ADDR[A], net.now)
    core_b.datagrams_received(hdr.pack(0x77, a_bytes, 0, 10, 0, 0, 1) + bytes(10), ADDR[A], 0)
    core_b.datagrams_received(
        hdr.pack(0x21, b"\x09" * 6, 0, 10, 0, 0, 1) + bytes(10), ADDR[A], net.now
    )
    core_b.datagrams_received(
        hdr.pack(0x21, a_bytes, 1 << 40, 1 << 20, 0, 0, 40) + bytes(10), ADDR[A], net.now
    )
    # Capture a real packet, then replay it and flip a bit in a copy.
    before = len(net.wire)
    net.send(A, vnet(eth(mac(2), mac(1), b"secret marker" * 10)))
    captured = net.wire[before][2]
    assert b"secret marker" not in captured
    core_b.datagrams_received(captured, ADDR[A], net.now)
    flipped = bytearray(captured)
    flipped[-5] ^= 0x01
    fresh = (10**6).to_bytes(8, "big")  # a fresh counter, so only the tag can refuse it
    flipped[7:15] = fresh
    flipped[HEADER_SIZE : HEADER_SIZE + 8] = fresh
    core_b.datagrams_received(bytes(flipped), ADDR[A], net.now)
    assert dict(core_b.drops) == {
        "truncated": 1,
        "malformed": 1,
        "unknown_peer": 1,
        "oversize": 1,
        "replayed": 1,
        "tampered": 1,
    }
    assert len(net.tap[B]) == 1


def test_plain_packets_carry_the_frame_in_clear_and_encrypted_do_not() -> None:
    for encrypted in (False, True):
        net = established_net([(A, B)], encrypted=encrypted)
        net.learn(B, mac(2))
        before = len(net.wire)
        net.send(A, vnet(eth(mac(2), mac(1), b"MARKER-1234" * 3000)))
        seen = any(b"MARKER-1234" in d for _, _, d in net.wire[before:])
        assert seen is not encrypted


def test_junk_flood_is_bounded() -> None:
    cfg = SleeveConfig(reassembly_per_peer=8, reassembly_bytes=1 << 20)
    net = established_net([(A, B)], encrypted=False, config=cfg)
    core_b = net.cores[B]
    hdr = struct.Struct(">B6sQIIHH")
    a_bytes = A.to_bytes(6, "big")
    for i in range(1000):
        core_b.datagrams_received(
            hdr.pack(0x21, a_bytes, i, 60000, 0, 0, 50) + bytes(1200), ADDR[A], net.now
        )
    assert core_b.status(net.now)["reassembly_bytes"] <= 8 * 60000
    assert core_b.drops["reassembly_evicted"] == 1000 - 8


def test_multi_hop_unicast_and_broadcast_tree() -> None:
    # A - B - C in a line (A and C have no direct link).
    net = established_net([(A, B), (B, C)], encrypted=True)
    routes = {
        A: Routes({B: B, C: B}, {A: [B], B: [], C: []}),
        B: Routes({A: A, C: C}, {A: [C], B: [A, C], C: [A]}),
        C: Routes({B: B, A: B}, {C: [B], A: [], B: []}),
    }
    for p, r in routes.items():
        net.cores[p].routes_changed(r)
    arp = eth(b"\xff" * 6, mac(3), b"who-has")
    net.send(C, vnet(arp))
    assert net.tap[A] == [vnet(arp)] and net.tap[B] == [vnet(arp)]
    reply = vnet(eth(mac(3), mac(1), os.urandom(30000)), gso_type=1, flags=1, start=34, off=16)
    net.send(A, reply)
    assert net.tap[C] == [reply]
    assert net.cores[B].stats["relayed"] == 1
    assert len(net.tap[B]) == 1  # the relay did not deliver the unicast locally


def test_mac_move_is_relearned() -> None:
    net = established_net([(A, B), (A, C)], encrypted=False)
    net.learn(B, mac(9))
    net.send(A, vnet(eth(mac(9), mac(1), b"x" * 50)))
    assert len(net.tap[B]) == 1 and not net.tap[C]
    net.learn(C, mac(9))  # the container moved behind C and said something
    net.send(A, vnet(eth(mac(9), mac(1), b"y" * 50)))
    assert len(net.tap[C]) == 1 and not net.tap[B]
    assert net.cores[A].macs.moves == 1


def test_stp_frames_ignored_and_local_destinations_not_sent() -> None:
    net = established_net([(A, B)])
    net.send(A, vnet(eth(b"\x01\x80\xc2\x00\x00\x00", mac(1), b"bpdu")))
    net.send(A, vnet(eth(b"\xff" * 6, mac(1), b"hi")))  # A learns mac(1) is local
    net.send(A, vnet(eth(mac(1), mac(5), b"to local")))
    assert net.cores[A].drops["stp"] == 1
    assert net.cores[A].drops["local_destination"] == 1
    assert len(net.tap[B]) == 1


def _tcp_frame_partial_checksum(payload: bytes) -> tuple[bytes, bytes]:
    """A TCP/IPv4 frame with CHECKSUM_PARTIAL state, and the same frame fully checksummed."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    tcp = bytearray(struct.pack(">HHIIBBHHH", 1234, 80, 1, 0, 0x50, 0x18, 1000, 0, 0) + payload)
    pseudo = src + dst + struct.pack(">BBH", 0, 6, len(tcp))
    total = sum(struct.unpack(f">{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    partial = bytearray(tcp)
    partial[16:18] = total.to_bytes(2, "big")  # what the kernel leaves: the pseudo-header sum
    full = bytearray(tcp)
    data = pseudo + bytes(tcp) + (b"\x00" if len(tcp) % 2 else b"")
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    full[16:18] = ((~s) & 0xFFFF).to_bytes(2, "big")
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    head = mac(2) + mac(1) + b"\x08\x00" + ip
    return head + bytes(partial), head + bytes(full)


@pytest.mark.parametrize("size", [1, 2, 101, 1000])
def test_complete_checksum_matches_a_full_computation(size: int) -> None:
    partial, full = _tcp_frame_partial_checksum(os.urandom(size))
    assert complete_checksum(partial, 34, 16) == full


def test_per_frame_peer_gets_frames_without_virtio_header() -> None:
    configs = {A: SleeveConfig(), B: SleeveConfig(tap_vnet_hdr=False)}
    net = established_net([(A, B)], configs=configs)
    assert not net.cores[A].superframes_everywhere
    assert net.cores[A].link_status(B)["superframes"] is False  # type: ignore[index]
    assert net.cores[B].link_status(A)["superframes"] is False  # type: ignore[index]
    net.learn(B, mac(2))
    partial, full = _tcp_frame_partial_checksum(b"hello" * 100)
    net.send(A, vnet(partial, flags=1, start=34, off=16))
    assert net.tap[B] == [full]
    net.send(A, vnet(eth(mac(2), mac(1), bytes(30000)), gso_type=1, flags=1, start=34, off=16))
    assert net.cores[A].drops["needs_offload"] == 1
    # And back: the per-frame side's frames gain a zero header on the super-frame side.
    net.learn(A, mac(1))
    plain = eth(mac(1), mac(2), b"back" * 50)
    net.cores[B].frame_from_tap(plain, net.now)
    net.settle()
    assert net.tap[A] == [vnet(plain)]


def test_icmp_too_big_when_fragmenting_is_off() -> None:
    net = established_net([(A, B)], encrypted=False, config=SleeveConfig(fragment=False))
    net.learn(B, mac(2))
    ip = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        3000,
        0,
        0x4000,
        64,
        17,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    frame = eth(mac(2), mac(1), ip + bytes(2980))
    net.send(A, vnet(frame))
    assert not net.tap[B]
    [answer] = [flat(f) for f in net.cores[A].take_tap_frames()] or net.tap[A]
    icmp_frame = answer[VNET_HDR_SIZE:]
    assert icmp_frame[:6] == mac(1) and icmp_frame[6:12] == mac(2)
    ip_hdr = icmp_frame[14:34]
    assert ip_hdr[9] == 1 and ip_hdr[12:16] == bytes([10, 0, 0, 2])
    icmp = icmp_frame[34:]
    assert icmp[0] == 3 and icmp[1] == 4
    assert int.from_bytes(icmp[6:8], "big") == 1472 - HEADER_SIZE - 17 - VNET_HDR_SIZE - 14
    # Checksums verify (one's complement sum of a checksummed header is 0xffff).
    for chunk in (ip_hdr, icmp):
        words = struct.unpack(f">{len(chunk) // 2}H", chunk + b"\x00" * (len(chunk) % 2))
        s = sum(words)
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        assert s == 0xFFFF
    no_df = bytearray(frame)
    no_df[20] = 0
    assert icmp_too_big(bytes(no_df), 1400) is None


def test_features_round_trip() -> None:
    cfg = SleeveConfig(port=7000, tap_vnet_hdr=False)
    parsed = remote_sleeve(features_of(cfg))
    assert parsed == {"port": 7000, "superframes": False, "cipher": cfg.cipher}
    assert remote_sleeve({}) is None
    assert remote_sleeve({"sleeve_version": 1, "sleeve_port": "x"}) is None


def _datagrams(core: SleeveCore) -> list[bytes]:
    out = []
    core.flush()
    for t in core.take_transmits():
        seg = t.segment or len(t.buffer)
        out += [t.buffer[i : i + seg] for i in range(0, len(t.buffer), seg)]
    return out


@pytest.mark.parametrize("encrypted", [True, False])
def test_coalesced_buffers_with_gaps_and_several_messages(encrypted: bool) -> None:
    """GRO-style buffers: runs of fragments from several messages, with one fragment missing."""
    net = established_net([(A, B)], encrypted=encrypted)
    net.learn(B, mac(2))
    core_a, core_b = net.cores[A], net.cores[B]
    frames = [vnet(eth(mac(2), mac(1), os.urandom(n))) for n in (20000, 64000, 9000)]
    # (v2: a message's fragments have one size, ceil(length / count); messages differ)
    per_message = [_capture(core_a, f, net.now) for f in frames]
    missing = per_message[1][20]  # inside the 64000-byte frame
    for dgrams in per_message:
        seg = len(dgrams[0])
        full = [d for d in dgrams if len(d) == seg and d is not missing]
        coalesced = b"".join(full)
        # the kernel coalesces equal-size segments; a short last fragment arrives on its own
        for i in range(0, len(coalesced), 30 * seg):
            core_b.datagrams_received(coalesced[i : i + 30 * seg], ADDR[A], net.now, seg)
        for d in dgrams:
            if len(d) != seg:
                core_b.datagrams_received(d, ADDR[A], net.now)
    got = [flat(f) for f in core_b.take_tap_frames()]
    assert got == [frames[0], frames[2]]
    core_b.datagrams_received(missing, ADDR[A], net.now)
    assert [flat(f) for f in core_b.take_tap_frames()] == [frames[1]]
    assert not core_b.drops
    assert core_b.status(net.now)["reassembly_bytes"] == 0


def test_coalesced_buffer_with_a_forged_fragment_is_not_assembled_blindly() -> None:
    net = established_net([(A, B)], encrypted=False)
    net.learn(B, mac(2))
    core_a, core_b = net.cores[A], net.cores[B]
    frame = vnet(eth(mac(2), mac(1), os.urandom(30000)))
    core_a.frame_from_tap(frame, net.now)
    dgrams = _datagrams(core_a)
    seg = len(dgrams[0])
    forged = bytearray(dgrams[5])
    forged[23:25] = (6).to_bytes(2, "big")  # claims to be fragment 6 at fragment 5's place
    bad = [*dgrams[:5], bytes(forged), *dgrams[6:]]
    core_b.datagrams_received(b"".join(bad[:-1]), ADDR[A], net.now, seg)
    core_b.datagrams_received(bad[-1], ADDR[A], net.now)
    assert core_b.take_tap_frames() == []
    assert core_b.drops["malformed"] >= 1


def test_cut_covers_the_concatenation_exactly() -> None:
    from weft.sleeve.core import _cut

    parts: list[bytes | memoryview] = [b"ab", os.urandom(5000), b"cdef", os.urandom(777)]
    whole = b"".join(parts)
    for chunk in (1, 3, 100, 1445, 10000):
        cuts = _cut(parts, chunk)
        joined = [b"".join(c) for c in cuts]
        assert b"".join(joined) == whole
        assert all(len(j) == chunk for j in joined[:-1]) and 0 < len(joined[-1]) <= chunk
    head_and_body: list[bytes | memoryview] = [b"h" * 17, os.urandom(3000)]
    assert [len(b"".join(c)) for c in _cut(head_and_body, 1000)] == [1000, 1000, 1000, 17]


def _capture(core: SleeveCore, frame: bytes, now: float) -> list[bytes]:
    """The datagrams ``core`` sends for one TAP frame (taken off its output, not delivered)."""
    core.frame_from_tap(frame, now)
    return _datagrams(core)


@pytest.mark.parametrize("gro", [False, True])
def test_forged_fragment_headers_cannot_make_messages_undeliverable(gro: bool) -> None:
    """#14 item 2: without the key, one forged datagram per message (sender name and message id
    copied from the wire, which shows them) used to make every fragmented message undeliverable:
    a 35-byte fragment claiming another length/count abandoned the real reassembly, and one with
    the real header but garbage bytes took a fragment's slot. Now each fragment authenticates
    before reassembly sees it."""
    net = established_net([(A, B)], encrypted=True)
    net.learn(B, mac(2))
    core_a, core_b = net.cores[A], net.cores[B]
    frames = [vnet(eth(mac(2), mac(1), os.urandom(20000))) for _ in range(20)]
    hdr = struct.Struct(">B6sQIIHH")
    for i, frame in enumerate(frames):
        real = _capture(core_a, frame, net.now)
        assert len(real) > 10
        vk, sender, msg_id, _total, _off, _idx, _count = hdr.unpack_from(real[0])
        if i % 2:  # a different cut of the same message id: 27 + 8 = 35 bytes
            forged = [hdr.pack(vk, sender, msg_id, 2000, 0, 0, 2) + os.urandom(8)]
        else:  # the real headers, garbage in place of the first and last fragments
            forged = [
                real[0][:HEADER_SIZE] + os.urandom(len(real[0]) - HEADER_SIZE),
                real[-1][:HEADER_SIZE] + os.urandom(len(real[-1]) - HEADER_SIZE),
            ]
        assert len(forged[0]) == 35 or len(forged) == 2
        for d in forged:  # the attacker's datagrams arrive first, from the peer's address
            core_b.datagrams_received(d, ADDR[A], net.now)
        if gro:
            seg = len(real[0])
            full = b"".join(d for d in real if len(d) == seg)
            core_b.datagrams_received(full, ADDR[A], net.now, seg)
            for d in real:
                if len(d) != seg:
                    core_b.datagrams_received(d, ADDR[A], net.now)
        else:
            for d in real:
                core_b.datagrams_received(d, ADDR[A], net.now)
    assert [flat(f) for f in core_b.take_tap_frames()] == frames
    # every forged datagram, and nothing else (the 35-byte one does not fit the cut its own
    # header gives: ceil(2000 / 2) bytes at index 0)
    assert dict(core_b.drops) == {"fragment_tag": 20, "malformed": 10}
    assert core_b.status(net.now)["reassembly_bytes"] == 0


def test_forged_fragments_cannot_evict_authenticated_reassemblies() -> None:
    """A flood of forged first fragments under fresh message ids opens no reassembly, so it
    cannot push out a message that is still arriving (the per-peer bound evicts the oldest)."""
    cfg = SleeveConfig(reassembly_per_peer=4)
    net = established_net([(A, B)], encrypted=True, config=cfg, gro=False)
    net.learn(B, mac(2))
    core_a, core_b = net.cores[A], net.cores[B]
    frame = vnet(eth(mac(2), mac(1), os.urandom(20000)))
    real = _capture(core_a, frame, net.now)
    hdr = struct.Struct(">B6sQIIHH")
    vk, sender, msg_id, total, _off, _idx, count = hdr.unpack_from(real[0])
    for d in real[:-1]:
        core_b.datagrams_received(d, ADDR[A], net.now)
    for k in range(1, 200):  # ids after the real message's, the sizes it has
        forged = hdr.pack(vk, sender, msg_id + 1000 * k, total, 0, 0, count)
        core_b.datagrams_received(forged + os.urandom(len(real[0]) - HEADER_SIZE), ADDR[A], 0)
    core_b.datagrams_received(real[-1], ADDR[A], net.now)
    assert [flat(f) for f in core_b.take_tap_frames()] == [frame]
    assert core_b.drops["reassembly_evicted"] == 0 and core_b.drops["fragment_tag"] == 199


ATTACKER = ("10.6.6.6", 6783)


def _plain_data(sender: PeerName, dst: PeerName, msg_id: int, frame: bytes) -> bytes:
    """A plaintext one-record data datagram as ``sender`` would send it (anyone can forge it)."""
    rec = struct.pack(">6s6sBI", sender.to_bytes(6, "big"), dst.to_bytes(6, "big"), 0, len(frame))
    body = rec + frame
    head = struct.pack(">B6sQIIHH", VERSION << 4 | 1, sender.to_bytes(6, "big"), msg_id,
                       len(body), 0, 0, 1)  # fmt: skip
    return head + body


def test_spoofed_datagrams_cannot_repoint_a_plain_link() -> None:
    """#14 item 3: on the plaintext sleeve one datagram claiming to be A, from the attacker's
    address, used to re-point B's link to A there: B's next frames for A went to the attacker.
    Now only a heartbeat carrying the token B gave A over the control connection moves it."""
    net = established_net([(A, B)], encrypted=False, config=SleeveConfig(tap_vnet_hdr=False))
    net.learn(A, mac(1))
    core_b = net.cores[B]
    spoofed = _plain_data(A, B, 12345, eth(mac(2), mac(1), b"spoofed"))
    core_b.datagrams_received(spoofed, ATTACKER, net.now)
    # a forged heartbeat too (its sequence and token guessed), full size
    hb = struct.pack(">B6sQIIHH", VERSION << 4 | 2, A.to_bytes(6, "big"), 7, 1445, 0, 0, 1)
    core_b.datagrams_received(hb + bytes(1445), ATTACKER, net.now)
    assert core_b.link_status(A)["addr"] == "10.0.0.1:6783"  # type: ignore[index]
    assert core_b.take_tap_frames() == []  # the spoofed frame was not delivered
    # B asks A (over the control connection) for a heartbeat, once (rate-limited)
    assert [(p, m[0]) for p, m in core_b.take_control()] == [(A, 0x02)]
    core_b.frame_from_tap(eth(mac(1), mac(2), b"for A"), net.now)
    core_b.flush()
    sent = core_b.take_transmits()
    assert sent and all(t.addr == ADDR[A] for t in sent)
    assert core_b.drops["wrong_source"] == 1 and core_b.drops["heartbeat_token"] == 1


def test_a_forged_heartbeat_from_the_peer_address_is_not_acknowledged() -> None:
    """Without the token a heartbeat is neither acknowledged (a forged ack of a large size
    would confirm a path MTU the path does not carry) nor allowed to move the link."""
    net = established_net([(A, B)], encrypted=False)
    core_b = net.cores[B]
    net.settle()
    hb = struct.pack(">B6sQIIHH", VERSION << 4 | 2, A.to_bytes(6, "big"), 7, 1445, 0, 0, 1)
    core_b.datagrams_received(hb + bytes(1445), ADDR[A], net.now)
    acks = [m for _, m in core_b.take_control() if m[0] == 0x01]
    assert acks == [] and core_b.drops["heartbeat_token"] == 1


@pytest.mark.parametrize("encrypted", [False, True])
def test_nat_rebinding_still_moves_the_link(encrypted: bool) -> None:
    """The peer's real address changes (a NAT rebinds its port): the link follows, plaintext on
    the peer's token-carrying heartbeat (asked for at once), encrypted on any authenticated
    datagram, and traffic flows both ways at the new address."""
    net = established_net([(A, B)], encrypted=encrypted)
    net.learn(A, mac(1))
    net.learn(B, mac(2))
    rebound = ("192.0.2.7", 40001)
    net.source[A] = rebound
    net.by_addr[rebound] = A
    first = vnet(eth(mac(2), mac(1), b"first after rebinding"))
    net.send(A, first)  # (no clock step: the move happens within the exchange)
    assert net.cores[B].link_status(A)["addr"] == "192.0.2.7:40001"  # type: ignore[index]
    second = vnet(eth(mac(2), mac(1), b"second"))
    net.send(A, second)
    assert net.tap[B][-1] == second
    if encrypted:
        assert net.tap[B] == [first, second]
    back = vnet(eth(mac(1), mac(2), b"reply"))
    net.send(B, back)
    assert net.tap[A] == [back]
    assert net.cores[B].link_status(A)["state"] == "established"  # type: ignore[index]


def test_a_neighbour_cannot_claim_another_peers_frames() -> None:
    """#14 item 8: a record names the peer where its frame entered the overlay; an
    authenticated neighbour used to be able to name any peer and so poison the MAC table with
    another peer's MACs. Now the claimed source must be the neighbour itself or a peer the
    routes put it on a shortest path from."""
    net = established_net([(A, B), (A, C)], encrypted=True)
    star = {
        A: Routes({B: B, C: C}, {A: [B, C], B: [C], C: [B]}),
        B: Routes({A: A, C: A}, {B: [A], A: [], C: []}),
        C: Routes({A: A, B: A}, {C: [A], A: [], B: []}),
    }
    for p, r in star.items():
        net.cores[p].routes_changed(r)
    core_a, core_b = net.cores[A], net.cores[B]
    # B, authenticated, sends a broadcast record claiming it entered at C, from C's MAC 9.
    forged = vnet(eth(b"\xff" * 6, mac(9), b"I am C's container"))
    link = core_b._links[A]
    core_b._queue(link, C.to_bytes(6, "big"), b"\x00" * 6, 1, forged)
    net.settle()
    assert core_a.macs.lookup(int.from_bytes(mac(9), "big"), net.now) is None
    assert net.tap[A] == [] and net.tap[C] == []
    assert core_a.drops["wrong_source_peer"] == 1
    # Its own frames, and C's frames relayed by A to B, still go through.
    net.learn(C, mac(3))
    assert core_b.macs.lookup(int.from_bytes(mac(3), "big"), net.now) == C
    net.learn(B, mac(2))
    assert core_a.macs.lookup(int.from_bytes(mac(2), "big"), net.now) == B


_FUZZ_HEADER = st.tuples(
    st.sampled_from([VERSION << 4 | 1, VERSION << 4 | 2, 0x11, 0x12, 0x00]),
    st.integers(0, 2**64 - 1),  # message id
    st.integers(0, 70000),  # length
    st.integers(0, 70000),  # offset
    st.integers(0, 60),  # index
    st.integers(0, 60),  # count
)


@settings(max_examples=200, deadline=None)
@given(
    encrypted=st.booleans(),
    datagrams=st.lists(
        st.tuples(_FUZZ_HEADER, st.binary(max_size=1500), st.booleans()), max_size=12
    ),
    controls=st.lists(st.binary(max_size=12), max_size=4),
)
def test_fuzzed_datagrams_and_control_messages_only_ever_drop(
    encrypted: bool,
    datagrams: list[tuple[tuple[int, int, int, int, int, int], bytes, bool]],
    controls: list[bytes],
) -> None:
    """Every v2 decoder field (fragment tags, the derived cut, heartbeat tokens, the token
    control message) under random input: drops and counters only, bounded state, and the link
    keeps its address (none of these carries the evidence a move needs)."""
    core = SleeveCore(B, SleeveConfig(reassembly_per_peer=4), rng=Random(1))
    core.add_link(
        A, ADDR[A], 0.0,
        send_key=KEYS[(B, A)] if encrypted else None,
        recv_key=KEYS[(A, B)] if encrypted else None,
    )  # fmt: skip
    a_bytes = A.to_bytes(6, "big")
    for (vk, msg_id, total, offset, index, count), body, from_attacker in datagrams:
        head = struct.pack(">B6sQIIHH", vk, a_bytes, msg_id, total, offset, index, count)
        core.datagrams_received(head + body, ATTACKER if from_attacker else ADDR[A], 1.0)
        core.datagrams_received(head + body + head + body, ADDR[A], 1.0, len(head + body))
        core.datagrams_received(body * 3, ADDR[A], 1.0, max(1, len(body)))  # GRO'd runts
    for message in controls:
        core.control_received(A, message, 1.0)
    core.handle_timer(10.0)
    assert core.link_status(A)["addr"] == "10.0.0.1:6783"  # type: ignore[index]
    assert core.status(10.0)["reassembly_bytes"] == 0  # all timed out by now
    assert all(m[0] in (0x01, 0x02) for _, m in core.take_control())


def test_link_status_says_when_the_peer_was_last_heard_and_the_round_trip() -> None:
    net = established_net([(A, B)])
    status = net.cores[A].link_status(B)
    assert status is not None
    assert status["rtt"] == 0.0  # the in-memory network answers at once
    heard_at = status["last_ack"]
    assert heard_at is not None and net.now - heard_at <= 1.0  # heartbeats every second
    net.blocked |= {(A, B), (B, A)}
    net.run(4.0)
    cut = net.cores[A].link_status(B)
    assert cut is not None and cut["state"] == "degraded"
    assert net.now - cut["last_ack"] >= 3.0  # nothing heard since the cut
    net.blocked.clear()
    net.run(3.0)
    back = net.cores[A].link_status(B)
    assert back is not None and net.now - back["last_ack"] <= 1.0
