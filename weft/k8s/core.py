"""Kubernetes peer discovery, the decisions: no I/O, time passed in.

The node list is the peer list: every node runs one router (a DaemonSet), reachable at the node's
``InternalIP`` on the control port. :class:`NodeView` keeps the nodes from a LIST and the WATCH
events after it and says which targets the router should dial; :func:`choose_reclaims` says which
dead peers' IPAM space this router takes over; :class:`ApiHealth` paces retries against an API
server that does not answer and says when to log (once per state change, never per retry).

Node -> peer name. A router in ``--k8s`` mode takes its peer name from its node's name
(:func:`peer_name_for_node`), so any router can tell which peer a deleted node ran without writing
anything to the API server (the ClusterRole only reads nodes) and without the dead router's help.

Reclaiming a deleted node's space (Weave Net left it "unreachable" until an operator ran
``weave rmpeer``). A peer is an orphan when it owns IPAM space, is no listed node's peer and is not
reachable over the mesh. Exactly one router takes an orphan over: the lowest-named peer among the
listed nodes that this router can reach (itself included), and only while those are a strict
majority of the listed nodes. All routers derive the same answer from the same node list and mesh
view; a router cut off from the majority (a partition) never reclaims, so the two sides of a
split cannot both take the same space. Level-triggered: the decision is re-evaluated on every
change and periodically, so a router that restarts, or a deletion seen while the reclaimer was
down, is handled the same way.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import PeerName
from weft.hostport import DEFAULT_PORT, format_hostport

__all__ = [
    "ApiHealth",
    "ApiRecovered",
    "ApiUnreachable",
    "K8sConfig",
    "K8sEvent",
    "Node",
    "NodeDeleted",
    "NodeView",
    "TargetsChanged",
    "choose_reclaims",
    "parse_node",
    "peer_name_for_node",
]

_NAME_LABEL: Final = b"weft-k8s-node-v1:"


def peer_name_for_node(node_name: str) -> PeerName:
    """The peer name of the router on ``node_name``: 48 bits of SHA-256, locally administered."""
    if not node_name:
        raise ConfigError("the Kubernetes node name is empty (set NODE_NAME from spec.nodeName)")
    digest = hashlib.sha256(_NAME_LABEL + node_name.encode()).digest()
    value = int.from_bytes(digest[:6], "big")
    value = (value | (0x02 << 40)) & ~(0x01 << 40)  # locally administered, unicast (as MACs)
    return PeerName(value)


@dataclass(frozen=True)
class K8sConfig:
    """``--k8s`` settings (seconds for durations).

    * ``node_name`` — this router's node (the DaemonSet passes ``spec.nodeName`` as NODE_NAME);
      its own address is never a target.
    * ``port`` — 6783: the control port every router listens on.
    * ``api_url`` — None: in-cluster configuration (service account), else this URL (tests,
      or a router outside the cluster with ``kubeconfig`` None).
    * ``kubeconfig`` — None: when set (and no ``api_url``), read the API server and credentials
      from this file.
    * ``label_selector`` — None: only nodes matching it are peers (e.g. ``weft=yes``).
    * ``watch_timeout`` — 300: a watch asks the server to end after this long; then we list again.
    * ``request_timeout`` — 30: bound for one LIST.
    * ``retry_initial`` / ``retry_max`` — 1 / 60: backoff between failed attempts doubles from
      the first up to the second, with jitter (x0.5..1.5).
    * ``reclaim_interval`` — 10: how often orphaned IPAM space is looked for besides on events.
    * ``network_policy`` — True: enforce NetworkPolicy on this node's pods
      (``--no-network-policy`` turns it off; weft/k8s/netpol.py).
    """

    node_name: str
    port: int = DEFAULT_PORT
    api_url: str | None = None
    kubeconfig: str | None = None
    label_selector: str | None = None
    watch_timeout: int = 300
    request_timeout: float = 30.0
    retry_initial: float = 1.0
    retry_max: float = 60.0
    reclaim_interval: float = 10.0
    network_policy: bool = True

    def __post_init__(self) -> None:
        peer_name_for_node(self.node_name)  # non-empty
        if not 0 < self.port < 65536:
            raise ConfigError(f"--k8s port {self.port} out of range 1..65535")
        if self.watch_timeout < 1:
            raise ConfigError("k8s watch_timeout must be at least 1 second")
        for label in ("request_timeout", "retry_initial", "retry_max", "reclaim_interval"):
            if not getattr(self, label) > 0:
                raise ConfigError(f"k8s {label} must be positive")
        if self.retry_max < self.retry_initial:
            raise ConfigError("k8s retry_max must be at least retry_initial")


@dataclass(frozen=True)
class Node:
    """What discovery needs from a Node object."""

    name: str
    internal_ip: str | None  # None while the kubelet has not reported one

    @property
    def peer(self) -> PeerName:
        return peer_name_for_node(self.name)


def parse_node(obj: Any) -> Node:
    """A Node from the API's JSON (``metadata.name``, ``status.addresses[type=InternalIP]``).

    RemoteProtocolError when the object is not a node as the API server sends it.
    """
    if not isinstance(obj, Mapping):
        raise RemoteProtocolError("node object is not a JSON object")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise RemoteProtocolError("node object has no metadata.name")
    status = obj.get("status") or {}
    addresses = status.get("addresses") if isinstance(status, Mapping) else None
    ip: str | None = None
    for entry in addresses or []:
        if (
            isinstance(entry, Mapping)
            and entry.get("type") == "InternalIP"
            and isinstance(entry.get("address"), str)
        ):
            try:
                parsed = ipaddress.ip_address(entry["address"])
            except ValueError:
                continue
            if ip is None or (parsed.version == 4 and ":" in ip):  # prefer IPv4
                ip = str(parsed)
    return Node(name, ip)


# ---------------------------------------------------------------------- events


@dataclass(frozen=True)
class TargetsChanged:
    """The addresses to dial changed (``host:port``, sorted, our own node excluded)."""

    targets: tuple[str, ...]


@dataclass(frozen=True)
class NodeDeleted:
    name: str
    peer: PeerName


@dataclass(frozen=True)
class ApiUnreachable:
    """The API server stopped answering (first failure after success, or at start)."""

    reason: str


@dataclass(frozen=True)
class ApiRecovered:
    """The API server answers again after ``failures`` failed attempts."""

    failures: int


K8sEvent = TargetsChanged | NodeDeleted | ApiUnreachable | ApiRecovered


class NodeView:
    """The nodes as last listed and watched; produces :class:`TargetsChanged` / NodeDeleted."""

    def __init__(self, config: K8sConfig) -> None:
        self.config = config
        self.nodes: dict[str, Node] = {}
        self.synced = False  # a LIST has been applied
        self._targets: tuple[str, ...] = ()
        self._events: deque[K8sEvent] = deque()

    def next_event(self) -> K8sEvent | None:
        return self._events.popleft() if self._events else None

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    def peers(self) -> set[PeerName]:
        """The peer names of every listed node (ours included)."""
        return {n.peer for n in self.nodes.values()}

    def listed(self, items: Iterable[Any]) -> None:
        """Replace the view by a LIST's items (a RemoteProtocolError leaves it unchanged)."""
        fresh = {}
        for obj in items:
            node = parse_node(obj)
            fresh[node.name] = node
        for name in sorted(set(self.nodes) - set(fresh)):
            self._events.append(NodeDeleted(name, self.nodes[name].peer))
        self.nodes = fresh
        self.synced = True
        self._recompute()

    def watched(self, kind: str, obj: Any) -> None:
        """Apply one WATCH event (``ADDED``, ``MODIFIED``, ``DELETED``; ``BOOKMARK`` ignored)."""
        if kind == "BOOKMARK":
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise RemoteProtocolError(f"unexpected watch event type {kind!r}")
        node = parse_node(obj)
        if kind == "DELETED":
            if self.nodes.pop(node.name, None) is not None:
                self._events.append(NodeDeleted(node.name, node.peer))
        else:
            self.nodes[node.name] = node
        self._recompute()

    def _recompute(self) -> None:
        targets = tuple(
            sorted(
                format_hostport(n.internal_ip, self.config.port)
                for n in self.nodes.values()
                if n.internal_ip is not None and n.name != self.config.node_name
            )
        )
        if targets != self._targets:
            self._targets = targets
            self._events.append(TargetsChanged(targets))


