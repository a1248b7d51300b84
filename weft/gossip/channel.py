"""Gossip channel contracts, in the shape of weaveworks/mesh ``gossip.go``.

Three roles:

* :class:`GossipData` — a piece of replicated state that can be encoded and merged.
* :class:`GossipHandler` — the application side of one channel (topology, ipam, ...).
* :class:`GossipSender` — what the mesh gives the application to send with.

All callbacks run on the router's event loop (or the simulator's single thread), never
concurrently, and must not block. Byte buffers passed in are owned by the callee afterwards.
"""

from __future__ import annotations

from typing import Protocol

from weft.gossip.peer import PeerName

__all__ = ["GossipData", "GossipHandler", "GossipSender"]


class GossipData(Protocol):
    """Replicated state that can be encoded and merged (a CRDT-like value)."""

    def encode(self) -> list[bytes]:
        """Serialise; several parts may be returned so large state can be split."""
        ...

    def merge(self, other: GossipData) -> GossipData:
        """Merge ``other`` into self and return self (used to coalesce pending outgoing data).

        The mesh only merges data handed to a sender (or returned by a handler) and only encodes
        the result; one object may be pending on several connections, so a merge may be seen
        by more than one of them (harmless for state that merges as a CRDT)."""
        ...


class GossipHandler(Protocol):
    """The application side of a channel. Raising ``RemoteProtocolError`` closes that connection."""

    def on_unicast(self, src: PeerName, payload: bytes) -> None:
        """A message addressed to us by ``src`` arrived (possibly relayed over several hops)."""
        ...

    def on_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        """A broadcast from ``src``; return what was new to keep relaying, or None."""
        ...

    def on_gossip(self, payload: bytes) -> GossipData | None:
        """Gossip from a neighbour; merge it and return only the delta (None = nothing new)."""
        ...

    def snapshot(self) -> GossipData:
        """Complete local state, sent periodically and on new connections. Return a fresh
        object (not the live state): pending data is merged in place per connection."""
        ...


class GossipSender(Protocol):
    """How an application sends on its channel. Never blocks; sending is queued and coalesced."""

    def gossip(self, data: GossipData) -> None:
        """Send ``data`` (normally a delta) to a few random neighbours."""
        ...

    def broadcast(self, data: GossipData) -> None:
        """Send ``data`` to every reachable peer along the broadcast tree."""
        ...

    def unicast(self, dst: PeerName, payload: bytes) -> None:
        """Send to one peer along the unicast route; dropped silently if unreachable."""
        ...
