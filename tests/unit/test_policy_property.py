"""The compiler (and explain) against an independent evaluator of networking.k8s.io/v1.

Hypothesis generates namespaces, pods and policies as the API server's JSON; ``evaluate`` below
decides each flow straight from that JSON by the API's rules (it shares no code with weft.policy):
the source pod's egress, if it is isolated for egress, AND the destination pod's ingress, if it
is isolated for ingress; its own node always reaches a pod; a pod always reaches itself. The
compiled state of every node involved, read as the kernel reads it (weft.policy.verdict), and
weft.policy.explain must both agree with it on every flow between every pair of addresses.

Derandomized (a fixed sequence of examples, no example database), so CI is deterministic.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError
from weft.policy.compiler import DesiredState, compile_policy
from weft.policy.explain import explain
from weft.policy.model import ClusterView
from weft.policy.verdict import chain_accepts

JSON = dict[str, Any]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

PROFILE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=250,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAME_LABEL = "kubernetes.io/metadata.name"
NAMESPACES = ("x", "y", "z")
# "w": a namespace whose object the view has not seen; x and y twice, so policies find pods
POD_NAMESPACES = ("x", "y", "x", "y", "z", "w")
NODE_IPS: dict[str, list[Address]] = {
    "n1": [ipaddress.ip_address("192.168.0.1")],
    "n2": [ipaddress.ip_address("192.168.0.2")],
}
OUTSIDE = tuple(
    ipaddress.ip_address(a)
    for a in ("203.0.113.7", "10.1.0.200", "192.168.0.1", "192.168.0.2", "2001:db8::7")
)
PORT_NUMBERS = (53, 80, 81, 8080)
PORT_NAMES = ("http", "dns", "web")
FLOWS: tuple[tuple[str, int | None], ...] = (
    ("TCP", 80),
    ("TCP", 81),
    ("TCP", 8080),
    ("TCP", 100),
    ("UDP", 53),
    ("UDP", 81),
    ("SCTP", 80),
    ("ICMP", None),
)
CIDRS4 = (
    "0.0.0.0/0",
    "10.1.0.0/16",
    "10.1.0.0/29",
    "10.1.0.0/30",
    "10.1.0.4/30",
    "10.1.0.3/32",
    "192.168.0.0/24",
    "203.0.113.0/24",
)
CIDRS6 = ("::/0", "fd00::/64", "fd00::/126", "2001:db8::/32")


def pod_v4(i: int) -> str:
    return f"10.1.0.{i + 1}"


def pod_v6(i: int) -> str:
    return f"fd00::{i + 1:x}"


# ---------------------------------------------------------------------- strategies

label_keys = st.sampled_from(("app", "tier"))
label_values = st.sampled_from(("a", "b"))
labels = st.dictionaries(label_keys, label_values, max_size=2)


@st.composite
def selectors(draw: st.DrawFn, namespaces: bool) -> JSON:
    values: Mapping[str, tuple[str, ...]] = (
        {"team": ("a", "b"), "env": ("a", "b"), NAME_LABEL: ("x", "y", "w")}
        if namespaces
        else {"app": ("a", "b"), "tier": ("a", "b")}
    )
    keys = st.sampled_from(tuple(values))
    out: JSON = {}
    match: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(keys)
        match[key] = draw(st.sampled_from(values[key]))
    empty_but_present: bool = draw(st.booleans())
    if match or empty_but_present:
        out["matchLabels"] = match
    exprs = []
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(("NotIn", "In", "Exists", "DoesNotExist")))
        key = draw(keys)
        expr: JSON = {"key": key, "operator": op}
        if op in ("In", "NotIn"):
            expr["values"] = draw(st.lists(st.sampled_from(values[key]), min_size=1, max_size=2))
        exprs.append(expr)
    if exprs:
        out["matchExpressions"] = exprs
    return out


@st.composite
def ip_blocks(draw: st.DrawFn) -> JSON:
    cidr = ipaddress.ip_network(draw(st.sampled_from(CIDRS4 + CIDRS6)))
    excepts = []
    for _ in range(draw(st.integers(0, 2))):
        prefix = draw(st.integers(cidr.prefixlen, cidr.max_prefixlen))
        offset = draw(st.integers(0, min(cidr.num_addresses - 1, 300)))
        inside = ipaddress.ip_network(f"{cidr.network_address + offset}/{prefix}", strict=False)
        excepts.append(str(inside))
    block: JSON = {"cidr": str(cidr)}
    if excepts:
        block["except"] = excepts
    return {"ipBlock": block}


@st.composite
def peers(draw: st.DrawFn) -> JSON:
    kind = draw(st.sampled_from(("pod", "namespace", "both", "ipBlock")))
    if kind == "ipBlock":
        return draw(ip_blocks())
    out: JSON = {}
    if kind in ("pod", "both"):
        out["podSelector"] = draw(selectors(namespaces=False))
    if kind in ("namespace", "both"):
        out["namespaceSelector"] = draw(selectors(namespaces=True))
    return out


@st.composite
def ports(draw: st.DrawFn) -> JSON:
    out: JSON = {}
    protocol = draw(st.sampled_from((None, "TCP", "UDP", "SCTP")))
    if protocol is not None:
        out["protocol"] = protocol
    kind = draw(st.sampled_from(("absent", "number", "name", "range")))
    if kind == "number":
        out["port"] = draw(st.sampled_from(PORT_NUMBERS))
    elif kind == "name":
        out["port"] = draw(st.sampled_from(PORT_NAMES))
    elif kind == "range":
        out["port"] = draw(st.sampled_from(PORT_NUMBERS))
        out["endPort"] = out["port"] + draw(st.sampled_from((0, 1, 30, 8000)))
    return out


@st.composite
def rules(draw: st.DrawFn, peers_key: str) -> JSON:
    rule: JSON = {}
    shape = draw(st.sampled_from(("absent", "empty", "some")))
    if shape == "empty":
        rule[peers_key] = []
    elif shape == "some":
        rule[peers_key] = draw(st.lists(peers(), min_size=1, max_size=3))
    shape = draw(st.sampled_from(("absent", "empty", "some")))
    if shape == "empty":
        rule["ports"] = []
    elif shape == "some":
        rule["ports"] = draw(st.lists(ports(), min_size=1, max_size=2))
    return rule


@st.composite
def policies(draw: st.DrawFn, index: int) -> JSON:
    # half the policies select every pod of their namespace, so that many flows are isolated;
    # an absent podSelector is the empty one too
    spec: JSON = {"podSelector": draw(st.one_of(st.just({}), selectors(namespaces=False)))}
    if not spec["podSelector"] and draw(st.booleans()):
        del spec["podSelector"]
    types = draw(
        st.sampled_from(
            (None, [], ["Ingress"], ["Egress"], ["Ingress", "Egress"], ["Egress", "Ingress"])
        )
    )
    if types is not None:
        spec["policyTypes"] = types
    for direction, key in (("ingress", "from"), ("egress", "to")):
        shape = draw(st.sampled_from(("absent", "empty", "some", "some")))
        if shape == "empty":
            spec[direction] = []
        elif shape == "some":
            spec[direction] = draw(st.lists(rules(key), min_size=1, max_size=2))
    namespace = draw(st.sampled_from(POD_NAMESPACES))
    return {"metadata": {"namespace": namespace, "name": f"q{index}"}, "spec": spec}


@st.composite
def pods(draw: st.DrawFn, index: int, count: int) -> JSON:
    phase = draw(st.sampled_from(("Running", "Running", "Running", "Pending", "Succeeded")))
    addresses: list[str] = []
    if phase == "Succeeded":  # a finished pod whose address another pod may have now
        other = draw(st.integers(0, count - 1))
        addresses = [pod_v4(other)]
    elif draw(st.integers(0, 9)) < 9:  # hypothesis favours 0: the usual case
        addresses = [pod_v4(index)]
        if draw(st.booleans()):
            addresses.append(pod_v6(index))
    container_ports = []
    for name in draw(st.lists(st.sampled_from(PORT_NAMES), unique=True, max_size=2)):
        container_ports.append(
            {
                "name": name,
                "containerPort": draw(st.sampled_from(PORT_NUMBERS)),
                "protocol": draw(st.sampled_from(("TCP", "UDP", "SCTP"))),
            }
        )
    if draw(st.booleans()):
        container_ports.append({"containerPort": 9000})  # unnamed, protocol defaulted
    host_network = phase == "Running" and draw(st.integers(0, 9)) == 9
    node = draw(st.sampled_from(("n1", "n2")))
    if host_network:  # the node's address: not the pod's own, so no policy applies to it
        addresses = [str(NODE_IPS[node][0])]
    status: JSON = {"phase": phase}
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": a} for a in addresses]
    return {
        "metadata": {
            "namespace": draw(st.sampled_from(POD_NAMESPACES)),
            "name": f"p{index}",
            "labels": draw(labels),
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": "main", "ports": container_ports}],
        },
        "status": status,
    }


@dataclass(frozen=True)
class World:
    namespaces: list[JSON]
    pods: list[JSON]
    policies: list[JSON]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    namespaces = [
        {
            "metadata": {
                "name": n,
                "labels": draw(
                    st.dictionaries(
                        st.sampled_from(("team", "env")), st.sampled_from(("a", "b")), max_size=2
                    )
                ),
            }
        }
        for n in NAMESPACES
    ]
    count = draw(st.integers(2, 6))
    pod_list = [draw(pods(i, count)) for i in range(count)]
    policy_list = [draw(policies(i)) for i in range(draw(st.integers(1, 4)))]
    return World(namespaces, pod_list, policy_list)


# ---------------------------------------------------------------------- the evaluator


@dataclass(frozen=True)
class EPod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    addresses: frozenset[Address]
    node: str
    ports: Sequence[tuple[str | None, str, int]]  # name, protocol, number


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


class Evaluator:
    """networking.k8s.io/v1 read off the JSON objects, one flow at a time."""

    def __init__(self, world: World, node_ips: Mapping[str, Sequence[Address]]) -> None:
        self.node_ips = node_ips
        self.ns_labels = {
            n["metadata"]["name"]: {**n["metadata"]["labels"], NAME_LABEL: n["metadata"]["name"]}
            for n in world.namespaces
        }
        self.pods: list[EPod] = []
        for p in world.pods:
            status, spec = p["status"], p["spec"]
            # finished pods and pods without an address take no part (their address is reused),
            # nor do host-network pods (their address is the node's)
            if (
                status["phase"] in ("Succeeded", "Failed")
                or not status.get("podIPs")
                or spec.get("hostNetwork")
            ):
                continue
            self.pods.append(
                EPod(
                    p["metadata"]["namespace"],
                    p["metadata"]["name"],
                    p["metadata"]["labels"],
                    frozenset(ipaddress.ip_address(e["ip"]) for e in status["podIPs"]),
                    spec["nodeName"],
                    [
                        (cp.get("name"), cp.get("protocol", "TCP"), cp["containerPort"])
                        for c in spec["containers"]
                        for cp in c.get("ports", [])
                    ],
                )
            )
        self.policies = world.policies

    def pod_at(self, address: Address) -> EPod | None:
        found = [p for p in self.pods if address in p.addresses]
        assert len(found) <= 1
        return found[0] if found else None

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        return self.ns_labels.get(name, {NAME_LABEL: name})

    @staticmethod
    def policy_types(spec: Mapping[str, Any]) -> list[str]:
        if spec.get("policyTypes"):
            return list(spec["policyTypes"])
        return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]

    def isolating(self, pod: EPod, policy_type: str) -> list[JSON]:
        return [
            pol
            for pol in self.policies
            if pol["metadata"]["namespace"] == pod.namespace
            and _selects(pol["spec"].get("podSelector") or {}, pod.labels)
            and policy_type in self.policy_types(pol["spec"])
        ]

    def peer_matches(
        self, peer: Mapping[str, Any], policy_ns: str, address: Address, pod: EPod | None
    ) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            cidr = ipaddress.ip_network(block["cidr"])
            if address.version != cidr.version or address not in cidr:
                return False
            return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
        if pod is None:
            return False
        ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
        if ns_sel is None:
            if pod.namespace != policy_ns:
                return False
        elif not _selects(ns_sel, self.namespace_labels(pod.namespace)):
            return False
        return pod_sel is None or _selects(pod_sel, pod.labels)

    @staticmethod
    def port_matches(
        spec: Mapping[str, Any], protocol: str, port: int | None, dest: EPod | None
    ) -> bool:
        if spec.get("protocol", "TCP") != protocol or port is None:
            return False
        want = spec.get("port")
        if want is None:
            return True
        if isinstance(want, str):  # a named port: the destination pod's container port
            if dest is None:
                return False
            numbers = [n for name, proto, n in dest.ports if name == want and proto == protocol]
            return bool(numbers) and numbers[0] == port
        return bool(want <= port <= spec.get("endPort", want))

    def rule_allows(
        self,
        rule: Mapping[str, Any],
        peers_key: str,
        policy_ns: str,
        peer: tuple[Address, EPod | None],
        protocol: str,
        port: int | None,
        dest: EPod | None,
    ) -> bool:
        listed = rule.get(peers_key) or []
        if listed and not any(self.peer_matches(p, policy_ns, *peer) for p in listed):
            return False
        wanted = rule.get("ports") or []
        return not wanted or any(self.port_matches(p, protocol, port, dest) for p in wanted)

    def allows(self, src: Address, dst: Address, protocol: str, port: int | None) -> bool:
        s, d = self.pod_at(src), self.pod_at(dst)
        if d is not None and src in self.node_ips.get(d.node, ()):
            return True  # kubelet probes: a node reaches its own pods
        if s is not None and src == dst:
            return True
        if s is not None:
            isolating = self.isolating(s, "Egress")
            if isolating and not any(
                self.rule_allows(r, "to", s.namespace, (dst, d), protocol, port, d)
                for pol in isolating
                for r in pol["spec"].get("egress") or []
            ):
                return False
        if d is not None:
            isolating = self.isolating(d, "Ingress")
            if isolating and not any(
                self.rule_allows(r, "from", d.namespace, (src, s), protocol, port, d)
                for pol in isolating
                for r in pol["spec"].get("ingress") or []
            ):
                return False
        return True


# ---------------------------------------------------------------------- the comparison


def kernel_allows(
    view: ClusterView,
    states: Mapping[str, DesiredState],
    src: Address,
    dst: Address,
    protocol: str,
    port: int | None,
) -> bool:
    """As policy_support.cluster_allows, with each node's state compiled once per view."""
    nodes = {p.node for a in (src, dst) for p in view.pods_at(a) if p.node is not None}
    return all(chain_accepts(states[n], src, dst, protocol, port) for n in sorted(nodes))