def choose_reclaims(
    local: PeerName,
    node_peers: Iterable[PeerName],
    owners: Mapping[PeerName, int],
    reachable: Iterable[PeerName],
) -> list[PeerName]:
    """The orphaned peers whose space ``local`` must take over now (usually none).

    ``node_peers``: the peers of the listed nodes; ``owners``: peers owning IPAM space (how many
    addresses); ``reachable``: peers reachable over the mesh. See the module docstring.
    """
    listed = set(node_peers)
    if local not in listed:
        return []  # our own node is not listed (yet): we do not decide for others
    live = (set(reachable) | {local}) & listed
    if 2 * len(live) <= len(listed):
        return []  # not in touch with a majority of the nodes: maybe partitioned
    if min(live) != local:
        return []
    seen = set(reachable) | {local}
    return sorted(p for p, owned in owners.items() if owned > 0 and p not in listed | seen)


class ApiHealth:
    """Backoff and state-change logging for API failures (``rng`` for the jitter)."""

    def __init__(self, config: K8sConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.ok: bool | None = None  # None until the first attempt ends
        self.failures = 0
        self.last_error: str | None = None
        self.since: float | None = None  # when the current state began

    def succeeded(self, now: float) -> ApiRecovered | None:
        """An attempt worked; returns an event when this ends a failing state."""
        event = ApiRecovered(self.failures) if self.ok is False else None
        if self.ok is not True:
            self.since = now
        self.ok = True
        self.failures = 0
        return event

    def failed(self, reason: str, now: float) -> tuple[float, ApiUnreachable | None]:
        """An attempt failed: the delay before the next one, and an event on a state change."""
        event = ApiUnreachable(reason) if self.ok is not False else None
        if self.ok is not False:
            self.since = now
        self.ok = False
        self.failures += 1
        self.last_error = reason
        base = min(self.config.retry_max, self.config.retry_initial * 2 ** (self.failures - 1))
        return min(self.config.retry_max, base * (0.5 + self.rng.random())), event
