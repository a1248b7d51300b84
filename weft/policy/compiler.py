"""The NetworkPolicy compiler: cluster view + this node -> what the kernel must enforce here.

Pure: no I/O, no clock. The output, :class:`DesiredState`, is data shaped for nftables sets, so
that the rule list never depends on pods or policies (weft.policy.nft renders the ruleset):

* per direction, the set of isolated local pod addresses (a pod is isolated for ingress when a
  policy of its namespace selects it and lists Ingress in its policyTypes; egress likewise);
* per direction, the allowed flows as set elements keyed by address, protocol and port:
  :class:`AllowAll` (local address . peer range: every protocol and port) and
  :class:`AllowPorts` (local address . peer range . protocol . port range). For ingress the local
  address is the destination and the peer the source; for egress the other way round.

Only this node's pods are programmed (their chains, so to speak, are the elements keyed by their
addresses); peers are every pod of the cluster, local or remote, and ipBlocks. Named ports are
resolved per destination pod: for ingress on the local pod, for egress on each peer pod (a peer that
is not a pod has no named ports, so a named port never matches it).

Elements of one set never overlap (nftables rejects overlapping intervals in a concatenated set):
:func:`_disjoint_ranges` and :func:`_disjoint_rectangles` merge what several rules allow into
disjoint pieces. :class:`Grant` keeps, per local pod, what each policy rule allowed and why; the
elements are derived from the grants, and an explain command (not built yet) is to read them.

Always allowed, and therefore part of the fixed ruleset rather than of this state: replies of
allowed connections (conntrack established/related), IPv6 neighbour discovery, traffic from the
pod's own node (``node_addresses``) and a pod's traffic to itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from weft.policy.model import (
    ClusterView,
    IPAddress,
    IPNetwork,
    NetworkPolicy,
    Pod,
    PodRef,
    PolicyPeer,
    PolicyPort,
    PolicyRef,
    PolicyRule,
    Protocol,
)

__all__ = [
    "AddrRange",
    "AllowAll",
    "AllowPorts",
    "DesiredState",
    "Direction",
    "DirectionState",
    "Grant",
    "PodPolicy",
    "PortCell",
    "PortRange",
    "compile_pod",
    "compile_policy",
]

Direction = Literal["ingress", "egress"]
_MAX: Final = {4: (1 << 32) - 1, 6: (1 << 128) - 1}


@dataclass(frozen=True, order=True)
class AddrRange:
    """An inclusive range of addresses of one family (a host, a CIDR, or a CIDR minus excepts)."""

    version: int
    first: int
    last: int

    @classmethod
    def host(cls, address: IPAddress) -> AddrRange:
        return cls(address.version, int(address), int(address))

    @classmethod
    def network(cls, net: IPNetwork) -> AddrRange:
        return cls(net.version, int(net.network_address), int(net.broadcast_address))

    @classmethod
    def everything(cls, version: int) -> AddrRange:
        return cls(version, 0, _MAX[version])

    def contains(self, address: IPAddress) -> bool:
        return address.version == self.version and self.first <= int(address) <= self.last

    def start(self) -> IPAddress:
        return ipaddress.ip_address(self.first) if self.version == 4 else _v6(self.first)

    def end(self) -> IPAddress:
        return ipaddress.ip_address(self.last) if self.version == 4 else _v6(self.last)

    def __str__(self) -> str:
        """nftables notation: ``10.0.0.5``, ``10.0.0.0/8`` or ``10.0.0.3-10.0.0.9``."""
        if self.first == self.last:
            return str(self.start())
        size = self.last - self.first + 1
        if size & (size - 1) == 0 and self.first % size == 0:
            bits = 32 if self.version == 4 else 128
            return f"{self.start()}/{bits - size.bit_length() + 1}"
        return f"{self.start()}-{self.end()}"


def _v6(value: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(value)


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


ALL_PORTS: Final = PortRange(0, 65535)


@dataclass(frozen=True, order=True)
class PortCell:
    """Peers in ``peer`` may use ``protocol`` ports ``ports``."""

    peer: AddrRange
    protocol: Protocol
    ports: PortRange


@dataclass(frozen=True)
class Grant:
    """What one policy rule allows one local pod: ``all_peers`` on every protocol and port, and
    ``cells`` on the listed ones. Empty means the rule matched nothing for this pod (e.g. a named
    port the pod does not have); it is kept so explain can say so."""

    policy: PolicyRef
    direction: Direction
    rule: int  # index in spec.ingress / spec.egress
    all_peers: tuple[AddrRange, ...]
    cells: tuple[PortCell, ...]
    peers: str  # for people: "namespaceSelector {...} AND podSelector {...}; ipBlock ..."
    ports: str  # for people: "80/TCP, dns/UDP" or "all"

    def allows(self, peer: IPAddress, protocol: str | None, port: int | None) -> bool:
        if any(r.contains(peer) for r in self.all_peers):
            return True
        return any(
            c.protocol == protocol
            and port is not None
            and c.ports.first <= port <= c.ports.last
            and c.peer.contains(peer)
            for c in self.cells
        )


@dataclass(frozen=True)
class PodPolicy:
    """One local pod: which policies isolate it each way, and what their rules grant it."""

    pod: PodRef
    addresses: tuple[IPAddress, ...]
    ingress_policies: tuple[PolicyRef, ...]  # empty: not isolated for ingress
    egress_policies: tuple[PolicyRef, ...]
    grants: tuple[Grant, ...]

    def isolated(self, direction: Direction) -> bool:
        return bool(self.ingress_policies if direction == "ingress" else self.egress_policies)

    def grants_for(self, direction: Direction) -> tuple[Grant, ...]:
        return tuple(g for g in self.grants if g.direction == direction)


@dataclass(frozen=True, order=True)
class AllowAll:
    """Set element ``local . peer``: every protocol and port."""

    local: AddrRange  # always a single host; an AddrRange so that elements sort across families
    peer: AddrRange


@dataclass(frozen=True, order=True)
class AllowPorts:
    """Set element ``local . peer . protocol . ports``."""

    local: AddrRange
    peer: AddrRange
    protocol: Protocol
    ports: PortRange


@dataclass(frozen=True)
class DirectionState:
    isolated: tuple[AddrRange, ...] = ()  # hosts, sorted
    allow_all: tuple[AllowAll, ...] = ()  # sorted; disjoint per local address
    allow_ports: tuple[AllowPorts, ...] = ()  # sorted; disjoint per local address and protocol


@dataclass(frozen=True)
class DesiredState:
    """Everything this node's kernel must hold; equal views give equal states (deterministic)."""

    node: str
    node_addresses: tuple[AddrRange, ...]  # hosts, sorted: always allowed to reach local pods
    local_addresses: tuple[AddrRange, ...]  # every local pod's addresses (a pod to itself)
    pods: tuple[PodPolicy, ...]  # sorted by pod
    ingress: DirectionState
    egress: DirectionState

    def direction(self, direction: Direction) -> DirectionState:
        return self.ingress if direction == "ingress" else self.egress


