"""The OVS fast part (weft.fastdp.ovs_part) against an in-memory datapath, with a stepped clock.

Two parts back to back: A's probes go through a simulated tunnel into B's fake datapath and come
back out of ``handle_upcalls``; the links' control messages go straight to the other part. The
worker runs jobs inline and timers are a list the test fires by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from weft.fastdp.esp import ESP_OVERHEAD, EspPair
from weft.fastdp.esp_links import EspLinks
from weft.fastdp.heartbeat import HeartbeatConfig, Probe, decode_probe
from weft.fastdp.ovs import FlowKey, OutputAction
from weft.fastdp.ovs_flows import OvsFlowPlanner, OvsPeer, OvsPorts
from weft.fastdp.ovs_part import (
    FEATURE_ESP,
    FEATURE_OVS,
    FEATURE_OVS_PORT,
    FEATURE_OVS_VNI,
    OvsLinkHandle,
    OvsPart,
    OvsPartConfig,
    make_part,
)
from weft.fastdp.vxlan import NETWORK_VNI
from weft.gossip.peer import PeerName
from weft.overlay import OverlayConnectionParams

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
HB = HeartbeatConfig(interval=1.0, healthy_interval=5.0, timeout=15.0)
MTU = 1450


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.timers: list[Timer] = []

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(when, fn)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move time forward, firing due timers in order (as the loop would)."""
        end = self.now + seconds
        while True:
            due = sorted(
                (t for t in self.timers if not t.cancelled and t.when <= end),
                key=lambda t: t.when,
            )
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.fn()
        self.now = end


@dataclass
class Timer:
    when: float
    fn: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class InlineWorker:
    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        return fn(*args)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        try:
            result, err = fn(*args), None
        except Exception as exc:
            result, err = None, exc
        if then is not None:
            then(result, err)

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass


@dataclass
class Tunnel:
    """Carries probe frames between fake datapaths while ``up`` and big enough."""

    hosts: dict[str, FakeHost] = field(default_factory=dict)
    up: bool = True
    path_mtu: int = 1500

    def send(self, dst_ip: str, frame: bytes) -> None:
        if self.up and len(frame) - 14 + 50 <= self.path_mtu and dst_ip in self.hosts:
            self.hosts[dst_ip].arrived.append(frame)


@dataclass
class FakeHost:
    """The kernel side in memory: records what the part asked for."""

    tunnel: Tunnel
    local_name: PeerName
    local_ip: str
    fail_start: str = ""
    stale: list[str] = field(default_factory=list)
    peers: dict[PeerName, OvsPeer] = field(default_factory=dict)
    peer_history: list[dict[PeerName, OvsPeer]] = field(default_factory=list)
    locations: dict[str, PeerName] = field(default_factory=dict)
    arrived: list[bytes] = field(default_factory=list)
    flushes: int = 0
    pointed: frozenset[str] = frozenset()
    bridge_macs: set[str] = field(default_factory=set)
    expired: list[float] = field(default_factory=list)
    started: int = 0
    stopped: bool = False

    def start(self) -> int:
        self.started += 1
        if self.fail_start:
            raise OSError(self.fail_start)
        self.tunnel.hosts[self.local_ip] = self
        return MTU

    def fileno(self) -> int | None:
        return None

    def stale_removed(self) -> list[str]:
        return list(self.stale)

    def set_peers(self, peers: dict[PeerName, OvsPeer]) -> None:
        self.peers = dict(peers)
        self.peer_history.append(dict(peers))

    def macs_changed(self, locations: dict[str, PeerName]) -> int:
        self.locations = dict(locations)
        return 0

    def handle_upcalls(self) -> list[Probe]:
        frames, self.arrived = self.arrived, []
        return [p for f in frames if (p := decode_probe(f, self.local_name)) is not None]

    def send_probe(self, peer: PeerName, frame: bytes) -> bool:
        info = self.peers.get(peer)
        if info is None:
            return False
        self.tunnel.send(info.ip, frame)
        return True

    def expire_idle(self, idle_seconds: float) -> int:
        self.expired.append(idle_seconds)
        return 2

    def flush_learned(self) -> int:
        self.flushes += 1
        return 1

    def point_macs(self, macs: frozenset[str]) -> int:
        self.pointed = macs
        return len(macs)

    def local_macs(self) -> set[str]:
        return set(self.bridge_macs)

    def status(self) -> dict[str, Any]:
        return {"flows": 3, "upcalls": 7}

    def stop(self) -> None:
        self.stopped = True
        self.tunnel.hosts.pop(self.local_ip, None)


