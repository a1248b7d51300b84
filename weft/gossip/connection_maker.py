"""Connection-maker policy: which addresses to dial and when (no I/O, time injected).

Targets come from two sources:

* *direct* targets: given on the command line or by ``connect`` (persisted by the router);
  ``replace=True`` swaps the whole direct set; ``forget`` removes some.
* *discovered* targets: addresses of peers other peers are connected to but we are not
  (only while discovery is on). They disappear once we are connected to that peer.

Backoff (Weave's): the first retry waits ``initial`` (2 s) times a jitter factor drawn from
[1/2, 3/2); each failure multiplies the interval by 1.5, capped at 6 minutes. A connection that
lived at least ``reset_after`` (1 min) resets the interval. When gossip shows a retrying target's
peer alive again (a new uid, or a record reappearing), it is retried at once.

Target states (status rows): ``connecting`` (a dial is outstanding), ``retrying`` (waiting for
``next_try`` after a failure), ``failed`` (like retrying, but the backoff has reached its cap),
``connected``. A fresh target is dialed on the next :meth:`poll`.

The caller must answer every dial handed out by :meth:`poll` with :meth:`connection_succeeded`
or :meth:`dial_failed`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from weft.errors import ConfigError
from weft.gossip.peer import PeerName

__all__ = ["BackoffConfig", "ConnectionMaker", "Target", "host_of", "normalise_address"]


@dataclass(frozen=True)
class BackoffConfig:
    """Retry policy. Defaults are Weave's."""

    initial: float = 2.0  # seconds before the first retry (before jitter)
    factor: float = 1.5  # growth per failed attempt
    cap: float = 360.0  # longest interval (6 minutes)
    jitter_low: float = 0.5  # the wait is interval * uniform[jitter_low, jitter_high)
    jitter_high: float = 1.5
    reset_after: float = 60.0  # a connection that lived this long resets the backoff

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ConfigError("backoff: need 0 < initial <= cap")
        if self.factor < 1:
            raise ConfigError("backoff: factor must be >= 1")
        if not 0 < self.jitter_low <= self.jitter_high:
            raise ConfigError("backoff: need 0 < jitter_low <= jitter_high")


def host_of(address: str) -> str:
    """The host part of ``host:port`` or ``[v6]:port`` (the whole string if there is no port)."""
    if address.startswith("["):
        end = address.find("]")
        return address[1:end] if end > 0 else address
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def normalise_address(address: str, default_port: int) -> str:
    """``host`` -> ``host:port``; IPv6 hosts get brackets. Leaves ``host:port`` alone."""
    address = address.strip()
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{default_port}"
    colons = address.count(":")
    if colons == 0:
        return f"{address}:{default_port}"
    if colons > 1:  # bare IPv6
        return f"[{address}]:{default_port}"
    return address


@dataclass
class Target:
    address: str
    direct: bool = False
    discovered_for: PeerName | None = None  # set while discovery wants this address
    peer: PeerName | None = None  # who answered at this address last time (if known)
    state: str = "connecting"  # connecting | retrying | failed | connected
    attempts: int = 0
    interval: float = 0.0
    next_try: float | None = None  # None: not scheduled (connecting or connected)
    last_error: str = ""
    last_attempt: float | None = None
    connected_at: float | None = None
    dialing: bool = False

    def to_status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "state": self.state,
            "attempts": self.attempts,
            "next_try": self.next_try,
            "last_error": self.last_error,
            "direct": self.direct,
            "peer": str(self.peer) if self.peer is not None else None,
        }