# ---------------------------------------------------------------------- peers


@dataclass(frozen=True)
class _Peers:
    """A rule's peers resolved against the view: ranges to match, pods for named ports."""

    ranges: tuple[AddrRange, ...]  # disjoint
    pods: tuple[Pod, ...]  # pods whose addresses lie in ``ranges`` (named-port destinations)


def _subtract(rng: tuple[int, int], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    pieces = [rng]
    for lo, hi in holes:
        out: list[tuple[int, int]] = []
        for a, b in pieces:
            if hi < a or lo > b:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo - 1))
            if hi < b:
                out.append((hi + 1, b))
        pieces = out
    return pieces


def _peer_matches(view: ClusterView, policy: NetworkPolicy, peer: PolicyPeer, pod: Pod) -> bool:
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not peer.namespace_selector.matches(view.namespace_labels(pod.namespace)):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(pod.labels)


def _resolve_peers(view: ClusterView, policy: NetworkPolicy, rule: PolicyRule) -> _Peers:
    if not rule.peers:  # absent or empty from/to: everyone, inside the cluster or not
        return _Peers((AddrRange.everything(4), AddrRange.everything(6)), view.pods)
    ranges: list[AddrRange] = []
    for peer in rule.peers:
        if peer.ip_block is not None:
            block = peer.ip_block
            whole = AddrRange.network(block.cidr)
            holes = [(int(e.network_address), int(e.broadcast_address)) for e in block.excepts]
            for lo, hi in _subtract((whole.first, whole.last), holes):
                ranges.append(AddrRange(whole.version, lo, hi))
    selected = {
        p.ref: p
        for peer in rule.peers
        if peer.ip_block is None
        for p in view.pods
        if _peer_matches(view, policy, peer, p)
    }
    for pod in selected.values():
        ranges.extend(AddrRange.host(a) for a in pod.ips)
    merged = _disjoint_ranges(ranges)
    # pods reached through an ipBlock are destinations too (named ports on egress)
    dests = [p for p in view.pods if p.ref in selected or any(_in(merged, a) for a in p.ips)]
    return _Peers(tuple(merged), tuple(dests))


