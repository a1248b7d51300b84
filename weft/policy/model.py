"""The cluster as NetworkPolicy sees it: namespaces, pods, policies; parsed from the API's JSON.

Input is the plain camelCase JSON dicts the API server returns (what kubernetes_asyncio gives with
``_preload_content=False`` or ``ApiClient.sanitize_for_serialization``). Each ``parse_*`` function
returns a frozen object or raises :class:`PolicyObjectError` naming the object and the field, so a
caller skips that one object and keeps the rest (:meth:`ClusterView.from_api` does exactly that).
Nothing here does I/O.

Semantics follow networking.k8s.io/v1 as the API server defines it:

* ``policyTypes`` absent or empty defaults to Ingress, plus Egress when the policy has egress rules
  (the API server's ``SetDefaults_NetworkPolicy``).
* A peer with both ``podSelector`` and ``namespaceSelector`` selects pods matching both (AND);
  separate peers are alternatives (OR). ``podSelector`` alone selects in the policy's namespace;
  ``namespaceSelector`` alone selects every pod of the matching namespaces.
* ``from``/``to`` absent or empty: every peer; ``ports`` absent or empty: every port and protocol.
  ``ingress``/``egress`` absent or empty: no rule, so nothing is allowed in that direction.
* A port's protocol defaults to TCP; a port without a number is every port of its protocol;
  ``endPort`` makes a range and needs a numeric ``port``.
* Namespaces are matched by their labels, which always include ``kubernetes.io/metadata.name``
  (the API server sets it; we set it too, so a namespace we have not seen yet still matches by
  name).
* Pods in phase Succeeded or Failed, pods without an IP and host-network pods are not in the view
  (their addresses are reused, or are the node's).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn

from weft.errors import ProtocolError

__all__ = [
    "NAMESPACE_NAME_LABEL",
    "PROTOCOLS",
    "ClusterView",
    "ContainerPort",
    "IPAddress",
    "IPBlock",
    "IPNetwork",
    "LabelSelector",
    "Namespace",
    "NetworkPolicy",
    "Pod",
    "PodRef",
    "PolicyObjectError",
    "PolicyPeer",
    "PolicyPort",
    "PolicyRef",
    "PolicyRule",
    "Requirement",
    "parse_label_selector",
    "parse_namespace",
    "parse_network_policy",
    "parse_pod",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["TCP", "UDP", "SCTP"]

NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
PROTOCOLS: Final[tuple[Protocol, ...]] = ("TCP", "UDP", "SCTP")
OPERATORS: Final = ("In", "NotIn", "Exists", "DoesNotExist")
_PORT_NAME: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME
_IGNORED_PHASES: Final = frozenset({"Succeeded", "Failed"})


class PolicyObjectError(ProtocolError):
    """An object from the API server that weft cannot use; the message names object and field.

    ``kind`` ("NetworkPolicy", "Pod", "Namespace"), ``ref`` ("namespace/name", or "name", or
    "?" when even the name is missing), ``field`` (a JSON path such as
    ``spec.ingress[0].ports[1].endPort``) and ``problem`` are kept for logs and metrics.
    """

    def __init__(self, kind: str, ref: str, field: str, problem: str) -> None:
        super().__init__(f"{kind} {ref}: {field}: {problem}")
        self.kind = kind
        self.ref = ref
        self.field = field
        self.problem = problem


# ---------------------------------------------------------------------- selectors


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry."""

    key: str
    operator: str  # one of OPERATORS
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":  # an absent key is "not in" (apimachinery labels.Selector)
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist

    def describe(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.operator}"
        return f"{self.key} {self.operator} ({', '.join(sorted(self.values))})"


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels AND matchExpressions; the empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.expressions
        )

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels] + [
            r.describe() for r in self.expressions
        ]
        return "{" + ", ".join(parts) + "}" if parts else "{} (all)"


# ---------------------------------------------------------------------- objects


@dataclass(frozen=True, order=True)
class _NamespacedRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodRef(_NamespacedRef):
    """A pod by namespace/name (a type of its own, so a policy's ref never stands for a pod's)."""