@dataclass
class ConnectionMaker:
    """Pure policy state; :class:`~weft.gossip.mesh.MeshCore` drives it."""

    backoff: BackoffConfig
    rng: random.Random
    port: int = 6783
    targets: dict[str, Target] = field(default_factory=dict)
    ourself: PeerName | None = None
    own_addresses: set[str] = field(default_factory=set)
    _connected_addresses: set[str] = field(default_factory=set)
    _connected_names: set[PeerName] = field(default_factory=set)

    # --- inputs -----------------------------------------------------------------------------

    def add_direct(self, addresses: Iterable[str], now: float, replace: bool = False) -> None:
        wanted = {normalise_address(a, self.port) for a in addresses}
        if replace:
            for addr, t in list(self.targets.items()):
                if t.direct and addr not in wanted:
                    t.direct = False
                    self._maybe_drop(addr)
        for addr in wanted:
            found = self.targets.get(addr)
            if found is None:
                found = self.targets[addr] = Target(address=addr, next_try=now, state="retrying")
                found.direct = True
                self._refresh_connected(found)
            found.direct = True

    def forget(self, addresses: Iterable[str]) -> None:
        for a in addresses:
            addr = normalise_address(a, self.port)
            t = self.targets.get(addr)
            if t is not None:
                t.direct = False
                self._maybe_drop(addr)

    def direct_targets(self) -> list[str]:
        return sorted(a for a, t in self.targets.items() if t.direct)

    def set_discovered(self, name: PeerName, addresses: Iterable[str], now: float) -> None:
        """Discovery wants ``addresses`` for peer ``name`` (empty: no longer)."""
        wanted = {a for a in addresses if a not in self.own_addresses}
        for addr, t in list(self.targets.items()):
            if t.discovered_for == name and addr not in wanted:
                t.discovered_for = None
                self._maybe_drop(addr)
        for addr in wanted:
            found = self.targets.get(addr)
            if found is None:
                # Both ends discover each other at once; let the lower name dial first so a
                # full mesh does not open every connection twice (the duplicate would lose the
                # tie-break anyway). The other end dials after a jittered initial interval.
                when = now
                if self.ourself is not None and self.ourself > name:
                    when = now + self.backoff.initial * self._jitter()
                found = self.targets[addr] = Target(address=addr, next_try=when, state="retrying")
                found.peer = name
                found.discovered_for = name
                self._refresh_connected(found)
            found.discovered_for = name

    def set_connected(self, addresses: Iterable[str], names: Iterable[PeerName]) -> None:
        """Our current connections: their addresses (see MeshCore) and peer names."""
        self._connected_addresses = set(addresses)
        self._connected_names = set(names)
        for t in list(self.targets.values()):
            self._refresh_connected(t)

    def connection_succeeded(self, address: str, name: PeerName, now: float) -> None:
        t = self.targets.get(address)
        if t is None:
            return
        t.peer = name
        t.dialing = False
        t.state = "connected"
        t.next_try = None
        t.connected_at = now
        t.last_error = ""

    def connection_lost(self, address: str, now: float, reason: str) -> None:
        t = self.targets.get(address)
        if t is None:
            return
        lived = now - t.connected_at if t.connected_at is not None else 0.0
        t.connected_at = None
        t.last_error = reason
        if lived >= self.backoff.reset_after:
            t.interval = 0.0
            t.attempts = 0
        self._schedule_retry(t, now)

    def dial_failed(self, address: str, now: float, reason: str) -> None:
        t = self.targets.get(address)
        if t is None:
            return
        t.dialing = False
        t.attempts += 1
        t.last_error = reason
        self._schedule_retry(t, now)
        self._maybe_drop(address)

    def reached_connected_peer(self, address: str, name: PeerName) -> None:
        """A dial reached a peer we already have a connection with (ours lost the duplicate
        tie-break): not a failure; the target now follows that peer's connection."""
        t = self.targets.get(address)
        if t is None:
            return
        t.dialing = False
        t.peer = name
        t.last_error = ""
        self._refresh_connected(t)

    def dialed_self(self, address: str) -> None:
        """The address turned out to be our own: never dial it again."""
        self.own_addresses.add(address)
        t = self.targets.get(address)
        if t is not None:
            t.dialing = False
            t.discovered_for = None
            t.state = "failed"
            t.next_try = None
            t.last_error = "connection to self"
            self._maybe_drop(address)

    def peer_alive(self, name: PeerName, now: float) -> None:
        """Gossip shows ``name`` alive again (new uid / reappeared): retry its targets now."""
        for t in self.targets.values():
            if t.peer == name and t.state in ("retrying", "failed") and not t.dialing:
                if t.address in self.own_addresses:
                    continue
                t.next_try = now

    # --- outputs ----------------------------------------------------------------------------

    def poll(self, now: float) -> list[str]:
        """Addresses to dial now (they become ``connecting``)."""
        out = []
        for t in self.targets.values():
            if t.next_try is not None and t.next_try <= now and not t.dialing:
                if t.state == "connected" or t.address in self.own_addresses:
                    t.next_try = None
                    continue
                t.dialing = True
                t.state = "connecting"
                t.next_try = None
                t.last_attempt = now
                out.append(t.address)
        return sorted(out)

    def next_deadline(self) -> float | None:
        times = [
            t.next_try for t in self.targets.values() if t.next_try is not None and not t.dialing
        ]
        return min(times) if times else None

    def status(self) -> list[dict[str, Any]]:
        return [self.targets[a].to_status() for a in sorted(self.targets)]

    # --- internals --------------------------------------------------------------------------

    def _schedule_retry(self, t: Target, now: float) -> None:
        b = self.backoff
        t.interval = b.initial if t.interval <= 0 else min(b.cap, t.interval * b.factor)
        t.next_try = now + t.interval * self._jitter()
        t.state = "failed" if t.interval >= b.cap else "retrying"

    def _jitter(self) -> float:
        b = self.backoff
        return b.jitter_low + self.rng.random() * (b.jitter_high - b.jitter_low)

    def _refresh_connected(self, t: Target) -> None:
        connected = t.address in self._connected_addresses or (
            t.peer is not None and t.peer in self._connected_names
        )
        if connected and t.state != "connected" and not t.dialing:
            t.state = "connected"
            t.next_try = None
        elif not connected and t.state == "connected" and not t.dialing:
            # lost without a connection_lost (e.g. an inbound connection went away)
            t.state = "retrying"
            t.next_try = t.next_try if t.next_try is not None else 0.0
        self._maybe_drop(t.address)

    def _maybe_drop(self, address: str) -> None:
        t = self.targets.get(address)
        if t is None or t.direct or t.dialing:
            return
        if t.discovered_for is None:
            del self.targets[address]
