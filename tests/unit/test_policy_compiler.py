"""weft.policy.compiler: each NetworkPolicy feature, read back as the kernel would match it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.policy_support import (
    cluster_allows,
    ip,
    ns,
    pod,
    policy,
    view_of,
)
from weft.policy.compiler import (
    AddrRange,
    AllowPorts,
    PortRange,
    compile_policy,
)
from weft.policy.model import ClusterView
from weft.policy.nft import render_full
from weft.policy.verdict import chain_accepts

# The upstream e2e model, trimmed: namespaces x, y, z with pods a, b, c; x on node n1, y and z
# on n2 (so cross-node paths are exercised), addresses 10.32.<ns>.<pod>.
NSES = ("x", "y", "z")
PODS = ("a", "b", "c")
NODE_IPS = {"n1": [ip("192.168.0.1")], "n2": [ip("192.168.0.2")]}
OUTSIDE = ip("203.0.113.7")


def addr(namespace: str, name: str) -> str:
    return f"10.32.{NSES.index(namespace) + 1}.{PODS.index(name) + 1}"


def model_pods(**overrides: Any) -> list[dict[str, Any]]:
    out = []
    for n in NSES:
        for p in PODS:
            out.append(
                pod(
                    n,
                    p,
                    addr(n, p),
                    node="n1" if n == "x" else "n2",
                    ports=[("serve-80", 80, "TCP"), ("serve-81-udp", 81, "UDP")],
                )
            )
    return out


def model_view(*policies: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> ClusterView:
    return view_of(
        [ns(n, ns=n) for n in NSES], model_pods() if pods is None else pods, list(policies)
    )


def allowed(
    view: ClusterView, src: str, dst: str, port: int | None = 80, proto: str = "TCP"
) -> bool:
    def where(p: str) -> Any:
        if "/" in p:
            n, name = p.split("/")
            return ip(addr(n, name))
        return ip(p)

    return cluster_allows(view, NODE_IPS, where(src), where(dst), proto, port)


def reachability(view: ClusterView, port: int = 80, proto: str = "TCP") -> set[tuple[str, str]]:
    """(src, dst) pairs allowed among the 9 pods."""
    names = [f"{n}/{p}" for n in NSES for p in PODS]
    return {(s, d) for s in names for d in names if s != d and allowed(view, s, d, port, proto)}


ALL_PAIRS = {(f"{a}/{b}", f"{c}/{d}") for a in NSES for b in PODS for c in NSES for d in PODS} - {
    (f"{n}/{p}", f"{n}/{p}") for n in NSES for p in PODS
}


def pairs_to(dst: str) -> set[tuple[str, str]]:
    return {(s, d) for s, d in ALL_PAIRS if d == dst}


def pairs_from(src: str) -> set[tuple[str, str]]:
    return {(s, d) for s, d in ALL_PAIRS if s == src}


# ---------------------------------------------------------------------- isolation


def test_no_policy_allows_everything_and_programs_nothing() -> None:
    view = model_view()
    assert reachability(view) == ALL_PAIRS
    state = compile_policy(view, "n1", NODE_IPS["n1"])
    assert not state.ingress.isolated and not state.egress.isolated
    assert [str(p.pod) for p in state.pods] == ["x/a", "x/b", "x/c"]  # only n1's pods


def test_default_deny_ingress() -> None:
    view = model_view(policy("x", "deny-in"))
    denied = {pair for pair in ALL_PAIRS if pair[1].startswith("x/")}
    assert reachability(view) == ALL_PAIRS - denied
    assert allowed(view, "x/a", "y/a")  # egress untouched
    assert not allowed(view, str(OUTSIDE), "x/a")


def test_default_deny_egress() -> None:
    view = model_view(policy("x", "deny-out", policyTypes=["Egress"]))
    denied = {pair for pair in ALL_PAIRS if pair[0].startswith("x/")}
    assert reachability(view) == ALL_PAIRS - denied
    assert not allowed(view, "x/a", str(OUTSIDE))
    assert allowed(view, "y/a", "x/a")  # ingress untouched


def test_always_allowed_own_node_and_self_but_not_other_nodes() -> None:
    view = model_view(policy("x", "deny-all", policyTypes=["Ingress", "Egress"]))
    assert allowed(view, "192.168.0.1", "x/a")  # kubelet probes from n1
    assert not allowed(view, "192.168.0.2", "x/a")  # another node is just a peer
    state = compile_policy(view, "n1", NODE_IPS["n1"])
    a = ip(addr("x", "a"))
    assert chain_accepts(state, a, a, "TCP", 80)  # a pod to itself (hairpin via a service)


def test_policy_selects_pods_by_label_only_in_its_namespace() -> None:
    view = model_view(policy("x", "deny-a", podSelector={"matchLabels": {"pod": "a"}}))
    assert reachability(view) == ALL_PAIRS - pairs_to("x/a")


def test_union_of_policies_selecting_a_pod() -> None:
    allow_b = policy(
        "x", "allow-b", ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]
    )
    allow_c = policy(
        "x", "allow-c", ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]
    )
    view = model_view(allow_b, allow_c)
    into_x = {pair for pair in ALL_PAIRS if pair[1].startswith("x/")}
    allowed_in = {("x/b", "x/a"), ("x/c", "x/a"), ("x/c", "x/b"), ("x/b", "x/c")}
    assert reachability(view) == (ALL_PAIRS - into_x) | allowed_in


# ---------------------------------------------------------------------- peers


def test_pod_selector_peer_is_the_policy_namespace() -> None:
    view = model_view(
        policy("x", "p", ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    )
    assert allowed(view, "x/b", "x/a")
    assert not allowed(view, "y/b", "x/a")


def test_namespace_selector_peer_with_metadata_name_label() -> None:
    sel = {"matchLabels": {"kubernetes.io/metadata.name": "y"}}
    view = model_view(policy("x", "p", ingress=[{"from": [{"namespaceSelector": sel}]}]))
    assert {s for s, d in reachability(view) if d == "x/a"} == {"y/a", "y/b", "y/c"}


def test_and_versus_or_peers() -> None:
    ns_y = {"matchLabels": {"ns": "y"}}
    pod_b = {"matchLabels": {"pod": "b"}}
    both = model_view(
        policy("x", "and", ingress=[{"from": [{"namespaceSelector": ns_y, "podSelector": pod_b}]}])
    )
    assert {s for s, d in reachability(both) if d == "x/a"} == {"y/b"}
    either = model_view(
        policy("x", "or", ingress=[{"from": [{"namespaceSelector": ns_y}, {"podSelector": pod_b}]}])
    )
    assert {s for s, d in reachability(either) if d == "x/a"} == {"y/a", "y/b", "y/c", "x/b"}


def test_match_expressions_in_peers() -> None:
    sel = {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x", "y"]}]}
    view = model_view(policy("x", "p", ingress=[{"from": [{"namespaceSelector": sel}]}]))
    assert {s for s, d in reachability(view) if d == "x/a"} == {"z/a", "z/b", "z/c"}


def test_ip_block_with_except() -> None:
    block = {"ipBlock": {"cidr": "10.32.0.0/16", "except": ["10.32.2.0/24"]}}
    view = model_view(policy("x", "p", ingress=[{"from": [block]}]))
    sources = {s for s, d in reachability(view) if d == "x/a"}
    assert sources == {"x/b", "x/c", "z/a", "z/b", "z/c"}  # y is 10.32.2.x
    assert not allowed(view, str(OUTSIDE), "x/a")
    out = model_view(
        policy(
            "x",
            "to-outside",
            policyTypes=["Egress"],
            egress=[
                {"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/30"]}}]}
            ],
        )
    )
    assert allowed(out, "x/a", "203.0.113.7")
    assert not allowed(out, "x/a", "203.0.113.2")
    assert not allowed(out, "x/a", "y/a")


def test_empty_from_allows_all_but_absent_rules_allow_nothing() -> None:
    empty_from = model_view(policy("x", "p", ingress=[{}]))
    assert reachability(empty_from) == ALL_PAIRS
    assert allowed(empty_from, str(OUTSIDE), "x/a")
    assert allowed(empty_from, "y/a", "x/a", port=None, proto="ICMP")
    empty_list_from = model_view(policy("x", "p", ingress=[{"from": []}]))
    assert reachability(empty_list_from) == ALL_PAIRS
    no_rules = model_view(policy("x", "p", ingress=[]))
    assert reachability(no_rules) == ALL_PAIRS - {p for p in ALL_PAIRS if p[1].startswith("x/")}
    empty_to = model_view(policy("x", "p", policyTypes=["Egress"], egress=[{"to": []}]))
    assert allowed(empty_to, "x/a", str(OUTSIDE))
    assert reachability(empty_to) == ALL_PAIRS


def test_policy_types_defaulting_decides_which_rules_count() -> None:
    # No policyTypes, egress rules present: Egress is defaulted in, egress is restricted.
    defaulted = model_view(policy("x", "p", ingress=[{}], egress=[{"to": [{"podSelector": {}}]}]))
    assert not allowed(defaulted, "x/a", "y/a")
    assert allowed(defaulted, "x/a", "x/b")
    # policyTypes [Ingress] with egress rules: the egress rules are ignored, egress is open.
    ingress_only = model_view(
        policy("x", "p", policyTypes=["Ingress"], ingress=[{}], egress=[{"to": []}])
    )
    state = compile_policy(ingress_only, "n1", ())
    assert not state.egress.isolated
    assert allowed(ingress_only, "x/a", "y/a")


# ---------------------------------------------------------------------- ports


def test_numeric_port_and_protocol() -> None:
    view = model_view(policy("x", "p", ingress=[{"ports": [{"port": 80}]}]))
    assert allowed(view, "y/a", "x/a", 80, "TCP")
    assert not allowed(view, "y/a", "x/a", 81, "TCP")
    assert not allowed(view, "y/a", "x/a", 80, "UDP")  # protocol defaults to TCP
    assert not allowed(view, "y/a", "x/a", None, "ICMP")  # a rule with ports is not "everything"


def test_udp_and_sctp() -> None:
    view = model_view(
        policy(
            "x",
            "p",
            ingress=[
                {"ports": [{"protocol": "UDP", "port": 81}, {"protocol": "SCTP", "port": 80}]}
            ],
        )
    )
    assert allowed(view, "y/a", "x/a", 81, "UDP")
    assert not allowed(view, "y/a", "x/a", 81, "TCP")
    assert allowed(view, "y/a", "x/a", 80, "SCTP")
    assert not allowed(view, "y/a", "x/a", 80, "UDP")
    elements = compile_policy(view, "n1", ()).ingress.allow_ports
    assert {e.protocol for e in elements} == {"UDP", "SCTP"}


def test_protocol_without_port_is_every_port_of_it() -> None:
    view = model_view(policy("x", "p", ingress=[{"ports": [{"protocol": "UDP"}]}]))
    assert allowed(view, "y/a", "x/a", 1, "UDP") and allowed(view, "y/a", "x/a", 65535, "UDP")
    assert not allowed(view, "y/a", "x/a", 80, "TCP")


def test_end_port_range() -> None:
    view = model_view(policy("x", "p", ingress=[{"ports": [{"port": 8000, "endPort": 8010}]}]))
    assert [allowed(view, "y/a", "x/a", p) for p in (7999, 8000, 8005, 8010, 8011)] == [
        False,
        True,
        True,
        True,
        False,
    ]


def test_named_port_resolves_per_destination_pod() -> None:
    pods = model_pods()
    # x/a serves "web" on 8080, x/b on 9090; x/c has no "web"
    pods[0]["spec"]["containers"][0]["ports"].append({"name": "web", "containerPort": 8080})
    pods[1]["spec"]["containers"][0]["ports"].append({"name": "web", "containerPort": 9090})
    ingress = model_view(policy("x", "p", ingress=[{"ports": [{"port": "web"}]}]), pods=pods)
    assert allowed(ingress, "y/a", "x/a", 8080) and not allowed(ingress, "y/a", "x/a", 9090)
    assert allowed(ingress, "y/a", "x/b", 9090) and not allowed(ingress, "y/a", "x/b", 8080)
    assert not any(allowed(ingress, "y/a", "x/c", p) for p in (80, 8080, 9090))
    # egress: resolved on the destination pod, never on the source
    egress = model_view(
        policy("y", "p", policyTypes=["Egress"], egress=[{"ports": [{"port": "web"}]}]), pods=pods
    )
    assert allowed(egress, "y/a", "x/a", 8080) and not allowed(egress, "y/a", "x/a", 9090)
    assert allowed(egress, "y/a", "x/b", 9090) and not allowed(egress, "y/a", "x/b", 8080)
    assert not allowed(egress, "y/a", str(OUTSIDE), 8080)  # not a pod: no named ports
    # the existing model names still work and only on their protocol
    serve = model_view(
        policy("x", "p", ingress=[{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}])
    )
    assert allowed(serve, "y/a", "x/a", 81, "UDP")
    assert not allowed(serve, "y/a", "x/a", 81, "TCP")


def test_overlapping_rules_give_disjoint_elements() -> None:
    view = model_view(
        policy(
            "x",
            "p",
            podSelector={"matchLabels": {"pod": "a"}},
            ingress=[
                {
                    "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                    "ports": [{"port": 80, "endPort": 90}],
                },
                {
                    "from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
                    "ports": [{"port": 85, "endPort": 100}],
                },
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]},
            ],
        )
    )
    elements = compile_policy(view, "n1", ()).ingress.allow_ports
    local = AddrRange.host(ip(addr("x", "a")))
    assert all(e.local == local for e in elements)
    for i, e in enumerate(elements):
        for f in elements[i + 1 :]:
            peers_overlap = e.peer.first <= f.peer.last and f.peer.first <= e.peer.last
            ports_overlap = e.ports.first <= f.ports.last and f.ports.first <= e.ports.last
            assert not (peers_overlap and ports_overlap and e.protocol == f.protocol), (e, f)

    def v4(text: str) -> int:
        return AddrRange.host(ip(text)).first

    assert (
        AllowPorts(
            local, AddrRange(4, v4("10.1.0.0"), v4("10.1.255.255")), "TCP", PortRange(80, 100)
        )
        in elements
    )
    assert allowed(view, "10.1.2.3", "x/a", 100) and not allowed(view, "10.2.0.1", "x/a", 100)


# ---------------------------------------------------------------------- pod churn


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_neither_peers_nor_targets(phase: str) -> None:
    pods = model_pods()
    pods.append(pod("y", "done", "10.32.9.9", node="n1", labels={"pod": "b"}, phase=phase))
    pods.append(pod("x", "gone", "10.32.9.8", node="n1", labels={"pod": "a"}, phase=phase))
    pods.append(pod("y", "pending", None, node="n1", labels={"pod": "b"}, phase="Pending"))
    view = model_view(
        policy(
            "x",
            "p",
            ingress=[
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}
            ],
        ),
        pods=pods,
    )
    state = compile_policy(view, "n1", ())
    text = render_full(state)
    assert "10.32.9.9" not in text and "10.32.9.8" not in text  # reused addresses never allowed
    assert "x/gone" not in {str(p.pod) for p in state.pods}


def test_pod_churn_changes_elements_not_rules() -> None:
    before = model_view(policy("x", "p", ingress=[{"from": [{"namespaceSelector": {}}]}]))
    pods = model_pods()
    pods.append(pod("z", "new", "10.32.3.77", node="n2"))
    after = model_view(policy("x", "p", ingress=[{"from": [{"namespaceSelector": {}}]}]), pods=pods)
    old, new = (
        render_full(compile_policy(before, "n1", ())),
        render_full(compile_policy(after, "n1", ())),
    )
    assert old != new

    def rules(text: str) -> list[str]:
        return text.split("\tchain ", 1)[1].splitlines()

    assert rules(old) == rules(new)  # everything from the first chain on is identical
    assert allowed(after, "10.32.3.77", "x/a") and not allowed(before, "10.32.3.77", "x/a")


def test_compile_is_deterministic() -> None:
    ps = [
        policy(
            "x",
            "p1",
            ingress=[{"from": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80"}]}],
        ),
        policy(
            "x", "p2", policyTypes=["Egress"], egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]
        ),
    ]
    a = render_full(compile_policy(model_view(*ps), "n1", NODE_IPS["n1"]))
    b = render_full(
        compile_policy(
            model_view(*reversed(ps), pods=list(reversed(model_pods()))), "n1", NODE_IPS["n1"]
        )
    )
    assert a == b


def test_dual_stack_pods_get_both_families() -> None:
    pods = [
        pod("x", "a", ["10.32.1.1", "fd00::1:1"], node="n1"),
        pod("y", "a", ["10.32.2.1", "fd00::2:1"], node="n2"),
        pod("y", "b", ["10.32.2.2", "fd00::2:2"], node="n2", labels={"pod": "other"}),
    ]
    view = view_of(
        [ns("x"), ns("y")],
        pods,
        [
            policy(
                "x",
                "p",
                ingress=[
                    {
                        "from": [
                            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}
                        ]
                    }
                ],
            )
        ],
    )
    for src, ok in (
        ("10.32.2.1", True),
        ("fd00::2:1", True),
        ("10.32.2.2", False),
        ("fd00::2:2", False),
    ):
        dst = "10.32.1.1" if ":" not in src else "fd00::1:1"
        assert cluster_allows(view, {}, ip(src), ip(dst), "TCP", 80) is ok, src
