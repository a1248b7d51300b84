"""Admission of control connections that have not authenticated yet (no I/O, time injected).

Until its handshake is done, a connection costs us a task, buffers and handshake CPU, and proves
nothing: anyone who can reach TCP 6783 can open one and send nothing after the header, holding
it until the handshake timeout. :class:`Admission` bounds these connections (issue #14 item 6):

* ``limit`` (32) connections are authenticating at a time, inbound and outbound together;
* ``outbound_reserve`` (8) of them are only for our own dials: inbound ones get at most
  ``limit - outbound_reserve``, so strangers cannot stop us from reaching our known peers;
* ``per_source`` (4) inbound ones from one source: an IPv4 address, or an IPv6 /64 (one host
  usually has a whole /64);
* when the inbound budget is full, a newcomer from a source holding at least two fewer
  connections than the busiest source takes the place of that source's oldest one. A flood from
  a few sources then cannot keep a peer from elsewhere out; to block new inbound peers, an
  attacker needs as many sources as the budget has slots, and still cannot block our dials.

Refusals (and handshake failures of inbound connections) are logged aggregated: the first
``log_burst`` of a ``log_interval`` one by one, then one :class:`RefusalsSummarised` per
interval with the counts by reason and by source, instead of a line per connection.

The caller (the router's asyncio pump) gives every connection a key, asks ``admit_inbound`` or
``admit_outbound`` before it spends anything on it, and calls ``release`` once the handshake is
done or the connection is gone. Connections waiting for an accept token are already counted.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from weft.errors import ConfigError, LocalError

__all__ = [
    "Admission",
    "AdmissionConfig",
    "Admitted",
    "RefusalsSummarised",
    "Refused",
    "source_of",
]

LABEL_LIMIT: Final = "unauth_limit"
LABEL_PER_SOURCE: Final = "unauth_per_source"
LABEL_OUTBOUND: Final = "unauth_outbound_limit"
LABEL_FAILED: Final = "handshake_failed"
_SUMMARY_SOURCES: Final = 10  # sources named in a summary line


@dataclass(frozen=True)
class AdmissionConfig:
    """Budget of connections that have not authenticated yet.

    * ``limit`` — 32: at most this many authenticate at a time, inbound and outbound together.
    * ``per_source`` — 4: at most this many inbound ones from one source address (IPv4) or
      ``ipv6_prefix`` network (IPv6).
    * ``outbound_reserve`` — 8: slots of ``limit`` only our own dials may use.
    * ``ipv6_prefix`` — 64: IPv6 sources are counted per network of this length.
    * ``log_interval`` — 60 s: refusals beyond ``log_burst`` are summed up once per interval.
    * ``log_burst`` — 3: refusals and handshake failures logged one by one per interval.
    """

    limit: int = 32
    per_source: int = 4
    outbound_reserve: int = 8
    ipv6_prefix: int = 64
    log_interval: float = 60.0
    log_burst: int = 3

    def validated(self) -> AdmissionConfig:
        if self.limit < 2:
            raise ConfigError(f"unauthenticated connection limit {self.limit}: must be at least 2")
        if not 0 < self.outbound_reserve < self.limit:
            raise ConfigError(
                f"outbound reserve {self.outbound_reserve}: must be 1..{self.limit - 1}"
                " (below the unauthenticated connection limit)"
            )
        if self.per_source < 1:
            raise ConfigError(f"per-source limit {self.per_source}: must be at least 1")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ConfigError(f"IPv6 source prefix /{self.ipv6_prefix}: must be 0..128")
        if not self.log_interval > 0 or self.log_burst < 0:
            raise ConfigError("admission log interval must be positive, burst at least 0")
        return self

    @property
    def inbound_limit(self) -> int:
        return self.limit - self.outbound_reserve


@dataclass(frozen=True)
class Admitted:
    """Go ahead. ``evict``: first close this (inbound, unauthenticated) connection's key."""

    evict: int | None = None
    evict_reason: str = ""


@dataclass(frozen=True)
class Refused:
    """Close at once. ``label`` is the counter label; ``log``: log this one individually (the
    others of this interval go into the next :class:`RefusalsSummarised`)."""

    reason: str
    label: str
    log: bool


Verdict = Admitted | Refused


@dataclass(frozen=True)
class RefusalsSummarised:
    """What was refused (and failed before authenticating) in one log interval."""

    interval: float
    by_label: tuple[tuple[str, int], ...]  # most first
    by_source: tuple[tuple[str, int], ...]  # most first, at most _SUMMARY_SOURCES
    sources: int  # distinct sources in all
    logged: int  # of the total, logged one by one during the interval

    @property
    def total(self) -> int:
        return sum(n for _, n in self.by_label)

    def message(self) -> str:
        labels = ", ".join(f"{label} {n}" for label, n in self.by_label)
        top = ", ".join(f"{src} {n}" for src, n in self.by_source)
        more = f" ({self.sources} sources in all)" if self.sources > len(self.by_source) else ""
        return (
            f"unauthenticated connections in the last {self.interval:g}s: {self.total} refused or"
            f" failed ({labels}; {self.logged} logged above); by source: {top}{more}"
        )