def _in(ranges: Sequence[AddrRange], address: IPAddress) -> bool:
    return any(r.contains(address) for r in ranges)


def _describe_peers(rule: PolicyRule) -> str:
    if not rule.peers:
        return "all sources and destinations (no from/to)"
    return "; ".join(p.describe() for p in rule.peers)


def _describe_ports(rule: PolicyRule) -> str:
    if not rule.ports:
        return "all ports and protocols"
    return ", ".join(p.describe() for p in rule.ports)


def _port_range(port: PolicyPort, dest: Pod) -> PortRange | None:
    """``port`` as a range on destination ``dest``; None when ``dest`` lacks the named port."""
    if port.port is None:
        return ALL_PORTS
    if isinstance(port.port, str):
        number = dest.named_port(port.port, port.protocol)
        return None if number is None else PortRange(number, number)
    return PortRange(port.port, port.end_port if port.end_port is not None else port.port)


# ---------------------------------------------------------------------- grants


def _grant(
    view: ClusterView,
    policy: NetworkPolicy,
    direction: Direction,
    index: int,
    rule: PolicyRule,
    peers: _Peers,
    target: Pod,
) -> Grant:
    all_peers: tuple[AddrRange, ...] = ()
    cells: list[PortCell] = []
    families = {a.version for a in target.ips}
    ranges = [r for r in peers.ranges if r.version in families]
    if not rule.ports:
        all_peers = tuple(ranges)
    else:
        for port in rule.ports:
            if direction == "ingress" or not isinstance(port.port, str):
                # ingress: the destination is the target; egress numeric: same on every peer
                rng = _port_range(port, target)
                if rng is not None:
                    cells.extend(PortCell(r, port.protocol, rng) for r in ranges)
                continue
            for dest in peers.pods:  # egress to a named port: resolved on each destination pod
                rng = _port_range(port, dest)
                if rng is None:
                    continue
                cells.extend(
                    PortCell(AddrRange.host(a), port.protocol, rng)
                    for a in dest.ips
                    if a.version in families and _in(ranges, a)
                )
    return Grant(
        policy.ref,
        direction,
        index,
        all_peers,
        tuple(sorted(set(cells))),
        _describe_peers(rule),
        _describe_ports(rule),
    )