@dataclass
class Side:
    part: OvsPart
    host: FakeHost | None = None
    handle: OvsLinkHandle | None = None
    health: list[tuple[bool, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    local_macs: list[frozenset[str]] = field(default_factory=list)

    def health_callback(self) -> Callable[[bool, str], None]:
        return lambda healthy, reason: self.health.append((healthy, reason))


def make_side(
    clock: Clock,
    tunnel: Tunnel,
    ip: str,
    hosts: list[FakeHost],
    esp: EspLinks | None = None,
    **host_args: Any,
) -> Side:
    def make_host(name: PeerName, local_ip: str) -> FakeHost:
        host = FakeHost(tunnel, name, local_ip, **host_args)
        hosts.append(host)
        return host

    part = OvsPart(
        bridge="weft",
        tap="weft-tap",
        heartbeat=HB,
        config=OvsPartConfig(local_ip=ip),
        make_host=make_host,
        worker=InlineWorker(),
        clock=lambda: clock.now,
        call_at=clock.call_at,
        esp=esp,
    )
    side = Side(part)
    part.on_local_macs = side.local_macs.append
    return side


def params(local: PeerName, remote: PeerName, ip: str, key: bytes | None = None) -> Any:
    return OverlayConnectionParams(
        local_name=local,
        remote_name=remote,
        remote_short_id=0x1234,  # only the low 12 bits are a short id
        remote_ip=ip,
        outbound=True,
        data_send_key=key,
        data_recv_key=key,
        remote_features={},
        send_control=lambda b: None,
        on_established=lambda: None,
    )


@dataclass
class Pair:
    clock: Clock
    tunnel: Tunnel
    a: Side
    b: Side
    hosts: list[FakeHost]

    def pump(self) -> None:
        """Deliver what crossed the tunnel (the upcall sockets became readable)."""
        for _ in range(4):
            for side in (self.a, self.b):
                side.part.upcalls_ready()

    def run(self, seconds: float, step: float = 0.25) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.now))
            self.pump()


async def make_pair(start_links: bool = True, esp: list[EspLinks] | None = None) -> Pair:
    # The ESP driver stamps esp_installed with the loop's clock: start ours there.
    clock = Clock(asyncio.get_running_loop().time() if esp else 1000.0)
    tunnel = Tunnel()
    hosts: list[FakeHost] = []
    a = make_side(clock, tunnel, "10.0.0.1", hosts, esp=esp[0] if esp else None)
    b = make_side(clock, tunnel, "10.0.0.2", hosts, esp=esp[1] if esp else None)
    pair = Pair(clock, tunnel, a, b, hosts)
    if start_links:

        def to(side: Side) -> Callable[[bytes], None]:
            def send(payload: bytes) -> None:
                assert side.handle is not None
                side.part.control_received(side.handle, payload)

            return send

        for me, other, local, remote, ip in ((a, b, A, B, "10.0.0.2"), (b, a, B, A, "10.0.0.1")):
            key = b"k" * 32 if esp else None
            me.handle = me.part.start_link(
                params(local, remote, ip, key),
                to(other),
                me.health_callback(),
                me.failed.append,
            )
            assert me.handle is not None
    return pair


