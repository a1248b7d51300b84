"""The per-peer address allocator: a sans-I/O core around the ring CRDT.

Driven by API calls (``allocate``, ``claim``, ``release``, ``rmpeer``, ``reset``,
``peers_changed``), by channel input (``receive_gossip``, ``receive_unicast``) and by
``handle_timer(now)``; it produces ``messages_to_send()``, ``next_event()``, ``get_timer()`` and
``take_changes()`` (what must be persisted before any of the messages or events leave). It never
reads a clock or touches a socket.

Addresses are handed out lowest-first from the spans this peer owns in the requested subnet (the
subnet's network and broadcast addresses and the range's first and last are never handed out).
A peer without free space in a subnet asks a donor - the reachable peer advertising the most free
space there - by unicast; the donor hands over half of its largest free run and gossips the ring
change. Claims of a specific address owned by another peer ask that owner for exactly that address.

Initial ownership (``IpamConfig.init``):

* ``seed=A,B,...``: every peer (seed or not) creates the same ring from the list at once;
* ``consensus=N``: peers agree on who splits the range with a single-decree Paxos over the same
  channel (see :mod:`weft.ipam.paxos`). Participants announce themselves by unicast to the
  lowest-named reachable peer; once it has heard from N, it proposes them all; others propose
  only if nothing was chosen after ``consensus_fallback`` (+ jitter) seconds. The proposal, its
  value and the "chosen" notice flood; promises and accepts go back by unicast - tens of ms of
  simulated time at 100 peers (bench/ipam.py). Every peer builds the identical ring from the
  chosen list, so no ring needs to travel for the consensus itself;
* ``observer``: never proposes, owns nothing at first, takes the ring from gossip and asks donors.

Requests wait while the ring is not ready or a donor is being asked, up to
``request_timeout``; then they fail with :class:`RequestTimeoutError` naming what was missing.
"""

from __future__ import annotations

import bisect
import ipaddress
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal

import msgpack

from weft.errors import ConfigError, LocalError, RemoteProtocolError, WeftError
from weft.gossip.peer import PeerName
from weft.ipam.paxos import Claim, Paxos, ProposalId
from weft.ipam.ring import Entry, Ring, RingConflictError, RingData, allocatable

__all__ = [
    "AddressInUseError",
    "Allocation",
    "AllocationFailed",
    "AllocationSucceeded",
    "Allocator",
    "ConsensusReached",
    "GossipOut",
    "InitMode",
    "IpamConfig",
    "IpamData",
    "IpamEvent",
    "NotReadyError",
    "Outgoing",
    "PeerReachableError",
    "PersistedState",
    "RangeFullError",
    "RequestTimeoutError",
    "RingConflictDetected",
    "SpaceDonated",
    "StateChanges",
    "UnicastOut",
    "UnknownPeerError",
    "parse_address",
]

_MAX_MESSAGE = 16 << 20
DEFAULT_RANGE = IPv4Network("10.32.0.0/12")  # as Weave


# ----- errors ------------------------------------------------------------------------------


class AddressInUseError(LocalError):
    """The address is held by another container (HTTP 409)."""


class UnknownPeerError(ConfigError):
    """rmpeer of a peer that owns nothing and was never seen (HTTP 404)."""


class PeerReachableError(LocalError):
    """rmpeer of a peer that is still reachable, or reset with nobody to hand over to (409)."""


class RequestTimeoutError(WeftError):
    """A request waited longer than ``request_timeout`` (HTTP 503)."""


class RangeFullError(WeftError):
    """No reachable peer has a free address in the subnet (HTTP 503)."""


class NotReadyError(WeftError):
    """The operation needs a ring that does not exist yet (HTTP 503)."""