class _PeerCache:
    """A rule's peers do not depend on the target pod: resolve each rule once per compile."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self._cache: dict[tuple[PolicyRef, Direction, int], _Peers] = {}

    def get(
        self, policy: NetworkPolicy, direction: Direction, index: int, rule: PolicyRule
    ) -> _Peers:
        key = (policy.ref, direction, index)
        if key not in self._cache:
            self._cache[key] = _resolve_peers(self.view, policy, rule)
        return self._cache[key]


def _compile_pod(view: ClusterView, pod: Pod, cache: _PeerCache) -> PodPolicy:
    ingress: list[PolicyRef] = []
    egress: list[PolicyRef] = []
    grants: list[Grant] = []
    for policy in view.policies:
        if policy.namespace != pod.namespace or not policy.pod_selector.matches(pod.labels):
            continue
        # Rules of a direction the policy does not list in policyTypes are ignored (API).
        if policy.affects_ingress:
            ingress.append(policy.ref)
            for i, rule in enumerate(policy.ingress):
                peers = cache.get(policy, "ingress", i, rule)
                grants.append(_grant(view, policy, "ingress", i, rule, peers, pod))
        if policy.affects_egress:
            egress.append(policy.ref)
            for i, rule in enumerate(policy.egress):
                peers = cache.get(policy, "egress", i, rule)
                grants.append(_grant(view, policy, "egress", i, rule, peers, pod))
    return PodPolicy(pod.ref, pod.ips, tuple(ingress), tuple(egress), tuple(grants))


def compile_pod(view: ClusterView, pod: Pod) -> PodPolicy:
    """The isolation and grants of one pod (any node's); what an explain reads."""
    return _compile_pod(view, pod, _PeerCache(view))


# ---------------------------------------------------------------------- flattening


def _disjoint_ranges(ranges: Iterable[AddrRange]) -> list[AddrRange]:
    """Union of ``ranges`` as sorted, disjoint, non-adjacent ranges (per family)."""
    out: list[AddrRange] = []
    for r in sorted(ranges):
        if out and out[-1].version == r.version and r.first <= out[-1].last + 1:
            if r.last > out[-1].last:
                out[-1] = AddrRange(r.version, out[-1].first, r.last)
            continue
        out.append(r)
    return out


def _merge_ports(ports: Iterable[PortRange]) -> tuple[PortRange, ...]:
    out: list[PortRange] = []
    for p in sorted(ports):
        if out and p.first <= out[-1].last + 1:
            if p.last > out[-1].last:
                out[-1] = PortRange(out[-1].first, p.last)
            continue
        out.append(p)
    return tuple(out)


def _disjoint_rectangles(
    cells: Sequence[tuple[AddrRange, PortRange]],
) -> Iterator[tuple[AddrRange, PortRange]]:
    """The union of peer x port rectangles (one family) as disjoint rectangles.

    A sweep over the peer axis: between two consecutive rectangle edges the set of covering port
    ranges is constant; equal neighbouring strips are merged. O(n log n) for the usual case of
    few overlapping rectangles.
    """
    if not cells:
        return
    version = cells[0][0].version
    events: dict[int, list[tuple[int, PortRange]]] = {}
    for peer, ports in cells:
        events.setdefault(peer.first, []).append((1, ports))
        events.setdefault(peer.last + 1, []).append((-1, ports))
    active: dict[PortRange, int] = {}
    strip_start: int | None = None
    strip_ports: tuple[PortRange, ...] = ()
    for x in sorted(events):
        for delta, ports in events[x]:
            active[ports] = active.get(ports, 0) + delta
            if active[ports] == 0:
                del active[ports]
        now = _merge_ports(active)
        if now == strip_ports:
            continue
        if strip_start is not None and strip_ports:
            for p in strip_ports:
                yield AddrRange(version, strip_start, x - 1), p
        strip_start, strip_ports = x, now


def _flatten(pods: Sequence[PodPolicy], direction: Direction) -> DirectionState:
    isolated: list[AddrRange] = []
    allow_all: list[AllowAll] = []
    allow_ports: list[AllowPorts] = []
    for pp in pods:
        if not pp.isolated(direction):
            continue
        grants = pp.grants_for(direction)
        for address in pp.addresses:
            local = AddrRange.host(address)
            isolated.append(local)
            every = [r for g in grants for r in g.all_peers if r.version == address.version]
            allow_all.extend(AllowAll(local, r) for r in _disjoint_ranges(every))
            by_proto: dict[Protocol, list[tuple[AddrRange, PortRange]]] = {}
            for g in grants:
                for c in g.cells:
                    if c.peer.version == address.version:
                        by_proto.setdefault(c.protocol, []).append((c.peer, c.ports))
            for proto, rects in sorted(by_proto.items()):
                allow_ports.extend(
                    AllowPorts(local, peer, proto, ports)
                    for peer, ports in _disjoint_rectangles(rects)
                )
    return DirectionState(
        tuple(sorted(set(isolated))), tuple(sorted(set(allow_all))), tuple(sorted(allow_ports))
    )


def compile_policy(
    view: ClusterView, node: str, node_addresses: Iterable[IPAddress] = ()
) -> DesiredState:
    """The desired enforcement state of node ``node``: its pods only (``Pod.node == node``).

    ``node_addresses`` are the node's own addresses (its InternalIP and the address it has on the
    weft bridge): traffic from them to local pods is always allowed (kubelet probes).
    """
    cache = _PeerCache(view)
    local = [p for p in view.pods if p.node == node]
    pods = tuple(_compile_pod(view, p, cache) for p in sorted(local, key=lambda p: p.ref))
    return DesiredState(
        node=node,
        node_addresses=tuple(sorted({AddrRange.host(a) for a in node_addresses})),
        local_addresses=tuple(sorted({AddrRange.host(a) for p in local for a in p.ips})),
        pods=pods,
        ingress=_flatten(pods, "ingress"),
        egress=_flatten(pods, "egress"),
    )