async def test_links_become_healthy_through_the_tunnel() -> None:
    pair = await make_pair()
    pair.run(3)
    assert pair.a.health and pair.a.health[-1] == (True, "")
    assert pair.b.health[-1] == (True, "")
    assert pair.a.part.status()["links"][str(B)]["state"] == "healthy"
    host_a = pair.hosts[0]
    # Every peer on the network VNI, its short id cut to 12 bits, not carrying yet.
    assert host_a.peers == {B: OvsPeer("10.0.0.2", 0x234, False, vni=NETWORK_VNI)}
    assert pair.a.part.counters["probes_sent"] >= 1
    assert pair.b.part.counters["probes_received"] >= 1


async def test_blocked_tunnel_goes_unhealthy_and_comes_back() -> None:
    pair = await make_pair()
    pair.run(3)
    pair.tunnel.up = False
    pair.run(16)
    healthy, reason = pair.a.health[-1]
    assert not healthy and "6784 blocked" in reason, reason
    pair.tunnel.up = True
    pair.run(3)
    assert pair.a.health[-1] == (True, "")


async def test_a_path_smaller_than_the_mtu_never_becomes_healthy() -> None:
    pair = await make_pair()
    pair.tunnel.path_mtu = 1400
    pair.run(16)
    assert all(not healthy for healthy, _ in pair.a.health)
    assert pair.a.health and "no full-size" in pair.a.health[-1][1]


async def test_carrying_sets_peers_flushes_the_bridge_and_points_announced_macs() -> None:
    pair = await make_pair()
    pair.run(3)
    part, handle, host = pair.a.part, pair.a.handle, pair.hosts[0]
    assert handle is not None
    part.peer_macs(handle, frozenset({"0A:00:00:00:00:02", "0a:00:00:00:00:03"}))
    assert host.locations == {"0a:00:00:00:00:02": B, "0a:00:00:00:00:03": B}
    assert host.pointed == frozenset()  # not carrying: nothing points into the tunnel
    part.set_carrying(handle, True)
    assert host.peers[B].carrying
    assert host.flushes == 1
    assert host.pointed == {"0A:00:00:00:00:02", "0a:00:00:00:00:03"}
    assert part.counters["bridge_entries"] == 2
    part.set_carrying(handle, True)  # no change: nothing done
    assert host.flushes == 1
    part.set_carrying(handle, False)
    assert not host.peers[B].carrying and host.flushes == 2 and host.pointed == frozenset()


async def test_local_macs_polled_announced_and_never_pointed_away() -> None:
    pair = await make_pair()
    part, handle, host = pair.a.part, pair.a.handle, pair.hosts[0]
    assert handle is not None
    host.bridge_macs = {"0a:00:00:00:00:09"}
    pair.clock.advance(0.2)  # the first poll
    assert pair.a.local_macs == [frozenset({"0a:00:00:00:00:09"})]
    assert part.local_macs == {"0a:00:00:00:00:09"}
    part.peer_macs(handle, frozenset({"0a:00:00:00:00:09", "0a:00:00:00:00:02"}))
    part.set_carrying(handle, True)
    assert host.pointed == {"0a:00:00:00:00:02"}  # the moved container is ours now
    pair.clock.advance(5)  # polls again: unchanged, no new announcement
    assert len(pair.a.local_macs) == 1


async def test_idle_flows_expire_on_a_timer() -> None:
    pair = await make_pair()
    host = pair.hosts[0]
    pair.clock.advance(29)
    assert host.expired == []
    pair.clock.advance(1.5)
    assert host.expired == [30.0]
    pair.clock.advance(30)
    assert host.expired == [30.0, 30.0]
    status = pair.a.part.status()
    assert status["flows_expired"] == 4
    assert status["kernel"] == {"flows": 3, "upcalls": 7}


async def test_stop_link_removes_the_peer_and_close_stops_the_datapath() -> None:
    pair = await make_pair()
    part, handle, host = pair.a.part, pair.a.handle, pair.hosts[0]
    assert handle is not None
    part.set_carrying(handle, True)
    part.stop_link(handle)
    assert host.peers == {} and host.flushes == 2 and host.pointed == frozenset()
    part.stop_link(handle)  # idempotent
    part.control_received(handle, b"\x01junk")  # a stopped link ignores late messages
    assert part.status()["links"] == {}
    part.close()
    assert host.stopped
    assert all(t.cancelled for t in pair.clock.timers if t.fn == part.handle_timer)


