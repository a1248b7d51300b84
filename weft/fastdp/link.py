"""One connection's fast path as a sans-I/O core: ESP SPI exchange (when encrypted) and
heartbeats, producing control messages, probes to send and events. No clock, no kernel.

Driven by: ``handle_timer(now)``, ``control_received(payload, now)`` (fast-path control
messages from the peer), ``probe_received(probe)`` (a probe our datapath caught),
``spi_allocated(spi)`` and ``esp_installed(now)`` (the router did the kernel work).
Produces: ``control_to_send()`` (bytes for the peer's link, over the control connection),
``probes_to_send()`` (``(seq, frame_size)``; the router builds them with ``encode_probe`` and
sends them through the datapath), ``next_event()`` and ``get_timer()``.

Encrypted connections (both ends have a password): the link first asks for an inbound SPI
(:class:`SpiRequested`), sends it, and once it also has the peer's it emits :class:`EspReady`;
heartbeats start only after ``esp_installed``, so the path can become healthy only through ESP.

Control messages: 1 kind byte, then ``1``: a heartbeat ack (heartbeat.encode_ack) or ``2``: our
inbound SPI (u32 BE). Anything else from the peer raises RemoteProtocolError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from weft.errors import LocalError, RemoteProtocolError
from weft.fastdp.heartbeat import (
    FastPathHeartbeat,
    HealthChanged,
    HeartbeatConfig,
    HeartbeatState,
    Probe,
    ProbeAck,
    decode_ack,
    encode_ack,
)
from weft.gossip.peer import PeerName

__all__ = [
    "EspReady",
    "FastPathLink",
    "LinkEvent",
    "SpiOffer",
    "SpiRequested",
    "decode_control",
    "encode_spi",
]

KIND_ACK = 1
KIND_SPI = 2


@dataclass(frozen=True)
class SpiRequested:
    """Allocate our inbound SPI (``XfrmClient.alloc_spi``) and call ``spi_allocated``."""


@dataclass(frozen=True)
class EspReady:
    """Both SPIs known: install ESP (``XfrmClient.install``, ``InboundGuard``), then call
    ``esp_installed``. Emitted again if the peer announces a new SPI."""

    in_spi: int
    out_spi: int


LinkEvent = SpiRequested | EspReady | HealthChanged


def encode_spi(spi: int) -> bytes:
    return struct.pack("!BI", KIND_SPI, spi)


@dataclass(frozen=True)
class SpiOffer:
    """The peer's inbound SPI: what we send to."""

    spi: int


def decode_control(payload: bytes) -> ProbeAck | SpiOffer:
    """A fast-path control message from the peer; RemoteProtocolError when malformed."""
    if not payload:
        raise RemoteProtocolError("empty fast-path control message")
    kind = payload[0]
    if kind == KIND_ACK:
        return decode_ack(payload[1:])
    if kind == KIND_SPI:
        if len(payload) != 5:
            raise RemoteProtocolError(f"fast-path SPI message of {len(payload)} bytes")
        (spi,) = struct.unpack_from("!I", payload, 1)
        if spi < 0x100:
            raise RemoteProtocolError(f"reserved ESP SPI {spi:#x}")
        return SpiOffer(spi)
    raise RemoteProtocolError(f"unknown fast-path control message kind {kind}")


class FastPathLink:
    def __init__(
        self,
        local: PeerName,
        remote: PeerName,
        mtu: int,
        encrypted: bool,
        now: float,
        config: HeartbeatConfig | None = None,
    ) -> None:
        self.local = local
        self.remote = remote
        self.encrypted = encrypted
        self.config = config or HeartbeatConfig()
        self._mtu = mtu
        self._control: list[bytes] = []
        self._events: list[LinkEvent] = []
        self.in_spi: int | None = None
        self.out_spi: int | None = None
        self._ready_sent: tuple[int, int] | None = None
        self.heartbeat: FastPathHeartbeat | None = None
        if encrypted:
            self._events.append(SpiRequested())
        else:
            self.heartbeat = FastPathHeartbeat(self.config, mtu, now)

    # -- state ----------------------------------------------------------------------------------

    @property
    def state(self) -> HeartbeatState:
        return self.heartbeat.state if self.heartbeat else HeartbeatState.PENDING

    @property
    def reason(self) -> str:
        if self.heartbeat is not None:
            return self.heartbeat.reason
        if self.in_spi is None or self.out_spi is None:
            return "exchanging ESP SPIs"
        return "installing ESP"

    # -- inputs ---------------------------------------------------------------------------------

    def spi_allocated(self, spi: int) -> None:
        if not self.encrypted:
            raise LocalError("SPI for an unencrypted fast path")
        self.in_spi = spi
        self._control.append(encode_spi(spi))
        self._maybe_ready()

    def esp_installed(self, now: float) -> None:
        """The kernel has the SAs and policies: start (or restart) heartbeats."""
        if self.heartbeat is None:
            self.heartbeat = FastPathHeartbeat(self.config, self._mtu, now)
        else:
            self.heartbeat.mtu_changed(self._mtu, now)  # keys changed: prove the path again
            self._drain_heartbeat()

    def control_received(self, payload: bytes, now: float) -> None:
        message = decode_control(payload)
        if isinstance(message, ProbeAck):
            if self.heartbeat is not None:
                self.heartbeat.ack_received(message, now)
                self._drain_heartbeat()
            return
        if not self.encrypted:
            raise RemoteProtocolError("ESP SPI from a peer on an unencrypted connection")
        self.out_spi = message.spi
        self._maybe_ready()

    def probe_received(self, probe: Probe) -> None:
        """A probe from this link's peer arrived through our datapath: acknowledge it."""
        if probe.src == self.remote and probe.dst == self.local:
            self._control.append(bytes([KIND_ACK]) + encode_ack(probe.seq, probe.size))

    def mtu_changed(self, mtu: int, now: float) -> None:
        self._mtu = mtu
        if self.heartbeat is not None:
            self.heartbeat.mtu_changed(mtu, now)
            self._drain_heartbeat()

    def handle_timer(self, now: float) -> None:
        if self.heartbeat is not None:
            self.heartbeat.handle_timer(now)
            self._drain_heartbeat()

    # -- outputs --------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return self.heartbeat.get_timer() if self.heartbeat is not None else None

    def probes_to_send(self) -> list[tuple[int, int]]:
        return self.heartbeat.probes_to_send() if self.heartbeat is not None else []

    def control_to_send(self) -> list[bytes]:
        out, self._control = self._control, []
        return out

    def next_event(self) -> LinkEvent | None:
        return self._events.pop(0) if self._events else None

    # -- internals ------------------------------------------------------------------------------

    def _maybe_ready(self) -> None:
        if self.in_spi is None or self.out_spi is None:
            return
        pair = (self.in_spi, self.out_spi)
        if pair != self._ready_sent:
            self._ready_sent = pair
            self._events.append(EspReady(*pair))

    def _drain_heartbeat(self) -> None:
        assert self.heartbeat is not None
        while (event := self.heartbeat.next_event()) is not None:
            self._events.append(event)
