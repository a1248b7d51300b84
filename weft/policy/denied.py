"""The last denied flows, for ``weft policy denied``, the HTTP API and the UI; pure.

:class:`DeniedLog` turns NFLOG packets (:class:`weft.policy.nflog.DeniedPacket`) into a bounded
ring of :class:`DeniedFlow` records: who (address and, when known, pod) tried to reach what
(address, pod, protocol and port), in which direction, and which local pod's isolation — which
policies — denied it. The caller injects the clock and two lookups (address -> pod, local pod
address + direction -> the policies isolating it), so this module does no I/O and reads no clock.

Cheap under a flood, on top of the kernel's log limit: the same flow (direction, addresses,
protocol, destination port; source ports differ between attempts) seen again within
``merge_window`` seconds of its last packet only raises that record's ``count``; new records are
admitted by a token bucket (``rate`` a second, ``burst`` at once) and counted in ``suppressed``
when refused; at most ``max_entries`` are kept, oldest dropped first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final

from weft.policy.compiler import Direction
from weft.policy.model import IPAddress
from weft.policy.nflog import DeniedPacket
from weft.policy.nft import DENY_PREFIX

__all__ = ["DeniedFlow", "DeniedLog", "protocol_name"]

_DIRECTIONS: Final[dict[str, Direction]] = {v: k for k, v in DENY_PREFIX.items()}
_PROTOCOLS: Final = {1: "ICMP", 6: "TCP", 17: "UDP", 33: "DCCP", 58: "ICMPv6", 132: "SCTP"}
_PROTOCOLS_UDPLITE: Final = 136

Resolve = Callable[[IPAddress], "str | None"]
IsolatingPolicies = Callable[[IPAddress, Direction], "list[str]"]


def protocol_name(number: int) -> str:
    """``TCP``, ``UDP``, ``SCTP`` as NetworkPolicy spells them; others by name or number."""
    if number == _PROTOCOLS_UDPLITE:
        return "UDPLite"
    return _PROTOCOLS.get(number, str(number))


@dataclass(frozen=True)
class DeniedFlow:
    """Packets of one flow denied in one burst: first and last time, how many."""

    time: float  # first packet, seconds since the epoch (the injected clock's)
    last: float  # latest packet merged into this record
    count: int
    direction: Direction
    source: IPAddress
    source_pod: str | None  # "ns/name"
    destination: IPAddress
    destination_pod: str | None
    protocol: str  # "TCP", "UDP", "SCTP", "ICMP", "ICMPv6", ...
    port: int | None  # destination port; None for ICMP and when unknown
    isolated_pod: str | None  # the local pod whose isolation denied it (egress: source)
    policies: tuple[str, ...]  # "ns/name" of the policies isolating it in this direction

    def key(self) -> tuple[Direction, IPAddress, IPAddress, str, int | None]:
        return (self.direction, self.source, self.destination, self.protocol, self.port)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "last": self.last,
            "count": self.count,
            "direction": self.direction,
            "source": str(self.source),
            "source_pod": self.source_pod,
            "destination": str(self.destination),
            "destination_pod": self.destination_pod,
            "protocol": self.protocol,
            "port": self.port,
            "isolated_pod": self.isolated_pod,
            "policies": list(self.policies),
        }


class DeniedLog:
    """A bounded, rate-limited ring of the latest :class:`DeniedFlow` s, newest last."""

    def __init__(
        self,
        max_entries: int = 200,
        rate: float = 20.0,
        burst: int = 50,
        merge_window: float = 1.0,
    ) -> None:
        if max_entries < 1 or rate <= 0 or burst < 1 or merge_window < 0:
            raise ValueError("max_entries, rate and burst must be positive, merge_window >= 0")
        self.max_entries = max_entries
        self.rate = rate
        self.burst = burst
        self.merge_window = merge_window
        self._flows: deque[DeniedFlow] = deque(maxlen=max_entries)
        self._latest: dict[tuple[Direction, IPAddress, IPAddress, str, int | None], DeniedFlow] = {}
        self._tokens = float(burst)
        self._refilled: float | None = None
        self.packets = 0  # every packet offered, merged or not
        self.suppressed = 0  # new records refused by the rate limit
        self.foreign = 0  # packets whose prefix is not one of ours (another user of the group)

    def _take_token(self, now: float) -> bool:
        if self._refilled is not None and now > self._refilled:
            self._tokens = min(float(self.burst), self._tokens + (now - self._refilled) * self.rate)
        if self._refilled is None or now > self._refilled:
            self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def record(
        self,
        packet: DeniedPacket,
        now: float,
        resolve: Resolve,
        isolating_policies: IsolatingPolicies,
    ) -> DeniedFlow | None:
        """Add ``packet``; the record it went into, or None (not ours, or rate-limited)."""
        direction = _DIRECTIONS.get(packet.prefix)
        if direction is None:
            self.foreign += 1
            return None
        self.packets += 1
        protocol = protocol_name(packet.protocol)
        key = (direction, packet.src, packet.dst, protocol, packet.dport)
        previous = self._latest.get(key)
        if previous is not None and 0 <= now - previous.last <= self.merge_window:
            merged = replace(previous, last=now, count=previous.count + 1)
            for i in range(len(self._flows) - 1, -1, -1):  # usually near the newest end
                if self._flows[i] is previous:
                    self._flows[i] = merged
                    break
            self._latest[key] = merged
            return merged
        if not self._take_token(now):
            self.suppressed += 1
            return None
        local = packet.src if direction == "egress" else packet.dst
        flow = DeniedFlow(
            time=now,
            last=now,
            count=1,
            direction=direction,
            source=packet.src,
            source_pod=resolve(packet.src),
            destination=packet.dst,
            destination_pod=resolve(packet.dst),
            protocol=protocol,
            port=packet.dport,
            isolated_pod=resolve(local),
            policies=tuple(sorted(isolating_policies(local, direction))),
        )
        if len(self._flows) == self.max_entries:
            oldest = self._flows[0]
            if self._latest.get(oldest.key()) is oldest:
                del self._latest[oldest.key()]
        self._flows.append(flow)
        self._latest[key] = flow
        return flow

    def flows(self) -> list[DeniedFlow]:
        """Oldest first."""
        return list(self._flows)

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        """Newest first, at most ``limit`` flows, with the log's own counts."""
        flows = list(reversed(self._flows))
        if limit is not None:
            flows = flows[: max(limit, 0)]
        return {
            "flows": [f.to_json() for f in flows],
            "packets": self.packets,
            "suppressed": self.suppressed,
            "foreign": self.foreign,
            "max_entries": self.max_entries,
        }
