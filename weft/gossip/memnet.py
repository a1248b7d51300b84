"""A seeded in-memory network that runs many real :class:`MeshCore` peers on a simulated clock.

For simulation tests and benchmarks (and for other parts' simulations: IPAM registers its
channel through ``on_core``). Discrete-event: nothing sleeps; :meth:`MemNet.run_until` jumps
from one event to the next. Everything random comes from one seed, so a run is reproducible.

Model:

* A peer listens on ``10.<i>.<j>.<k>:6783``. A dial takes ``dial_delay``; it fails with
  "connection refused" if nobody is there (or the peer is stopped) and with "timed out" after
  ``dial_timeout`` if the two are partitioned. A successful dial is a connection on both cores
  (``connection_added``, conn_uid shared as Weave's xor); ``establish_delay`` later the
  "overlay" marks it established on both sides.
* Every link has a fixed latency drawn once from ``latency`` (so each connection stays FIFO) and
  drops each message with probability ``loss`` (to exercise anti-entropy; real TCP does not
  drop, it dies - which partitions model).
* :meth:`partition` cuts links between groups: messages on cut links vanish and the
  connections close ``detect_delay`` later (a heartbeat timeout). :meth:`heal` lifts it.
* :meth:`restart` stops a peer and starts it again with the same name, address and direct
  targets but a new uid; its connections close at once on the other ends (a reset).
* A :class:`~weft.errors.RemoteProtocolError` from a core closes that connection; the reason is
  kept in :attr:`MemNet.errors`.

``depth`` (for benchmarks): every message carries its sender's depth + 1; a peer's depth is the
largest it has received. After :meth:`reset_depths`, the depth at which a peer learnt something
counts the gossip hops ("rounds") it took.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.errors import RemoteProtocolError
from weft.gossip.mesh import (
    ConnectionRejected,
    DialRequested,
    MeshConfig,
    MeshCore,
    MeshEvent,
)
from weft.gossip.peer import PeerIdentity, PeerName, random_peer_name, random_uid

__all__ = ["MemNet", "SimPeer"]


@dataclass
class SimPeer:
    """One simulated host: its address, current core and connections."""

    index: int
    name: PeerName
    nickname: str
    address: str
    core: MeshCore
    targets: list[str]
    alive: bool = True
    incarnation: int = 0
    conns: dict[int, tuple[SimPeer, int]] = field(default_factory=dict)  # id -> (remote, its id)
    timer_at: float | None = None
    depth: int = 0
    events: list[MeshEvent] = field(default_factory=list)
    bytes_sent: int = 0
    messages_sent: int = 0

    def __hash__(self) -> int:
        return self.index

    def __eq__(self, other: object) -> bool:
        return self is other


class MemNet:
    """The simulated network. All times are simulated seconds (``self.now``)."""

    def __init__(
        self,
        seed: int = 0,
        config: MeshConfig | None = None,
        *,
        latency: tuple[float, float] = (0.001, 0.010),
        loss: float = 0.0,
        dial_delay: float = 0.01,
        dial_timeout: float = 1.0,
        establish_delay: float = 0.05,
        detect_delay: float = 1.0,
        on_core: Callable[[SimPeer], None] | None = None,
        keep_events: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self._seed = seed
        self.config = config or MeshConfig()
        self.latency = latency
        self.loss = loss
        self.dial_delay = dial_delay
        self.dial_timeout = dial_timeout
        self.establish_delay = establish_delay
        self.detect_delay = detect_delay
        self.on_core = on_core
        self.keep_events = keep_events
        self.now = 0.0
        self.peers: list[SimPeer] = []
        self.by_address: dict[str, SimPeer] = {}
        self.errors: list[str] = []
        self.bytes_sent = 0
        self.messages_sent = 0
        self.messages_dropped = 0
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = 0
        self._next_conn = 1
        self._group: dict[int, int] = {}  # peer index -> partition group (absent: group 0)
        self._link_latency: dict[tuple[int, int], float] = {}
        self._fifo: dict[int, float] = {}  # conn id -> last delivery time (keeps FIFO)

    # ==== building ===============================================================================

    def add_peer(
        self,
        targets: Iterable[str] = (),
        *,
        nickname: str | None = None,
        config: MeshConfig | None = None,
    ) -> SimPeer:
        """Start a new peer now; it dials ``targets`` (addresses of other peers)."""
        i = len(self.peers)
        address = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:6783"
        name = random_peer_name(self.rng)
        while any(p.name == name for p in self.peers):
            name = random_peer_name(self.rng)
        nick = nickname or f"h{i}"
        core = self._new_core(name, nick, config)
        peer = SimPeer(i, name, nick, address, core, list(targets))
        self.peers.append(peer)
        self.by_address[address] = peer
        if self.on_core is not None:
            self.on_core(peer)
        core.add_targets(peer.targets, self.now)
        self._pump(peer)
        return peer

    def _new_core(self, name: PeerName, nickname: str, config: MeshConfig | None) -> MeshCore:
        ident = PeerIdentity(name, nickname, random_uid(self.rng), self.rng.randrange(4096))
        rng = random.Random(self.rng.getrandbits(64))
        return MeshCore(ident, config or self.config, rng, self.now, key=self.identity_key(name))

    def identity_key(self, name: PeerName) -> Ed25519PrivateKey:
        """The identity key of the peer called ``name`` (the same across its restarts, as a
        router's persisted key); derived from the seed and the name, so runs are repeatable."""
        seed = hashlib.blake2b(f"memnet-key:{self._seed}:{int(name)}".encode(), digest_size=32)
        return Ed25519PrivateKey.from_private_bytes(seed.digest())

    def restart(self, peer: SimPeer, config: MeshConfig | None = None) -> SimPeer:
        """Stop ``peer`` and start it again (same name/address/targets, new uid)."""
        self.stop(peer)
        peer.core = self._new_core(peer.name, peer.nickname, config)
        peer.alive = True
        peer.incarnation += 1
        peer.timer_at = None
        if self.on_core is not None:
            self.on_core(peer)
        peer.core.add_targets(peer.targets, self.now)
        self._pump(peer)
        return peer

    def stop(self, peer: SimPeer) -> None:
        """The peer's process dies: its connections reset at once on the other ends."""
        if not peer.alive:
            return
        for conn_id in list(peer.conns):
            self._close(peer, conn_id, "connection reset by peer", local=False)
        peer.alive = False

    # ==== faults =================================================================================

    def partition(self, *groups: Iterable[SimPeer]) -> None:
        """Cut links between groups (peers in no group form group 0)."""
        self._group = {}
        for g, members in enumerate(groups, start=1):
            for p in members:
                self._group[p.index] = g
        for peer in self.peers:
            for conn_id, (remote, _) in list(peer.conns.items()):
                if not self._linked(peer, remote):
                    self._push(self.now + self.detect_delay, "cut", (peer, conn_id))

    def heal(self) -> None:
        self._group = {}

    def _linked(self, a: SimPeer, b: SimPeer) -> bool:
        return self._group.get(a.index, 0) == self._group.get(b.index, 0)

    def _latency(self, a: SimPeer, b: SimPeer) -> float:
        key = (min(a.index, b.index), max(a.index, b.index))
        lat = self._link_latency.get(key)
        if lat is None:
            lat = self._link_latency[key] = self.rng.uniform(*self.latency)
        return lat

    # ==== running ================================================================================

    def _push(self, when: float, kind: str, args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, args))

    def run_until(self, t: float) -> None:
        """Process every event up to simulated time ``t``; ``now`` ends at ``t``."""
        heap = self._heap
        while heap and heap[0][0] <= t:
            when, _, kind, args = heapq.heappop(heap)
            self.now = max(self.now, when)
            self._dispatch(kind, args)
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, pred: Callable[[], bool], timeout: float, step: float = 0.05
    ) -> float | None:
        """Run until ``pred()`` holds (checked every ``step``); the time taken, or None."""
        start = self.now
        while True:
            if pred():
                return self.now - start
            if self.now - start >= timeout:
                return None
            self.run_for(step)

    def _dispatch(self, kind: str, args: tuple[Any, ...]) -> None:
        if kind == "deliver":
            peer, conn_id, tag, payload, depth = args
            if conn_id not in peer.conns:
                return
            peer.depth = max(peer.depth, depth)
            try:
                peer.core.receive(conn_id, tag, payload, self.now)
            except RemoteProtocolError as err:
                self.errors.append(f"{peer.nickname}: {err}")
                self._close(peer, conn_id, str(err), local=True)
            self._pump(peer)
        elif kind == "timer":
            peer, incarnation = args
            if not peer.alive or incarnation != peer.incarnation or peer.timer_at is None:
                return
            if peer.timer_at > self.now:
                return  # superseded by a later rescheduling
            peer.timer_at = None
            peer.core.handle_timer(self.now)
            self._pump(peer)
        elif kind == "dial":
            self._dial_result(*args)
        elif kind == "dial_failed":
            peer, incarnation, address, reason = args
            if peer.alive and incarnation == peer.incarnation:
                peer.core.dial_failed(address, self.now, reason)
                self._pump(peer)
        elif kind == "establish":
            peer, conn_id = args
            if conn_id in peer.conns:
                peer.core.connection_established(conn_id, self.now)
                self._pump(peer)
        elif kind == "cut":
            peer, conn_id = args
            entry = peer.conns.get(conn_id)
            if entry is not None and not self._linked(peer, entry[0]):
                self._close(peer, conn_id, "heartbeat timeout", local=True)
        else:  # pragma: no cover - internal
            raise AssertionError(kind)

    def inject(self, peer: SimPeer, conn_id: int, tag: int, payload: bytes) -> None:
        """Deliver a raw message as if ``peer`` had sent it on its connection ``conn_id``
        (attack tests: a member that sends what its core never would)."""
        remote, remote_id = peer.conns[conn_id]
        self._push(self.now, "deliver", (remote, remote_id, tag, payload, peer.depth + 1))

    def flush(self, peer: SimPeer) -> None:
        """Collect what ``peer``'s core wants to send (call after using a channel's sender
        from outside a simulated event, e.g. from a test)."""
        self._pump(peer)

    def _pump(self, peer: SimPeer) -> None:
        """Move a core's output into the network and re-arm its timer."""
        if not peer.alive:
            return
        core = peer.core
        for conn_id, tag, payload in core.messages_to_send():
            entry = peer.conns.get(conn_id)
            if entry is None:
                continue
            remote, remote_id = entry
            peer.bytes_sent += len(payload)
            peer.messages_sent += 1
            self.bytes_sent += len(payload)
            self.messages_sent += 1
            if not self._linked(peer, remote) or (self.loss and self.rng.random() < self.loss):
                self.messages_dropped += 1
                continue
            when = max(self.now + self._latency(peer, remote), self._fifo.get(remote_id, 0.0))
            self._fifo[remote_id] = when
            self._push(when, "deliver", (remote, remote_id, tag, payload, peer.depth + 1))
        while (ev := core.next_event()) is not None:
            if self.keep_events:
                peer.events.append(ev)
            if isinstance(ev, DialRequested):
                self._push(self.now + self.dial_delay, "dial", (peer, peer.incarnation, ev.address))
            elif isinstance(ev, ConnectionRejected) and ev.conn_id in peer.conns:
                self._close(peer, ev.conn_id, ev.reason, local=True)
        t = core.get_timer()
        if t != peer.timer_at:
            peer.timer_at = t
            if t is not None:
                self._push(max(t, self.now), "timer", (peer, peer.incarnation))

    def _dial_result(self, peer: SimPeer, incarnation: int, address: str) -> None:
        if not peer.alive or incarnation != peer.incarnation:
            return
        remote = self.by_address.get(address)
        if remote is None or not remote.alive:
            self._push(self.now, "dial_failed", (peer, incarnation, address, "connection refused"))
            return
        if not self._linked(peer, remote):
            self._push(
                self.now + self.dial_timeout,
                "dial_failed",
                (peer, incarnation, address, "dial timed out"),
            )
            return
        a_id, b_id = self._next_conn, self._next_conn + 1
        self._next_conn += 2
        conn_uid = self.rng.getrandbits(64) ^ self.rng.getrandbits(64)
        peer.conns[a_id] = (remote, b_id)
        remote.conns[b_id] = (peer, a_id)
        ok_a = peer.core.connection_added(
            a_id, remote.core.identity, address, True, self.now, conn_uid=conn_uid
        )
        # the acceptor sees the dialer's host with an ephemeral port
        host = peer.address.rsplit(":", 1)[0]
        ok_b = remote.core.connection_added(
            b_id,
            peer.core.identity,
            f"{host}:{40000 + a_id % 20000}",
            False,
            self.now,
            conn_uid=conn_uid,
        )
        if ok_a and ok_b:
            self._push(self.now + self.establish_delay, "establish", (peer, a_id))
            self._push(self.now + self.establish_delay, "establish", (remote, b_id))
        self._pump(peer)
        self._pump(remote)

    def _close(self, peer: SimPeer, conn_id: int, reason: str, *, local: bool) -> None:
        """Close a connection on both ends (``local``: ``peer`` noticed; else the remote)."""
        entry = peer.conns.pop(conn_id, None)
        if entry is None:
            return
        remote, remote_id = entry
        remote.conns.pop(remote_id, None)
        self._fifo.pop(conn_id, None)
        self._fifo.pop(remote_id, None)
        if peer.alive:
            peer.core.connection_removed(conn_id, self.now, reason)
            self._pump(peer)
        if remote.alive:
            remote.core.connection_removed(remote_id, self.now, f"closed by peer: {reason}")
            self._pump(remote)

    # ==== observing ==============================================================================

    def alive(self) -> list[SimPeer]:
        return [p for p in self.peers if p.alive]

    def reset_depths(self) -> None:
        for p in self.peers:
            p.depth = 0

    def converged(self, peers: Iterable[SimPeer] | None = None) -> bool:
        """Every given (default: live) peer holds the identical topology of exactly them."""
        group = list(peers) if peers is not None else self.alive()
        if not group:
            return True
        want = {p.name: p.core.identity.uid for p in group}
        first = group[0].core.topology
        if len(first) != len(want):
            return False
        for name, uid in want.items():
            rec = first.get(name)
            if rec is None or rec.uid != uid:
                return False
        h = first.digest_hash()
        return all(p.core.topology.digest_hash() == h for p in group[1:])

    def knows(self, name: PeerName, peers: Iterable[SimPeer] | None = None) -> bool:
        group = list(peers) if peers is not None else self.alive()
        return all(name in p.core.topology for p in group)

    def check_invariants(self) -> None:
        """Assert what must hold after every step (raises AssertionError)."""
        for p in self.peers:
            if not p.alive:
                continue
            core = p.core
            core.sync_local(self.now)
            me = core.topology.ourself
            assert me.uid == core.identity.uid, "own record has a foreign uid"
            connected = core.connected_peers()
            assert me.conn_names == frozenset(connected), (
                f"{p.nickname}: own record connections differ from live connections"
            )
            assert set(connected.values()) <= set(p.conns), f"{p.nickname}: core has unknown conn"
            for rec in core.topology.records.values():
                assert rec.name not in rec.conn_names
            for dst, hop in core.routes_all.unicast_table().items():
                assert hop in connected, f"{p.nickname}: next hop {hop} for {dst} not a neighbour"
