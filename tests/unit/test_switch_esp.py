"""ESP for the vxlan fast path (weft.fastdp.esp_links through weft.fastdp.vxlan_part) with
an in-memory kernel: fake xfrm, nftables guard and vxlan datapath that write one ordered log,
jobs run inline (the worker thread's order), the heartbeat clock stepped by hand.

Shown: the inbound guard before the SPI, the SAs and policies before the peer's FDB entry, and
heartbeats (so health, so carrying) only after that; teardown withdraws the FDB before removing
ESP; an SPI re-announce re-keys without plaintext; xfrm errors fail the connection's fast path
once (not retried) and a kernel without ESP stops the part offering it.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from weft.fastdp.errors import DatapathError
from weft.fastdp.esp import EspPair
from weft.fastdp.esp_links import EspLinks
from weft.fastdp.heartbeat import HeartbeatConfig, decode_probe
from weft.fastdp.link import encode_spi
from weft.fastdp.vxlan import VxlanConfig
from weft.fastdp.vxlan_part import VxlanLinkHandle, VxlanPart
from weft.gossip.peer import PeerName
from weft.overlay import OverlayConnectionParams

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
IP = {A: "192.0.2.1", B: "192.0.2.2"}
KEY_AB, KEY_BA = b"a" * 32, b"b" * 32


class FakeXfrm:
    def __init__(self, log: list[str], first_spi: int) -> None:
        self.log = log
        self.next_spi = first_spi
        self.fail_alloc: DatapathError | None = None
        self.fail_install: DatapathError | None = None
        self.allocs = 0
        self.installed: dict[str, EspPair] = {}

    def alloc_spi(self, local_ip: str, remote_ip: str) -> int:
        self.allocs += 1
        if self.fail_alloc is not None:
            raise self.fail_alloc
        self.next_spi += 1
        self.log.append(f"alloc {self.next_spi:#x}")
        return self.next_spi

    def install(self, pair: EspPair, send_key: bytes, recv_key: bytes) -> None:
        if self.fail_install is not None:
            raise self.fail_install
        assert len(send_key) == len(recv_key) == 36 and send_key != recv_key
        self.log.append(f"install {pair.in_spi:#x}/{pair.out_spi:#x}")
        self.installed[pair.remote_ip] = pair

    def remove(self, pair: EspPair) -> None:
        self.log.append(f"remove {pair.in_spi:#x}/{pair.out_spi:#x}")
        self.installed.pop(pair.remote_ip, None)

    def remove_stale(self) -> tuple[int, int]:
        self.log.append("remove_stale")
        return (2, 2)

    def close(self) -> None:
        self.log.append("xfrm closed")


@dataclass
class FakeGuard:
    log: list[str]
    ips: set[str] = field(default_factory=set)

    def start(self) -> None:
        self.log.append("guard start")

    def require_esp_from(self, ip: str) -> None:
        self.log.append(f"guard require {ip}")
        self.ips.add(ip)

    def forget(self, ip: str) -> None:
        self.log.append(f"guard forget {ip}")
        self.ips.discard(ip)

    def stop(self) -> None:
        self.log.append("guard stop")


@dataclass
class FakeDp:
    log: list[str]
    peers: dict[PeerName, bool] = field(default_factory=dict)  # name -> carrying

    def peer_started(self, name: PeerName, ip: str) -> None:
        self.log.append(f"fdb start {ip}")
        self.peers[name] = False

    def peer_carrying(self, name: PeerName, carrying: bool) -> None:
        if name in self.peers:
            self.log.append(f"fdb carrying {carrying}")
            self.peers[name] = carrying

    def peer_stopped(self, name: PeerName) -> None:
        if self.peers.pop(name, None) is not None:
            self.log.append("fdb stop")

    def macs_changed(self, locations: dict[str, PeerName]) -> None:
        pass

    def stop(self) -> None:
        self.log.append("device deleted")


class InlineExecutor:
    """The worker thread, in order, without the thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


class FakeIpr:
    def link_lookup(self, ifname: str) -> list[int]:
        return []

    def close(self) -> None:
        pass


