"""A small in-memory gossip network for IPAM simulations and the benchmark.

It stands in for the mesh under the "ipam" channel only: each peer gets a
:class:`~weft.gossip.channel.GossipSender` whose ``gossip`` goes to about ``2·log2(n)`` random
reachable peers (pending data to one neighbour is coalesced, as the mesh does per connection),
``unicast`` goes straight to the destination if it is reachable when the message arrives, and
every ``full_gossip_interval`` each peer sends its snapshot to one random neighbour (the mesh's
periodic full gossip). Latency is drawn per message; partitions are groups of peers; crashed
peers drop everything. Time is simulated (an event heap); nothing sleeps.

It drives the real :class:`IpamNode`/:class:`Allocator` cores with :class:`MemoryStore` stores,
so a crash and restart loses exactly what a ``kill -9`` would lose.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weft.gossip.channel import GossipData
from weft.gossip.peer import PeerName
from weft.ipam.allocator import Allocator, IpamConfig, IpamData, IpamEvent
from weft.ipam.node import IpamNode, MemoryStore

__all__ = ["SimNet", "SimPeer"]


@dataclass
class SimPeer:
    name: PeerName
    config: IpamConfig
    store: MemoryStore
    node: IpamNode | None = None
    group: int = 0
    timer_at: float | None = None
    events: list[IpamEvent] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.node is not None

    @property
    def allocator(self) -> Allocator:
        assert self.node is not None, f"peer {self.name} is down"
        return self.node.allocator


class _SimSender:
    def __init__(self, net: SimNet, src: PeerName) -> None:
        self._net = net
        self._src = src

    def gossip(self, data: GossipData) -> None:
        self._net._gossip(self._src, data)

    def broadcast(self, data: GossipData) -> None:
        for dst in self._net.reachable_from(self._src):
            self._net._queue_data(self._src, dst, data)

    def unicast(self, dst: PeerName, payload: bytes) -> None:
        self._net._unicast(self._src, dst, payload)


class SimNet:
    """Peers, partitions, crashes and a simulated clock for IPAM cores."""

    def __init__(
        self,
        seed: int = 1,
        latency: tuple[float, float] = (0.002, 0.010),
        full_gossip_interval: float = 5.0,
        fanout: int | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency = latency
        self.full_gossip_interval = full_gossip_interval
        self.fanout = fanout
        self.peers: dict[PeerName, SimPeer] = {}
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._pending: dict[tuple[PeerName, PeerName], IpamData] = {}
        self.messages = 0
        self.bytes = 0
        self.listeners: list[Callable[[SimPeer, IpamEvent], None]] = []
        self._groups: dict[int, list[PeerName]] = {}

    # ----- membership ------------------------------------------------------------------------

    def add_peer(self, name: PeerName, config: IpamConfig, start: bool = True) -> SimPeer:
        peer = SimPeer(name, config, MemoryStore())
        self.peers[name] = peer
        if start:
            self.start(name)
        return peer

    def start(self, name: PeerName) -> None:
        """(Re)start a peer from its persisted state."""
        peer = self.peers[name]
        assert peer.node is None
        alloc = Allocator(
            name, peer.config, self.now, random.Random(self.rng.random()), peer.store.load()
        )
        node = IpamNode(alloc, peer.store, lambda: self.now)

        def listen(ev: IpamEvent) -> None:
            self._on_event(peer, ev)

        node.listeners.append(listen)
        peer.node = node
        peer.timer_at = None
        node.attach(_SimSender(self, name))
        self._after(peer)
        self._schedule_full_gossip(peer, first=True)
        self._refresh_reachability()

    def crash(self, name: PeerName) -> None:
        """Drop the peer at once (kill -9): its store stays as last committed."""
        peer = self.peers[name]
        peer.node = None
        peer.timer_at = None
        for key in [k for k in self._pending if name in k]:
            del self._pending[key]
        self._refresh_reachability()

    def partition(self, groups: list[set[PeerName]]) -> None:
        """Split the peers into groups; peers not listed go to group 0."""
        for p in self.peers.values():
            p.group = 0
        for i, g in enumerate(groups, start=1):
            for name in g:
                self.peers[name].group = i
        self._refresh_reachability()

    def heal(self) -> None:
        self.partition([])

    def reachable(self, a: PeerName, b: PeerName) -> bool:
        pa, pb = self.peers[a], self.peers[b]
        return pa.alive and pb.alive and pa.group == pb.group

    def reachable_from(self, src: PeerName) -> list[PeerName]:
        me = self.peers[src]
        if not me.alive:
            return []
        return [n for n in self._groups.get(me.group, []) if n != src]

    def _refresh_reachability(self) -> None:
        groups: dict[int, list[PeerName]] = {}
        for n, p in self.peers.items():
            if p.alive:
                groups.setdefault(p.group, []).append(n)
        self._groups = groups
        for p in self.peers.values():
            if p.node is not None:
                p.node.allocator.peers_changed(groups[p.group], self.now)
                p.node.pump()
                self._after(p)

    # ----- client calls ----------------------------------------------------------------------

    def call(self, name: PeerName, fn: Callable[[Allocator], Any]) -> Any:
        """Run ``fn(allocator)`` on a live peer at the current time, then pump it."""
        peer = self.peers[name]
        assert peer.node is not None
        try:
            return fn(peer.node.allocator)
        finally:
            peer.node.pump()
            self._after(peer)

    def _on_event(self, peer: SimPeer, ev: IpamEvent) -> None:
        peer.events.append(ev)
        for listener in self.listeners:
            listener(peer, ev)

    # ----- the clock -------------------------------------------------------------------------

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, fn))

    def run_until(self, t: float, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to time ``t`` (or until ``stop()``); True if stopped early."""
        while self._heap and self._heap[0][0] <= t:
            when, _, fn = heapq.heappop(self._heap)
            self.now = when
            fn()
            if stop is not None and stop():
                return True
        self.now = max(self.now, t)
        return False

    def run_for(self, dt: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + dt, stop)

    def _after(self, peer: SimPeer) -> None:
        """Re-arm the peer's timer after any call into its node."""
        if peer.node is None:
            return
        t = peer.node.allocator.get_timer()
        if t is None or t == peer.timer_at:
            return
        peer.timer_at = t
        node = peer.node

        def fire() -> None:
            if peer.node is node and peer.timer_at == t:
                peer.timer_at = None
                node.handle_timer()
                self._after(peer)

        self._at(t, fire)

    def _schedule_full_gossip(self, peer: SimPeer, first: bool = False) -> None:
        node = peer.node
        delay = self.full_gossip_interval * (self.rng.random() if first else 1.0)

        def fire() -> None:
            if peer.node is not node or node is None:
                return
            targets = self.reachable_from(peer.name)
            if targets:
                dst = targets[self.rng.randrange(len(targets))]
                self._queue_data(peer.name, dst, node.snapshot())
            self._schedule_full_gossip(peer)

        self._at(self.now + delay, fire)

    # ----- delivery --------------------------------------------------------------------------

    def _delay(self) -> float:
        lo, hi = self.latency
        return lo + (hi - lo) * self.rng.random()

    def _gossip(self, src: PeerName, data: GossipData) -> None:
        targets = self.reachable_from(src)
        if not targets:
            return
        k = self.fanout or max(2, math.ceil(2 * math.log2(len(self.peers) + 1)))
        for dst in self.rng.sample(targets, min(k, len(targets))):
            self._queue_data(src, dst, data)

    def _queue_data(self, src: PeerName, dst: PeerName, data: GossipData) -> None:
        assert isinstance(data, IpamData)
        key = (src, dst)
        pending = self._pending.get(key)
        if pending is not None:
            pending.merge(data)
            return
        copy = IpamData().merge(data)
        self._pending[key] = copy

        def deliver() -> None:
            item = self._pending.pop(key, None)
            if item is None or not self.reachable(src, dst):
                return
            peer = self.peers[dst]
            assert peer.node is not None
            for payload in item.encode():
                self.messages += 1
                self.bytes += len(payload)
                delta = peer.node.on_gossip(payload)
                if delta is not None:
                    self._gossip(dst, delta)
            self._after(peer)

        self._at(self.now + self._delay(), deliver)

    def _unicast(self, src: PeerName, dst: PeerName, payload: bytes) -> None:
        if dst not in self.peers:
            return

        def deliver() -> None:
            if not self.reachable(src, dst):
                return
            peer = self.peers[dst]
            assert peer.node is not None
            self.messages += 1
            self.bytes += len(payload)
            peer.node.on_unicast(src, payload)
            self._after(peer)

        self._at(self.now + self._delay(), deliver)
