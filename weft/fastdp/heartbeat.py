"""Fast-path heartbeats: full-MTU frames through the tunnel, acknowledged over the control link.

A kernel datapath is only "healthy" for a connection when a frame of the full overlay MTU has
crossed it, so a path that drops UDP 6784 or cannot carry the MTU never carries traffic.

How (Linux VXLAN datapath; the OVS datapath sends the same frame with a packet-execute action):

1. The sender writes a probe frame with a packet socket bound to its vxlan device: an Ethernet
   frame ``dst = remote peer name, src = local peer name, ethertype 0x88B5`` (IEEE 802 local
   experimental) whose total size is ``overlay MTU + 14``. The vxlan device looks the destination
   MAC up in its FDB, where the router keeps ``peer-name -> peer IP`` (fdb.py), encapsulates with
   DF set, and sends it to exactly that peer.
2. The receiver has a packet socket (ETH_P_ALL plus a 4-instruction BPF filter accepting only
   ethertype 0x88B5, so data frames are never copied to userspace) on its own vxlan device; packet
   taps see frames before the bridge does. The bridge itself drops the probe: the receiver keeps a
   static bridge FDB entry ``own peer name -> vxlan port``, and a bridge never forwards a frame out
   of the port it came in on, so probes never reach containers.
3. The receiver answers over the control connection (overlay control) with :func:`encode_ack`
   carrying the sequence number and the size it received; the sender feeds that to
   :meth:`FastPathHeartbeat.ack_received`.

:class:`FastPathHeartbeat` is the sender's state machine: ``pending`` until the first full-size
probe is acknowledged, ``healthy`` while acks keep coming, ``unhealthy`` (with a reason) when none
arrived for ``timeout`` seconds (3 s, probes every second: at least two lost in a row); it keeps
probing while unhealthy and returns to ``healthy`` after ``recover_acks`` (2) acks in a row with
no probe lost in between (hysteresis, so a loaded host does not flap). It takes ``now`` and never
reads a clock.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from dataclasses import dataclass

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import PeerName

__all__ = [
    "ETHERTYPE_WEFT",
    "HEARTBEAT_BPF_FILTER",
    "FastPathHeartbeat",
    "HealthChanged",
    "HeartbeatConfig",
    "HeartbeatState",
    "Probe",
    "ProbeAck",
    "decode_ack",
    "decode_probe",
    "encode_ack",
    "encode_probe",
]

ETHERTYPE_WEFT = 0x88B5
ETH_HEADER = 14
_PROBE_MAGIC = b"wfhb"
_ACK_MAGIC = b"wfha"
_VERSION = 1
# After the Ethernet header: magic, version, seq, declared total frame size.
_PROBE_BODY = struct.Struct("!4sBQH")
_ACK = struct.Struct("!4sBQH")
MIN_PROBE_SIZE = ETH_HEADER + _PROBE_BODY.size
MAX_FRAME = 65535


def _cbpf_accept_ethertype(ethertype: int) -> bytes:
    """Classic BPF: ``ldh [12]; jeq #ethertype, 0, 1; ret #0xffff; ret #0`` (sock_filter[])."""
    insns = [
        (0x28, 0, 0, 12),  # BPF_LD | BPF_H | BPF_ABS
        (0x15, 0, 1, ethertype),  # BPF_JMP | BPF_JEQ | BPF_K
        (0x06, 0, 0, 0xFFFF),  # BPF_RET | BPF_K: accept
        (0x06, 0, 0, 0),  # BPF_RET | BPF_K: drop
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


HEARTBEAT_BPF_FILTER = _cbpf_accept_ethertype(ETHERTYPE_WEFT)


def _mac_bytes(name: PeerName) -> bytes:
    return int(name).to_bytes(6, "big")


@dataclass(frozen=True)
class Probe:
    """A probe frame as received: who sent it, to whom, its sequence number and size on the wire."""

    src: PeerName
    dst: PeerName
    seq: int
    size: int


@dataclass(frozen=True)
class ProbeAck:
    seq: int
    size: int


def encode_probe(src: PeerName, dst: PeerName, seq: int, size: int) -> bytes:
    """A probe Ethernet frame of exactly ``size`` bytes (overlay MTU + 14)."""
    if not MIN_PROBE_SIZE <= size <= MAX_FRAME:
        raise ConfigError(f"probe size {size} outside {MIN_PROBE_SIZE}..{MAX_FRAME}")
    head = _mac_bytes(dst) + _mac_bytes(src) + struct.pack("!H", ETHERTYPE_WEFT)
    body = _PROBE_BODY.pack(_PROBE_MAGIC, _VERSION, seq, size)
    return head + body + bytes(size - len(head) - len(body))


def decode_probe(frame: bytes, local_name: PeerName) -> Probe | None:
    """The probe in ``frame`` if it is one addressed to ``local_name``, else None.

    Frames come from the wire (anyone who can reach UDP 6784), so anything malformed, truncated
    or addressed elsewhere is ignored rather than raised.
    """
    if len(frame) < MIN_PROBE_SIZE:
        return None
    if frame[12:14] != struct.pack("!H", ETHERTYPE_WEFT):
        return None
    magic, version, seq, declared = _PROBE_BODY.unpack_from(frame, ETH_HEADER)
    if magic != _PROBE_MAGIC or version != _VERSION:
        return None
    dst = PeerName(int.from_bytes(frame[0:6], "big"))
    if dst != local_name:
        return None
    src = PeerName(int.from_bytes(frame[6:12], "big"))
    # A probe that arrives shorter than declared was truncated somewhere: report what arrived.
    return Probe(src=src, dst=dst, seq=seq, size=min(len(frame), declared))


def encode_ack(seq: int, size: int) -> bytes:
    """The receiver's answer, sent as an overlay-control message on the control connection."""
    return _ACK.pack(_ACK_MAGIC, _VERSION, seq, size)


def decode_ack(payload: bytes) -> ProbeAck:
    """Parse an ack from the peer; anything malformed is the peer's fault."""
    if len(payload) != _ACK.size:
        raise RemoteProtocolError(f"fast-path heartbeat ack of {len(payload)} bytes")
    magic, version, seq, size = _ACK.unpack(payload)
    if magic != _ACK_MAGIC or version != _VERSION:
        raise RemoteProtocolError("fast-path heartbeat ack with bad magic or version")
    return ProbeAck(seq=seq, size=size)


class HeartbeatState(enum.Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class HeartbeatConfig:
    """Timing of fast-path heartbeats (seconds)."""

    # Probe period while pending or unhealthy: fast, so a path is adopted (or re-adopted) quickly.
    interval: float = 1.0
    # Probe period while healthy: often enough that silence shows within ``timeout``.
    healthy_interval: float = 1.0
    # No full-size ack for this long makes the path unhealthy (Weave used 60 s; we fall back
    # within seconds because the sleeve is always running alongside and the move is cheap).
    timeout: float = 3.0
    # Acks in a row (no probe lost in between) that make an unhealthy path healthy again.
    recover_acks: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.interval <= self.timeout:
            raise ConfigError("heartbeat interval must be > 0 and <= timeout")
        if not 0 < self.healthy_interval < self.timeout:
            raise ConfigError("healthy heartbeat interval must be > 0 and < timeout")
        if self.recover_acks < 1:
            raise ConfigError("heartbeat recover_acks must be at least 1")


@dataclass(frozen=True)
class HealthChanged:
    """The fast path of one connection became healthy or unhealthy; ``reason`` says why not."""

    state: HeartbeatState
    reason: str


class FastPathHeartbeat:
    """Sender-side heartbeat state machine for one connection's fast path.

    Driven by ``handle_timer(now)``, ``ack_received(ack, now)`` and ``mtu_changed(mtu, now)``;
    produces ``probes_to_send()`` (sequence number and frame size for each probe to emit),
    ``next_event()`` and ``get_timer()``.
    """

    # Outstanding probes remembered for matching acks; older ones are forgotten.
    MAX_OUTSTANDING = 64

    def __init__(self, config: HeartbeatConfig, mtu: int, now: float) -> None:
        self.config = config
        self.state = HeartbeatState.PENDING
        self.reason = "waiting for the first heartbeat through the tunnel"
        self._mtu = self._check_mtu(mtu)
        self._seq = 0
        self._outstanding: OrderedDict[int, tuple[int, float]] = OrderedDict()  # seq -> size, sent
        self.last_ack: float | None = None  # when the last acknowledgement came (any size)
        self.rtt: float | None = None  # probe sent -> its ack, of the last acknowledged probe
        self._next_probe = now
        self._since = now  # when the current wait for an ack started
        self._recovering = 0  # acks in a row while unhealthy
        self._probes: list[tuple[int, int]] = []
        self._events: list[HealthChanged] = []

    @staticmethod
    def _check_mtu(mtu: int) -> int:
        if not MIN_PROBE_SIZE <= mtu + ETH_HEADER <= MAX_FRAME:
            raise ConfigError(f"fast-path MTU {mtu} out of range")
        return mtu

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def frame_size(self) -> int:
        return self._mtu + ETH_HEADER

    def get_timer(self) -> float:
        if self.state == HeartbeatState.UNHEALTHY:
            return self._next_probe  # the timeout already fired; only probing remains
        return min(self._next_probe, self._since + self.config.timeout)

    def handle_timer(self, now: float) -> None:
        if now >= self._since + self.config.timeout and self.state != HeartbeatState.UNHEALTHY:
            if self.state == HeartbeatState.PENDING:
                why = (
                    f"no full-size ({self._mtu} byte) heartbeat through the tunnel acknowledged "
                    f"within {self.config.timeout:g}s (UDP 6784 blocked or path MTU too small?)"
                )
            else:
                why = (
                    f"silent: heartbeats through the tunnel unanswered for {self.config.timeout:g}s"
                )
            self._recovering = 0
            self._set(HeartbeatState.UNHEALTHY, why)
        if now >= self._next_probe:
            self._seq += 1
            self._outstanding[self._seq] = (self.frame_size, now)
            while len(self._outstanding) > self.MAX_OUTSTANDING:
                self._outstanding.popitem(last=False)
            self._probes.append((self._seq, self.frame_size))
            period = (
                self.config.healthy_interval
                if self.state == HeartbeatState.HEALTHY
                else self.config.interval
            )
            self._next_probe = now + period

    def probes_to_send(self) -> list[tuple[int, int]]:
        """``(seq, frame_size)`` of each probe to send now; the list is handed over."""
        out, self._probes = self._probes, []
        return out

    def ack_received(self, ack: ProbeAck, now: float) -> None:
        """The remote acknowledged probe ``ack.seq`` having received ``ack.size`` bytes.

        Acks for unknown or forgotten probes (e.g. sent before an MTU change) are ignored.
        """
        probe = self._outstanding.pop(ack.seq, None)
        if probe is None:
            return
        expected, sent = probe
        self.last_ack = now
        self.rtt = max(0.0, now - sent)
        # Probes before this one that were never answered will not be any more.
        lost = [s for s in self._outstanding if s < ack.seq]
        for seq in lost:
            del self._outstanding[seq]
        if ack.size < expected:
            self._recovering = 0
            self._set(
                HeartbeatState.UNHEALTHY,
                f"tunnel delivered {ack.size} of {expected} bytes; MTU {self._mtu} too large",
            )
            return
        self._since = now
        if self.state == HeartbeatState.UNHEALTHY:
            self._recovering = 1 if lost else self._recovering + 1
            if self._recovering < self.config.recover_acks:
                return
        if self.state != HeartbeatState.HEALTHY:
            self._set(HeartbeatState.HEALTHY, "")
            # Switch to the slower healthy period from now on.
            self._next_probe = min(self._next_probe, now + self.config.healthy_interval)

    def mtu_changed(self, mtu: int, now: float) -> None:
        """The overlay MTU changed: earlier probes prove nothing; start over as pending."""
        self._mtu = self._check_mtu(mtu)
        self._outstanding.clear()
        self._since = now
        self._next_probe = now
        if self.state != HeartbeatState.PENDING:
            self._set(HeartbeatState.PENDING, f"MTU changed to {mtu}; re-probing")

    def next_event(self) -> HealthChanged | None:
        return self._events.pop(0) if self._events else None

    def _set(self, state: HeartbeatState, reason: str) -> None:
        self.reason = reason
        if state != self.state:
            self.state = state
            self._events.append(HealthChanged(state, reason))
