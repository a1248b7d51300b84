"""MeshCore: the sans-I/O mesh (topology, routes, gossip channels, connection maker).

Driven by three sources only - API calls, :meth:`MeshCore.receive` and
:meth:`MeshCore.handle_timer` - it produces :meth:`MeshCore.messages_to_send`,
:meth:`MeshCore.next_event` and :meth:`MeshCore.get_timer`. It never reads a clock or touches a
socket; every call that can change state takes ``now`` (seconds, any monotonic origin).

Topology gossip (what makes it scale, unlike Weave's whole-topology gossip):

* A change (our own record, or records newly learned from a neighbour) is queued as *names* on
  ``fanout`` random connections (``ceil(2*log2 n)``, at least 2; never the one it came from).
  Each connection flushes its queue ``gossip_delay`` after the first queued name, but at most
  once per ``gossip_interval`` (default 1 s, as Weave's coalescing); a flush offers the
  *current* record of each queued name, so bursts coalesce to the newest versions. Our own new
  record is pushed; relayed ones are announced (name, uid, version) and fetched by whoever lacks
  them, once (a peer hears of a version from about every neighbour). Records a neighbour is
  known to hold are not offered again. Receivers relay only
  records that improved their view, so propagation stops by itself.
* Anti-entropy repairs whatever was lost: every ``anti_entropy_interval`` (jittered) we send one
  random neighbour a 16-byte hash of our version vector. On mismatch it answers with its vector
  (``name -> (uid, version)``); we answer with only the records newer than that vector plus a
  request for the names where it is ahead; it answers the request. A new connection starts with
  the dialer's vector, so a joining peer downloads the topology once.
* Steady state therefore costs one small hash message per peer per interval.

Application channels (weaveworks/mesh shape, see channel.py): ``register_channel`` returns a
:class:`~weft.gossip.channel.GossipSender`. Outgoing gossip/broadcast data is kept pending per
connection and merged there (``GossipData.merge``) until :meth:`messages_to_send` drains it; a
connection the router reports as ``blocked`` keeps coalescing. Gossip and broadcasts for
channels we do not know are relayed (surrogate; gossip deduplicated by hash for a minute).
Unicast and broadcast relaying use the "all connections" routes, the overlay uses the data ones
(:attr:`MeshCore.routes`).

Events (frozen dataclasses, past tense, from :meth:`next_event`):
``DialRequested`` (the core has asked for a dial: the router must answer with
``connection_added`` or ``dial_failed``), ``ConnectionRejected`` (close that connection with the
reason; the core already forgot it), ``TopologyChanged``, ``RoutesChanged``, ``PeersRemoved``,
``PeerRestarted``, ``ShortIdChanged``, ``RecordsRefused`` (records not merged: another key
than the one bound to the name, a version beyond the bounds; the router logs it).

Our record lists each connection with what carries it (``connection_attributes``: datapath,
encryption, MTU, data state, as the overlay reports them); a change of those alone is published
``attributes_delay`` after the first one, coalesced, never once per PMTU step.

Topology records are signed by their owner's identity key (``key``; topology.py). A received
record whose header does not beat the held version is dropped before its body is decoded or its
signature verified; a badly signed one closes the connection (a correct relay verifies before
relaying), one refused by the name's key binding or the version bounds does not.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import math
import random
from collections import deque
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.errors import ConfigError, LocalError
from weft.gossip.channel import GossipData, GossipHandler, GossipSender
from weft.gossip.connection_maker import BackoffConfig, ConnectionMaker, host_of
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.routes import Routes
from weft.gossip.topology import (
    DEFAULT_MAX_TOPOLOGY_BYTES,
    MAX_PEERS,
    ConnectionSummary,
    LinkAttributes,
    PeerRecord,
    Topology,
    decode_record,
    peek_record,
)
from weft.gossip.wire import (
    CHANNEL_TOPOLOGY,
    TAG_BROADCAST,
    TAG_GOSSIP,
    TAG_UNICAST,
    Announcement,
    DigestHash,
    DigestVector,
    RecordRequest,
    TopologyUpdate,
    decode_envelope,
    decode_topology,
    encode_announce,
    encode_broadcast,
    encode_digest_hash,
    encode_digest_vector,
    encode_gossip,
    encode_request,
    encode_unicast,
    encode_update,
)

__all__ = [
    "Admission",
    "ConnectionRejected",
    "DialRequested",
    "MeshConfig",
    "MeshCore",
    "MeshEvent",
    "MeshStats",
    "PeerRestarted",
    "PeersRemoved",
    "RecordsRefused",
    "RoutesChanged",
    "ShortIdChanged",
    "TopologyChanged",
]

_UPDATE_CHUNK = 1 << 20  # split topology updates into messages of about 1 MiB


@dataclass(frozen=True)
class MeshConfig:
    """Mesh tuning. Every default is documented and chosen for 1..1000+ peers."""

    port: int = 6783  # default control port, used to turn discovered hosts into addresses
    discovery: bool = True  # dial peers learned from others' records
    fanout: int | None = None  # neighbours per topology change; None: ceil(2*log2 n), min 2
    gossip_delay: float = 0.05  # wait after the first queued change before flushing (batching)
    gossip_interval: float = 1.0  # at most one topology update per connection per interval
    anti_entropy_interval: float = 5.0  # mean period of digest exchange with one neighbour
    anti_entropy_quiet: float = 1.0  # answer a digest mismatch only this long after a change
    channel_gossip_interval: float = 30.0  # full state of application channels (as Weave)
    # Relayed records up to this size are pushed, larger ones announced and fetched once. With
    # 0 (default) every relay is an announcement: in a mesh of degree d a peer hears of a new
    # version about d times but downloads it once (half the bytes of pushing at 1,000 peers for
    # one round trip more per hop). Our own record is always pushed.
    eager_record_bytes: int = 0
    request_timeout: float = 1.0  # re-request an announced record from another peer after this
    local_delay: float = 0.02  # our record is rebuilt this long after a connection event
    # A change of a connection's datapath, encryption, MTU or data state alone (no connection
    # added, lost or established) is published this long after the first one: a PMTU search or
    # a switch-over makes one version, not one per step (every version is decoded by every
    # peer, issue #18). A connection change in the meantime publishes them at once.
    attributes_delay: float = 3.0
    track_known_degree: int = 64  # remember what neighbours hold only up to this many links
    recalc_delay: float = 0.1  # routes/GC/discovery recalculated this long after a change
    gc_grace: float = 2.0  # a peer must stay unreachable this long before it is dropped
    tombstone_ttl: float = 60.0  # a collected record coming back unchanged is not relayed
    surrogate_ttl: float = 60.0  # how long relayed unknown-channel gossip is remembered
    # Bounds of the topology (issue #14 item 5): peer records held (ours included; at most
    # topology.MAX_PEERS, which also bounds every topology message) and their encoded bytes.
    # Records beyond are refused with a RecordsRefused event (the router logs it).
    max_peers: int = MAX_PEERS
    max_topology_bytes: int = DEFAULT_MAX_TOPOLOGY_BYTES
    backoff: BackoffConfig = field(default_factory=BackoffConfig)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"mesh port {self.port} is not in 1..65535")
        if not 1 <= self.max_peers <= MAX_PEERS:
            raise ConfigError(f"mesh max_peers {self.max_peers} is not in 1..{MAX_PEERS}")
        if self.fanout is not None and self.fanout < 1:
            raise ConfigError("mesh fanout must be at least 1")
        for name in ("gossip_interval", "anti_entropy_interval", "channel_gossip_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mesh {name} must be positive")
        for name in (
            "gossip_delay",
            "local_delay",
            "attributes_delay",
            "recalc_delay",
            "gc_grace",
            "surrogate_ttl",
            "tombstone_ttl",
            "anti_entropy_quiet",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"mesh {name} must not be negative")


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DialRequested:
    """The core requested a dial; answer with ``connection_added`` or ``dial_failed``."""

    address: str


@dataclass(frozen=True)
class ConnectionRejected:
    """The core dropped this connection (duplicate, to self, name collision): close it."""

    conn_id: int
    reason: str


@dataclass(frozen=True)
class TopologyChanged:
    """Some record changed (coalesced: one event per batch of changes)."""


@dataclass(frozen=True)
class RoutesChanged:
    """The connection graph changed; ``MeshCore.routes`` now answers with new routes."""


@dataclass(frozen=True)
class PeersRemoved:
    """Records garbage-collected because the peers stayed unreachable."""

    names: tuple[PeerName, ...]


@dataclass(frozen=True)
class PeerRestarted:
    """A peer came back with a new incarnation uid."""

    name: PeerName
    old_uid: int
    new_uid: int


@dataclass(frozen=True)
class RecordsRefused:
    """Records from ``source`` (a neighbour) were not merged: ``count`` of them, ``reason``
    the first one's reason (bounds, key binding, version bounds). Not an error of the
    connection."""

    source: PeerName
    count: int
    reason: str
    name: PeerName  # the first refused record's peer


@dataclass(frozen=True)
class ShortIdChanged:
    """Our short id clashed with a lower-named peer's and was reassigned."""

    short_id: int


