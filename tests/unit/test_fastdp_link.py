"""Two FastPathLink cores wired back to back: a simulated tunnel carries probes (or drops them),
the control connection carries acks and SPIs; the clock is stepped by hand."""

from __future__ import annotations

import pytest

from weft.errors import LocalError, RemoteProtocolError
from weft.fastdp.heartbeat import (
    HealthChanged,
    HeartbeatConfig,
    HeartbeatState,
    Probe,
    encode_ack,
)
from weft.fastdp.link import (
    EspReady,
    FastPathLink,
    LinkEvent,
    SpiOffer,
    SpiRequested,
    decode_control,
    encode_spi,
)
from weft.gossip.peer import PeerName

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
CFG = HeartbeatConfig(interval=1.0, healthy_interval=5.0, timeout=15.0)


def state(link: FastPathLink) -> HeartbeatState:
    return link.state  # a call: mypy must not narrow across steps


class Pair:
    """Links a (at A) and b (at B); ``tunnel_mtu`` is the largest frame the tunnel carries."""

    def __init__(self, encrypted: bool = False, mtu: int = 1450) -> None:
        self.a = FastPathLink(A, B, mtu, encrypted, 0.0, CFG)
        self.b = FastPathLink(B, A, mtu, encrypted, 0.0, CFG)
        self.tunnel_up = True
        self.tunnel_mtu = 1500 + 14
        self.events: dict[str, list[LinkEvent]] = {"a": [], "b": []}

    def exchange(self, now: float) -> None:
        for _ in range(4):  # until quiet
            for src, dst, sname in ((self.a, self.b, "a"), (self.b, self.a, "b")):
                for seq, size in src.probes_to_send():
                    if self.tunnel_up and size <= self.tunnel_mtu:
                        dst.probe_received(Probe(src.local, src.remote, seq, size))
                for msg in src.control_to_send():
                    dst.control_received(msg, now)
                while (ev := src.next_event()) is not None:
                    self.events[sname].append(ev)

    def run(self, start: float, end: float, step: float = 0.25) -> None:
        now = start
        while now <= end:
            for link in (self.a, self.b):
                timer = link.get_timer()
                if timer is not None and timer <= now:
                    link.handle_timer(now)
            self.exchange(now)
            now += step

    def health(self, name: str) -> list[HeartbeatState]:
        return [e.state for e in self.events[name] if isinstance(e, HealthChanged)]


def test_plain_link_becomes_healthy_falls_back_and_returns() -> None:
    p = Pair()
    p.run(0.0, 2.0)
    assert state(p.a) is HeartbeatState.HEALTHY and state(p.b) is HeartbeatState.HEALTHY
    p.tunnel_up = False  # e.g. nftables drops UDP 6784
    p.run(2.25, 25.0)
    assert p.health("a") == [HeartbeatState.HEALTHY, HeartbeatState.UNHEALTHY]
    assert "unanswered" in p.a.reason
    p.tunnel_up = True
    p.run(25.25, 28.0)
    assert p.health("a")[-1] is HeartbeatState.HEALTHY and p.a.reason == ""


def test_path_that_cannot_carry_the_mtu_never_becomes_healthy() -> None:
    p = Pair(mtu=1450)
    p.tunnel_mtu = 1400  # smaller underlay somewhere on the path
    p.run(0.0, 20.0)
    assert p.health("a") == [HeartbeatState.UNHEALTHY]
    assert "1450 byte" in p.a.reason
    p.a.mtu_changed(1380, 20.0)
    p.b.mtu_changed(1380, 20.0)
    p.run(20.0, 22.0)
    assert state(p.a) is HeartbeatState.HEALTHY


def test_encrypted_link_exchanges_spis_before_any_probe() -> None:
    p = Pair(encrypted=True)
    assert p.a.next_event() == SpiRequested() and p.b.next_event() == SpiRequested()
    assert p.a.get_timer() is None and p.a.probes_to_send() == []
    assert p.a.reason == "exchanging ESP SPIs"
    p.a.spi_allocated(0x1000A)
    p.b.spi_allocated(0x1000B)
    p.exchange(0.0)
    assert p.events["a"] == [EspReady(in_spi=0x1000A, out_spi=0x1000B)]
    assert p.events["b"] == [EspReady(in_spi=0x1000B, out_spi=0x1000A)]
    assert p.a.reason == "installing ESP"
    p.run(0.0, 3.0)
    assert state(p.a) is HeartbeatState.PENDING  # no heartbeats before ESP is installed
    p.a.esp_installed(3.0)
    p.b.esp_installed(3.0)
    p.run(3.0, 5.0)
    assert state(p.a) is HeartbeatState.HEALTHY and state(p.b) is HeartbeatState.HEALTHY
    # The peer re-keys (new SPI): ready again, and heartbeats must prove the new SAs.
    p.b.spi_allocated(0x2000B)
    p.exchange(5.0)
    assert p.events["a"][-1] == EspReady(in_spi=0x1000A, out_spi=0x2000B)
    p.a.esp_installed(5.5)
    assert state(p.a) is HeartbeatState.PENDING
    p.run(5.5, 7.0)
    assert state(p.a) is HeartbeatState.HEALTHY


def test_control_messages_and_bad_input() -> None:
    assert decode_control(encode_spi(0x1234)) == SpiOffer(0x1234)
    for bad in (b"", b"\x09", b"\x02\x00", encode_spi(5), b"\x01" + b"x" * 15):
        with pytest.raises(RemoteProtocolError):
            decode_control(bad)
    plain = FastPathLink(A, B, 1450, False, 0.0, CFG)
    with pytest.raises(RemoteProtocolError, match="unencrypted"):
        plain.control_received(encode_spi(0x1234), 0.0)
    with pytest.raises(LocalError):
        plain.spi_allocated(0x1234)
    # Acks for probes never sent and probes from someone else are ignored.
    plain.control_received(b"\x01" + encode_ack(99, 1464), 0.0)
    plain.probe_received(Probe(src=A, dst=A, seq=1, size=1464))
    assert plain.control_to_send() == []
    assert state(plain) is HeartbeatState.PENDING
