"""``weft policy explain``: is one flow allowed, and which policies and rules decide it (pure).

Read from the compiler's own output (:func:`weft.policy.compiler.compile_pod` and its
:class:`~weft.policy.compiler.Grant` records), the same one the kernel's set elements are derived
from, so an explanation and the enforcement cannot disagree. A flow is allowed when

* it is always allowed: a pod to itself, or a node's own address to a pod on that node (kubelet
  probes); or else
* the source pod's egress allows it (a pod that no policy isolates for egress, or an address that
  is not a pod, has no egress to check) AND the destination pod's ingress allows it (likewise).

A flow without a port (``port=None``) is one no port can match (ICMP, say): only rules that allow
every port and protocol allow it; rules that allow the peer on some ports are listed as
``other_ports`` so the answer still shows what is open. Replies of allowed connections and IPv6
neighbour discovery always pass and are not asked about here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from weft.errors import ConfigError
from weft.policy.compiler import Direction, Grant, compile_pod
from weft.policy.model import PROTOCOLS, ClusterView, IPAddress, Pod, PodRef, PolicyRef

__all__ = ["DirectionVerdict", "Endpoint", "RuleMatch", "Verdict", "explain", "parse_endpoint"]

_NO_NODES: Final[Mapping[str, Iterable[IPAddress]]] = {}


@dataclass(frozen=True)
class Endpoint:
    """One end of the flow: an address, and the pod that has it (None: not a pod's address)."""

    address: IPAddress
    pod: PodRef | None = None
    node: str | None = None

    def describe(self) -> str:
        return str(self.address) if self.pod is None else f"{self.pod} ({self.address})"

    def to_json(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "pod": None if self.pod is None else str(self.pod),
            "node": self.node,
        }


@dataclass(frozen=True)
class RuleMatch:
    """One rule of one policy, as people read it (from the compiler's Grant)."""

    policy: PolicyRef
    direction: Direction
    rule: int  # index in spec.ingress / spec.egress
    peers: str
    ports: str

    @classmethod
    def of(cls, grant: Grant) -> RuleMatch:
        return cls(grant.policy, grant.direction, grant.rule, grant.peers, grant.ports)

    def describe(self) -> str:
        way = "from" if self.direction == "ingress" else "to"
        return (
            f"{self.policy} {self.direction} rule {self.rule}: {way} {self.peers}; "
            f"ports {self.ports}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": str(self.policy),
            "direction": self.direction,
            "rule": self.rule,
            "peers": self.peers,
            "ports": self.ports,
        }


@dataclass(frozen=True)
class DirectionVerdict:
    """Egress of the source pod or ingress of the destination pod."""

    direction: Direction
    pod: PodRef | None  # whose isolation counts; None: that end is not a pod
    isolated_by: tuple[PolicyRef, ...]  # empty: not isolated this way, everything passes
    allowed_by: tuple[RuleMatch, ...]
    other_ports: tuple[RuleMatch, ...]  # rules allowing the peer, but not on this port/protocol
    allowed: bool
    reason: str

    @property
    def isolated(self) -> bool:
        return bool(self.isolated_by)

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "pod": None if self.pod is None else str(self.pod),
            "isolated": self.isolated,
            "isolated_by": [str(p) for p in self.isolated_by],
            "allowed": self.allowed,
            "allowed_by": [r.to_json() for r in self.allowed_by],
            "other_ports": [r.to_json() for r in self.other_ports],
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    source: Endpoint
    destination: Endpoint
    protocol: str | None  # None with port None: every port and protocol
    port: int | None
    allowed: bool
    always_allowed: str | None  # why the flow passes whatever the policies, or None
    egress: DirectionVerdict
    ingress: DirectionVerdict
    reason: str

    @property
    def flow(self) -> str:
        return _flow(self.protocol, self.port)

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "verdict": "allowed" if self.allowed else "denied",
            "reason": self.reason,
            "source": self.source.to_json(),
            "destination": self.destination.to_json(),
            "protocol": self.protocol,
            "port": self.port,
            "flow": self.flow,
            "always_allowed": self.always_allowed,
            "egress": self.egress.to_json(),
            "ingress": self.ingress.to_json(),
        }