class PolicyRef(_NamespacedRef):
    """A NetworkPolicy by namespace/name."""


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerPort:
    name: str | None
    protocol: Protocol
    number: int


@dataclass(frozen=True)
class Pod:
    """A pod; ``ips`` sorted, at most one per family in practice (``status.podIPs``)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[IPAddress, ...] = ()
    phase: str = "Running"
    node: str | None = None
    host_network: bool = False
    ports: tuple[ContainerPort, ...] = ()

    @property
    def ref(self) -> PodRef:
        return PodRef(self.namespace, self.name)

    @property
    def active(self) -> bool:
        """Policies apply to it and select it: it has an address of its own that is live."""
        return bool(self.ips) and self.phase not in _IGNORED_PHASES and not self.host_network

    def named_port(self, name: str, protocol: str) -> int | None:
        """The number of the container port called ``name`` with ``protocol`` (first wins)."""
        for port in self.ports:
            if port.name == name and port.protocol == protocol:
                return port.number
        return None


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, address: IPAddress) -> bool:
        return (
            address.version == self.cidr.version
            and address in self.cidr
            and not any(address in e for e in self.excepts)
        )

    def describe(self) -> str:
        if not self.excepts:
            return f"ipBlock {self.cidr}"
        return f"ipBlock {self.cidr} except {', '.join(map(str, self.excepts))}"


@dataclass(frozen=True)
class PolicyPeer:
    """Exactly one of: ``ip_block``, or one or both selectors (both: AND)."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def describe(self) -> str:
        if self.ip_block is not None:
            return self.ip_block.describe()
        parts = []
        if self.namespace_selector is not None:
            parts.append(f"namespaceSelector {self.namespace_selector.describe()}")
        if self.pod_selector is not None:
            parts.append(f"podSelector {self.pod_selector.describe()}")
        return " AND ".join(parts)


@dataclass(frozen=True)
class PolicyPort:
    """``port`` None: every port of ``protocol``; a str is a named port; ``end_port`` a range."""

    protocol: Protocol = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    def describe(self) -> str:
        if self.port is None:
            return f"all/{self.protocol}"
        if self.end_port is not None:
            return f"{self.port}-{self.end_port}/{self.protocol}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class PolicyRule:
    """One ingress or egress rule; empty ``peers``: every peer; empty ``ports``: everything."""

    peers: tuple[PolicyPeer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    policy_types: tuple[str, ...] = ("Ingress",)  # after defaulting; "Ingress" and/or "Egress"

    @property
    def ref(self) -> PolicyRef:
        return PolicyRef(self.namespace, self.name)

    @property
    def affects_ingress(self) -> bool:
        return "Ingress" in self.policy_types

    @property
    def affects_egress(self) -> bool:
        return "Egress" in self.policy_types


@dataclass(frozen=True)
class ClusterView:
    """Everything the compiler reads. ``pods`` holds only active pods (see :attr:`Pod.active`)."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    pods: tuple[Pod, ...] = ()
    policies: tuple[NetworkPolicy, ...] = ()

    @classmethod
    def build(
        cls,
        namespaces: Iterable[Namespace] = (),
        pods: Iterable[Pod] = (),
        policies: Iterable[NetworkPolicy] = (),
    ) -> ClusterView:
        """A view from parsed objects: inactive pods dropped, deterministic order."""
        return cls(
            namespaces={n.name: n for n in sorted(namespaces, key=lambda n: n.name)},
            pods=tuple(sorted((p for p in pods if p.active), key=lambda p: p.ref)),
            policies=tuple(sorted(policies, key=lambda p: p.ref)),
        )

    @classmethod
    def from_api(
        cls,
        namespaces: Iterable[Any] = (),
        pods: Iterable[Any] = (),
        policies: Iterable[Any] = (),
    ) -> tuple[ClusterView, tuple[PolicyObjectError, ...]]:
        """Parse the API's items; a malformed object is skipped and its error returned."""
        errors: list[PolicyObjectError] = []
        parsed_ns: list[Namespace] = []
        parsed_pods: list[Pod] = []
        parsed_pols: list[NetworkPolicy] = []
        for obj in namespaces:
            try:
                parsed_ns.append(parse_namespace(obj))
            except PolicyObjectError as err:
                errors.append(err)
        for obj in pods:
            try:
                parsed_pods.append(parse_pod(obj))
            except PolicyObjectError as err:
                errors.append(err)
        for obj in policies:
            try:
                parsed_pols.append(parse_network_policy(obj))
            except PolicyObjectError as err:
                errors.append(err)
        return cls.build(parsed_ns, parsed_pods, parsed_pols), tuple(errors)

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        if ns is None:
            return {NAMESPACE_NAME_LABEL: name}
        return ns.labels

    def pod(self, namespace: str, name: str) -> Pod | None:
        for pod in self.pods:
            if pod.namespace == namespace and pod.name == name:
                return pod
        return None

    def pods_at(self, address: IPAddress) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if address in p.ips)