async def test_a_replacing_connection_takes_over() -> None:
    pair = await make_pair()
    old = pair.a.handle
    new = pair.a.part.start_link(
        params(A, B, "10.0.0.2"), lambda b: None, lambda h, r: None, lambda r: None
    )
    assert old is not None and new is not None and old.stopped and not new.stopped
    pair.a.part.stop_link(old)  # the router stops the old one: the new one stays
    assert B in pair.hosts[0].peers


async def test_stale_state_is_reported_and_a_failed_start_is_not_retried() -> None:
    clock, tunnel = Clock(), Tunnel()
    hosts: list[FakeHost] = []
    side = make_side(clock, tunnel, "10.0.0.1", hosts, stale=["weft-dp", "vethwe-b"])
    assert side.part.start_link(params(A, B, "10.0.0.2"), print, print, print) is not None
    assert side.part.status()["stale_removed"] == ["weft-dp", "vethwe-b"]

    broken = make_side(clock, tunnel, "10.0.0.3", hosts, fail_start="No such device (ENODEV)")
    for _ in range(3):
        assert broken.part.start_link(params(A, B, "10.0.0.2"), print, print, print) is None
    assert broken.part.problem == "ovs: No such device (ENODEV)"
    assert hosts[-1].started == 1  # found once, reported, not retried
    assert broken.part.features() == {}


async def test_a_part_without_esp_refuses_encrypted_connections() -> None:
    clock, tunnel = Clock(), Tunnel()
    hosts: list[FakeHost] = []
    side = make_side(clock, tunnel, "10.0.0.1", hosts)
    handle = side.part.start_link(
        params(A, B, "10.0.0.2", key=b"k" * 32), print, print, side.failed.append
    )
    assert handle is None and side.failed == [
        "ovs: encrypted connections need ESP on this datapath"
    ]


async def test_features_and_compatibility() -> None:
    side = make_side(Clock(), Tunnel(), "10.0.0.1", [])
    features = side.part.features()
    assert features == {FEATURE_OVS: 1, FEATURE_OVS_PORT: 6784, FEATURE_OVS_VNI: NETWORK_VNI}
    assert side.part.peer_compatible(features) == ""
    assert side.part.peer_compatible({}) == "ovs: the peer has no OVS datapath"
    other = {**features, FEATURE_OVS_PORT: 4789}
    assert "the peer uses UDP 4789" in side.part.peer_compatible(other)


async def test_malformed_control_is_a_protocol_error() -> None:
    from weft.errors import RemoteProtocolError

    pair = await make_pair()
    assert pair.a.handle is not None
    with pytest.raises(RemoteProtocolError):
        pair.a.part.control_received(pair.a.handle, b"\x09")


@dataclass(frozen=True)
class Ctx:
    bridge: str = "weft"
    tap: str | None = "weft-tap"
    heartbeat: HeartbeatConfig = HB
    encrypted: bool = False


async def test_make_part_for_the_switch() -> None:
    part = make_part(Ctx(bridge="br-x"))
    assert isinstance(part, OvsPart) and part.name == "ovs" and part.part_id == 3
    assert part.config.datapath.bridge == "br-x" and part.heartbeat is HB
    assert not part.encrypted and part.config.datapath.extra_overhead == 0
    part.close()
    encrypted = make_part(Ctx(encrypted=True))
    assert encrypted.encrypted and encrypted.esp is not None and encrypted.esp.name == "ovs"
    assert encrypted.config.datapath.extra_overhead == ESP_OVERHEAD
    assert encrypted.features()[FEATURE_ESP] == 1
    encrypted.close()


# -- ESP (weft.fastdp.esp_links with a fake kernel) ---------------------------------------------


