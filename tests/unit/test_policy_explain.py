"""weft.policy.explain: the verdict, the deciding policies and rules, and its errors."""

from __future__ import annotations

import json

import pytest

from tests.unit.policy_support import ip, ns, pod, policy, view_of
from weft.errors import ConfigError
from weft.policy.explain import explain
from weft.policy.model import ClusterView, PodRef

NODES = {"n1": [ip("192.168.0.1")], "n2": [ip("192.168.0.2")]}


def cluster(*policies: dict[str, object]) -> ClusterView:
    return view_of(
        [ns("x"), ns("y", team="b")],
        [
            pod("x", "a", ["10.0.0.1", "fd00::1"], node="n1", ports=[("http", 8080, "TCP")]),
            pod("x", "b", "10.0.0.2", node="n1"),
            pod("y", "c", "10.0.1.3", node="n2"),
            pod("y", "done", "10.0.1.9", node="n2", phase="Succeeded"),
        ],
        list(policies),
    )


def test_no_policy_is_allowed_and_says_nothing_isolates() -> None:
    v = explain(cluster(), "x/a", "y/c", "TCP", 80)
    assert v.allowed and v.always_allowed is None
    assert not v.egress.isolated and not v.ingress.isolated
    assert v.source.pod == PodRef("x", "a") and v.source.address == ip("10.0.0.1")
    assert v.destination.node == "n2"
    assert "x/a is not isolated for egress" in v.egress.reason
    assert "y/c is not isolated for ingress" in v.ingress.reason
    assert v.reason.startswith("x/a (10.0.0.1) -> y/c (10.0.1.3) TCP/80: allowed")


def test_denied_names_every_isolating_policy_and_the_peer() -> None:
    view = cluster(
        policy("y", "p1"),
        policy("y", "p2", ingress=[{"ports": [{"port": 443}]}]),
    )
    v = explain(view, "x/a", "y/c", port=80)  # protocol defaults to TCP
    assert not v.allowed and v.protocol == "TCP"
    assert [str(p) for p in v.ingress.isolated_by] == ["y/p1", "y/p2"]
    assert v.ingress.reason == (
        "y/c is isolated for ingress by y/p1, y/p2; no rule allows 10.0.0.1 TCP/80"
    )
    assert [(str(r.policy), r.rule, r.ports) for r in v.ingress.other_ports] == [
        ("y/p2", 0, "443/TCP")
    ]
    assert v.egress.allowed and "denied: y/c is isolated for ingress" in v.reason
    assert explain(view, "x/a", "y/c", "TCP", 443).allowed


def test_allowed_lists_the_rules_that_allow_it() -> None:
    view = cluster(
        policy(
            "x",
            "out",
            policyTypes=["Egress"],
            egress=[
                {"to": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]},
                {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": 80}]},
                {"to": [{"podSelector": {}}]},
            ],
        )
    )
    v = explain(view, "x/a", "y/c", "TCP", 80)
    assert v.allowed
    assert [(r.rule, r.direction) for r in v.egress.allowed_by] == [(0, "egress"), (1, "egress")]
    first = v.egress.allowed_by[0]
    assert first.peers == "namespaceSelector {team=b}" and first.ports == "all ports and protocols"
    assert "allowed by x/out egress rule 0, x/out egress rule 1" in v.egress.reason
    assert "to namespaceSelector {team=b}" in first.describe()
    assert not explain(view, "x/a", "203.0.113.9", "TCP", 80).allowed
    # without a port: only the rules that allow every port count; the others are listed
    v = explain(view, "x/a", "10.0.0.99")
    assert not v.allowed and v.flow == "every port and protocol"
    assert [r.rule for r in v.egress.other_ports] == [1]


def test_named_port_resolved_on_the_destination_pod() -> None:
    view = cluster(policy("x", "web", ingress=[{"ports": [{"port": "http"}]}]))
    assert explain(view, "y/c", "x/a", "TCP", 8080).allowed
    assert not explain(view, "y/c", "x/a", "TCP", 80).allowed
    assert not explain(view, "y/c", "x/b", "TCP", 8080).allowed  # x/b has no port "http"


def test_always_allowed_same_pod_and_own_node_only() -> None:
    view = cluster(policy("x", "deny", policyTypes=["Ingress", "Egress"]))
    v = explain(view, "x/a", "x/a", "TCP", 80, node_addresses=NODES)
    assert v.allowed and v.always_allowed is not None and "same pod" in v.always_allowed
    v = explain(view, "192.168.0.1", "x/a", "TCP", 80, node_addresses=NODES)
    assert v.allowed and "node n1" in (v.always_allowed or "")
    v = explain(view, "192.168.0.2", "x/a", "TCP", 80, node_addresses=NODES)  # another node
    assert not v.allowed and v.always_allowed is None
    assert v.egress.pod is None and "not a pod" in v.egress.reason
    assert not explain(view, "x/a", "x/b", "TCP", 80, node_addresses=NODES).allowed


def test_pod_by_name_uses_the_family_of_the_other_end() -> None:
    view = cluster()
    assert explain(view, "x/a", "fd00::9", "UDP", 53).source.address == ip("fd00::1")
    assert explain(view, "x/a", "x/b").source.address == ip("10.0.0.1")
    assert explain(view, ip("10.0.0.2"), PodRef("x", "a")).source.pod == PodRef("x", "b")


@pytest.mark.parametrize(
    ("source", "destination", "protocol", "port", "message"),
    [
        ("x/nope", "x/a", "TCP", 80, "no pod x/nope in the cluster view"),
        ("y/done", "x/a", "TCP", 80, "no pod y/done"),  # finished pods are not in the view
        ("x/a", "not an address", "TCP", 80, "neither NAMESPACE/POD nor an IP address"),
        ("203.0.113.1", "203.0.113.2", "TCP", 80, "neither 203.0.113.1 nor 203.0.113.2"),
        ("x/b", "fd00::1", "TCP", 80, "no address family in common"),
        ("10.0.0.1", "fd00::1", "TCP", 80, "different IP families"),
        ("x/a", "x/b", "TCP", 0, "not a port number"),
        ("x/a", "x/b", "ICMP", 80, "ICMP has no ports"),
        ("x/a", "x/b", "TCP", None, "TCP needs a port"),
        ("x/a", "x/b", "T/CP", 80, "not a protocol name"),
    ],
)
def test_bad_questions_are_config_errors(
    source: str, destination: str, protocol: str, port: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        explain(cluster(), source, destination, protocol, port)


def test_to_json_is_plain_json() -> None:
    view = cluster(policy("y", "p1", ingress=[{"from": [{"podSelector": {}}]}]))
    doc = explain(view, "x/a", "y/c", "UDP", 53).to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["verdict"] == "denied" and doc["allowed"] is False
    assert doc["source"] == {"address": "10.0.0.1", "pod": "x/a", "node": "n1"}
    assert doc["flow"] == "UDP/53" and doc["always_allowed"] is None
    assert doc["ingress"]["isolated_by"] == ["y/p1"] and doc["ingress"]["allowed_by"] == []
    doc = explain(view, "y/c", "y/c", "ICMP").to_json()
    assert doc["allowed"] is True and doc["port"] is None and doc["flow"] == "ICMP"
    assert explain(view, "y/c", "y/c", "ICMP").egress.to_json()["direction"] == "egress"