def _flow(protocol: str | None, port: int | None) -> str:
    if port is not None:
        return f"{protocol}/{port}"
    return protocol if protocol is not None else "every port and protocol"


# ---------------------------------------------------------------------- input


def parse_endpoint(value: str | PodRef | IPAddress, what: str = "endpoint") -> PodRef | IPAddress:
    """``NAMESPACE/POD`` or an IP address (as text or already parsed); ConfigError otherwise."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    namespace, sep, name = text.partition("/")
    if sep and namespace and name and "/" not in name:
        return PodRef(namespace, name)
    raise ConfigError(f"{what} {value!r} is neither NAMESPACE/POD nor an IP address")


def _resolve(view: ClusterView, target: PodRef | IPAddress) -> tuple[Pod | None, IPAddress | None]:
    if isinstance(target, PodRef):
        pod = view.pod(target.namespace, target.name)
        if pod is None:
            raise ConfigError(
                f"no pod {target} in the cluster view (pods that finished, have no address yet"
                " or use the host's network are not in it)"
            )
        return pod, None
    found = view.pods_at(target)
    return (found[0] if found else None), target


def _endpoints(
    view: ClusterView, source: PodRef | IPAddress, destination: PodRef | IPAddress
) -> tuple[Endpoint, Endpoint]:
    src_pod, src_addr = _resolve(view, source)
    dst_pod, dst_addr = _resolve(view, destination)
    if src_pod is None and dst_pod is None:
        raise ConfigError(
            f"neither {source} nor {destination} is a pod's address: no NetworkPolicy decides"
            " between them"
        )
    if src_addr is not None and dst_addr is not None and src_addr.version != dst_addr.version:
        raise ConfigError(f"{src_addr} and {dst_addr} are of different IP families")
    fixed = src_addr or dst_addr
    # two pods by name: IPv4 first, else their common family
    families = [fixed.version] if fixed is not None else [4, 6]

    def pick(pod: Pod | None, addr: IPAddress | None) -> IPAddress | None:
        if addr is not None:
            return addr
        assert pod is not None
        for version in families:
            for a in pod.ips:
                if a.version == version and all(
                    any(b.version == version for b in other.ips)
                    for other in (src_pod, dst_pod)
                    if other is not None
                ):
                    return a
        return None

    src_ip, dst_ip = pick(src_pod, src_addr), pick(dst_pod, dst_addr)
    if src_ip is None or dst_ip is None:
        raise ConfigError(f"{source} and {destination} have no address family in common")

    def endpoint(pod: Pod | None, address: IPAddress) -> Endpoint:
        return Endpoint(address) if pod is None else Endpoint(address, pod.ref, pod.node)

    return endpoint(src_pod, src_ip), endpoint(dst_pod, dst_ip)


def _protocol(protocol: str | None, port: int | None) -> str | None:
    if protocol is None:
        return "TCP" if port is not None else None
    name = protocol.strip().upper()
    if not name.isalnum():
        raise ConfigError(f"protocol {protocol!r} is not a protocol name like TCP, UDP or SCTP")
    if port is not None and name not in PROTOCOLS:
        raise ConfigError(f"{name} has no ports: give a port with TCP, UDP or SCTP only")
    if port is None and name in PROTOCOLS:
        raise ConfigError(f"{name} needs a port (leave the protocol out to ask for every port)")
    return name


# ---------------------------------------------------------------------- the verdict


def _direction(
    view: ClusterView,
    direction: Direction,
    local: Endpoint,
    peer: Endpoint,
    protocol: str | None,
    port: int | None,
) -> DirectionVerdict:
    way = "egress" if direction == "egress" else "ingress"
    if local.pod is None:
        return DirectionVerdict(
            direction, None, (), (), (), True, f"{local.address} is not a pod: no {way} to check"
        )
    pod = view.pod(local.pod.namespace, local.pod.name)
    assert pod is not None  # resolved from this view
    compiled = compile_pod(view, pod)
    isolated_by = compiled.ingress_policies if direction == "ingress" else compiled.egress_policies
    if not isolated_by:
        kind = "Ingress" if direction == "ingress" else "Egress"
        return DirectionVerdict(
            direction,
            local.pod,
            (),
            (),
            (),
            True,
            f"{local.pod} is not isolated for {way} (no policy of namespace"
            f" {local.pod.namespace} selects it for {kind})",
        )
    allowed_by: list[RuleMatch] = []
    other_ports: list[RuleMatch] = []
    for grant in compiled.grants_for(direction):
        if grant.allows(peer.address, protocol, port):
            allowed_by.append(RuleMatch.of(grant))
        elif any(c.peer.contains(peer.address) for c in grant.cells):
            other_ports.append(RuleMatch.of(grant))
    names = ", ".join(map(str, isolated_by))
    if allowed_by:
        rules = ", ".join(f"{r.policy} {way} rule {r.rule}" for r in allowed_by)
        reason = f"{local.pod} is isolated for {way} by {names}; allowed by {rules}"
    else:
        reason = (
            f"{local.pod} is isolated for {way} by {names}; no rule allows {peer.address}"
            f" {_flow(protocol, port)}"
        )
    return DirectionVerdict(
        direction,
        local.pod,
        isolated_by,
        tuple(allowed_by),
        tuple(other_ports),
        bool(allowed_by),
        reason,
    )


def explain(
    view: ClusterView,
    source: str | PodRef | IPAddress,
    destination: str | PodRef | IPAddress,
    protocol: str | None = None,
    port: int | None = None,
    *,
    node_addresses: Mapping[str, Iterable[IPAddress]] = _NO_NODES,
) -> Verdict:
    """Whether a new connection ``source`` -> ``destination`` on ``protocol``/``port`` passes.

    ``source``/``destination``: ``NAMESPACE/POD`` or an address (text, PodRef or address). A pod
    named with two addresses uses the family of the other end (IPv4 between two named pods that
    have both). ``protocol`` defaults to TCP when a port is given; without a port the question is
    "every port and protocol" (or a portless protocol such as ICMP). ``node_addresses``: each
    node's own addresses, by node name (a node always reaches its own pods).

    Raises ConfigError for an unknown pod, text that is neither a pod nor an address, a flow
    between two addresses of which neither is a pod's, or a bad protocol or port.
    """
    if port is not None and (isinstance(port, bool) or not 1 <= port <= 65535):
        raise ConfigError(f"port {port!r} is not a port number 1..65535")
    proto = _protocol(protocol, port)
    src, dst = _endpoints(
        view, parse_endpoint(source, "source"), parse_endpoint(destination, "destination")
    )
    always: str | None = None
    if src.pod is not None and src.address == dst.address:
        always = f"same pod: {src.pod} always reaches itself"
    elif (
        dst.pod is not None
        and dst.node is not None
        and src.address in set(node_addresses.get(dst.node, ()))
    ):
        always = (
            f"{src.address} is an address of node {dst.node}, where {dst.pod} runs: a node"
            " always reaches its own pods (kubelet probes)"
        )
    egress = _direction(view, "egress", src, dst, proto, port)
    ingress = _direction(view, "ingress", dst, src, proto, port)
    flow = f"{src.describe()} -> {dst.describe()} {_flow(proto, port)}"
    if always is not None:
        allowed, reason = True, f"{flow}: allowed: {always}"
    elif egress.allowed and ingress.allowed:
        allowed, reason = True, f"{flow}: allowed: {egress.reason}; {ingress.reason}"
    else:
        allowed = False
        denied = [d.reason for d in (egress, ingress) if not d.allowed]
        reason = f"{flow}: denied: {'; '.join(denied)}"
    return Verdict(src, dst, proto, port, allowed, always, egress, ingress, reason)