@dataclass
class FakeXfrm:
    log: list[tuple[str, Any]]
    next_spi: int = 0x1000

    def alloc_spi(self, local_ip: str, remote_ip: str) -> int:
        self.next_spi += 1
        self.log.append(("alloc", (local_ip, remote_ip)))
        return self.next_spi

    def install(self, pair: EspPair, send_key: bytes, recv_key: bytes) -> None:
        self.log.append(("install", pair))

    def remove(self, pair: EspPair) -> None:
        self.log.append(("remove", pair))

    def remove_stale(self) -> tuple[int, int]:
        return (1, 2)

    def close(self) -> None:
        pass


@dataclass
class FakeGuard:
    log: list[tuple[str, Any]]

    def start(self) -> None:
        self.log.append(("guard start", None))

    def require_esp_from(self, ip: str) -> None:
        self.log.append(("guard", ip))

    def forget(self, ip: str) -> None:
        self.log.append(("forget", ip))

    def stop(self) -> None:
        self.log.append(("guard stop", None))


async def settle(pair: Pair, seconds: float) -> None:
    """Step the clock, letting the ESP driver's results (call_soon_threadsafe) run."""
    end = pair.clock.now + seconds
    while pair.clock.now < end - 1e-9:
        for _ in range(3):
            await asyncio.sleep(0)
        pair.clock.advance(min(0.25, end - pair.clock.now))
        pair.pump()


async def test_encrypted_links_probe_only_after_esp_and_the_datapath_knows_the_peer_then() -> None:
    logs: list[list[tuple[str, Any]]] = [[], []]
    xfrms = [partial(FakeXfrm, logs[i], 0x1000 * (i + 1)) for i in (0, 1)]
    drivers = [EspLinks(xfrms[i], FakeGuard(logs[i]), "ovs") for i in (0, 1)]
    pair = await make_pair(esp=drivers)
    host_a = pair.hosts[0]
    assert pair.a.part.mtu == MTU and pair.a.part.encrypted
    # Before the SPIs are exchanged and ESP installed the datapath does not know the peer.
    assert host_a.peers == {} and ("guard start", None) in logs[0]
    await settle(pair, 3)
    kinds = [k for k, _ in logs[0]]
    assert kinds.index("guard") < kinds.index("alloc") < kinds.index("install")
    assert host_a.peers == {B: OvsPeer("10.0.0.2", 0x234, False, vni=NETWORK_VNI)}
    assert pair.a.health[-1] == (True, "") and pair.b.health[-1] == (True, "")
    installed = next(p for k, p in logs[0] if k == "install")
    assert installed.remote_ip == "10.0.0.2"
    assert (installed.in_spi, installed.out_spi) == (0x1001, 0x2001)
    status = pair.a.part.status()
    assert status["encrypted"] and status["esp"]["stale_removed"] == {"sas": 1, "policies": 2}
    # The link goes: the datapath forgets the peer before its ESP is removed.
    assert pair.a.handle is not None
    pair.a.part.set_carrying(pair.a.handle, True)
    pair.a.part.stop_link(pair.a.handle)
    await settle(pair, 0.5)
    assert host_a.peers == {}
    assert ("remove", installed) in logs[0] and ("forget", "10.0.0.2") in logs[0]
    pair.a.part.close()
    assert host_a.stopped and logs[0][-1] == ("guard stop", None)


async def test_an_esp_part_refuses_unencrypted_peers() -> None:
    logs: list[tuple[str, Any]] = []
    side = make_side(
        Clock(), Tunnel(), "10.0.0.1", [], esp=EspLinks(lambda: FakeXfrm(logs), FakeGuard(logs))
    )
    features = side.part.features()
    assert side.part.peer_compatible(features) == ""
    plain = {k: v for k, v in features.items() if k != FEATURE_ESP}
    assert side.part.peer_compatible(plain) == "ovs: the peer's OVS datapath has no ESP"
    assert side.part.start_link(params(A, B, "10.0.0.2"), print, print, side.failed.append) is None
    assert side.failed == ["ovs: an unencrypted connection on an ESP datapath"]