# ----- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class InitMode:
    """How the ring gets its first owners; parse ``--ipalloc-init`` with :meth:`parse`.

    ``kind``: "consensus" (``quorum_of`` = N peers expected; a majority must agree),
    "seed" (``seeds`` split the range at once) or "observer" (owns nothing at first).
    """

    kind: Literal["consensus", "seed", "observer"] = "consensus"
    quorum_of: int = 1
    seeds: tuple[PeerName, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "consensus" and self.quorum_of < 1:
            raise ConfigError("--ipalloc-init consensus=N needs N >= 1")
        if self.kind == "seed" and not self.seeds:
            raise ConfigError("--ipalloc-init seed= needs at least one peer name")

    @property
    def quorum(self) -> int:
        return self.quorum_of // 2 + 1

    @classmethod
    def parse(cls, text: str) -> InitMode:
        """``consensus[=N]``, ``seed=NAME,NAME...`` or ``observer``."""
        kind, _, arg = text.strip().partition("=")
        if kind == "observer" and not arg:
            return cls("observer")
        if kind == "consensus":
            if not arg:
                return cls("consensus", 1)
            try:
                n = int(arg)
            except ValueError:
                raise ConfigError(f"--ipalloc-init consensus={arg}: N must be a number") from None
            return cls("consensus", n)
        if kind == "seed":
            names = tuple(PeerName.parse(x) for x in arg.split(",") if x.strip())
            return cls("seed", seeds=tuple(sorted(set(names))))
        raise ConfigError(
            f"invalid --ipalloc-init {text!r}: expected consensus=N, seed=NAME,... or observer"
        )

    def __str__(self) -> str:
        if self.kind == "consensus":
            return f"consensus={self.quorum_of}"
        if self.kind == "seed":
            return "seed=" + ",".join(str(s) for s in self.seeds)
        return "observer"


@dataclass(frozen=True)
class IpamConfig:
    """IPAM settings (all durations in seconds)."""

    range: IPv4Network = DEFAULT_RANGE
    """The whole allocation range (``--ipalloc-range``), shared by every peer."""
    default_subnet: IPv4Network | None = None
    """Subnet for requests that name none (``--ipalloc-default-subnet``); None = the range."""
    init: InitMode = field(default_factory=InitMode)
    """Initial ownership (``--ipalloc-init``); default consensus among 1 peer (just us)."""
    request_timeout: float = 30.0
    """How long an allocation or claim waits for the ring or a donor before failing."""
    donor_wait: float = 2.0
    """How long to wait for one donor's answer before asking another."""
    full_grace: float = 3.0
    """How long no reachable peer must advertise free space before a request fails as full."""
    consensus_fallback: float = 3.0
    """If no consensus after this (plus jitter), any participant proposes, not just the lowest."""
    free_gossip_interval: float = 1.0
    """Free-count changes (advisory) are batched and gossiped at most this often."""

    def __post_init__(self) -> None:
        if self.range.prefixlen > 30:
            raise ConfigError(f"--ipalloc-range {self.range} is too small (need /30 or larger)")
        sub = self.subnet
        if not sub.subnet_of(self.range):
            raise ConfigError(f"default subnet {sub} is not inside --ipalloc-range {self.range}")
        if sub.prefixlen > 30:
            raise ConfigError(f"default subnet {sub} is too small (need /30 or larger)")
        for name in ("request_timeout", "donor_wait", "full_grace", "consensus_fallback",
                     "free_gossip_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ipam {name} must be positive")

    @property
    def subnet(self) -> IPv4Network:
        return self.default_subnet or self.range


# ----- data, events, messages --------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """One address held by one container in one subnet."""

    container_id: str
    address: IPv4Address
    subnet: IPv4Network

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.subnet.prefixlen}"

    def to_json(self) -> dict[str, str]:
        return {
            "container_id": self.container_id,
            "address": str(self.address),
            "cidr": self.cidr,
            "subnet": str(self.subnet),
        }


@dataclass(frozen=True)
class AllocationSucceeded:
    request_id: int
    allocation: Allocation


@dataclass(frozen=True)
class AllocationFailed:
    request_id: int
    container_id: str
    error: WeftError


@dataclass(frozen=True)
class ConsensusReached:
    seeds: tuple[PeerName, ...]


@dataclass(frozen=True)
class RingConflictDetected:
    message: str


@dataclass(frozen=True)
class SpaceDonated:
    recipient: PeerName
    addresses: int


IpamEvent = (
    AllocationSucceeded | AllocationFailed | ConsensusReached | RingConflictDetected | SpaceDonated
)


@dataclass
class IpamData:
    """The ipam channel's :class:`~weft.gossip.channel.GossipData`: ring entries + Paxos claims."""

    ring: RingData | None = None
    claims: dict[PeerName, Claim] = field(default_factory=dict)
    values: dict[ProposalId, tuple[PeerName, ...]] = field(default_factory=dict)
    chosen: ProposalId | None = None
    """Set by a proposer that saw a quorum accept its proposal (its value is in ``values``)."""

    def encode(self) -> list[bytes]:
        obj: dict[str, Any] = {}
        if self.ring is not None:
            obj["ring"] = self.ring.to_wire()
        if self.claims:
            obj["paxos"] = Paxos.to_wire(self.claims)
        if self.values:
            obj["values"] = Paxos.values_to_wire(self.values)
        if self.chosen is not None:
            obj["chosen"] = list(self.chosen)
        return [msgpack.packb(obj)]

    def merge(self, other: Any) -> IpamData:
        if not isinstance(other, IpamData):
            raise LocalError(f"cannot merge {type(other).__name__} into ipam data")
        if other.ring is not None:
            if self.ring is None:
                self.ring = RingData(other.ring.start, other.ring.end, other.ring.seeds,
                                     dict(other.ring.entries))
            else:
                self.ring.merge_in(other.ring)
        for name, claim in other.claims.items():
            mine = self.claims.get(name)
            if mine is None or claim.key() > mine.key():
                self.claims[name] = claim
        for pid, value in other.values.items():
            self.values.setdefault(pid, value)
        self.chosen = self.chosen or other.chosen
        return self

    @classmethod
    def decode(cls, payload: bytes) -> IpamData:
        obj = _unpack(payload)
        if not isinstance(obj, dict):
            raise RemoteProtocolError("ipam gossip: expected a map")
        ring = RingData.from_wire(obj["ring"]) if "ring" in obj else None
        claims = Paxos.from_wire(obj["paxos"]) if "paxos" in obj else {}
        values = Paxos.values_from_wire(obj["values"]) if "values" in obj else {}
        chosen = obj.get("chosen")
        if chosen is not None and not (
            isinstance(chosen, list)
            and len(chosen) == 2
            and all(type(x) is int and 0 <= x < 1 << 63 for x in chosen)
        ):
            raise RemoteProtocolError("ipam paxos: bad chosen id")
        return cls(ring, claims, values, None if chosen is None else (chosen[0], chosen[1]))

    def empty(self) -> bool:
        return (
            (self.ring is None or not self.ring.entries)
            and not self.claims
            and not self.values
            and self.chosen is None
        )


@dataclass(frozen=True)
class GossipOut:
    data: IpamData


@dataclass(frozen=True)
class UnicastOut:
    dst: PeerName
    payload: bytes


