"""weft.policy.model: parsing the API's JSON, selectors, defaulting, malformed objects."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from weft.errors import WeftError
from weft.policy.model import (
    NAMESPACE_NAME_LABEL,
    ClusterView,
    ContainerPort,
    IPBlock,
    LabelSelector,
    PolicyObjectError,
    PolicyPeer,
    PolicyPort,
    Requirement,
    parse_namespace,
    parse_network_policy,
    parse_pod,
)


def pod_json(ns: str = "x", name: str = "a", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "labels": {"pod": name}},
        "spec": {
            "nodeName": "node1",
            "containers": [
                {"name": "c", "ports": [{"name": "serve-80", "containerPort": 80}]},
                {"name": "d", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            ],
        },
        "status": {"phase": "Running", "podIP": "10.32.0.5", **status},
    }


def policy_json(spec: Any, ns: str = "x", name: str = "p") -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name}, "spec": spec}


# ---------------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    ("req", "labels", "expected"),
    [
        (Requirement("a", "In", frozenset({"1", "2"})), {"a": "2"}, True),
        (Requirement("a", "In", frozenset({"1"})), {"a": "2"}, False),
        (Requirement("a", "In", frozenset({"1"})), {}, False),
        (Requirement("a", "NotIn", frozenset({"1"})), {"a": "2"}, True),
        (Requirement("a", "NotIn", frozenset({"1"})), {"a": "1"}, False),
        (Requirement("a", "NotIn", frozenset({"1"})), {}, True),  # absent key is "not in"
        (Requirement("a", "Exists"), {"a": ""}, True),
        (Requirement("a", "Exists"), {"b": "1"}, False),
        (Requirement("a", "DoesNotExist"), {"b": "1"}, True),
        (Requirement("a", "DoesNotExist"), {"a": "1"}, False),
    ],
)
def test_requirement_operators(req: Requirement, labels: dict[str, str], expected: bool) -> None:
    assert req.matches(labels) is expected


def test_selector_is_and_of_labels_and_expressions_and_empty_matches_all() -> None:
    sel = LabelSelector((("app", "web"),), (Requirement("tier", "Exists"),))
    assert sel.matches({"app": "web", "tier": "x"})
    assert not sel.matches({"app": "web"})
    assert not sel.matches({"app": "db", "tier": "x"})
    assert LabelSelector().matches({})
    assert LabelSelector().matches({"any": "thing"})


# ---------------------------------------------------------------------- objects


def test_namespace_gets_its_name_label() -> None:
    ns = parse_namespace({"metadata": {"name": "y", "labels": {"team": "a"}}})
    assert ns.labels == {"team": "a", NAMESPACE_NAME_LABEL: "y"}
    # the API server's value wins over a forged one: it is always the name
    ns = parse_namespace({"metadata": {"name": "y", "labels": {NAMESPACE_NAME_LABEL: "z"}}})
    assert ns.labels[NAMESPACE_NAME_LABEL] == "y"


def test_pod_parses_ips_node_and_named_ports() -> None:
    pod = parse_pod(pod_json(podIPs=[{"ip": "10.32.0.5"}, {"ip": "fd00::5"}], podIP="10.32.0.5"))
    assert pod.ips == (ipaddress.ip_address("10.32.0.5"), ipaddress.ip_address("fd00::5"))
    assert pod.node == "node1"
    assert pod.ports == (ContainerPort("serve-80", "TCP", 80), ContainerPort("dns", "UDP", 53))
    assert pod.named_port("serve-80", "TCP") == 80
    assert pod.named_port("serve-80", "UDP") is None  # the name is per protocol
    assert pod.named_port("dns", "UDP") == 53
    assert pod.active


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_and_pods_without_ip_are_not_in_the_view(phase: str) -> None:
    done = parse_pod(pod_json(name="done", phase=phase))
    no_ip = parse_pod(pod_json(name="new", podIP=None, phase="Pending"))
    host = parse_pod({**pod_json(name="host"), "spec": {"hostNetwork": True}})
    live = parse_pod(pod_json(name="live"))
    assert not done.active and not no_ip.active and not host.active
    view = ClusterView.build(pods=[done, no_ip, host, live])
    assert [p.name for p in view.pods] == ["live"]


def test_policy_types_defaulting_as_the_api_server() -> None:
    only_ingress = parse_network_policy(policy_json({"podSelector": {}}))
    assert only_ingress.policy_types == ("Ingress",)
    with_egress = parse_network_policy(policy_json({"podSelector": {}, "egress": [{}]}))
    assert with_egress.policy_types == ("Ingress", "Egress")
    # an empty egress list is no egress rule: no Egress by default
    empty_egress = parse_network_policy(policy_json({"podSelector": {}, "egress": []}))
    assert empty_egress.policy_types == ("Ingress",)
    explicit = parse_network_policy(policy_json({"podSelector": {}, "policyTypes": ["Egress"]}))
    assert explicit.policy_types == ("Egress",)
    assert explicit.affects_egress and not explicit.affects_ingress


def test_policy_rules_peers_and_ports() -> None:
    pol = parse_network_policy(
        policy_json(
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {
                        "from": [
                            {
                                "podSelector": {"matchLabels": {"pod": "b"}},
                                "namespaceSelector": {
                                    "matchExpressions": [
                                        {"key": "ns", "operator": "In", "values": ["y", "z"]}
                                    ]
                                },
                            },
                            {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}},
                        ],
                        "ports": [
                            {"port": 80},
                            {"protocol": "UDP", "port": "dns"},
                            {"protocol": "SCTP", "port": 1000, "endPort": 1010},
                            {"protocol": "UDP"},
                        ],
                    }
                ],
            }
        )
    )
    (rule,) = pol.ingress
    assert rule.peers[0] == PolicyPeer(
        pod_selector=LabelSelector((("pod", "b"),)),
        namespace_selector=LabelSelector((), (Requirement("ns", "In", frozenset({"y", "z"})),)),
    )
    assert rule.peers[1] == PolicyPeer(
        ip_block=IPBlock(
            ipaddress.ip_network("192.168.0.0/16"), (ipaddress.ip_network("192.168.1.0/24"),)
        )
    )
    assert rule.ports == (
        PolicyPort("TCP", 80),
        PolicyPort("UDP", "dns"),
        PolicyPort("SCTP", 1000, 1010),
        PolicyPort("UDP"),
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]},
            "spec.ingress[0].ports[0].port",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]},
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            {"podSelector": {}, "egress": [{"ports": [{"port": "http", "endPort": 90}]}]},
            "spec.egress[0].ports[0].endPort",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": "80"}]}]},
            "spec.ingress[0].ports[0].port",
        ),
        ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]"),
        (
            {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            {
                "podSelector": {},
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}],
            },
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            {
                "podSelector": {},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}],
            },
            "spec.ingress[0].from[0]",
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}},
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}},
            "spec.podSelector.matchExpressions[0].values",
        ),
        (
            {
                "podSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
            "spec.podSelector.matchExpressions[0].values",
        ),
        ({"podSelector": {"matchLabels": {"a": 1}}}, "spec.podSelector.matchLabels.a"),
        ({"podSelector": {}, "policyTypes": ["Both"]}, "spec.policyTypes[0]"),
        ({"podSelector": {}, "ingress": {"from": []}}, "spec.ingress"),
        (None, "spec"),
    ],
)
def test_malformed_policy_names_object_and_field(spec: Any, field: str) -> None:
    with pytest.raises(PolicyObjectError) as info:
        parse_network_policy(policy_json(spec, ns="prod", name="broken"))
    err = info.value
    assert isinstance(err, WeftError)
    assert (err.kind, err.ref, err.field) == ("NetworkPolicy", "prod/broken", field)
    assert str(err).startswith(f"NetworkPolicy prod/broken: {field}: ")


def test_malformed_objects_are_skipped_and_the_rest_kept() -> None:
    good_policy = policy_json({"podSelector": {}}, name="good")
    bad_policy = policy_json(
        {"podSelector": {}, "ingress": [{"ports": [{"port": -1}]}]}, name="bad"
    )
    bad_pod = pod_json(name="bad", podIP="10.0.0.999")
    view, errors = ClusterView.from_api(
        namespaces=[{"metadata": {"name": "x"}}, {"metadata": {}}, "junk"],
        pods=[pod_json(name="a"), bad_pod, {"metadata": {"name": "nons"}}],
        policies=[bad_policy, good_policy],
    )
    assert [p.name for p in view.policies] == ["good"]
    assert [p.name for p in view.pods] == ["a"]
    assert list(view.namespaces) == ["x"]
    described = sorted(str(e) for e in errors)
    assert described == sorted(
        [
            "Namespace ?: metadata.name: missing or empty",
            "Namespace ?: (object): is a str, not a JSON object",
            "Pod x/bad: status.podIP: '10.0.0.999' is not an IP address",
            "Pod ?/nons: metadata.namespace: missing or empty",
            "NetworkPolicy x/bad: spec.ingress[0].ports[0].port: -1 is not a port number 1..65535",
        ]
    )


def test_unknown_namespace_still_matches_by_name_label() -> None:
    view = ClusterView.build()
    assert view.namespace_labels("ghost") == {NAMESPACE_NAME_LABEL: "ghost"}
