"""An allocator bound to a store, a clock and a gossip sender: the "ipam" channel handler.

:class:`IpamNode` is what registers on the mesh (``mesh.register_channel("ipam", node)``). Every
entry point runs the allocator, then :meth:`IpamNode.pump`: persist the changes (committed),
then hand messages to the sender and events to the listeners - so nothing a peer or a client
sees can ever be ahead of what survives a ``kill -9``. The relayed gossip delta is returned only
after the changes it caused are committed, for the same reason.

No asyncio here: the router's service and the simulator both drive it from one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from weft.gossip.channel import GossipData, GossipSender
from weft.gossip.peer import PeerName
from weft.ipam.allocator import (
    Allocator,
    GossipOut,
    IpamEvent,
    PersistedState,
    StateChanges,
)

__all__ = ["IpamNode", "MemoryStore", "Store"]


class Store(Protocol):
    """Persistence of one allocator's state. ``save`` returns only once the change is durable."""

    def load(self) -> PersistedState | None:
        """The saved state, or None on first start."""
        ...

    def save(self, changes: StateChanges) -> None:
        """Apply and commit ``changes`` (raise on failure; nothing is then sent)."""
        ...

    def close(self) -> None:
        ...


class MemoryStore:
    """A :class:`Store` in memory; survives an :class:`IpamNode` being dropped (simulated crash)."""

    def __init__(self) -> None:
        self._state: PersistedState | None = None
        self.saves = 0

    def load(self) -> PersistedState | None:
        s = self._state
        if s is None:
            return None
        return PersistedState(
            s.range_start,
            s.range_end,
            s.seeds,
            dict(s.entries),
            {k: list(v) for k, v in s.allocations.items()},
            s.paxos,
        )

    def save(self, changes: StateChanges) -> None:
        self.saves += 1
        if changes.wipe or self._state is None:
            self._state = PersistedState(0, 0, (), {}, {}, None)
        s = self._state
        if changes.range is not None:
            s.range_start, s.range_end = changes.range
        if changes.seeds is not None:
            s.seeds = changes.seeds
        s.entries.update(changes.entries)
        for cid, items in changes.allocations.items():
            if items:
                s.allocations[cid] = list(items)
            else:
                s.allocations.pop(cid, None)
        if changes.paxos is not None:
            s.paxos = changes.paxos

    def close(self) -> None:
        return None


class IpamNode:
    """The "ipam" :class:`~weft.gossip.channel.GossipHandler` around an :class:`Allocator`."""

    def __init__(self, allocator: Allocator, store: Store, clock: Callable[[], float]) -> None:
        self.allocator = allocator
        self.store = store
        self.clock = clock
        self.sender: GossipSender | None = None
        self.listeners: list[Callable[[IpamEvent], None]] = []
        self.after_pump: list[Callable[[], None]] = []
        """Called at the end of every pump (the service re-arms its timer from here)."""

    def attach(self, sender: GossipSender) -> None:
        """Give the node the channel's sender (from ``mesh.register_channel``) and flush."""
        self.sender = sender
        self.pump()

    def pump(self) -> None:
        """Persist, then send, then tell listeners. Call after every allocator call."""
        changes = self.allocator.take_changes()
        if changes is not None:
            self.store.save(changes)
        if self.sender is not None:
            for msg in self.allocator.messages_to_send():
                if isinstance(msg, GossipOut):
                    self.sender.gossip(msg.data)
                else:
                    self.sender.unicast(msg.dst, msg.payload)
        while (event := self.allocator.next_event()) is not None:
            for listener in list(self.listeners):
                listener(event)
        for hook in list(self.after_pump):
            hook()

    # ----- GossipHandler -----------------------------------------------------------------------

    def on_unicast(self, src: PeerName, payload: bytes) -> None:
        self.allocator.receive_unicast(src, payload, self.clock())
        self.pump()

    def on_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        return self.on_gossip(payload)

    def on_gossip(self, payload: bytes) -> GossipData | None:
        delta = self.allocator.receive_gossip(payload, self.clock())
        self.pump()
        return delta

    def snapshot(self) -> GossipData:
        return self.allocator.snapshot()

    def handle_timer(self) -> None:
        self.allocator.handle_timer(self.clock())
        self.pump()