# ---------------------------------------------------------------------- parsing


class _Obj:
    """Error context for one object: ``fail(field, problem)`` raises naming it."""

    def __init__(self, kind: str, obj: Any, namespaced: bool) -> None:
        self.kind = kind
        self.ref = "?"
        if not isinstance(obj, Mapping):
            self.fail("", f"is a {type(obj).__name__}, not a JSON object")
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            self.fail("metadata", "missing or not an object")
        name = meta.get("name")
        namespace = meta.get("namespace") if namespaced else None
        if isinstance(name, str) and name:
            self.ref = name if not namespaced else f"{namespace or '?'}/{name}"
        else:
            self.fail("metadata.name", "missing or empty")
        if namespaced and not (isinstance(namespace, str) and namespace):
            self.fail("metadata.namespace", "missing or empty")
        self.name: str = name
        self.namespace: str = namespace if isinstance(namespace, str) else ""
        self.meta: Mapping[str, Any] = meta

    def fail(self, where: str, problem: str) -> NoReturn:
        raise PolicyObjectError(self.kind, self.ref, where or "(object)", problem)

    def mapping(self, value: Any, where: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(where, f"expected an object, got {type(value).__name__}")
        return value

    def array(self, value: Any, where: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(where, f"expected an array, got {type(value).__name__}")
        return value

    def string_map(self, value: Any, where: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, val in self.mapping(value, where).items():
            if not isinstance(key, str) or not isinstance(val, str):
                self.fail(f"{where}.{key}", "label keys and values must be strings")
            out[key] = val
        return out

    def port_number(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(where, f"{value!r} is not a port number 1..65535")
        return int(value)

    def protocol(self, value: Any, where: str) -> Protocol:
        if value is None:
            return "TCP"
        for proto in PROTOCOLS:
            if value == proto:
                return proto
        return self.fail(where, f"{value!r} is not one of TCP, UDP, SCTP")

    def address(self, value: Any, where: str) -> IPAddress:
        if not isinstance(value, str):
            self.fail(where, f"expected an IP address string, got {type(value).__name__}")
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            return self.fail(where, f"{value!r} is not an IP address")

    def network(self, value: Any, where: str) -> IPNetwork:
        if not isinstance(value, str) or "/" not in value:
            self.fail(where, f"{value!r} is not a CIDR")
        try:
            return ipaddress.ip_network(value, strict=False)  # as Go's ParseCIDR: host bits masked
        except ValueError:
            return self.fail(where, f"{value!r} is not a CIDR")


def _selector(ctx: _Obj, value: Any, where: str) -> LabelSelector:
    raw = ctx.mapping(value, where)
    labels = ctx.string_map(raw.get("matchLabels"), f"{where}.matchLabels")
    reqs: list[Requirement] = []
    for i, expr in enumerate(ctx.array(raw.get("matchExpressions"), f"{where}.matchExpressions")):
        at = f"{where}.matchExpressions[{i}]"
        expr = ctx.mapping(expr, at)
        key, op = expr.get("key"), expr.get("operator")
        if not isinstance(key, str) or not key:
            ctx.fail(f"{at}.key", "missing or empty")
        if op not in OPERATORS:
            ctx.fail(f"{at}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
        values = ctx.array(expr.get("values"), f"{at}.values")
        if not all(isinstance(v, str) for v in values):
            ctx.fail(f"{at}.values", "values must be strings")
        if op in ("In", "NotIn") and not values:
            ctx.fail(f"{at}.values", f"operator {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            ctx.fail(f"{at}.values", f"operator {op} takes no values")
        reqs.append(Requirement(key, op, frozenset(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(reqs))


def parse_label_selector(value: Any, what: str = "selector") -> LabelSelector:
    """A standalone selector (e.g. from a CLI); errors name it as ``what``."""
    ctx = _Obj.__new__(_Obj)
    ctx.kind, ctx.ref = "LabelSelector", what
    return _selector(ctx, value, "(selector)")


def parse_namespace(obj: Any) -> Namespace:
    ctx = _Obj("Namespace", obj, namespaced=False)
    labels = ctx.string_map(ctx.meta.get("labels"), "metadata.labels")
    labels[NAMESPACE_NAME_LABEL] = ctx.name  # the API server sets it on every namespace
    return Namespace(ctx.name, labels)


def parse_pod(obj: Any) -> Pod:
    """A pod from its JSON; a pod that is not :attr:`Pod.active` parses fine (callers drop it)."""
    ctx = _Obj("Pod", obj, namespaced=True)
    labels = ctx.string_map(ctx.meta.get("labels"), "metadata.labels")
    spec = ctx.mapping(obj.get("spec"), "spec")
    status = ctx.mapping(obj.get("status"), "status")
    phase = status.get("phase", "Pending")
    if not isinstance(phase, str):
        ctx.fail("status.phase", "not a string")
    ips: set[IPAddress] = set()
    if status.get("podIP"):
        ips.add(ctx.address(status["podIP"], "status.podIP"))
    for i, entry in enumerate(ctx.array(status.get("podIPs"), "status.podIPs")):
        entry = ctx.mapping(entry, f"status.podIPs[{i}]")
        ips.add(ctx.address(entry.get("ip"), f"status.podIPs[{i}].ip"))
    node = spec.get("nodeName")
    if node is not None and not isinstance(node, str):
        ctx.fail("spec.nodeName", "not a string")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        ctx.fail("spec.hostNetwork", "not a boolean")
    ports: list[ContainerPort] = []
    for c, container in enumerate(ctx.array(spec.get("containers"), "spec.containers")):
        at = f"spec.containers[{c}]"
        container = ctx.mapping(container, at)
        for p, port in enumerate(ctx.array(container.get("ports"), f"{at}.ports")):
            pat = f"{at}.ports[{p}]"
            port = ctx.mapping(port, pat)
            name = port.get("name")
            if name is not None and not isinstance(name, str):
                ctx.fail(f"{pat}.name", "not a string")
            ports.append(
                ContainerPort(
                    name or None,
                    ctx.protocol(port.get("protocol"), f"{pat}.protocol"),
                    ctx.port_number(port.get("containerPort"), f"{pat}.containerPort"),
                )
            )
    return Pod(
        namespace=ctx.namespace,
        name=ctx.name,
        labels=labels,
        ips=tuple(sorted(ips, key=lambda a: (a.version, int(a)))),
        phase=phase,
        node=node or None,
        host_network=host_network,
        ports=tuple(ports),
    )


def _port(ctx: _Obj, value: Any, where: str) -> PolicyPort:
    raw = ctx.mapping(value, where)
    protocol = ctx.protocol(raw.get("protocol"), f"{where}.protocol")
    port = raw.get("port")
    end_port = raw.get("endPort")
    if port is None:
        if end_port is not None:
            ctx.fail(f"{where}.endPort", "needs a numeric port")
        return PolicyPort(protocol)
    if isinstance(port, str):
        if not _PORT_NAME.match(port) or not re.search(r"[a-z]", port) or "--" in port:
            ctx.fail(f"{where}.port", f"{port!r} is neither a port number nor a port name")
        if end_port is not None:
            ctx.fail(f"{where}.endPort", f"needs a numeric port, not the named port {port!r}")
        return PolicyPort(protocol, port)
    number = ctx.port_number(port, f"{where}.port")
    if end_port is None:
        return PolicyPort(protocol, number)
    end = ctx.port_number(end_port, f"{where}.endPort")
    if end < number:
        ctx.fail(f"{where}.endPort", f"{end} is below port {number}")
    return PolicyPort(protocol, number, end)


def _peer(ctx: _Obj, value: Any, where: str) -> PolicyPeer:
    raw = ctx.mapping(value, where)
    pod_sel = raw.get("podSelector")
    ns_sel = raw.get("namespaceSelector")
    block = raw.get("ipBlock")
    if block is not None:
        if pod_sel is not None or ns_sel is not None:
            ctx.fail(where, "ipBlock cannot be combined with podSelector or namespaceSelector")
        block = ctx.mapping(block, f"{where}.ipBlock")
        cidr = ctx.network(block.get("cidr"), f"{where}.ipBlock.cidr")
        excepts: list[IPNetwork] = []
        for i, exc in enumerate(ctx.array(block.get("except"), f"{where}.ipBlock.except")):
            net = ctx.network(exc, f"{where}.ipBlock.except[{i}]")
            if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
                ctx.fail(f"{where}.ipBlock.except[{i}]", f"{net} is not inside {cidr}")
            excepts.append(net)
        return PolicyPeer(ip_block=IPBlock(cidr, tuple(excepts)))
    if pod_sel is None and ns_sel is None:
        ctx.fail(where, "a peer needs podSelector, namespaceSelector or ipBlock")
    return PolicyPeer(
        pod_selector=None if pod_sel is None else _selector(ctx, pod_sel, f"{where}.podSelector"),
        namespace_selector=(
            None if ns_sel is None else _selector(ctx, ns_sel, f"{where}.namespaceSelector")
        ),
    )


def _rules(ctx: _Obj, value: Any, where: str, peers_key: str) -> tuple[PolicyRule, ...]:
    rules: list[PolicyRule] = []
    for i, rule in enumerate(ctx.array(value, where)):
        at = f"{where}[{i}]"
        rule = ctx.mapping(rule, at)
        peers = tuple(
            _peer(ctx, p, f"{at}.{peers_key}[{j}]")
            for j, p in enumerate(ctx.array(rule.get(peers_key), f"{at}.{peers_key}"))
        )
        ports = tuple(
            _port(ctx, p, f"{at}.ports[{j}]")
            for j, p in enumerate(ctx.array(rule.get("ports"), f"{at}.ports"))
        )
        rules.append(PolicyRule(peers, ports))
    return tuple(rules)


def parse_network_policy(obj: Any) -> NetworkPolicy:
    ctx = _Obj("NetworkPolicy", obj, namespaced=True)
    if obj.get("spec") is None:
        ctx.fail("spec", "missing")
    spec = ctx.mapping(obj.get("spec"), "spec")
    # Absent podSelector is the empty selector, as Go's decoder gives for the non-pointer field.
    selector = _selector(ctx, spec.get("podSelector"), "spec.podSelector")
    ingress = _rules(ctx, spec.get("ingress"), "spec.ingress", "from")
    egress = _rules(ctx, spec.get("egress"), "spec.egress", "to")
    types = ctx.array(spec.get("policyTypes"), "spec.policyTypes")
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            ctx.fail(f"spec.policyTypes[{i}]", f"{t!r} is not Ingress or Egress")
    if not types:  # the API server's defaulting
        types = ["Ingress", "Egress"] if egress else ["Ingress"]
    ordered = tuple(t for t in ("Ingress", "Egress") if t in types)
    return NetworkPolicy(ctx.namespace, ctx.name, selector, ingress, egress, ordered)
