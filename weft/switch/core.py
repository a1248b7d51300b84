"""The overlay switch's decisions for one connection, as a pure clock-stepped core.

Which datapath carries a connection's traffic. Every datapath both ends support starts when the
connection does and proves itself through its own path (sleeve: UDP heartbeats; a fast datapath:
full-MTU probe frames through the tunnel, acknowledged over the control connection). The best one
that is healthy *at both ends* carries the traffic, in the order of ``candidates`` (ovs, vxlan,
then sleeve, which is always last). Both ends must agree because each end's vxlan FDB decides
what *it* sends: if only one end's probes got through, the other end would keep sending into a
tunnel that is gone. So each end tells the other its own view (:meth:`PathSwitch.peer_state`),
and a fast path carries only while both say healthy.

Missed heartbeats move the connection to the next healthy datapath at once; their return moves it
back after ``SwitchConfig.recovery_hold`` seconds of health at both ends (so a flapping path does
not bounce traffic around). A forced datapath (``--datapath vxlan``) has a single candidate and
no fallback: the connection fails while that path is unhealthy.

No I/O, no clock: inputs take ``now``; outputs are :attr:`PathSwitch.chosen`, :attr:`info`,
events (:class:`DatapathChanged`) and :meth:`get_timer`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from weft.errors import ConfigError, LocalError, RemoteProtocolError
from weft.overlay import PART_OVS, PART_SLEEVE, PART_SWITCH, PART_VXLAN

__all__ = [
    "FALLBACK_REASONS",
    "MAX_MACS",
    "PART_OVS",
    "PART_SLEEVE",
    "PART_SWITCH",
    "PART_VXLAN",
    "SLEEVE",
    "DatapathChanged",
    "MacsAnnounced",
    "PathState",
    "PathSwitch",
    "SwitchConfig",
    "decode_switch_message",
    "encode_macs",
    "encode_path_state",
    "split_envelope",
    "wrap",
]

SLEEVE = "sleeve"
# Why a connection left a datapath, as a short code (metrics label, UI filter):
# its heartbeats went unanswered, the peer's did, a probe came back short, or it can never carry.
FALLBACK_REASONS = ("heartbeat_lost", "peer_heartbeat_lost", "mtu", "unavailable")

# -- the overlay-control envelope -----------------------------------------------------------------
#
# When both ends advertise ``overlay_switch`` 1 in their hello features, every overlay-control
# message (tag 7) is ``part (1 byte) || the part's own message``, so each sub-overlay gets its own
# messages unchanged: 0 = sleeve (its heartbeat acks), 1 = the vxlan fast path (FastPathLink's
# messages: heartbeat acks, ESP SPIs), 3 = the OVS fast path (the same messages, its own links),
# 2 = the switch itself:
#   ``0x01 || datapath id u8 (1 vxlan, 2 ovs) || healthy u8``: the sender's own view of that fast
#       path (its probes through the tunnel are answered); sent when it changes and at start;
#   ``0x02 || count u16 || count x 6-byte MACs``: every MAC the sender has on its bridge (its
#       containers and exposed addresses), complete each time, sent when it changes; the receiver
#       gives them to every fast datapath it runs for this connection (vxlan: FDB entries, only
#       while vxlan carries the connection). MACs are the host's, not a datapath's.
# A message for a known part the receiver does not run for this connection is ignored (the peer
# may have started a datapath we lack); an unknown part is a protocol error.
# A peer without ``overlay_switch`` gets sleeve messages bare (what a plain sleeve expects).

_PARTS = (PART_SLEEVE, PART_VXLAN, PART_SWITCH, PART_OVS)
_KIND_STATE = 1
_KIND_MACS = 2
_DATAPATH_IDS = {"vxlan": 1, "ovs": 2}
_DATAPATH_NAMES = {v: k for k, v in _DATAPATH_IDS.items()}
MAX_MACS = 8192


def wrap(part: int, payload: bytes) -> bytes:
    return bytes((part,)) + payload


def split_envelope(message: bytes) -> tuple[int, bytes]:
    """``(part, payload)``; RemoteProtocolError for an empty message or an unknown part."""
    if not message:
        raise RemoteProtocolError("empty overlay control message")
    part = message[0]
    if part not in _PARTS:
        raise RemoteProtocolError(f"overlay control message for unknown part {part}")
    return part, message[1:]


@dataclass(frozen=True)
class PathState:
    """The peer's own view of one of its fast paths to us."""

    datapath: str
    healthy: bool


@dataclass(frozen=True)
class MacsAnnounced:
    """Every MAC the peer has on its bridge (``aa:bb:..`` text, lower case)."""

    macs: frozenset[str]


