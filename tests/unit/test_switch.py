"""The overlay switch's wiring (weft.switch.pump) with a fake sleeve and a fake vxlan part:
envelope routing, both ends agreeing, fallback callbacks, notes, the sleeve's route filter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from unittest.mock import ANY

import pytest

from weft.errors import ConfigError, RemoteProtocolError
from weft.fastdp.link import FastPathLink
from weft.fastdp.part import FastPart
from weft.fastdp.vxlan import VxlanConfig
from weft.fastdp.vxlan_part import VxlanLinkHandle, VxlanPart
from weft.gossip.peer import PeerName
from weft.overlay import (
    Overlay,
    OverlayConnectionParams,
    OverlayConnectionStatus,
    RoutesView,
)
from weft.switch.core import (
    PART_OVS,
    PART_SLEEVE,
    PART_SWITCH,
    PART_VXLAN,
    SwitchConfig,
    encode_path_state,
    wrap,
)
from weft.switch.pump import SwitchConnection, SwitchOverlay

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
C = PeerName.parse("02:00:00:00:00:0c")
REASON = "heartbeats through the tunnel unanswered for 2s (UDP 6784 blocked?)"


@dataclass
class FakeSleeveConn:
    params: OverlayConnectionParams
    received: list[bytes] = field(default_factory=list)
    state: str = "pending"
    stopped: bool = False

    def control_received(self, payload: bytes) -> None:
        self.received.append(payload)

    def status(self) -> OverlayConnectionStatus:
        return OverlayConnectionStatus("sleeve", self.state, 1414, "udp x", False)

    def stop(self) -> None:
        self.stopped = True

    def establish(self) -> None:
        self.state = "established"
        self.params.on_established()


class FakeSleeve:
    def __init__(self) -> None:
        self.conns: list[FakeSleeveConn] = []
        self.routes: RoutesView | None = None

    def features(self) -> dict[str, Any]:
        return {"sleeve_version": 1}

    def prepare_connection(self, params: OverlayConnectionParams) -> FakeSleeveConn:
        conn = FakeSleeveConn(params)
        self.conns.append(conn)
        return conn

    def routes_changed(self, routes: RoutesView) -> None:
        self.routes = routes

    def status(self) -> dict[str, Any]:
        return {"stats": {}}


class FakeVxlan:
    """A fast part in memory (``name`` vxlan unless told): records what the switch asks."""

    def __init__(self, mtu: int = 1450, name: str = "vxlan", part_id: int = PART_VXLAN) -> None:
        self.name = name
        self.part_id = part_id
        self.problem = ""
        self.mtu: int | None = mtu
        self.encrypted = False
        self.device_config = VxlanConfig()
        self.local_macs: frozenset[str] = frozenset({"02:42:00:00:00:01"})
        self.on_local_macs: Callable[[frozenset[str]], None] = lambda macs: None
        self.handles: list[VxlanLinkHandle] = []
        self.control: list[bytes] = []
        self.carrying: dict[PeerName, bool] = {}
        self.macs: dict[PeerName, frozenset[str]] = {}
        self.params: list[OverlayConnectionParams] = []

    def features(self) -> dict[str, Any]:
        if self.name != "vxlan":
            return {f"fastdp_{self.name}": 1}
        return {"fastdp_vxlan": 1, "fastdp_vxlan_port": 6784, "fastdp_vni": 0xFFFFFF}

    def peer_compatible(self, remote_features: Mapping[str, Any]) -> str:
        if remote_features.get(f"fastdp_{self.name}") != 1:
            return f"{self.name}: the peer has no {self.name} datapath"
        return ""

    def ensure_started(self, local: PeerName, ip: str) -> bool:
        return True

    def start_link(
        self,
        params: OverlayConnectionParams,
        send_control: Callable[[bytes], None],
        on_health: Callable[[bool, str], None],
        on_failed: Callable[[str], None],
    ) -> VxlanLinkHandle:
        assert self.mtu is not None
        self.params.append(params)
        link = FastPathLink(params.local_name, params.remote_name, self.mtu, False, 0.0)
        handle = VxlanLinkHandle(
            params.remote_name, params.remote_ip, link, send_control, on_health, on_failed
        )
        self.handles.append(handle)
        return handle

    def control_received(self, handle: VxlanLinkHandle, payload: bytes) -> None:
        self.control.append(payload)

    def set_carrying(self, handle: VxlanLinkHandle, carrying: bool) -> None:
        self.carrying[handle.remote] = carrying

    def peer_macs(self, handle: VxlanLinkHandle, macs: frozenset[str]) -> None:
        self.macs[handle.remote] = macs

    def stop_link(self, handle: VxlanLinkHandle) -> None:
        handle.stopped = True

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def _vxlan_part_is_a_fast_part(part: VxlanPart) -> FastPart:
    return part  # mypy checks VxlanPart against the protocol


SWITCH_FEATURES = {
    "sleeve_version": 1,
    "overlay_switch": 1,
    "fastdp_vxlan": 1,
    "fastdp_vxlan_port": 6784,
    "fastdp_vni": 0xFFFFFF,
}


@dataclass
class End:
    overlay: SwitchOverlay
    sleeve: FakeSleeve
    vxlan: FakeVxlan
    sent: list[bytes] = field(default_factory=list)
    established: int = 0
    conn: SwitchConnection | None = None
    ovs: FakeVxlan | None = None

    def connect(
        self, local: PeerName, remote: PeerName, features: Mapping[str, Any], key: bytes | None
    ) -> SwitchConnection:
        def established() -> None:
            self.established += 1

        params = OverlayConnectionParams(
            local_name=local,
            remote_name=remote,
            remote_short_id=1,
            remote_ip="192.0.2.2",
            outbound=True,
            data_send_key=key,
            data_recv_key=key,
            remote_features=features,
            send_control=self.sent.append,
            on_established=established,
        )
        conn = self.overlay.prepare_connection(params)
        assert isinstance(conn, SwitchConnection)
        self.conn = conn
        return conn


def make_end(mode: str = "auto", vxlan: FakeVxlan | None = None, container_mtu: int = 1376) -> End:
    sleeve = FakeSleeve()
    vx = vxlan or FakeVxlan()
    overlay = SwitchOverlay(
        cast(Overlay, sleeve),
        [cast(FastPart, vx)],
        mode=mode,
        switch_config=SwitchConfig(recovery_hold=0.0),
        container_mtu=container_mtu,
    )
    return End(overlay, sleeve, vx)


def deliver(src: End, dst: End) -> None:
    assert dst.conn is not None
    messages, src.sent[:] = list(src.sent), []
    for message in messages:
        dst.conn.control_received(message)


async def test_features_advertise_the_switch_and_vxlan() -> None:
    end = make_end()
    assert end.overlay.features() == SWITCH_FEATURES


async def test_both_ends_agree_carry_by_vxlan_fall_back_and_return() -> None:
    a, b = make_end(), make_end()
    fallbacks: list[tuple[str, str]] = []
    a.overlay.on_fallback(lambda old, new: fallbacks.append((old, new)))
    ca, cb = a.connect(A, B, SWITCH_FEATURES, None), b.connect(B, A, SWITCH_FEATURES, None)
    # Each end announced its MACs (switch part) at start.
    assert a.sent == [wrap(PART_SWITCH, bytes.fromhex("020001") + bytes.fromhex("024200000001"))]
    deliver(a, b)
    deliver(b, a)
    assert b.vxlan.macs[A] == frozenset({"02:42:00:00:00:01"})
    a.sleeve.conns[0].establish()
    assert a.established == 1 and ca.status().datapath == "sleeve"
    assert ca.status().info == (
        "vxlan: waiting for the first heartbeat through the tunnel; using sleeve"
    )
    ha, hb = a.vxlan.handles[0], b.vxlan.handles[0]
    ha.on_health(True, "")
    deliver(a, b)
    assert cb.switch.chosen == "sleeve"  # b's own probes are not answered yet
    hb.on_health(True, "")
    deliver(b, a)
    assert ca.switch.chosen == cb.switch.chosen == "vxlan"
    assert a.vxlan.carrying[B] and b.vxlan.carrying[A]
    status = ca.status()
    assert (status.datapath, status.state, status.mtu, status.info) == (
        "vxlan",
        "established",
        1450,
        "",
    )
    assert a.established == 1  # established once, whatever carries
    ha.on_health(False, REASON)
    assert ca.switch.chosen == "sleeve" and not a.vxlan.carrying[B]
    assert fallbacks == [("vxlan", "sleeve")]
    assert ca.status().info == f"vxlan: {REASON}; using sleeve"
    switch_status = a.overlay.status()["switch"]
    assert switch_status["fallbacks"] == {"vxlan->sleeve": 1}
    assert switch_status["fallback_reasons"] == [
        {"from": "vxlan", "to": "sleeve", "reason": "heartbeat_lost", "count": 1}
    ]
    moves = [
        (h["peer"], h["kind"], h["from"], h["to"], h["reason"]) for h in switch_status["history"]
    ]
    assert moves == [
        (str(B), "recovered", "sleeve", "vxlan", "healthy"),
        (str(B), "fallback", "vxlan", "sleeve", "heartbeat_lost"),
    ]
    assert switch_status["history"][-1]["info"] == f"vxlan: {REASON}"
    deliver(a, b)
    assert cb.switch.chosen == "sleeve"  # the peer follows
    ha.on_health(True, "")
    deliver(a, b)
    assert ca.switch.chosen == cb.switch.chosen == "vxlan"


async def test_sleeve_messages_travel_in_the_envelope() -> None:
    a, b = make_end(), make_end()
    ca = a.connect(A, B, SWITCH_FEATURES, None)
    b.connect(B, A, SWITCH_FEATURES, None)
    a.sent.clear()
    a.sleeve.conns[0].params.send_control(b"\x01sleeve-ack")
    assert a.sent == [wrap(PART_SLEEVE, b"\x01sleeve-ack")]
    deliver(a, b)
    assert b.sleeve.conns[0].received == [b"\x01sleeve-ack"]
    ca.control_received(wrap(1, b"fast"))
    assert a.vxlan.control == [b"fast"]
    with pytest.raises(RemoteProtocolError):
        ca.control_received(b"\x07junk")
    with pytest.raises(RemoteProtocolError):
        ca.control_received(wrap(PART_SWITCH, b"\x01\x09\x01"))


async def test_a_plain_sleeve_peer_gets_bare_messages_and_a_note() -> None:
    a = make_end()
    ca = a.connect(A, B, {"sleeve_version": 1}, None)
    assert a.vxlan.handles == []  # no vxlan link to a peer without it
    assert ca.switch.chosen == "sleeve"
    a.sleeve.conns[0].params.send_control(b"\x01ack")
    assert a.sent == [b"\x01ack"]
    ca.control_received(b"\x01theirs")
    assert a.sleeve.conns[0].received == [b"\x01theirs"]
    a.sleeve.conns[0].establish()
    assert ca.status().info == "vxlan: the peer has no vxlan datapath; using sleeve"


async def test_vxlan_mtu_below_the_container_mtu_is_not_used() -> None:
    a = make_end(vxlan=FakeVxlan(mtu=1350))
    ca = a.connect(A, B, SWITCH_FEATURES, None)
    a.sleeve.conns[0].establish()
    assert ca.status().info == (
        "vxlan: overlay MTU 1350 below the container MTU 1376; using sleeve"
    )


async def test_forced_vxlan_has_no_sleeve_and_fails_visibly() -> None:
    a = make_end(mode="vxlan")
    ca = a.connect(A, B, {"sleeve_version": 1}, None)
    assert a.sleeve.conns == []
    status = ca.status()
    assert status.datapath == "vxlan" and status.state == "failed"
    assert status.info == (
        "vxlan: the peer has no vxlan datapath; no fallback (datapath vxlan forced)"
    )


async def test_forced_sleeve_never_starts_vxlan() -> None:
    a = make_end(mode="sleeve")
    ca = a.connect(A, B, SWITCH_FEATURES, None)
    assert a.vxlan.handles == [] and ca.switch.chosen == "sleeve"
    a.sleeve.conns[0].establish()
    assert ca.status().info == "udp x"  # the sleeve's own


async def test_encrypted_connection_stays_on_sleeve_and_says_so() -> None:
    sleeve = FakeSleeve()
    overlay = SwitchOverlay(cast(Overlay, sleeve), [], note="encrypted: kernel has no ESP")
    end = End(overlay, sleeve, FakeVxlan())
    conn = end.connect(A, B, SWITCH_FEATURES, b"k" * 32)
    sleeve.conns[0].establish()
    assert conn.status().info == "encrypted: kernel has no ESP; using sleeve"
    assert "fastdp_vxlan" not in overlay.features()


class Routes:
    """A: neighbours B and C; C is reached only through B when ``via_b`` (partial mesh)."""

    def __init__(self, via_b: bool) -> None:
        self.via_b = via_b

    def unicast_next_hop(self, dst: PeerName) -> PeerName | None:
        return self.unicast_table().get(dst)

    def broadcast_next_hops(self, src: PeerName) -> list[PeerName]:
        return [B] if self.via_b else [B, C]

    def unicast_table(self) -> dict[PeerName, PeerName]:
        return {B: B, C: B} if self.via_b else {B: B, C: C}

    def may_relay(self, src: PeerName, via: PeerName) -> bool:
        return self.unicast_table().get(src) == via


async def test_the_sleeve_leaves_out_carried_peers_from_our_broadcasts_unless_they_relay() -> None:
    for via_b, expected in ((False, [C]), (True, [B])):
        a, b = make_end(), make_end()
        ca, _ = a.connect(A, B, SWITCH_FEATURES, None), b.connect(B, A, SWITCH_FEATURES, None)
        a.overlay.routes_changed(Routes(via_b))
        routes = a.sleeve.routes
        assert routes is not None
        assert routes.broadcast_next_hops(A) == ([B] if via_b else [B, C])
        a.vxlan.handles[0].on_health(True, "")
        ca.control_received(wrap(PART_SWITCH, encode_path_state("vxlan", True)))
        assert ca.switch.chosen == "vxlan"
        assert routes.broadcast_next_hops(A) == expected
        assert routes.broadcast_next_hops(C) == ([B] if via_b else [B, C])  # relaying: all
        ca.stop()
        assert routes.broadcast_next_hops(A) == ([B] if via_b else [B, C])
        assert a.vxlan.handles[0].stopped and a.sleeve.conns[0].stopped


async def test_a_replacing_connection_survives_the_old_ones_stop() -> None:
    a = make_end()
    old = a.connect(A, B, SWITCH_FEATURES, None)
    new = a.connect(A, B, SWITCH_FEATURES, None)
    old.stop()
    assert a.overlay.conns[B] is new and not new.stopped
    assert a.sleeve.conns[0].stopped and not a.sleeve.conns[1].stopped
    a.sleeve.conns[1].establish()
    assert new.status().state == "established"


def make_two_part_end() -> End:
    """An end with an OVS part (part 3) and a vxlan part, given in the wrong order."""
    sleeve = FakeSleeve()
    vx = FakeVxlan()
    ovs = FakeVxlan(name="ovs", part_id=PART_OVS)
    overlay = SwitchOverlay(
        cast(Overlay, sleeve),
        [cast(FastPart, vx), cast(FastPart, ovs)],
        switch_config=SwitchConfig(recovery_hold=0.0),
        container_mtu=1376,
    )
    return End(overlay, sleeve, vx, ovs=ovs)


BOTH_FEATURES = {**SWITCH_FEATURES, "fastdp_ovs": 1}


async def test_fast_parts_best_first_each_with_its_own_envelope_part() -> None:
    a = make_two_part_end()
    ovs = a.ovs
    assert ovs is not None
    assert [p.name for p in a.overlay.fast_parts] == ["ovs", "vxlan"]
    assert a.overlay.features()["fastdp_ovs"] == 1
    ca = a.connect(A, B, BOTH_FEATURES, None)
    assert ca.switch.status()["paths"] == {
        name: {"healthy": False, "peer_healthy": False, "reason": ANY} for name in ("ovs", "vxlan")
    } | {"sleeve": ANY}
    assert ovs.params[0].remote_name == B and a.vxlan.params[0].data_send_key is None
    ca.control_received(wrap(PART_OVS, b"to-ovs"))
    ca.control_received(wrap(PART_VXLAN, b"to-vxlan"))
    assert ovs.control == [b"to-ovs"] and a.vxlan.control == [b"to-vxlan"]
    a.sent.clear()
    ovs.handles[0].send_control(b"from-ovs")
    a.vxlan.handles[0].send_control(b"from-vxlan")
    assert a.sent == [wrap(PART_OVS, b"from-ovs"), wrap(PART_VXLAN, b"from-vxlan")]
    # MACs are the host's: every fast part of the connection gets them.
    ca.control_received(wrap(PART_SWITCH, bytes.fromhex("020001") + bytes(6)))
    assert ovs.macs[B] == a.vxlan.macs[B] == frozenset({"00:00:00:00:00:00"})
    # Both healthy at both ends: ovs carries; ovs lost: vxlan; vxlan lost: sleeve.
    a.sleeve.conns[0].establish()
    for part in (ovs, a.vxlan):
        part.handles[0].on_health(True, "")
        ca.control_received(wrap(PART_SWITCH, encode_path_state(part.name, True)))
    assert ca.switch.chosen == "ovs" and ovs.carrying[B] and not a.vxlan.carrying[B]
    fallbacks: list[tuple[str, str]] = []
    a.overlay.on_fallback(lambda old, new: fallbacks.append((old, new)))
    ovs.handles[0].on_health(False, "ovs down")
    assert ca.switch.chosen == "vxlan" and a.vxlan.carrying[B] and not ovs.carrying[B]
    assert ca.status().info == "ovs: ovs down; using vxlan"
    a.vxlan.handles[0].on_health(False, "vxlan down")
    assert ca.switch.chosen == "sleeve" and not a.vxlan.carrying[B]
    assert fallbacks == [("ovs", "vxlan"), ("vxlan", "sleeve")]
    assert a.overlay.status()["switch"]["datapaths"] == ["ovs", "vxlan", "sleeve"]
    ca.stop()
    assert ovs.handles[0].stopped and a.vxlan.handles[0].stopped


async def test_a_peer_without_ovs_gets_vxlan_and_the_note_says_why() -> None:
    a = make_two_part_end()
    ovs = a.ovs
    assert ovs is not None
    ca = a.connect(A, B, SWITCH_FEATURES, None)
    assert ovs.handles == [] and len(a.vxlan.handles) == 1
    a.sleeve.conns[0].establish()
    a.vxlan.handles[0].on_health(True, "")
    ca.control_received(wrap(PART_SWITCH, encode_path_state("vxlan", True)))
    assert ca.switch.chosen == "vxlan"
    assert ca.status().info == "ovs: the peer has no ovs datapath; using vxlan"
    # The peer's OVS messages for a path we do not run are ignored, not an error.
    ca.control_received(wrap(PART_OVS, b"whatever"))
    assert ovs.control == []


async def test_forced_ovs_without_an_ovs_part_is_refused() -> None:
    with pytest.raises(ConfigError, match="ovs: not available"):
        SwitchOverlay(cast(Overlay, FakeSleeve()), [], mode="ovs")
    with pytest.raises(ConfigError, match="no openvswitch"):
        SwitchOverlay(cast(Overlay, FakeSleeve()), [], mode="ovs", note="ovs: no openvswitch")
    with pytest.raises(ConfigError, match="expected one of auto, ovs, vxlan, sleeve"):
        SwitchOverlay(cast(Overlay, FakeSleeve()), [], mode="fast")


async def test_a_part_that_fails_a_connection_leaves_it_on_sleeve_for_good() -> None:
    a = make_end()
    ca = a.connect(A, B, SWITCH_FEATURES, None)
    a.sleeve.conns[0].establish()
    a.sent.clear()
    a.vxlan.handles[0].on_failed("vxlan: ESP: allocate an ESP SPI failed")
    assert a.sent == [wrap(PART_SWITCH, encode_path_state("vxlan", False))]
    a.vxlan.handles[0].on_health(True, "")
    ca.control_received(wrap(PART_SWITCH, encode_path_state("vxlan", True)))
    assert ca.switch.chosen == "sleeve"
    assert ca.status().info == "vxlan: ESP: allocate an ESP SPI failed; using sleeve"


async def test_an_encrypted_connection_on_an_esp_fast_path_says_so() -> None:
    vx = FakeVxlan(mtu=1410)
    vx.encrypted = True
    a = make_end(vxlan=vx)
    ca = a.connect(A, B, SWITCH_FEATURES, b"k" * 32)
    assert vx.params[0].data_send_key == b"k" * 32  # the part gets the data keys
    a.sleeve.conns[0].establish()
    assert ca.status().datapath == "sleeve"
    vx.handles[0].on_health(True, "")
    ca.control_received(wrap(PART_SWITCH, encode_path_state("vxlan", True)))
    status = ca.status()
    assert (status.datapath, status.state, status.mtu, status.encrypted) == (
        "vxlan",
        "established",
        1410,
        True,
    )
    assert status.info == "ESP rfc4106(gcm(aes))"
    # A connection without keys never runs on a part that only does ESP.
    cc = a.connect(A, C, SWITCH_FEATURES, None)
    assert len(vx.handles) == 1 and cc.switch.chosen == "sleeve"
    assert "vxlan: runs with ESP only" in cc.switch.info