def check_world(world: World) -> None:
    view, errors = ClusterView.from_api(world.namespaces, world.pods, world.policies)
    assert not errors, errors
    evaluator = Evaluator(world, NODE_IPS)
    states = {n: compile_policy(view, n, NODE_IPS[n]) for n in NODE_IPS}
    addresses = sorted(
        {a for p in evaluator.pods for a in p.addresses} | set(OUTSIDE),
        key=lambda a: (a.version, int(a)),
    )
    for src in addresses:
        for dst in addresses:
            if src.version != dst.version:
                continue
            s, d = evaluator.pod_at(src), evaluator.pod_at(dst)
            for protocol, port in FLOWS:
                want = evaluator.allows(src, dst, protocol, port)
                flow = f"{src} -> {dst} {protocol}/{port}"
                got = kernel_allows(view, states, src, dst, protocol, port)
                assert got == want, f"kernel: {flow}: {got}, the API says {want}"
                if s is None and d is None:
                    with pytest.raises(ConfigError):
                        explain(view, src, dst, protocol, port, node_addresses=NODE_IPS)
                    continue
                # pods by name when the flow is between pods' own addresses
                source: Any = src if s is None or src.version != 4 else f"{s.namespace}/{s.name}"
                dest: Any = dst if d is None or dst.version != 4 else f"{d.namespace}/{d.name}"
                verdict = explain(view, source, dest, protocol, port, node_addresses=NODE_IPS)
                assert verdict.allowed == want, f"explain: {flow}: {verdict.to_json()}"


@PROFILE
@given(worlds())
def test_compiler_and_explain_agree_with_the_api_semantics(world: World) -> None:
    check_world(world)
