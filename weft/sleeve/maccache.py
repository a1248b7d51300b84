"""MAC learning for the sleeve: which peer owns which MAC address, with expiry.

Pure (no I/O); the caller passes ``now``. Entries map a 48-bit MAC (an ``int``) to the peer that
last sent a frame from it. A MAC seen behind another peer than before is a *move* (a container
re-attached elsewhere): the newest sighting wins and the move is counted, so traffic follows the
container as soon as it sends anything (an ARP, a gratuitous ARP, any frame).

Entries expire ``expiry`` seconds after they were last refreshed; :meth:`MacCache.expire` drops
them in bulk (amortised: at most once per ``expiry / 4``) and the cache never holds more than
``capacity`` entries (the oldest are evicted first), so a flood of random source MACs cannot
exhaust memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from weft.errors import ConfigError
from weft.gossip.peer import PeerName

__all__ = ["MacCache", "MacCacheConfig", "format_mac"]


def format_mac(mac: int) -> str:
    """``0x0242ac110002`` -> ``02:42:ac:11:00:02``."""
    raw = f"{mac:012x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True)
class MacCacheConfig:
    expiry: float = 600.0  # seconds an entry lives without being refreshed (Weave: 10 min)
    capacity: int = 65536  # hard bound on entries; the least recently refreshed go first

    def __post_init__(self) -> None:
        if self.expiry <= 0:
            raise ConfigError(f"MAC cache expiry must be positive, got {self.expiry}")
        if self.capacity < 1:
            raise ConfigError(f"MAC cache capacity must be at least 1, got {self.capacity}")


class MacCache:
    """MAC -> owning peer with expiry; ordered by last refresh (oldest first)."""

    __slots__ = ("_entries", "_next_sweep", "config", "moves")

    def __init__(self, config: MacCacheConfig | None = None) -> None:
        self.config = config or MacCacheConfig()
        # mac -> (peer, last seen); OrderedDict order == refresh order.
        self._entries: OrderedDict[int, tuple[PeerName, float]] = OrderedDict()
        self._next_sweep = 0.0
        self.moves = 0

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, mac: int, peer: PeerName, now: float) -> bool:
        """Record that ``mac`` was seen behind ``peer``; return True if it moved from another peer.

        Refreshing an unchanged entry is the hot path (every forwarded frame), so it costs one dict
        lookup and only re-orders the entry when it is at least a second old.
        """
        entries = self._entries
        old = entries.get(mac)
        if old is not None:
            if old[0] == peer:
                if now - old[1] >= 1.0:
                    entries[mac] = (peer, now)
                    entries.move_to_end(mac)
                return False
            entries[mac] = (peer, now)
            entries.move_to_end(mac)
            self.moves += 1
            return True
        entries[mac] = (peer, now)
        if len(entries) > self.config.capacity:
            entries.popitem(last=False)
        return False

    def lookup(self, mac: int, now: float) -> PeerName | None:
        """The peer owning ``mac``, or None when unknown or expired."""
        entry = self._entries.get(mac)
        if entry is None:
            return None
        if now - entry[1] > self.config.expiry:
            del self._entries[mac]
            return None
        return entry[0]

    def forget_peer(self, peer: PeerName) -> int:
        """Drop every MAC learned behind ``peer`` (it left the mesh); return how many."""
        gone = [mac for mac, (owner, _) in self._entries.items() if owner == peer]
        for mac in gone:
            del self._entries[mac]
        return len(gone)

    def expire(self, now: float) -> int:
        """Drop entries not refreshed for ``expiry`` seconds; return how many went."""
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + self.config.expiry / 4
        limit = now - self.config.expiry
        dropped = 0
        entries = self._entries
        while entries:
            mac, (_, seen) = next(iter(entries.items()))
            if seen >= limit:
                break
            del entries[mac]
            dropped += 1
        return dropped

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Live entries for status: ``[{"mac", "peer", "age"}]``."""
        return [
            {"mac": format_mac(mac), "peer": str(peer), "age": round(now - seen, 1)}
            for mac, (peer, seen) in self._entries.items()
            if now - seen <= self.config.expiry
        ]