def encode_path_state(datapath: str, healthy: bool) -> bytes:
    return bytes((_KIND_STATE, _DATAPATH_IDS[datapath], 1 if healthy else 0))


def encode_macs(macs: Sequence[str]) -> bytes:
    """The MAC announcement; at most MAX_MACS (the rest are left out: they get flooded)."""
    raw = [bytes.fromhex(m.replace(":", "")) for m in sorted(macs)[:MAX_MACS]]
    return struct.pack("!BH", _KIND_MACS, len(raw)) + b"".join(raw)


def decode_switch_message(payload: bytes) -> PathState | MacsAnnounced:
    """A switch message from the peer; RemoteProtocolError when malformed."""
    if not payload:
        raise RemoteProtocolError("empty overlay switch message")
    kind = payload[0]
    if kind == _KIND_STATE:
        if len(payload) != 3 or payload[1] not in _DATAPATH_NAMES or payload[2] > 1:
            raise RemoteProtocolError("malformed datapath state message")
        return PathState(_DATAPATH_NAMES[payload[1]], payload[2] == 1)
    if kind == _KIND_MACS:
        if len(payload) < 3:
            raise RemoteProtocolError("truncated MAC announcement")
        (count,) = struct.unpack_from("!H", payload, 1)
        if count > MAX_MACS or len(payload) != 3 + 6 * count:
            raise RemoteProtocolError(f"MAC announcement of {len(payload)} bytes for {count}")
        macs = set()
        for i in range(count):
            raw = payload[3 + 6 * i : 9 + 6 * i].hex()
            macs.add(":".join(raw[j : j + 2] for j in range(0, 12, 2)))
        return MacsAnnounced(frozenset(macs))
    raise RemoteProtocolError(f"unknown overlay switch message kind {kind}")


@dataclass(frozen=True)
class SwitchConfig:
    """Timing of the switch's choice (seconds)."""

    # A fast path that was lost and came back carries again only after being healthy at both
    # ends for this long. The first adoption of a path is immediate.
    recovery_hold: float = 3.0

    def __post_init__(self) -> None:
        if self.recovery_hold < 0:
            raise ConfigError(f"recovery hold {self.recovery_hold} must not be negative")


@dataclass(frozen=True)
class DatapathChanged:
    """The datapath carrying this connection changed (``old`` None: the first choice)."""

    old: str | None
    new: str
    reason: str
    code: str = ""  # a fallback: one of FALLBACK_REASONS


@dataclass
class _Path:
    name: str
    healthy: bool = False  # our probes through it are answered (sleeve: link established)
    reason: str = "starting"
    peer_healthy: bool = False  # the peer's probes through it are answered (fast paths only)
    healthy_since: float | None = None  # both ends healthy since
    lost_once: bool = False  # it was healthy and then lost: returning waits for the hold
    unavailable: str = ""  # non-empty: this path can never carry this connection (why)