Outgoing = GossipOut | UnicastOut


@dataclass
class StateChanges:
    """What changed since the last :meth:`Allocator.take_changes`; persist before sending."""

    wipe: bool = False
    range: tuple[int, int] | None = None
    """The range as (start, end); set on the first save and after a wipe."""
    seeds: tuple[PeerName, ...] | None = None
    entries: dict[int, Entry] = field(default_factory=dict)
    allocations: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """container id -> [(address, prefix length)]; an empty list means deleted."""
    paxos: Claim | None = None


@dataclass
class PersistedState:
    """Everything an allocator needs to come back after a restart."""

    range_start: int
    range_end: int
    seeds: tuple[PeerName, ...]
    entries: dict[int, Entry]
    allocations: dict[str, list[tuple[int, int]]]
    paxos: Claim | None


def _unpack(payload: bytes) -> object:
    if len(payload) > _MAX_MESSAGE:
        raise RemoteProtocolError("ipam message too large")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as err:  # msgpack raises a variety of errors on garbage
        raise RemoteProtocolError(f"ipam message undecodable: {err}") from None


@dataclass
class _Pending:
    id: int
    kind: Literal["allocate", "claim"]
    container_id: str
    subnet: IPv4Network
    address: int | None
    deadline: float
    asked: set[PeerName] = field(default_factory=set)
    waiting_on: PeerName | None = None
    wait_until: float = 0.0
    full_since: float | None = None
    last_reason: str = "the IPAM ring is not ready yet (no consensus or seeds)"


MAX_STATUS_RANGES = 16  # ranges listed per peer in the status (a ring can fragment)


def _ip(addr: int) -> str:
    return str(IPv4Address(addr))


# ----- the allocator -----------------------------------------------------------------------