@dataclass
class FakeSock:
    frames: list[bytes] = field(default_factory=list)

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


@dataclass
class End:
    name: PeerName
    part: VxlanPart
    xfrm: FakeXfrm
    guard: FakeGuard
    dp: FakeDp
    sock: FakeSock
    log: list[str]
    control: list[bytes] = field(default_factory=list)
    health: list[tuple[bool, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    handle: VxlanLinkHandle | None = None

    def connect(self, remote: PeerName) -> VxlanLinkHandle:
        send_key, recv_key = (KEY_AB, KEY_BA) if self.name == A else (KEY_BA, KEY_AB)
        params = OverlayConnectionParams(
            local_name=self.name,
            remote_name=remote,
            remote_short_id=1,
            remote_ip=IP[remote],
            outbound=self.name == A,
            data_send_key=send_key,
            data_recv_key=recv_key,
            remote_features={},
            send_control=lambda payload: None,
            on_established=lambda: None,
        )
        handle = self.part.start_link(
            params,
            self.control.append,
            lambda healthy, reason: self.health.append((healthy, reason)),
            self.failed.append,
        )
        assert handle is not None
        self.handle = handle
        return handle


def make_end(name: PeerName, first_spi: int) -> End:
    log: list[str] = []
    xfrm, guard, dp, sock = FakeXfrm(log, first_spi), FakeGuard(log), FakeDp(log), FakeSock()
    esp = EspLinks(lambda: xfrm, guard, "vxlan")
    part = VxlanPart(
        bridge="weft",
        tap=None,
        heartbeat=HeartbeatConfig(interval=1, healthy_interval=2, timeout=4),
        device=VxlanConfig(local_ip=IP[name], underlay_mtu=1500),
        esp=esp,
    )
    inline = InlineExecutor()
    cast(Any, part)._pool.shutdown()
    cast(Any, part)._pool = inline
    esp.bind(part.loop, inline.submit)
    esp.start()  # what VxlanPart._start does first, before the device exists
    part.local_name = name
    part.mtu = 1410  # 1500 - 50 (VXLAN) - 40 (ESP)
    cast(Any, part)._dp = dp
    cast(Any, part)._ipr = FakeIpr()
    cast(Any, part)._sock = sock
    cast(Any, part)._arm = lambda: None  # no loop timers: the tests step the clock
    return End(name, part, xfrm, guard, dp, sock, log)


async def settle() -> None:
    """Let the loop run the results the (inline) worker handed back."""
    for _ in range(5):
        await asyncio.sleep(0)


def pump(a: End, b: End) -> None:
    """Deliver control messages and probes both ways until nothing moves."""
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            assert src.handle is not None and dst.handle is not None
            messages, src.control[:] = list(src.control), []
            for message in messages:
                moved = True
                dst.part.control_received(dst.handle, message)
            frames, src.sock.frames[:] = list(src.sock.frames), []
            for frame in frames:
                moved = True
                probe = decode_probe(frame, dst.name)
                assert probe is not None
                dst.handle.link.probe_received(probe)
                cast(Any, dst.part)._process(dst.handle)


def tick(end: End, now: float) -> None:
    assert end.handle is not None
    end.handle.link.handle_timer(now)
    cast(Any, end.part)._process(end.handle)


async def connected_pair() -> tuple[End, End]:
    a, b = make_end(A, 0x1000), make_end(B, 0x2000)
    a.connect(B)
    b.connect(A)
    await settle()
    pump(a, b)
    await settle()
    return a, b


async def test_guard_then_spi_then_esp_then_fdb_then_heartbeats() -> None:
    a, b = await connected_pair()
    assert a.log == [
        "remove_stale",
        "guard start",
        "guard require 192.0.2.2",  # inbound plaintext dropped before anything is exchanged
        "alloc 0x1001",
        "install 0x1001/0x2001",  # outbound policy first (inside install), SAs, inbound policy
        "fdb start 192.0.2.2",  # only now can the vxlan device send anything to the peer
    ]
    assert a.xfrm.installed["192.0.2.2"] == EspPair("192.0.2.1", "192.0.2.2", 0x1001, 0x2001)
    assert b.xfrm.installed["192.0.2.1"] == EspPair("192.0.2.2", "192.0.2.1", 0x2001, 0x1001)
    assert a.sock.frames == [] and a.health == []  # no probe yet: the link waits for the clock
    for end in (a, b):
        tick(end, end.part.loop.time() + 1)
    assert a.sock.frames and len(a.sock.frames[0]) == 1410 + 14  # full-size, through ESP
    pump(a, b)
    assert a.health == [(True, "")] and b.health == [(True, "")]
    assert a.handle is not None
    a.part.set_carrying(a.handle, True)
    assert a.log[-1] == "fdb carrying True" and a.dp.peers == {B: True}
    status = a.part.status()
    assert status["encrypted"] is True and status["mtu"] == 1410
    assert status["esp"]["links"][str(B)]["out_spi"] == 0x2001
    assert status["esp"]["stale_removed"] == {"sas": 2, "policies": 2}
    assert a.part.features()["fastdp_esp"] == 1
    assert a.part.peer_compatible({**a.part.features()}) == ""
    no_esp = {k: v for k, v in a.part.features().items() if k != "fastdp_esp"}
    assert a.part.peer_compatible(no_esp) == "vxlan: the peer's vxlan datapath has no ESP"


async def test_no_heartbeat_and_no_fdb_before_the_peer_spi() -> None:
    a = make_end(A, 0x1000)
    handle = a.connect(B)
    await settle()
    assert handle.link.reason == "exchanging ESP SPIs"
    tick(a, a.part.loop.time() + 10)
    assert a.sock.frames == [] and a.dp.peers == {}
    assert a.control == [encode_spi(0x1001)]


async def test_stop_withdraws_the_fdb_before_esp_goes_and_close_removes_everything() -> None:
    a, b = await connected_pair()
    assert a.handle is not None
    a.part.set_carrying(a.handle, True)
    a.log.clear()
    a.part.stop_link(a.handle)
    await settle()
    assert a.log == [
        "fdb stop",
        "remove 0x1001/0x2001",
        "guard forget 192.0.2.2",
    ]
    assert a.xfrm.installed == {} and a.guard.ips == set()
    b.log.clear()
    cast(Any, b.part)._sock = None  # no real socket to unregister
    b.part.close()
    assert b.log == ["device deleted", "remove 0x2001/0x1001", "guard stop", "xfrm closed"]


async def test_an_spi_reannounce_rekeys_without_a_plaintext_window() -> None:
    a, b = await connected_pair()
    assert a.handle is not None
    for end in (a, b):
        tick(end, end.part.loop.time() + 1)
    pump(a, b)
    assert a.handle.link.state.value == "healthy"
    a.log.clear()
    a.part.control_received(a.handle, encode_spi(0x2999))  # the peer's new inbound SPI
    await settle()
    assert a.log == [
        "fdb stop",  # nothing forwards to the peer while its policies are replaced
        "remove 0x0/0x2001",  # policies and the old outbound SA; our inbound SA stays
        "install 0x1001/0x2999",
        "fdb start 192.0.2.2",
    ]
    assert a.handle.link.state.value == "pending"  # the new keys must prove the path again
    a.part.control_received(a.handle, encode_spi(0x2999))  # the same again: nothing to do
    await settle()
    assert a.log[-1] == "fdb start 192.0.2.2"


async def test_a_replacing_connection_takes_the_peer_over() -> None:
    a, _ = await connected_pair()
    old = a.handle
    assert old is not None
    a.log.clear()
    new = a.connect(B)
    await settle()
    assert a.log == ["alloc 0x1002", "fdb stop", "remove 0x1001/0x2001"]
    assert a.guard.ips == {"192.0.2.2"}  # the new link holds it; never dropped in between
    a.part.stop_link(old)  # the router stops the old one later: nothing of the new one goes
    await settle()
    assert a.log[-1] == "remove 0x1001/0x2001" and a.guard.ips == {"192.0.2.2"}
    assert a.part.links[B] is new


async def test_an_alloc_error_fails_the_path_once_and_a_kernel_without_esp_stops_offering_it() -> (
    None
):
    a = make_end(A, 0x1000)
    a.xfrm.fail_alloc = DatapathError("allocate an ESP SPI", "nope (ENOSYS)", errno.ENOSYS)
    handle = a.connect(B)
    await settle()
    assert a.failed == ["vxlan: ESP: allocate an ESP SPI: nope (ENOSYS)"]
    assert a.part.problem == "vxlan: ESP: allocate an ESP SPI: nope (ENOSYS)"
    assert a.part.status()["esp"]["fatal"] == a.part.problem
    for step in range(1, 5):  # time passes: not retried
        tick(a, a.part.loop.time() + step * 10)
    await settle()
    assert a.xfrm.allocs == 1 and a.failed == [a.part.problem] and a.sock.frames == []
    a.part.stop_link(handle)
    await settle()
    assert a.guard.ips == set()


async def test_an_install_error_fails_only_that_connection() -> None:
    a, b = make_end(A, 0x1000), make_end(B, 0x2000)
    a.xfrm.fail_install = DatapathError("add ESP out policy", "File exists (EEXIST)", errno.EEXIST)
    a.connect(B)
    b.connect(A)
    await settle()
    pump(a, b)
    await settle()
    assert a.failed == ["vxlan: ESP: add ESP out policy: File exists (EEXIST)"]
    assert a.part.problem == "" and a.dp.peers == {}
    assert a.log[-1] == "remove 0x1001/0x2001"  # the partial install undone


@pytest.mark.parametrize("missing", ["send", "recv"])
async def test_an_esp_link_needs_both_keys(missing: str) -> None:
    from weft.errors import LocalError

    esp = EspLinks(lambda: FakeXfrm([], 1), FakeGuard([]))
    keys = {"send": KEY_AB, "recv": KEY_BA, missing: None}
    with pytest.raises(LocalError):
        esp.link_started(B, "192.0.2.1", "192.0.2.2", keys["send"], keys["recv"])


def _caps(ovs: bool = False, esp: bool = True) -> Any:
    from weft.fastdp.capabilities import Capabilities, Feature

    return Capabilities(
        openvswitch=Feature(ovs, "" if ovs else "no openvswitch (ENOENT)"),
        vxlan=Feature(True, ""),
        esp=Feature(esp, "" if esp else "no ESP (ENOSYS)"),
    )


def _ctx(mode: str, encrypted: bool, caps: Any) -> Any:
    from weft.switch.pump import FastPartContext

    return FastPartContext(None, mode, caps, "weft", "weft-tap", 1376, HeartbeatConfig(), encrypted)


async def test_with_a_password_and_kernel_esp_the_vxlan_part_runs_esp() -> None:
    from weft.fastdp.esp_links import StrictInboundGuard
    from weft.switch.pump import _build_fast_parts

    parts, note = _build_fast_parts(_ctx("auto", True, _caps()))
    assert note == "" and [p.name for p in parts] == ["vxlan"]
    part = parts[0]
    assert isinstance(part, VxlanPart) and part.encrypted and part.esp is not None
    assert isinstance(cast(Any, part.esp)._guard, StrictInboundGuard)
    assert part.device_config.extra_overhead == 40  # ESP_OVERHEAD off the overlay MTU
    part.close()
    plain, note = _build_fast_parts(_ctx("auto", False, _caps()))
    assert note == "" and not plain[0].encrypted
    plain[0].close()


async def test_with_a_password_and_no_kernel_esp_there_is_no_fast_part() -> None:
    from weft.switch.pump import _build_fast_parts

    parts, note = _build_fast_parts(_ctx("auto", True, _caps(esp=False)))
    assert (parts, note) == ([], "encrypted: kernel has no ESP")
    parts, note = _build_fast_parts(_ctx("ovs", False, _caps()))
    assert (parts, note) == ([], "ovs: no openvswitch (ENOENT)")