MeshEvent = (
    DialRequested
    | ConnectionRejected
    | TopologyChanged
    | RoutesChanged
    | PeersRemoved
    | PeerRestarted
    | RecordsRefused
    | ShortIdChanged
)


@dataclass(frozen=True)
class Admission:
    """Verdict for a new connection: accept (maybe replacing another) or reject with a reason."""

    accept: bool
    replaces: int | None = None
    reason: str = ""


@dataclass
class MeshStats:
    """Counters (monotonic) for metrics and benchmarks."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    topology_bytes_sent: int = 0
    records_sent: int = 0
    records_received: int = 0
    records_new: int = 0
    records_refused: int = 0
    records_skipped: int = 0  # dropped from their header: no newer than the held version
    unicast_dropped: int = 0
    # unicast/broadcast whose claimed source cannot come over the connection it arrived on
    source_refused: int = 0
    surrogate_relayed: int = 0
    gc_removed: int = 0
    # per channel: [messages in, bytes in, messages out, bytes out] (topology, ipam, ...)
    by_channel: dict[str, list[int]] = field(default_factory=dict)

    def count(self, channel: str, nbytes: int, *, sent: bool) -> None:
        row = self.by_channel.get(channel)
        if row is None:
            if len(self.by_channel) >= _MAX_CHANNEL_STATS:
                channel = "other"  # peers may relay channels we don't know: keep this bounded
            row = self.by_channel.setdefault(channel, [0, 0, 0, 0])
        base = 2 if sent else 0
        row[base] += 1
        row[base + 1] += nbytes


@dataclass
class _Conn:
    conn_id: int
    remote: PeerIdentity
    address: str
    outbound: bool
    conn_uid: int
    added_at: float
    established: bool = False
    attributes: LinkAttributes | None = None  # the data plane's word on it (None: not yet)
    listen_address: str = ""  # host:default port (covers targets for an inbound connection)
    queue: list[tuple[int, bytes]] = field(default_factory=list)  # encoded, in order
    pending_names: set[PeerName] = field(default_factory=set)  # topology records to flush
    pending_since: float | None = None
    due: float | None = None  # when the queued names flush (pending_since set)
    last_flush: float = -math.inf
    last_vector: float = 0.0  # when we last answered its digest hash with our vector
    pending_app: dict[tuple[int, str, PeerName], list[GossipData]] = field(default_factory=dict)
    # What the remote is known to hold (it sent or we sent it): name -> (version, uid). Updates
    # skip records the remote already has. Tracked only while we have at most
    # MeshConfig.track_known_degree connections, so memory stays O(n * that) per router.
    known: dict[PeerName, tuple[int, int]] = field(default_factory=dict)
    track: bool = True

    def note_known(self, name: PeerName, version: int, uid: int) -> None:
        if not self.track:
            return
        have = self.known.get(name)
        if have is None or (version, uid) > have:
            self.known[name] = (version, uid)

    def has(self, rec: PeerRecord) -> bool:
        have = self.known.get(rec.name)
        return have is not None and have >= (rec.version, rec.uid)

    _summary: ConnectionSummary | None = None

    def summary(self) -> ConnectionSummary:
        s = self._summary
        if s is None or s.established != self.established or s.attributes != self.attributes:
            s = self._summary = ConnectionSummary(
                self.remote.name, self.address, self.outbound, self.established, self.attributes
            )
        return s

    def flush_due(self, cfg: MeshConfig) -> float | None:
        if self.pending_since is None:
            return None
        return max(self.pending_since + cfg.gossip_delay, self.last_flush + cfg.gossip_interval)


class _RoutesProxy:
    """A stable RoutesView: always answers from the core's current routes."""

    def __init__(self, core: MeshCore, data: bool) -> None:
        self._core = core
        self._data = data

    def unicast_next_hop(self, dst: PeerName) -> PeerName | None:
        return self._core._routes(self._data).unicast_next_hop(dst)

    def broadcast_next_hops(self, src: PeerName) -> list[PeerName]:
        return self._core._routes(self._data).broadcast_next_hops(src)

    def may_relay(self, src: PeerName, via: PeerName) -> bool:
        return self._core._routes(self._data).may_relay(src, via)

    def unicast_table(self) -> dict[PeerName, PeerName]:
        return self._core._routes(self._data).unicast_table()