class Allocator:
    """One peer's IPAM state machine. All methods run on one thread and never block."""

    def __init__(
        self,
        local: PeerName,
        config: IpamConfig,
        now: float,
        rng: random.Random | None = None,
        state: PersistedState | None = None,
    ) -> None:
        self.local = local
        self.config = config
        self._rng = rng or random.Random(int(local))
        rstart = int(config.range.network_address)
        self.ring = Ring(rstart, rstart + config.range.num_addresses, local)
        self.paxos = Paxos(local, config.init.quorum)
        self.conflict: str | None = None
        self._left = False
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._events: deque[IpamEvent] = deque()
        self._out: list[Outgoing] = []
        self._changes = StateChanges()
        self._dirty = False
        # allocations: container -> [(addr, prefixlen)], address -> container, sorted addresses
        self._by_cid: dict[str, list[tuple[int, int]]] = {}
        self._holder: dict[int, str] = {}
        self._sorted: list[int] = []
        self._reachable: set[PeerName] | None = None
        self._free_due: float | None = None
        self._paxos_retry_at: float | None = None
        self._proposed = False
        self._announced_to: PeerName | None = None
        self._chosen_sent = False
        self._gossip_tokens: set[int] = set()
        if state is not None:
            self._restore(state, now)
        else:
            self._changes.range = (self.ring.start, self.ring.end)
            self._dirty = True
        if config.init.kind == "seed" and not self.ring.ready:
            self._create(config.init.seeds, now)
        elif config.init.kind == "consensus" and not self.ring.ready:
            # We announce ourselves to the lowest-named reachable peer once we know who that is
            # (peers_changed); consensus starts once it has heard of N participants.
            self._consider_proposing(now)

    # ----- restore / persistence -------------------------------------------------------------

    def _restore(self, state: PersistedState, now: float) -> None:
        if (state.range_start, state.range_end) != (self.ring.start, self.ring.end):
            raise ConfigError(
                f"the data dir holds IPAM state for range "
                f"{_ip(state.range_start)}..{_ip(state.range_end - 1)}, not {self.config.range}; "
                "reset IPAM or use the same --ipalloc-range"
            )
        if state.entries:
            self.ring.seeds = state.seeds
            self.ring.merge(RingData(self.ring.start, self.ring.end, state.seeds, state.entries))
        if state.paxos is not None:
            self.paxos.restore(state.paxos)
        reclaimed: set[str] = set()
        for cid, items in state.allocations.items():
            for addr, prefix in items:
                if self.ring.owner(addr) == self.local:
                    self._hold(cid, addr, prefix)
                    continue
                # Not (or no longer) in our spans as far as we know: claim it again, which asks
                # its owner; it comes back, or fails clearly if someone else holds it now.
                net = IPv4Network((addr, prefix), strict=False)
                self._new_request("claim", cid, net, addr, now)
                reclaimed.add(cid)
        for cid in reclaimed:
            self._mark_alloc(cid)

    def take_changes(self) -> StateChanges | None:
        """Changes to persist (committed) before delivering messages or events; None if none."""
        if not self._dirty:
            return None
        out = self._changes
        self._changes = StateChanges()
        self._dirty = False
        return out

    def persisted_state(self) -> PersistedState:
        """The full state, as the store would hold it (tests, and a fresh store)."""
        return PersistedState(
            self.ring.start,
            self.ring.end,
            self.ring.seeds,
            self.ring.entries(),
            {cid: list(v) for cid, v in self._by_cid.items()},
            self.paxos.mine,
        )

    def _mark_tokens(self, tokens: Iterable[int], gossip_now: bool) -> None:
        for t in tokens:
            e = self.ring.entry(t)
            if e is not None:
                self._changes.entries[t] = e
                self._dirty = True
                if gossip_now:
                    self._gossip_tokens.add(t)

    def _mark_alloc(self, cid: str) -> None:
        self._changes.allocations[cid] = list(self._by_cid.get(cid, []))
        self._dirty = True

    def _mark_paxos(self) -> None:
        self._changes.paxos = self.paxos.mine
        self._dirty = True

    # ----- outputs -----------------------------------------------------------------------------

    def messages_to_send(self) -> list[Outgoing]:
        self._flush_gossip()
        out, self._out = self._out, []
        return out

    def next_event(self) -> IpamEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self._left:
            return None
        times = [p.deadline for p in self._pending.values()]
        times += [p.wait_until for p in self._pending.values() if p.waiting_on is not None]
        times += [
            p.full_since + self.config.full_grace
            for p in self._pending.values()
            if p.full_since is not None
        ]
        if self._free_due is not None:
            times.append(self._free_due)
        if self._paxos_retry_at is not None:
            times.append(self._paxos_retry_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._left:
            return
        if self._free_due is not None and now >= self._free_due:
            self._free_due = None
            self._update_free_counts(gossip=True)
        if self._paxos_retry_at is not None and now >= self._paxos_retry_at:
            self._paxos_retry_at = None
            if not self.ring.ready and self.config.init.kind == "consensus":
                self._propose(now)
        self._serve_pending(now)

    def _flush_gossip(self) -> None:
        if self._gossip_tokens:
            data = self.ring.data(self._gossip_tokens)
            self._gossip_tokens = set()
            self._out.append(GossipOut(IpamData(ring=data)))

    # ----- queries ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.ring.ready

    def lookup(self, container_id: str) -> list[Allocation]:
        return [self._allocation(container_id, a, p) for a, p in self._by_cid.get(container_id, [])]

    def allocations(self) -> list[Allocation]:
        return [
            self._allocation(cid, a, p)
            for cid, items in sorted(self._by_cid.items())
            for a, p in items
        ]

    def holder(self, address: int) -> str | None:
        return self._holder.get(address)

    def held(self) -> Mapping[int, str]:
        """Address -> container id of everything we hold (read-only view, for checks)."""
        return self._holder

    def _allocation(self, cid: str, addr: int, prefix: int) -> Allocation:
        net = IPv4Network((addr, prefix), strict=False)
        return Allocation(cid, IPv4Address(addr), net)

    def free_in(self, lo: int, hi: int) -> int:
        """Free addresses we hold in ``[lo, hi)`` (range ends excluded)."""
        used = bisect.bisect_left(self._sorted, hi) - bisect.bisect_left(self._sorted, lo)
        return max(allocatable(lo, hi, self.ring.start, self.ring.end) - used, 0)

    def status(self) -> dict[str, Any]:
        """The ``ipam`` object of ``/status``."""
        per_peer = self.ring.owned_and_free()
        entries: list[dict[str, Any]] = []
        unreachable = 0
        for name, (owned, free) in sorted(per_peer.items()):
            if name == self.local:
                free = sum(self.free_in(a, b) for a, b in self.ring.owned_ranges(name))
            if not self._is_reachable(name):
                unreachable += owned
            spans = self.ring.owned_ranges(name)
            entries.append(
                {
                    "peer": str(name),
                    "owned": owned,
                    "free": free,
                    "reachable": self._is_reachable(name),
                    # "first-last" (inclusive), lowest first; the rest only counted
                    "ranges": [f"{_ip(a)}-{_ip(b - 1)}" for a, b in spans[:MAX_STATUS_RANGES]],
                    "ranges_more": max(0, len(spans) - MAX_STATUS_RANGES),
                }
            )
        return {
            "range": str(self.config.range),
            "default_subnet": str(self.config.subnet),
            "init": str(self.config.init),
            "ready": self.ring.ready,
            "seeds": [str(s) for s in self.ring.seeds],
            "entries": entries,
            "unreachable": unreachable,
            "allocated": len(self._holder),
            "pending": [
                {
                    "container_id": p.container_id,
                    "kind": p.kind,
                    "subnet": str(p.subnet),
                    "address": _ip(p.address) if p.address is not None else None,
                    "waiting_on": str(p.waiting_on) if p.waiting_on is not None else None,
                    "reason": p.last_reason,
                }
                for p in self._pending.values()
            ],
            "consensus": {
                "quorum": self.paxos.quorum,
                "participants": len(self.paxos.claims),
            }
            if self.config.init.kind == "consensus" and not self.ring.ready
            else None,
            "conflict": self.conflict,
        }

    def _is_reachable(self, name: PeerName) -> bool:
        return name == self.local or self._reachable is None or name in self._reachable

    # ----- API -------------------------------------------------------------------------------

    def parse_subnet(self, subnet: str | IPv4Network | None) -> IPv4Network:
        """Validate a requested subnet (None = the default); ConfigError names the problem."""
        if subnet is None:
            return self.config.subnet
        if isinstance(subnet, IPv4Network):
            net = subnet
        else:
            try:
                net = IPv4Network(subnet, strict=True)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"invalid subnet {subnet!r}: {err}") from None
        if not net.subnet_of(self.config.range):
            raise ConfigError(f"subnet {net} is outside the IPAM range {self.config.range}")
        if net.prefixlen > 30:
            raise ConfigError(f"subnet {net} is too small to allocate from (need /30 or larger)")
        return net

    def allocate(self, container_id: str, subnet: IPv4Network | None, now: float) -> int:
        """Start allocating an address for ``container_id``; the result comes as an event."""
        self._check_alive()
        _check_cid(container_id)
        net = self.parse_subnet(subnet)
        rid = self._new_request("allocate", container_id, net, None, now)
        self._serve_pending(now)
        return rid

    def claim(
        self, container_id: str, address: IPv4Address, subnet: IPv4Network | None, now: float
    ) -> int:
        """Start claiming ``address`` for ``container_id`` (idempotent); result as an event."""
        self._check_alive()
        _check_cid(container_id)
        net = self.parse_subnet(subnet)
        addr = int(address)
        if address not in net:
            raise ConfigError(f"address {address} is not in subnet {net}")
        if addr in (int(net.network_address), int(net.broadcast_address)) or addr in (
            self.ring.start,
            self.ring.end - 1,
        ):
            raise ConfigError(f"address {address} is a network or broadcast address of {net}")
        holder = self._holder.get(addr)
        if holder is not None and holder != container_id:
            raise AddressInUseError(f"address {address} is already held by container {holder}")
        rid = self._new_request("claim", container_id, net, addr, now)
        self._serve_pending(now)
        return rid

    def release(self, container_id: str, now: float) -> list[Allocation]:
        """Free every address of ``container_id``; returns what was freed (maybe nothing)."""
        self._check_alive()
        items = self._by_cid.pop(container_id, [])
        freed = []
        for addr, prefix in items:
            self._holder.pop(addr, None)
            i = bisect.bisect_left(self._sorted, addr)
            if i < len(self._sorted) and self._sorted[i] == addr:
                self._sorted.pop(i)
            freed.append(self._allocation(container_id, addr, prefix))
        if items:
            self._changes.allocations[container_id] = []
            self._dirty = True
            self._schedule_free_update(now)
        for p in list(self._pending.values()):
            if p.container_id == container_id:
                self._fail(p, LocalError(f"container {container_id} was released while waiting"))
        return freed

    def peers_changed(self, reachable: Iterable[PeerName], now: float) -> None:
        """The set of peers reachable over the mesh changed (from the router's topology)."""
        self._reachable = set(reachable) - {self.local}
        self._announce()
        self._consider_proposing(now)
        self._serve_pending(now)

    def rmpeer(self, name: PeerName, now: float) -> int:
        """Take over every span of ``name`` (gone for good). Returns addresses taken over."""
        self._check_alive()
        if name == self.local:
            raise ConfigError("cannot rmpeer ourselves; use `weft reset` instead")
        known = name in self.ring.owners() or name in self.paxos.claims or (
            self._reachable is not None and name in self._reachable
        )
        if not known:
            raise UnknownPeerError(f"unknown peer {name}: it owns no IPAM space here")
        if self._reachable is not None and name in self._reachable:
            raise PeerReachableError(
                f"peer {name} is still reachable; stop it (or run `weft reset` on it) first"
            )
        if not self.ring.ready:
            raise NotReadyError("the IPAM ring is not ready; nothing to take over")
        tokens, taken = self.ring.transfer(name)
        self._mark_tokens(tokens, gossip_now=True)
        self._schedule_free_update(now)
        self._serve_pending(now)
        return taken

    def reset(self, now: float) -> PeerName | None:
        """Hand all our spans to a reachable peer, forget everything and stop taking part.

        Returns who got our space (None if we owned none). The router should stop afterwards.
        """
        self._check_alive()
        recipient: PeerName | None = None
        if self.ring.ready and self.ring.owned_ranges(self.local):
            candidates = sorted(self._reachable or ())
            if not candidates:
                raise PeerReachableError(
                    "no reachable peer to hand our address space to; stop this peer and run "
                    "`weft rmpeer` for it on another peer instead"
                )
            recipient = candidates[0]
            tokens = self.ring.give_all(recipient)
            data = self.ring.data(tokens)
            self._out.append(GossipOut(IpamData(ring=data)))
            self._out.append(
                UnicastOut(recipient, _pack({"t": "gift", "ring": data.to_wire()}))
            )
        for p in list(self._pending.values()):
            self._fail(p, LocalError("IPAM was reset"))
        self._left = True
        self._free_due = self._paxos_retry_at = None
        self._changes = StateChanges(wipe=True, range=(self.ring.start, self.ring.end))
        self._dirty = True
        self._gossip_tokens = set()
        return recipient

    def _check_alive(self) -> None:
        if self._left:
            raise LocalError("IPAM was reset on this peer; restart the router")

    def _new_request(
        self,
        kind: Literal["allocate", "claim"],
        cid: str,
        net: IPv4Network,
        addr: int | None,
        now: float,
    ) -> int:
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = _Pending(rid, kind, cid, net, addr, now + self.config.request_timeout)
        return rid

    # ----- serving requests ------------------------------------------------------------------

    def _serve_pending(self, now: float) -> None:
        if self._left:
            return
        for p in list(self._pending.values()):
            if p.id in self._pending:
                self._serve(p, now)

    def _serve(self, p: _Pending, now: float) -> None:
        if now >= p.deadline:
            self._fail(
                p,
                RequestTimeoutError(
                    f"{p.kind} for container {p.container_id} in {p.subnet} timed out after "
                    f"{self.config.request_timeout:g}s: {p.last_reason}"
                ),
            )
            return
        if self.conflict is not None and not self.ring.ready:
            p.last_reason = self.conflict
        if not self.ring.ready:
            return
        # Idempotence: the container already has what it asks for.
        for addr, prefix in self._by_cid.get(p.container_id, []):
            in_subnet = IPv4Address(addr) in p.subnet and prefix == p.subnet.prefixlen
            if p.kind == "allocate" and in_subnet:
                return self._succeed(p, addr, now)
            if p.kind == "claim" and addr == p.address:
                return self._succeed(p, addr, now)
        if p.kind == "claim":
            assert p.address is not None
            holder = self._holder.get(p.address)
            if holder is not None and holder != p.container_id:
                return self._fail(
                    p, AddressInUseError(f"address {_ip(p.address)} is held by container {holder}")
                )
            owner = self.ring.owner(p.address)
            if owner == self.local:
                return self._succeed(
                    p, self._hold(p.container_id, p.address, p.subnet.prefixlen), now
                )
            assert owner is not None
            if p.waiting_on is not None and now < p.wait_until:
                return
            if not self._is_reachable(owner):
                p.last_reason = f"address {_ip(p.address)} is owned by unreachable peer {owner}"
                p.waiting_on = None
                return
            self._ask(p, owner, now)
            p.last_reason = f"waiting for peer {owner} to hand over {_ip(p.address)}"
            return
        lowest = self._lowest_free(p.subnet)
        if lowest is not None:
            return self._succeed(p, self._hold(p.container_id, lowest, p.subnet.prefixlen), now)
        if p.waiting_on is not None and now < p.wait_until:
            return
        if p.waiting_on is not None:
            p.asked.add(p.waiting_on)
            p.waiting_on = None
        donor = self._choose_donor(p.subnet, p.asked)
        if donor is None and p.asked:
            # Everyone we asked said no (or did not answer); free counts may have moved since.
            p.asked.clear()
            donor = self._choose_donor(p.subnet, p.asked)
        if donor is None:
            p.last_reason = f"no reachable peer has free addresses in {p.subnet}"
            if p.full_since is None:
                p.full_since = now
            elif now >= p.full_since + self.config.full_grace:
                err = RangeFullError(f"no free address left in {p.subnet}: {p.last_reason}")
                self._fail(p, err)
            return
        p.full_since = None
        self._ask(p, donor, now)
        p.last_reason = f"asked peer {donor} for space in {p.subnet}"

    def _ask(self, p: _Pending, donor: PeerName, now: float) -> None:
        p.waiting_on = donor
        p.wait_until = now + self.config.donor_wait
        msg = {
            "t": "ask",
            "id": p.id,
            "lo": int(p.subnet.network_address),
            "hi": int(p.subnet.broadcast_address) + 1,
            "a": p.address,
        }
        self._out.append(UnicastOut(donor, _pack(msg)))

    def _choose_donor(self, net: IPv4Network, exclude: set[PeerName]) -> PeerName | None:
        lo, hi = int(net.network_address), int(net.broadcast_address) + 1
        free: dict[PeerName, int] = {}
        for s in self.ring.spans():
            if s.owner == self.local or s.owner in exclude or not self._is_reachable(s.owner):
                continue
            a, b = max(s.start, lo), min(s.end, hi)
            if a >= b or s.free == 0:
                continue
            # Advertised free is for the whole span; scale it to the part inside the subnet.
            part = s.free if (a, b) == (s.start, s.end) else max(1, s.free * (b - a) // s.size)
            free[s.owner] = free.get(s.owner, 0) + part
        if not free:
            return None
        best = max(free.values())
        top = sorted(n for n, f in free.items() if f == best)
        return top[self._rng.randrange(len(top))]

    def _lowest_free(self, net: IPv4Network) -> int | None:
        lo = int(net.network_address) + 1
        hi = int(net.broadcast_address)  # exclusive: the broadcast address is never handed out
        lo = max(lo, self.ring.start + 1)
        hi = min(hi, self.ring.end - 1)
        for s_start, s_end in self.ring.owned_ranges(self.local):
            a, b = max(s_start, lo), min(s_end, hi)
            if a >= b:
                continue
            i = bisect.bisect_left(self._sorted, a)
            x = a
            while i < len(self._sorted) and self._sorted[i] == x:
                x += 1
                i += 1
            if x < b:
                return x
        return None

    def _hold(self, cid: str, addr: int, prefix: int) -> int:
        self._by_cid.setdefault(cid, []).append((addr, prefix))
        self._holder[addr] = cid
        bisect.insort(self._sorted, addr)
        self._mark_alloc(cid)
        return addr

    def _succeed(self, p: _Pending, addr: int, now: float) -> None:
        del self._pending[p.id]
        prefix = p.subnet.prefixlen
        self._events.append(
            AllocationSucceeded(p.id, self._allocation(p.container_id, addr, prefix))
        )
        self._schedule_free_update(now)

    def _fail(self, p: _Pending, err: WeftError) -> None:
        self._pending.pop(p.id, None)
        self._events.append(AllocationFailed(p.id, p.container_id, err))

    def _schedule_free_update(self, now: float) -> None:
        # Free counts are advice for donor choice and status: batch them.
        if self._free_due is None:
            self._free_due = now + self.config.free_gossip_interval

    def _update_free_counts(self, gossip: bool, all_changes: bool = False) -> None:
        """Refresh the free counts we advertise (versions bump; persisted).

        Free counts are advice for donor choice, so only changes that matter to a donor search
        (a span becoming empty or non-empty) are gossiped at once, or all of them when
        ``all_changes``; the rest travel with the periodic full gossip. This keeps a busy
        peer's allocations from flooding the mesh.
        """
        changed = []
        urgent = []
        for s in list(self.ring.spans()):
            if s.owner == self.local:
                f = self.free_in(s.start, s.end)
                if self.ring.set_free(s.start, f):
                    changed.append(s.start)
                    if all_changes or (s.free == 0) != (f == 0):
                        urgent.append(s.start)
        self._mark_tokens(changed, gossip_now=False)
        if gossip:
            self._gossip_tokens.update(urgent)

    # ----- consensus -------------------------------------------------------------------------

    # Message flow (keeps consensus O(n) messages plus three floods, not n floods):
    # participants announce their (empty) claim by unicast to the lowest-named reachable peer;
    # a proposer's own claim, its value and its "chosen" notice flood (relayed by everyone);
    # acceptors answer by unicast to the proposer; learners trust the proposer's "chosen".

    def _announce(self) -> None:
        if (
            self.config.init.kind != "consensus"
            or self.ring.ready
            or self._left
            or not self._reachable
        ):
            return
        lowest = min(self._reachable | {self.local})
        if lowest != self.local and lowest != self._announced_to:
            self._announced_to = lowest
            self._out.append(UnicastOut(lowest, self._paxos_message(self._my_paxos())))

    def _paxos_message(self, data: IpamData) -> bytes:
        return _pack(
            {
                "t": "paxos",
                "claims": Paxos.to_wire(data.claims),
                "values": Paxos.values_to_wire(data.values),
            }
        )

    def _send_claim(self) -> None:
        """Tell whoever needs to know that our claim changed."""
        mine = self.paxos.mine
        proposer = PeerName(mine.promise[1]) if mine.promise[1] else None
        if proposer is None or proposer == self.local:
            self._out.append(GossipOut(self._my_paxos()))  # a proposal: flood it
        else:
            self._out.append(UnicastOut(proposer, self._paxos_message(self._my_paxos())))

    def _consider_proposing(self, now: float) -> None:
        if self.ring.ready or self.config.init.kind != "consensus" or self._proposed:
            return
        known = set(self.paxos.claims) | (self._reachable or set()) | {self.local}
        if len(known) < self.config.init.quorum_of:
            return
        if min(known) == self.local and len(self.paxos.claims) >= self.config.init.quorum_of:
            self._propose(now)
        elif self._paxos_retry_at is None:
            self._paxos_retry_at = now + self.config.consensus_fallback * (1 + self._rng.random())

    def _propose(self, now: float) -> None:
        self._proposed = True
        self.paxos.propose()
        self._mark_paxos()
        self._send_claim()
        self._paxos_retry_at = now + self.config.consensus_fallback * (1 + self._rng.random())
        self._check_chosen(now)

    def _my_paxos(self) -> IpamData:
        mine = self.paxos.mine
        values = {}
        if mine.accepted in self.paxos.values:
            values[mine.accepted] = self.paxos.values[mine.accepted]
        return IpamData(claims={self.local: mine}, values=values)

    def _check_chosen(self, now: float) -> None:
        chosen = self.paxos.chosen()
        if not chosen or self.ring.ready:
            return
        pid = self.paxos.chosen_id
        if pid is not None and pid[1] == int(self.local) and not self._chosen_sent:
            # We proposed it and counted the quorum: tell everyone (one flood).
            self._chosen_sent = True
            self._out.append(GossipOut(IpamData(values={pid: chosen}, chosen=pid)))
        self._create(chosen, now)

    def _create(self, seeds: tuple[PeerName, ...], now: float) -> None:
        try:
            tokens = self.ring.create(seeds)
        except RingConflictError as err:
            self._record_conflict(str(err))
            return
        self._paxos_retry_at = None
        self._changes.seeds = self.ring.seeds
        self._mark_tokens(tokens, gossip_now=False)
        self._events.append(ConsensusReached(self.ring.seeds))
        self._schedule_free_update(now)
        self._serve_pending(now)

    def _record_conflict(self, message: str) -> None:
        if self.conflict != message:
            self.conflict = message
            self._events.append(RingConflictDetected(message))

    # ----- channel input ---------------------------------------------------------------------

    def snapshot(self) -> IpamData:
        """Our complete state for periodic gossip and new connections."""
        data = IpamData(ring=self.ring.data() if self.ring.ready else None)
        if not self.ring.ready:
            # proposers' claims (and ours): what a newly connected peer needs to take part
            data.claims = {
                n: c for n, c in self.paxos.claims.items() if c.promise[1] == int(n)
            }
            if self.config.init.kind == "consensus":
                data.claims[self.local] = self.paxos.mine
            data.values = dict(self.paxos.values)
            data.chosen = self.paxos.chosen_id
        return data

    def receive_gossip(self, payload: bytes, now: float) -> IpamData | None:
        """Merge gossip (or a broadcast); return what was new, to relay, or None."""
        data = IpamData.decode(payload)
        if self._left:
            return None
        return self._merge(data, now)

    def _merge(self, data: IpamData, now: float) -> IpamData | None:
        delta = IpamData()
        if data.ring is not None:
            was_ready = self.ring.ready
            moved: set[int] = set()
            try:
                new = self.ring.merge(data.ring, moved)
            except RingConflictError as err:
                self._record_conflict(str(err))
                new = None
            if new is not None:
                # Relay only ownership news (and where those spans end); free counts are advice
                # that travels with the periodic full gossip, so a busy peer does not flood.
                if moved:
                    delta.ring = self.ring.data(self.ring.with_boundaries(moved))
                if not was_ready:
                    self._changes.seeds = self.ring.seeds
                    self._paxos_retry_at = None
                    self._events.append(ConsensusReached(self.ring.seeds))
                self._mark_tokens(new.entries, gossip_now=False)
                if any(e.owner == self.local for e in new.entries.values()):
                    # We were given space (donation, reset of a peer): advertise true free counts.
                    self._schedule_free_update(now)
                self._serve_pending(now)
        if data.claims or data.values or data.chosen is not None:
            delta.values.update(self.paxos.merge_values(data.values))
            new_claims = self.paxos.merge(data.claims)
            # Relay only proposers' own claims; acceptors' answers go to the proposer by unicast.
            delta.claims.update({n: c for n, c in new_claims.items() if c.promise[1] == int(n)})
            if data.chosen is not None and self.paxos.chosen_id is None:
                self.paxos.learn(data.chosen)
                delta.chosen = data.chosen
                if data.chosen in self.paxos.values:
                    delta.values[data.chosen] = self.paxos.values[data.chosen]
            if not self.ring.ready and self.config.init.kind == "consensus":
                if self.paxos.think():
                    self._mark_paxos()
                    self._send_claim()
                self._consider_proposing(now)
            if not self.ring.ready:
                self._check_chosen(now)
        return None if delta.empty() else delta

    def receive_unicast(self, src: PeerName, payload: bytes, now: float) -> None:
        """A space request or its answer from ``src``."""
        obj = _unpack(payload)
        if self._left:
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
            raise RemoteProtocolError("ipam unicast: expected a map with a type")
        kind = obj["t"]
        if kind == "paxos":
            data = IpamData(
                claims=Paxos.from_wire(obj.get("claims", [])),
                values=Paxos.values_from_wire(obj.get("values", [])),
            )
            self._merge(data, now)  # answers to a proposer are not relayed
        elif kind == "ask":
            self._on_ask(src, obj, now)
        elif kind in ("give", "gift"):
            ring = obj.get("ring")
            if ring is not None:
                self._merge(IpamData(ring=RingData.from_wire(ring)), now)
                if kind == "gift":
                    # Reset handed us space: relay it like any ring change.
                    self._gossip_tokens.update(RingData.from_wire(ring).entries)
            rid = obj.get("id")
            p = self._pending.get(rid) if isinstance(rid, int) else None
            if p is not None and p.waiting_on == src:
                if not obj.get("ok", False):
                    p.asked.add(src)
                    why = obj.get("why")
                    if isinstance(why, str) and why.startswith("in use"):
                        return self._fail(
                            p,
                            AddressInUseError(
                                f"address {_ip(p.address or 0)} is held by a container on peer "
                                f"{src}"
                            ),
                        )
                p.waiting_on = None
            self._serve_pending(now)
        else:
            raise RemoteProtocolError(f"ipam unicast: unknown type {kind!r}")

    def _on_ask(self, src: PeerName, obj: dict[Any, Any], now: float) -> None:
        rid, lo, hi, addr = obj.get("id"), obj.get("lo"), obj.get("hi"), obj.get("a")
        if not (
            isinstance(rid, int)
            and isinstance(lo, int)
            and isinstance(hi, int)
            and (addr is None or isinstance(addr, int))
        ):
            raise RemoteProtocolError("ipam space request: bad fields")
        reply: dict[str, Any] = {"t": "give", "id": rid, "ok": False, "why": "no free space"}
        if not self.ring.ready:
            reply["why"] = "ring not ready"
        elif addr is not None:
            if self.ring.owner(addr) != self.local:
                reply["why"] = "not the owner"
                reply["ring"] = self.ring.data().to_wire()
            elif addr in self._holder:
                reply["why"] = "in use"
            else:
                self._donate(src, addr, addr + 1, reply, now)
        else:
            run = self._largest_free_run(max(lo, self.ring.start), min(hi, self.ring.end))
            if run is not None:
                a, b = run
                self._donate(src, a + (b - a) // 2, b, reply, now)
            else:
                # Tell the asker our true free counts so it stops asking us.
                self._update_free_counts(gossip=True, all_changes=True)
        self._out.append(UnicastOut(src, _pack(reply)))

    def _donate(self, to: PeerName, a: int, b: int, reply: dict[str, Any], now: float) -> None:
        tokens = self.ring.give(a, b, to, self.free_in)
        self._mark_tokens(tokens, gossip_now=True)
        reply["ok"] = True
        reply["why"] = ""
        reply["ring"] = self.ring.data(tokens).to_wire()
        self._events.append(SpaceDonated(to, b - a))

    def _largest_free_run(self, lo: int, hi: int) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for s_start, s_end in self.ring.owned_ranges(self.local):
            a, b = max(s_start, lo, self.ring.start + 1), min(s_end, hi, self.ring.end - 1)
            if a >= b:
                continue
            i = bisect.bisect_left(self._sorted, a)
            x = a
            while x < b:
                nxt = self._sorted[i] if i < len(self._sorted) and self._sorted[i] < b else b
                if nxt > x and (best is None or nxt - x > best[1] - best[0]):
                    best = (x, nxt)
                x = nxt + 1
                i += 1
        return best


def _pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj)
    return out


def _check_cid(container_id: str) -> None:
    if not container_id or len(container_id) > 256 or "/" in container_id:
        raise ConfigError(f"invalid container id {container_id!r}")


def parse_address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except (ValueError, ipaddress.AddressValueError) as err:
        raise ConfigError(f"invalid address {text!r}: {err}") from None