class PathSwitch:
    """One connection's datapath choice.

    ``candidates`` are the datapaths this connection starts, best first; ``sleeve`` (if present)
    must be last and needs no agreement from the peer (the sleeve proves both directions itself).
    """

    def __init__(
        self, candidates: Sequence[str], now: float, config: SwitchConfig | None = None
    ) -> None:
        if not candidates:
            raise LocalError("a connection needs at least one datapath")
        if SLEEVE in candidates and candidates[-1] != SLEEVE:
            raise LocalError("sleeve must be the last datapath")
        if len(set(candidates)) != len(candidates):
            raise LocalError(f"duplicate datapaths in {list(candidates)}")
        self.config = config or SwitchConfig()
        self._paths = {name: _Path(name) for name in candidates}
        self._order = list(candidates)
        self._notes: list[str] = []  # why better datapaths are not candidates at all
        self.chosen: str | None = None
        self._events: list[DatapathChanged] = []
        self._decide(now)

    # -- inputs ---------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A datapath that was never a candidate, and why (shown in ``info``)."""
        if text not in self._notes:
            self._notes.append(text)

    def path_state(self, name: str, healthy: bool, reason: str, now: float) -> None:
        """Our own view of ``name``: its heartbeats are answered (or not, and why)."""
        path = self._path(name)
        if path.healthy and not healthy:
            path.lost_once = True
        path.healthy = healthy
        path.reason = reason
        self._update_since(path, now)
        self._decide(now)

    def peer_state(self, name: str, healthy: bool, now: float) -> None:
        """The peer's view of fast path ``name`` (its probes to us are answered)."""
        path = self._paths.get(name)
        if path is None or name == SLEEVE:
            return  # a path we do not run for this connection: nothing to agree on
        if path.peer_healthy and not healthy:
            path.lost_once = True
        path.peer_healthy = healthy
        self._update_since(path, now)
        self._decide(now)

    def unavailable(self, name: str, reason: str, now: float) -> None:
        """``name`` can never carry this connection (e.g. encrypted without kernel ESP)."""
        path = self._path(name)
        path.unavailable = reason
        path.healthy = False
        path.healthy_since = None
        self._decide(now)

    def handle_timer(self, now: float) -> None:
        self._decide(now)

    # -- outputs --------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When a held-back path becomes eligible again (None: nothing pending)."""
        deadline: float | None = None
        for name in self._order:
            if name == self.chosen:
                break  # only better paths than the current one can change the choice
            path = self._paths[name]
            if self._both_healthy(path) and path.healthy_since is not None and path.lost_once:
                at = path.healthy_since + self.config.recovery_hold
                deadline = at if deadline is None else min(deadline, at)
        return deadline

    def next_event(self) -> DatapathChanged | None:
        return self._events.pop(0) if self._events else None

    @property
    def carrying(self) -> bool:
        """True when the chosen datapath is healthy (traffic flows)."""
        if self.chosen is None:
            return False
        path = self._paths[self.chosen]
        return path.healthy and (path.name == SLEEVE or path.peer_healthy)

    def healthy(self, name: str) -> bool:
        """Our own view of ``name`` (what we tell the peer)."""
        path = self._paths.get(name)
        return bool(path and path.healthy)

    @property
    def info(self) -> str:
        """Why the connection is on its datapath, e.g. ``vxlan: heartbeats through the tunnel
        unanswered for 10s (UDP 6784 blocked or path MTU too small?); using sleeve``."""
        parts: list[str] = list(self._notes)
        for name in self._order:
            if name == self.chosen:
                break
            parts.append(self._why_not(self._paths[name], name))
        chosen = self.chosen
        if chosen is None:
            return "; ".join(parts)
        path = self._paths[chosen]
        if not self.carrying:
            parts.append(self._why_not(path, chosen))
            if chosen != self._order[-1] or len(self._order) == 1:
                parts.append(f"no fallback (datapath {chosen} forced)")
            return "; ".join(parts)
        if parts:
            parts.append(f"using {chosen}")
        return "; ".join(parts)

    def status(self) -> dict[str, object]:
        return {
            "chosen": self.chosen,
            "notes": list(self._notes),
            "paths": {
                p.name: {
                    "healthy": p.healthy,
                    "peer_healthy": p.peer_healthy if p.name != SLEEVE else None,
                    "reason": p.unavailable or p.reason,
                }
                for p in self._paths.values()
            },
        }

    # -- internals ------------------------------------------------------------------------------

    def _path(self, name: str) -> _Path:
        path = self._paths.get(name)
        if path is None:
            raise LocalError(f"datapath {name} is not a candidate for this connection")
        return path

    @staticmethod
    def _both_healthy(path: _Path) -> bool:
        if path.unavailable:
            return False
        return path.healthy and (path.name == SLEEVE or path.peer_healthy)

    def _update_since(self, path: _Path, now: float) -> None:
        if self._both_healthy(path):
            if path.healthy_since is None:
                path.healthy_since = now
        else:
            path.healthy_since = None

    def _eligible(self, path: _Path, now: float) -> bool:
        if not self._both_healthy(path):
            return False
        if path.name == self.chosen or not path.lost_once:
            return True
        since = path.healthy_since
        return since is not None and now >= since + self.config.recovery_hold

    def _why_not(self, path: _Path, name: str) -> str:
        if path.unavailable:
            return path.unavailable
        if not path.healthy:
            return f"{name}: {path.reason}"
        if name != SLEEVE and not path.peer_healthy:
            return f"{name}: the peer's heartbeats through the tunnel are not answered"
        return f"{name}: healthy again, returning after {self.config.recovery_hold:g}s"

    @staticmethod
    def _why_code(path: _Path) -> str:
        if path.unavailable:
            return "unavailable"
        if not path.healthy:
            return "mtu" if "too large" in path.reason else "heartbeat_lost"
        return "peer_heartbeat_lost"

    def _decide(self, now: float) -> None:
        choice = self._order[-1]  # the last resort: sleeve, or the forced datapath
        for name in self._order:
            if self._eligible(self._paths[name], now):
                choice = name
                break
        if choice != self.chosen:
            old = self.chosen
            self.chosen = choice
            code = ""
            if old is not None and self._order.index(old) < self._order.index(choice):
                reason = self._why_not(self._paths[old], old)  # a fallback: why the old one went
                code = self._why_code(self._paths[old])
            elif old is not None:
                reason = f"{choice}: healthy at both ends"
            else:
                reason = ""
            self._events.append(DatapathChanged(old, choice, reason, code))