def source_of(ip: str, ipv6_prefix: int = 64) -> str:
    """The per-source key of a remote address: the IPv4 address, or its IPv6 network."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip or "?"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


@dataclass
class _Window:
    start: float
    logged: int = 0
    by_label: Counter[str] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)


class Admission:
    """The budget's state. Keys are the caller's connection ids (unique while admitted)."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config.validated()
        self._inbound: dict[int, str] = {}  # key -> source; insertion order = age
        self._outbound: set[int] = set()
        self._by_source: Counter[str] = Counter()
        self._window: _Window | None = None
        self.counters: Counter[str] = Counter()  # refusals by label, evictions ("unauth_evicted")

    # -- queries -----------------------------------------------------------------------------

    @property
    def inbound(self) -> int:
        return len(self._inbound)

    @property
    def outbound(self) -> int:
        return len(self._outbound)

    def source_count(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def status(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "inbound": self.inbound,
            "outbound": self.outbound,
            "limit": cfg.limit,
            "outbound_reserve": cfg.outbound_reserve,
            "per_source": cfg.per_source,
            "busiest_sources": [
                {"source": src, "connections": n} for src, n in self._by_source.most_common(5)
            ],
        }

    # -- decisions ---------------------------------------------------------------------------

    def admit_inbound(self, key: int, ip: str, now: float) -> Verdict:
        """May a stranger's connection from ``ip`` start its handshake?"""
        cfg = self.config
        self._check_new(key)
        source = source_of(ip, cfg.ipv6_prefix)
        have = self._by_source.get(source, 0)
        if have >= cfg.per_source:
            return self._refuse(
                source,
                LABEL_PER_SOURCE,
                now,
                f"{have} connections from {source} are already authenticating"
                f" (per-source limit {cfg.per_source})",
            )
        evict: int | None = None
        reason = ""
        total = self.inbound + self.outbound
        if self.inbound >= cfg.inbound_limit or total >= cfg.limit:
            evict = self._eviction_candidate(have)
            if evict is None:
                return self._refuse(
                    source,
                    LABEL_LIMIT,
                    now,
                    f"{total} connections are authenticating (limit {cfg.limit},"
                    f" {cfg.outbound_reserve} kept for our own dials)",
                )
            victim = self._inbound[evict]
            reason = (
                f"closed to make room for {source}: the budget of unauthenticated connections"
                f" is full and {victim} held {self._by_source[victim]} of them"
            )
            self._remove(evict)
            self.counters["unauth_evicted"] += 1
        self._inbound[key] = source
        self._by_source[source] += 1
        return Admitted(evict, reason)

    def admit_outbound(self, key: int, now: float) -> Verdict:
        """May our own dial, now connected, start its handshake?"""
        cfg = self.config
        self._check_new(key)
        total = self.inbound + self.outbound
        if total >= cfg.limit:
            return self._refuse(
                "(our dials)",
                LABEL_OUTBOUND,
                now,
                f"{total} connections are authenticating (limit {cfg.limit})",
            )
        self._outbound.add(key)
        return Admitted()

    def release(self, key: int) -> None:
        """The connection authenticated or is gone; idempotent (unknown keys are ignored)."""
        if key in self._outbound:
            self._outbound.discard(key)
        elif key in self._inbound:
            self._remove(key)

    def note_refused(self, ip: str, label: str, now: float) -> bool:
        """A refusal decided elsewhere (e.g. the overall connection limit); True: log it."""
        return self._note(source_of(ip, self.config.ipv6_prefix), label, now)

    def note_failed(self, ip: str, now: float) -> bool:
        """An inbound connection ended before authenticating; True: log it individually."""
        return self._note(source_of(ip, self.config.ipv6_prefix), LABEL_FAILED, now)

    # -- timer -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When the current log interval ends (None: nothing to summarise)."""
        w = self._window
        return None if w is None else w.start + self.config.log_interval

    def handle_timer(self, now: float) -> RefusalsSummarised | None:
        """End the log interval if it is over: its summary when not everything was logged."""
        w = self._window
        if w is None or now < w.start + self.config.log_interval:
            return None
        self._window = None
        total = sum(w.by_label.values())
        if total <= w.logged:
            return None
        return RefusalsSummarised(
            interval=self.config.log_interval,
            by_label=tuple(w.by_label.most_common()),
            by_source=tuple(w.by_source.most_common(_SUMMARY_SOURCES)),
            sources=len(w.by_source),
            logged=w.logged,
        )

    # -- internals ---------------------------------------------------------------------------

    def _check_new(self, key: int) -> None:
        if key in self._inbound or key in self._outbound:
            raise LocalError(f"connection key {key} is already admitted")

    def _eviction_candidate(self, have: int) -> int | None:
        """The oldest connection of the busiest source, if it holds >= ``have`` + 2."""
        if not self._inbound:
            return None
        busiest = max(self._by_source.values())
        if busiest < have + 2:
            return None
        for key, source in self._inbound.items():  # oldest first
            if self._by_source[source] == busiest:
                return key
        return None  # pragma: no cover - the busiest source holds a connection

    def _remove(self, key: int) -> None:
        source = self._inbound.pop(key)
        self._by_source[source] -= 1
        if self._by_source[source] <= 0:
            del self._by_source[source]

    def _refuse(self, source: str, label: str, now: float, reason: str) -> Refused:
        return Refused(reason, label, self._note(source, label, now))

    def _note(self, source: str, label: str, now: float) -> bool:
        if label != LABEL_FAILED:
            self.counters[label] += 1
        w = self._window
        if w is None:
            w = self._window = _Window(start=now)
        w.by_label[label] += 1
        w.by_source[source] += 1
        if w.logged < self.config.log_burst:
            w.logged += 1
            return True
        return False