# -- the planner's announced MAC locations (weft.fastdp.ovs_flows.OvsFlowPlanner.locate) --------

PORTS = OvsPorts(bridge=2, vxlan=1)
C = PeerName.parse("02:00:00:00:00:0c")
MAC = "0a:00:00:00:00:02"


def planner() -> OvsFlowPlanner:
    p = OvsFlowPlanner(A, 0, "10.0.0.1", PORTS)
    p.set_peers(
        {
            B: OvsPeer("10.0.0.2", 2, True, vni=NETWORK_VNI),
            C: OvsPeer("10.0.0.3", 3, True, vni=NETWORK_VNI),
        }
    )
    return p


def to_mac(p: OvsFlowPlanner) -> Any:
    return p.miss(FlowKey(in_port=PORTS.bridge, eth_src="0a:00:00:00:00:01", eth_dst=MAC))


def test_announced_mac_is_tunnelled_to_its_peer_only() -> None:
    p = planner()
    assert len(to_mac(p).actions) == 4  # unknown: flooded to B and C
    stale = p.locate({MAC: B})
    assert len(stale) == 1  # the flood flow towards it
    decision = to_mac(p)
    assert decision.kind == "forward" and len(decision.actions) == 2
    assert decision.actions[0].tunnel.ipv4_dst == "10.0.0.2"
    assert decision.actions[0].tunnel.tun_id == NETWORK_VNI


def test_a_moved_mac_invalidates_flows_and_an_unannounced_one_is_forgotten() -> None:
    p = planner()
    p.locate({MAC: B})
    to_mac(p)
    assert len(p.locate({MAC: C})) == 1
    assert to_mac(p).actions[0].tunnel.ipv4_dst == "10.0.0.3"
    assert p.locate({MAC: C}) == ()  # unchanged: nothing to delete
    assert len(p.locate({})) == 1 and MAC not in p.macs
    # A MAC learned somewhere else since the announcement is not forgotten with it.
    p.locate({MAC: B})
    p.miss(FlowKey(in_port=PORTS.bridge, eth_src=MAC, eth_dst="ff:ff:ff:ff:ff:ff"))
    assert p.macs[MAC] == A
    p.locate({})
    assert p.macs[MAC] == A


def test_announced_macs_return_with_a_peer_that_carries_again() -> None:
    p = planner()
    p.locate({MAC: B})
    p.set_peers({B: OvsPeer("10.0.0.2", 2, False, vni=NETWORK_VNI)})
    assert MAC not in p.macs
    assert to_mac(p).kind == "drop"  # nobody carries: the sleeve's
    p.set_peers({B: OvsPeer("10.0.0.2", 2, True, vni=NETWORK_VNI)})
    assert p.macs[MAC] == B
    assert to_mac(p).actions[1] == OutputAction(PORTS.vxlan)


async def test_the_switch_builds_the_ovs_part_first_also_with_a_password() -> None:
    from weft.fastdp.capabilities import Capabilities, Feature
    from weft.switch.pump import FastPartContext, _build_fast_parts

    yes, no = Feature(True, ""), Feature(False, "No such file (ENOENT)")
    for encrypted in (False, True):
        caps = Capabilities(openvswitch=yes, vxlan=yes, esp=yes)
        ctx = FastPartContext(None, "auto", caps, "weft", None, 1376, HB, encrypted)
        parts, note = _build_fast_parts(ctx)
        assert [p.name for p in parts] == ["ovs"] and note == ""  # one datapath on UDP 6784
        assert parts[0].encrypted == encrypted
        assert parts[0].mtu is None  # nothing touched the kernel: it starts with a connection
        parts[0].close()
    caps = Capabilities(openvswitch=no, vxlan=yes, esp=yes)
    parts, note = _build_fast_parts(
        FastPartContext(None, "ovs", caps, "weft", None, 1376, HB, False)
    )
    assert parts == [] and note == "ovs: No such file (ENOENT)"  # found once, reported
