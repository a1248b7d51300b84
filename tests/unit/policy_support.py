"""Shared by the policy tests: API-shaped JSON builders and a reading of DesiredState as the
kernel's ruleset would match it (the fixed chains of weft/policy/nft.py over the set elements)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from weft.policy.compiler import compile_policy
from weft.policy.model import ClusterView, IPAddress
from weft.policy.verdict import chain_accepts

JSON = dict[str, Any]


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def ns(name: str, **labels: str) -> JSON:
    return {"metadata": {"name": name, "labels": dict(labels)}}


def pod(
    namespace: str,
    name: str,
    address: str | Sequence[str] | None,
    *,
    node: str = "n1",
    labels: Mapping[str, str] | None = None,
    ports: Iterable[tuple[str, int, str]] = (),
    phase: str = "Running",
) -> JSON:
    """``ports``: (name, number, protocol) container ports."""
    addresses = [address] if isinstance(address, str) else list(address or [])
    status: JSON = {"phase": phase}
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": a} for a in addresses]
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": dict(labels if labels is not None else {"pod": name}),
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "main",
                    "ports": [
                        {"name": n, "containerPort": num, "protocol": proto}
                        for n, num, proto in ports
                    ],
                }
            ],
        },
        "status": status,
    }


def policy(namespace: str, name: str, **spec: Any) -> JSON:
    spec.setdefault("podSelector", {})
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def view_of(
    namespaces: Iterable[JSON], pods: Iterable[JSON], policies: Iterable[JSON]
) -> ClusterView:
    view, errors = ClusterView.from_api(namespaces, pods, policies)
    assert not errors, errors
    return view


# ---------------------------------------------------------------------- the kernel's reading


def cluster_allows(
    view: ClusterView,
    node_addresses: Mapping[str, Sequence[IPAddress]],
    src: IPAddress,
    dst: IPAddress,
    proto: str,
    port: int | None,
) -> bool:
    """Compile every node involved and pass the packet through each node's chain once: the
    source pod's node (egress) and the destination pod's node (ingress), once if the same."""
    nodes: list[str] = []
    for address in (src, dst):
        for p in view.pods_at(address):
            if p.node is not None and p.node not in nodes:
                nodes.append(p.node)
    for node in nodes:
        state = compile_policy(view, node, node_addresses.get(node, ()))
        if not chain_accepts(state, src, dst, proto, port):
            return False
    return True