class _Sender:
    """The GossipSender handed to an application channel."""

    def __init__(self, core: MeshCore, channel: str) -> None:
        self._core = core
        self._channel = channel

    def gossip(self, data: GossipData) -> None:
        self._core._app_gossip(self._channel, data, exclude=None)

    def broadcast(self, data: GossipData) -> None:
        self._core._app_broadcast(self._channel, self._core.name, data)

    def unicast(self, dst: PeerName, payload: bytes) -> None:
        self._core._app_unicast(self._channel, dst, payload)


class MeshCore:
    """The mesh of one peer. Not thread-safe; all calls from one loop/thread."""

    def __init__(
        self,
        identity: PeerIdentity,
        config: MeshConfig | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
        key: Ed25519PrivateKey | None = None,
    ) -> None:
        """``key``: our identity key, which signs our record (the router persists one; None
        makes a fresh one, for tests and simulations that need no stable identity)."""
        self.identity = identity
        self.name = identity.name
        self.config = config or MeshConfig()
        self._rng = rng or random.Random()
        self._topology = Topology(
            identity,
            self._rng,
            key or Ed25519PrivateKey.generate(),
            max_peers=self.config.max_peers,
            max_bytes=self.config.max_topology_bytes,
        )
        self._conns: dict[int, _Conn] = {}
        self._by_name: dict[PeerName, int] = {}
        self._events: deque[MeshEvent] = deque()
        self._topology_event_queued = False
        self._routes_event_queued = False
        self._channels: dict[str, GossipHandler] = {}
        self._cm = ConnectionMaker(
            self.config.backoff, self._rng, self.config.port, ourself=identity.name
        )
        self._route_cache: dict[bool, Routes] = {}
        self._recalc_at: float | None = None
        self._graph_changed = False
        self._gc_wanted = False
        self._unreachable_since: dict[PeerName, float] = {}
        self._gc_at: float | None = None
        self._discovery_dirty: set[PeerName] = set()
        self._next_anti_entropy = now + self._jitter(self.config.anti_entropy_interval)
        self._next_channel_gossip = now + self._jitter(self.config.channel_gossip_interval)
        self._surrogate_seen: dict[bytes, float] = {}
        self._out_conns: set[int] = set()  # connections with something to send
        self._conn_list: list[_Conn] | None = None  # cache of _conns values, by id
        self._thin_conns: list[_Conn] | None = None  # neighbours with <= 2 links (cache)
        self._flush_heap: list[tuple[float, int]] = []  # (due, conn id); stale entries skipped
        self._last_change = -math.inf
        # collected records: name -> ((version, uid), until); held: zombies kept unrelayed
        self._tombstones: dict[PeerName, tuple[tuple[int, int], float]] = {}
        self._held: set[PeerName] = set()
        self._local_at: float | None = None  # when our record is rebuilt
        # announced records we asked for: name -> ((version, uid), ask again after)
        self._requested: dict[PeerName, tuple[tuple[int, int], float]] = {}
        self.stats = MeshStats()
        self.routes = _RoutesProxy(self, data=True)
        self.routes_all = _RoutesProxy(self, data=False)

    # ==== public API ============================================================================

    @property
    def topology(self) -> Topology:
        """Read-only use, please: the records this peer knows (our own record may lag our
        connections by ``local_delay``; see :meth:`sync_local`)."""
        return self._topology

    def sync_local(self, now: float) -> None:
        """Apply pending changes of our connections to our record now (tests, status)."""
        self._apply_local(now)

    @property
    def short_id(self) -> int:
        return self._topology.short_id

    def admission(
        self, remote: PeerIdentity, conn_uid: int, identity_key: bytes | None = None
    ) -> Admission:
        """Would a new connection to ``remote`` be kept? (Weave's rules; pure query.)

        Connection to self (our name and uid) and a name collision (our name, another uid) are
        refused. ``identity_key``: the key the handshake proved the peer holds (None only in
        in-memory tests); a name bound to another key (:meth:`Topology.binding`) is refused, so
        nobody can take over a peer's name, or displace its connection, without its private key.
        A second connection to a connected peer: the lower ``conn_uid`` (local conn id
        xor remote conn id, the same on both ends) wins; a connection to a newer incarnation
        (different uid) always replaces the old one.
        """
        if remote.name == self.name:
            if remote.uid == self.identity.uid:
                return Admission(False, reason="connection to self")
            return Admission(
                False, reason=f"peer name collision: another peer is also called {self.name}"
            )
        if identity_key is not None:
            bound = self._topology.binding(remote.name)
            if bound is not None and bound != identity_key:
                return Admission(
                    False,
                    reason=(
                        f"identity key mismatch: {remote.name} is bound to key"
                        f" {bound[:8].hex()}…, the peer proved {identity_key[:8].hex()}…"
                        " (another peer using that name, or its identity.key was replaced)"
                    ),
                )
        old_id = self._by_name.get(remote.name)
        if old_id is None:
            return Admission(True)
        old = self._conns[old_id]
        if old.remote.uid != remote.uid or conn_uid < old.conn_uid:
            return Admission(True, replaces=old_id)
        return Admission(False, reason=f"duplicate connection to {remote.name}")

    def connection_added(
        self,
        conn_id: int,
        remote: PeerIdentity,
        address: str,
        outbound: bool,
        now: float,
        conn_uid: int | None = None,
        identity_key: bytes | None = None,
    ) -> bool:
        """A control connection finished its handshake. Returns False if it was rejected
        (a ``ConnectionRejected`` event is queued for it, and for a connection it replaced).

        ``address``: for outbound connections the address we dialed (the target's), for inbound
        ones the remote's ``host:port`` as seen. ``conn_uid`` defaults to ``conn_id``.
        ``identity_key``: the key the handshake proved (see :meth:`admission`); an unbound name
        is bound to it here, so a neighbour's name is bound from the handshake, not from gossip.
        """
        if conn_id in self._conns:
            raise LocalError(f"connection {conn_id} added twice")
        uid = conn_id if conn_uid is None else conn_uid
        verdict = self.admission(remote, uid, identity_key)
        if (
            verdict.accept
            and identity_key is not None
            and not self._topology.bind(remote.name, identity_key)
        ):
            verdict = Admission(False, reason="too many peer names bound to keys")
        if not verdict.accept:
            if outbound:
                if verdict.reason == "connection to self":
                    self._cm.dialed_self(address)
                elif verdict.reason.startswith("duplicate"):
                    self._cm.reached_connected_peer(address, remote.name)
                else:
                    self._cm.dial_failed(address, now, verdict.reason)
            self._events.append(ConnectionRejected(conn_id, verdict.reason))
            self._after_change(now)
            return False
        if verdict.replaces is not None:
            self._drop_connection(verdict.replaces, now, "replaced by a newer connection")
            self._events.append(
                ConnectionRejected(verdict.replaces, "replaced by a newer connection")
            )
        # Decide the opening digest before our record changes: a peer we did not know (a
        # joiner, the other side of a healed partition) or an empty view needs the whole
        # vector; otherwise both sides are already gossiping and a hash suffices.
        full_sync = remote.name not in self._topology or len(self._topology) == 1
        conn = _Conn(conn_id, remote, address, outbound, uid, now)
        # An outbound address is the peer's listen address; for an inbound one the router passes
        # the listen port the peer announced when it can, else this guesses the default port.
        conn.listen_address = (
            address if outbound else f"{_bracket(host_of(address))}:{self.config.port}"
        )
        self._conns[conn_id] = conn
        self._conn_list = self._thin_conns = None
        self._update_tracking()
        self._by_name[remote.name] = conn_id
        if outbound:
            self._cm.connection_succeeded(address, remote.name, now)
        self._discovery_dirty.add(remote.name)
        self._local_changed(now)
        if outbound:
            # The dialer opens the topology exchange.
            if full_sync:
                self._send_topology(conn, encode_digest_vector(self._topology.digest()))
            else:
                self._send_digest_hash(conn)
        for name, handler in self._channels.items():
            self._pend_app(conn, TAG_GOSSIP, name, self.name, handler.snapshot())
        self._after_change(now)
        return True

    def connection_established(self, conn_id: int, now: float) -> None:
        """The overlay proved this connection's data path (idempotent)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.established:
            return
        conn.established = True
        self._local_changed(now)
        self._after_change(now)

    def connection_attributes(
        self, conn_id: int, attributes: LinkAttributes | None, now: float
    ) -> None:
        """What carries this connection changed (datapath, encryption, MTU, data state: the
        overlay's status). Published in our record coalesced, ``attributes_delay`` after the
        first change or with the next connection change, whichever comes first; no change, no
        new version (the router may call this on every status change)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.attributes == attributes:
            return
        conn.attributes = attributes
        if self._local_at is None:
            self._local_at = now + self.config.attributes_delay

    def connection_removed(self, conn_id: int, now: float, reason: str) -> None:
        """The control connection is gone (idempotent; unknown ids are ignored)."""
        if conn_id not in self._conns:
            return
        self._drop_connection(conn_id, now, reason)
        self._after_change(now)

    def receive(self, conn_id: int, tag: int, payload: bytes, now: float) -> None:
        """A message with tag 4, 5 or 6 arrived. Raises RemoteProtocolError on bad input
        (the router closes that connection with ``str(err)``)."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return  # a connection we already dropped; the router is closing it
        self.stats.messages_received += 1
        self.stats.bytes_received += len(payload)
        env = decode_envelope(tag, payload)
        self.stats.count(env.channel, len(payload), sent=False)
        if tag == TAG_GOSSIP:
            if env.channel == CHANNEL_TOPOLOGY:
                self._on_topology(conn, env.body, now)
            else:
                self._on_app_gossip(conn, env.channel, env.body, now)
        elif not self._routes(False).may_relay(env.src, conn.remote.name):
            # A neighbour speaking as a peer it cannot be relaying for (e.g. to act on IPAM
            # as that peer): dropped, not fatal (the topologies may briefly disagree).
            self.stats.source_refused += 1
        elif tag == TAG_UNICAST:
            assert env.dst is not None
            self._on_unicast(env.channel, env.src, env.dst, env.body, payload)
        else:
            self._on_broadcast(conn, env.channel, env.src, env.body, payload)
        self._after_change(now)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (once ``get_timer()`` has passed; extra calls are ok)."""
        cfg = self.config
        if self._local_at is not None and now >= self._local_at:
            self._apply_local(now)
        if self._recalc_at is not None and now >= self._recalc_at:
            self._recalc_at = None
            self._recalculate(now)
        if self._gc_at is not None and now >= self._gc_at:
            self._gc_at = None
            self._collect_garbage(now)
        if now >= self._next_anti_entropy:
            self._next_anti_entropy = now + self._jitter(cfg.anti_entropy_interval)
            self._anti_entropy()
        if now >= self._next_channel_gossip:
            self._next_channel_gossip = now + self._jitter(cfg.channel_gossip_interval)
            for name, handler in self._channels.items():
                self._app_gossip(name, handler.snapshot(), exclude=None)
        heap = self._flush_heap
        while heap and heap[0][0] <= now:
            due, conn_id = heapq.heappop(heap)
            conn = self._conns.get(conn_id)
            if conn is not None and conn.due == due:
                self._flush_topology(conn, now)
        if self._surrogate_seen and len(self._surrogate_seen) > 1024:
            self._surrogate_seen = {h: t for h, t in self._surrogate_seen.items() if t > now}
            if len(self._surrogate_seen) > _MAX_SURROGATE_SEEN:
                # a flood of distinct unknown-channel gossip: keep the newest half (relaying a
                # forgotten one again costs bytes, never correctness)
                keep = list(self._surrogate_seen.items())[-_MAX_SURROGATE_SEEN // 2 :]
                self._surrogate_seen = dict(keep)
        self._poll_dials(now)

    def get_timer(self) -> float | None:
        """The earliest time ``handle_timer`` has work to do."""
        times = [self._next_anti_entropy]
        if self._local_at is not None:
            times.append(self._local_at)
        if self._channels:
            times.append(self._next_channel_gossip)
        if self._recalc_at is not None:
            times.append(self._recalc_at)
        if self._gc_at is not None:
            times.append(self._gc_at)
        cm = self._cm.next_deadline()
        if cm is not None:
            times.append(cm)
        heap = self._flush_heap
        while heap:
            due, conn_id = heap[0]
            conn = self._conns.get(conn_id)
            if conn is not None and conn.due == due:
                times.append(due)
                break
            heapq.heappop(heap)  # stale entry
        return min(times)

    def messages_to_send(self, blocked: Container[int] = ()) -> list[tuple[int, int, bytes]]:
        """Drain outgoing ``(conn_id, tag, payload)``. Connections in ``blocked`` (the router's
        writer is backed up) keep their data pending, merged, for a later call."""
        out: list[tuple[int, int, bytes]] = []
        if not self._out_conns:
            return out
        kept: set[int] = set()
        for conn_id in sorted(self._out_conns):
            conn = self._conns.get(conn_id)
            if conn is None:
                continue
            if conn_id in blocked:
                kept.add(conn_id)
                continue
            if conn.pending_app:
                self._encode_app(conn)
            if conn.queue:
                for tag, payload in conn.queue:
                    out.append((conn.conn_id, tag, payload))
                    self.stats.messages_sent += 1
                    self.stats.bytes_sent += len(payload)
                    self.stats.count(_peek_channel(payload), len(payload), sent=True)
                conn.queue = []
        self._out_conns = kept
        return out

    def next_event(self) -> MeshEvent | None:
        if not self._events:
            return None
        ev = self._events.popleft()
        if isinstance(ev, TopologyChanged):
            self._topology_event_queued = False
        elif isinstance(ev, RoutesChanged):
            self._routes_event_queued = False
        return ev

    def register_channel(self, name: str, handler: GossipHandler) -> GossipSender:
        """Attach an application channel (e.g. "ipam"); returns its GossipSender."""
        if name == CHANNEL_TOPOLOGY or not name or len(name) > 64:
            raise LocalError(f"invalid gossip channel name {name!r}")
        if name in self._channels:
            raise LocalError(f"gossip channel {name!r} registered twice")
        self._channels[name] = handler
        return _Sender(self, name)

    def add_targets(self, addresses: Iterable[str], now: float, replace: bool = False) -> None:
        """Direct targets (launch arguments, ``connect``); ``replace`` swaps the whole set."""
        self._cm.add_direct(addresses, now, replace)
        self._cm.set_connected(self._connected_addresses(), self._by_name)
        self._poll_dials(now)

    def forget_targets(self, addresses: Iterable[str], now: float) -> None:
        self._cm.forget(addresses)
        self._poll_dials(now)

    def direct_targets(self) -> list[str]:
        """The direct targets (to persist across restarts)."""
        return self._cm.direct_targets()

    def dial_failed(self, address: str, now: float, reason: str) -> None:
        """A dial from ``DialRequested`` failed (refused, timeout, handshake error...)."""
        self._cm.dial_failed(address, now, reason)
        self._poll_dials(now)

    def connected_peers(self) -> dict[PeerName, int]:
        """Peer name -> conn id of our current connections."""
        return dict(self._by_name)

    def status(self) -> dict[str, Any]:
        """Mesh part of ``/status``: our record fields, peers[], connections[], targets[]."""
        me = self._topology.ourself
        recs = self._topology.records
        return {
            "name": str(self.name),
            "nickname": me.nickname,
            "uid": me.uid,
            "version": me.version,
            "short_id": me.short_id,
            "peers": [recs[n].to_status() for n in sorted(recs)],
            "connections": [
                {
                    "conn_id": c.conn_id,
                    "peer": str(c.remote.name),
                    "nickname": c.remote.nickname,
                    "address": c.address,
                    "outbound": c.outbound,
                    "state": "established" if c.established else "pending",
                }
                for c in sorted(self._conns.values(), key=lambda c: c.remote.name)
            ],
            "targets": self._cm.status(),
            "routes": {
                str(dst): str(hop) for dst, hop in sorted(self.routes.unicast_table().items())
            },
        }

    # ==== internals: connections ===============================================================

    def _jitter(self, interval: float) -> float:
        return interval * (0.5 + self._rng.random())

    def _drop_connection(self, conn_id: int, now: float, reason: str) -> None:
        conn = self._conns.pop(conn_id)
        self._conn_list = self._thin_conns = None
        self._update_tracking()
        self._out_conns.discard(conn_id)
        if self._by_name.get(conn.remote.name) == conn_id:
            del self._by_name[conn.remote.name]
        if conn.outbound:
            self._cm.connection_lost(conn.address, now, reason)
        self._discovery_dirty.add(conn.remote.name)
        self._gc_wanted = True
        self._local_changed(now)

    def _update_tracking(self) -> None:
        track = len(self._conns) <= self.config.track_known_degree
        for c in self._conns.values():
            if c.track != track:
                c.track = track
                c.known = {}

    def _connected_addresses(self) -> set[str]:
        out = set()
        for c in self._conns.values():
            out.add(c.address)
            out.add(c.listen_address)
        return out

    def _sync_connected(self) -> None:
        self._cm.set_connected(self._connected_addresses(), self._by_name)

    def _local_changed(self, now: float) -> None:
        """Our connections changed: rebuild our record after ``local_delay`` (coalescing a
        burst of connection events into one version bump; pending attribute changes go along)."""
        at = now + self.config.local_delay
        if self._local_at is None or self._local_at > at:
            self._local_at = at

    def _apply_local(self, now: float) -> None:
        if self._local_at is None:
            return
        self._local_at = None
        self._sync_connected()
        conns = [c.summary() for c in self._conns.values()]
        if self._topology.set_local_connections(conns):
            self._topology_changed(now)
            self._queue_names([self.name], exclude=None, now=now)

    def _poll_dials(self, now: float) -> None:
        for address in self._cm.poll(now):
            self._events.append(DialRequested(address))

    # ==== internals: topology gossip ===========================================================

    def _fanout(self) -> int:
        if self.config.fanout is not None:
            return self.config.fanout
        n = max(2, len(self._topology))
        return max(2, math.ceil(2 * math.log2(n)))

    def _random_conns(self, exclude: int | None) -> list[_Conn]:
        if self._conn_list is None:
            self._conn_list = [self._conns[i] for i in sorted(self._conns)]
        cands = self._conn_list
        k = self._fanout()
        if len(cands) <= k + (exclude is not None):
            return [c for c in cands if c.conn_id != exclude]
        # Neighbours that hang off few links (leaves of a star, links of a chain) hear of a
        # change from us or hardly at all: they always get it. The rest is a random sample.
        if self._thin_conns is None:
            recs = self._topology.records
            self._thin_conns = [
                c
                for c in cands
                if (r := recs.get(c.remote.name)) is None or len(r.connections) <= 2
            ]
        out = [c for c in self._thin_conns if c.conn_id != exclude]
        picked = self._rng.sample(cands, min(len(cands), k + 1))
        chosen = {c.conn_id for c in out}
        for c in picked:
            if len(out) >= max(k, len(self._thin_conns)):
                break
            if c.conn_id != exclude and c.conn_id not in chosen:
                out.append(c)
        return out

    def _queue_names(
        self,
        names: Iterable[PeerName],
        exclude: int | None,
        now: float,
        also: _Conn | None = None,
    ) -> None:
        names = list(names)
        if not names:
            return
        targets = self._random_conns(exclude)
        if also is not None and also not in targets:
            targets.append(also)
        for conn in targets:
            conn.pending_names.update(names)
            if conn.pending_since is None:
                conn.pending_since = now
                due = conn.flush_due(self.config)
                assert due is not None
                conn.due = due
                heapq.heappush(self._flush_heap, (due, conn.conn_id))

    def _flush_topology(self, conn: _Conn, now: float) -> None:
        names = conn.pending_names
        conn.pending_names = set()
        conn.pending_since = None
        conn.due = None
        conn.last_flush = now
        records = [r for n in names if (r := self._topology.get(n)) is not None]
        self._offer_records(conn, records)

    def _offer_records(self, conn: _Conn, records: list[PeerRecord]) -> None:
        """Gossip: push our own and small records, announce the rest (the remote asks)."""
        limit = self.config.eager_record_bytes
        push: list[PeerRecord] = []
        announce: dict[PeerName, tuple[int, int]] = {}
        for rec in records:
            if conn.has(rec):
                continue
            if len(rec.blob) <= limit or rec.name == self.name:
                push.append(rec)  # our own new version: nobody has it yet, announcing is waste
            else:
                announce[rec.name] = (rec.uid, rec.version)
        if push:
            self._send_records(conn, push)
        if announce:
            self._send_topology(conn, encode_announce(announce))

    def _send_records(self, conn: _Conn, records: list[PeerRecord], *, force: bool = False) -> None:
        """Send records; ``force`` also sends those we believe the remote has (answers to
        its explicit vector/request: our belief may rest on a message that was lost)."""
        chunk: list[bytes] = []
        size = 0
        sent = 0
        for rec in records:
            if not force and conn.has(rec):
                continue
            conn.note_known(rec.name, rec.version, rec.uid)
            sent += 1
            chunk.append(rec.blob)
            size += len(rec.blob)
            if size >= _UPDATE_CHUNK:
                self._send_topology(conn, encode_update(chunk))
                chunk, size = [], 0
        if chunk:
            self._send_topology(conn, encode_update(chunk))
        self.stats.records_sent += sent

    def _send_topology(self, conn: _Conn, body: bytes) -> None:
        payload = encode_gossip(CHANNEL_TOPOLOGY, self.name, body)
        self.stats.topology_bytes_sent += len(payload)
        self._enqueue(conn, TAG_GOSSIP, payload)

    def _anti_entropy(self) -> None:
        if not self._conns:
            return
        self._send_digest_hash(self._rng.choice(list(self._conns.values())))

    def _send_digest_hash(self, conn: _Conn) -> None:
        self._send_topology(
            conn, encode_digest_hash(self._topology.digest_hash(), len(self._topology))
        )

    def _on_topology(self, conn: _Conn, body: bytes, now: float) -> None:
        msg = decode_topology(body)
        if isinstance(msg, TopologyUpdate):
            self.stats.records_received += len(msg.blobs)
            records = []
            beats = self._topology.beats_held
            for b in msg.blobs:
                name, uid, version = peek_record(b)
                conn.note_known(name, version, uid)
                if beats(name, uid, version, b):
                    records.append(decode_record(b))  # verifies the signature (cached)
                else:
                    self.stats.records_skipped += 1
            self._merge(records, conn, now)
        elif isinstance(msg, DigestHash):
            # While changes are flowing, gossip is doing the work and vectors would only ship
            # records that are about to arrive anyway: repair once things are quiet.
            # A different record count means missing records rather than versions in flight,
            # and a connection is never put off for more than two intervals.
            quiet = (
                now - self._last_change >= self.config.anti_entropy_quiet
                or msg.count != len(self._topology)
                or now - conn.last_vector >= 2 * self.config.anti_entropy_interval
            )
            if quiet and msg.hash != self._topology.digest_hash():
                conn.last_vector = now
                self._send_topology(conn, encode_digest_vector(self._topology.digest()))
        elif isinstance(msg, DigestVector):
            # The vector is the remote's own word on what it holds: believe it over our notes.
            if conn.track:
                conn.known = {n: (version, uid) for n, (uid, version) in msg.vector.items()}
            newer = self._topology.newer_than(msg.vector)
            if newer:
                self._send_records(conn, newer, force=True)
            wanted = self._topology.wanted_from(msg.vector)
            if wanted:
                self._send_topology(conn, encode_request(wanted))
        elif isinstance(msg, Announcement):
            for name, (uid, version) in msg.vector.items():
                conn.note_known(name, version, uid)
            wanted = []
            timeout = self.config.request_timeout
            for name in self._topology.wanted_from(msg.vector):
                uid, version = msg.vector[name]
                asked = self._requested.get(name)
                if asked is not None and asked[0] >= (version, uid) and asked[1] > now:
                    continue  # already asked someone for this version
                self._requested[name] = ((version, uid), now + timeout)
                wanted.append(name)
            if wanted:
                self._send_topology(conn, encode_request(wanted))
            if len(self._requested) > 4 * len(self._topology) + 64:
                self._requested = {n: a for n, a in self._requested.items() if a[1] > now}
                if len(self._requested) > 2 * MAX_PEERS:
                    self._requested = {}  # a flood of announced names: forget, never grow
        else:
            assert isinstance(msg, RecordRequest)
            recs = [x for n in msg.names if (x := self._topology.get(n)) is not None]
            if recs:
                self._send_records(conn, recs, force=True)

    def _merge(self, records: list[PeerRecord], source: _Conn, now: float) -> None:
        result = self._topology.merge(records)
        if result.refused:
            self.stats.records_refused += len(result.refused)
            name, why = result.refused[0]
            self._events.append(RecordsRefused(source.remote.name, len(result.refused), why, name))
        if not result.changed:
            return
        self.stats.records_new += len(result.new)
        for old, new in result.replaced:
            self._index_addresses(old, new)
        if result.added or result.connections_removed or result.restarted:
            self._gc_wanted = True
        for name, old_uid, new_uid in result.restarted:
            self._events.append(PeerRestarted(name, old_uid, new_uid))
            self._cm.peer_alive(name, now)
        for name in result.added:
            self._cm.peer_alive(name, now)
        if result.short_id_changed:
            self._events.append(ShortIdChanged(self._topology.short_id))
        relay = []
        for r in result.new:
            if r.name == self.name:
                continue
            tomb = self._tombstones.get(r.name)
            if tomb is not None and tomb[1] > now and (r.version, r.uid) <= tomb[0]:
                # A record we collected, back unchanged: a zombie kept by a peer that has not
                # collected it yet, or the other side of a healed partition. Keep it quietly;
                # it is relayed once it turns out reachable (see _collect_garbage).
                self._held.add(r.name)
                self._gc_wanted = True
                continue
            self._tombstones.pop(r.name, None)
            relay.append(r.name)
        self._queue_names(relay, exclude=source.conn_id, now=now)
        if result.self_bumped:
            # our corrected record must reach the peer that had the stale one, and beyond
            self._queue_names([self.name], exclude=None, now=now, also=source)
        self._topology_changed(now)

    def _topology_changed(self, now: float) -> None:
        self._last_change = now
        self._thin_conns = None
        self._graph_changed = True
        self._route_cache.clear()
        if not self._topology_event_queued:
            self._topology_event_queued = True
            self._events.append(TopologyChanged())
        if self._recalc_at is None:
            self._recalc_at = now + self.config.recalc_delay

    def _recalculate(self, now: float) -> None:
        if self._graph_changed:
            self._graph_changed = False
            if not self._routes_event_queued:
                self._routes_event_queued = True
                self._events.append(RoutesChanged())
        if self._gc_wanted:
            self._gc_wanted = False
            self._collect_garbage(now)
        self._refresh_discovery(now)

    def _collect_garbage(self, now: float) -> None:
        reachable = self._topology.reachable()
        if self._held:
            back = [n for n in self._held if n in reachable]
            for n in back:
                self._tombstones.pop(n, None)
            self._held = {n for n in self._held if n not in reachable and n in self._topology}
            self._queue_names(back, exclude=None, now=now)
        if self._tombstones and len(self._tombstones) > len(self._topology):
            self._tombstones = {n: t for n, t in self._tombstones.items() if t[1] > now}
        grace = self.config.gc_grace
        due: list[PeerName] = []
        later: float | None = None
        for name in self._topology.records:
            if name in reachable:
                continue
            since = self._unreachable_since.setdefault(name, now)
            if now >= since + grace:
                due.append(name)
            else:
                later = since + grace if later is None else min(later, since + grace)
        for name in list(self._unreachable_since):
            if name in reachable:
                del self._unreachable_since[name]
        if due:
            ttl = now + self.config.tombstone_ttl
            for name in due:
                rec = self._topology.get(name)
                if rec is not None:
                    self._index_addresses(rec, None)
                    self._tombstones[name] = ((rec.version, rec.uid), ttl)
                self._unreachable_since.pop(name, None)
                self._held.discard(name)
            gone = self._topology.remove(due)
            self.stats.gc_removed += len(gone)
            # Our neighbours are dropping them too: forget that they hold them, or a record
            # that comes back unchanged after a partition would never be relayed to them.
            for conn in self._conns.values():
                for name in gone:
                    conn.known.pop(name, None)
            self._events.append(PeersRemoved(tuple(sorted(gone))))
            self._topology_changed(now)
        if later is not None:
            self._gc_at = later if self._gc_at is None else min(self._gc_at, later)

    # ==== internals: discovery ==================================================================

    def _index_addresses(self, old: PeerRecord | None, new: PeerRecord | None) -> None:
        """Mark peers whose discovered addresses may have changed with this record change."""
        if not self.config.discovery:
            return
        if new is None:
            assert old is not None
            self._discovery_dirty |= old.conn_names
        elif old is None:
            self._discovery_dirty |= new.conn_names
        else:
            # Only membership matters: a peer keeps the address it was connected at.
            self._discovery_dirty |= old.conn_names ^ new.conn_names

    def _addresses_of(self, name: PeerName) -> set[str]:
        """Addresses others announce for ``name`` (see ``_discovery_addresses``)."""
        port = self.config.port
        out: set[str] = set()
        for rec in self._topology.records.values():
            if name in rec.conn_names and rec.name != self.name:
                for c in rec.connections:
                    if c.name == name:
                        out.update(_discovery_addresses(c.address, c.outbound, port))
                        break
        return out

    def _refresh_discovery(self, now: float) -> None:
        if not self.config.discovery:
            self._discovery_dirty.clear()
            return
        for name in self._discovery_dirty:
            if name == self.name or name in self._by_name:
                self._cm.set_discovered(name, (), now)
            else:
                self._cm.set_discovered(name, self._addresses_of(name), now)
        self._discovery_dirty.clear()
        self._poll_dials(now)

    # ==== internals: routes =====================================================================

    def _routes(self, data: bool) -> Routes:
        r = self._route_cache.get(data)
        if r is None:
            r = self._route_cache[data] = Routes(self.name, self._topology.records, data=data)
        return r

    # ==== internals: application channels ======================================================

    def _pend_app(self, conn: _Conn, tag: int, channel: str, src: PeerName, d: GossipData) -> None:
        conn.pending_app.setdefault((tag, channel, src), []).append(d)
        self._out_conns.add(conn.conn_id)

    def _enqueue(self, conn: _Conn, tag: int, payload: bytes) -> None:
        conn.queue.append((tag, payload))
        self._out_conns.add(conn.conn_id)

    def _encode_app(self, conn: _Conn) -> None:
        for (tag, channel, src), items in conn.pending_app.items():
            data = items[0]
            for more in items[1:]:
                data = data.merge(more)
            for part in data.encode():
                if tag == TAG_GOSSIP:
                    conn.queue.append((tag, encode_gossip(channel, src, part)))
                else:
                    conn.queue.append((tag, encode_broadcast(channel, src, part)))
        conn.pending_app = {}

    def _app_gossip(self, channel: str, data: GossipData, exclude: int | None) -> None:
        for conn in self._random_conns(exclude):
            self._pend_app(conn, TAG_GOSSIP, channel, self.name, data)

    def _app_broadcast(self, channel: str, src: PeerName, data: GossipData) -> None:
        for hop in self._routes(False).broadcast_next_hops(src):
            conn_id = self._by_name.get(hop)
            if conn_id is not None:
                self._pend_app(self._conns[conn_id], TAG_BROADCAST, channel, src, data)

    def _app_unicast(self, channel: str, dst: PeerName, payload: bytes) -> None:
        self._forward_unicast(dst, encode_unicast(channel, self.name, dst, payload))

    def _forward_unicast(self, dst: PeerName, message: bytes) -> None:
        hop = self._routes(False).unicast_next_hop(dst)
        conn_id = self._by_name.get(hop) if hop is not None else None
        if conn_id is None:
            self.stats.unicast_dropped += 1
            return
        self._enqueue(self._conns[conn_id], TAG_UNICAST, message)

    def _on_unicast(
        self, channel: str, src: PeerName, dst: PeerName, body: bytes, raw: bytes
    ) -> None:
        if dst != self.name:
            self._forward_unicast(dst, raw)
            return
        handler = self._channels.get(channel)
        if handler is not None:
            handler.on_unicast(src, body)

    def _on_broadcast(
        self, conn: _Conn, channel: str, src: PeerName, body: bytes, raw: bytes
    ) -> None:
        if src == self.name:
            return
        handler = self._channels.get(channel)
        if handler is not None:
            data = handler.on_broadcast(src, body)
            if data is not None:
                self._app_broadcast(channel, src, data)
            return
        # surrogate: relay the broadcast unchanged along the tree
        self.stats.surrogate_relayed += 1
        for hop in self._routes(False).broadcast_next_hops(src):
            conn_id = self._by_name.get(hop)
            if conn_id is not None and conn_id != conn.conn_id:
                self._enqueue(self._conns[conn_id], TAG_BROADCAST, raw)

    def _on_app_gossip(self, conn: _Conn, channel: str, body: bytes, now: float) -> None:
        handler = self._channels.get(channel)
        if handler is not None:
            delta = handler.on_gossip(body)
            if delta is not None:
                self._app_gossip(channel, delta, exclude=conn.conn_id)
            return
        # surrogate: relay unknown-channel gossip once per ttl
        key = hashlib.blake2b(channel.encode() + b"\0" + body, digest_size=16).digest()
        seen = self._surrogate_seen.get(key)
        if seen is not None and seen > now:
            return
        self._surrogate_seen[key] = now + self.config.surrogate_ttl
        self.stats.surrogate_relayed += 1
        raw = encode_gossip(channel, self.name, body)
        for c in self._random_conns(conn.conn_id):
            self._enqueue(c, TAG_GOSSIP, raw)

    def _after_change(self, now: float) -> None:
        self._poll_dials(now)


@functools.lru_cache(maxsize=1 << 16)
def _discovery_addresses(address: str, outbound: bool, port: int) -> tuple[str, ...]:
    """Where to dial a peer seen at ``address``: the address itself (outbound: the address that
    was dialed; inbound: the router records the listen port the peer announced in its hello), and
    its host on the default port (for peers that announce none: then the port is ephemeral)."""
    del outbound  # both kinds carry a listening address from weft routers
    default = f"{_bracket(host_of(address))}:{port}"
    return (default, address) if address != default else (default,)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_MAX_CHANNEL_STATS = 16
_MAX_SURROGATE_SEEN = 65_536  # remembered unknown-channel gossip hashes (dedup), at most


def _peek_channel(payload: bytes) -> str:
    """The channel name of an envelope we encoded (a msgpack array whose first item is a short
    string), without decoding the rest; "other" when it is not in that form."""
    if len(payload) < 2 or payload[0] & 0xF0 != 0x90 or payload[1] & 0xE0 != 0xA0:
        return "other"
    end = 2 + (payload[1] & 0x1F)
    try:
        return payload[2:end].decode()
    except UnicodeDecodeError:
        return "other"
