"""Shared by the policy tests: API-shaped JSON builders and a reading of DesiredState as the
kernel's ruleset would match it (the fixed chains of weft/policy/nft.py over the set elements)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from weft.policy.compiler import AddrRange, DesiredState, DirectionState, compile_policy
from weft.policy.model import ClusterView, IPAddress

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


def _hit_all(state: DirectionState, local: IPAddress, peer: IPAddress) -> bool:
    lh = AddrRange.host(local)
    return any(e.local == lh and e.peer.contains(peer) for e in state.allow_all)


def _hit_ports(
    state: DirectionState, local: IPAddress, peer: IPAddress, proto: str, port: int | None
) -> bool:
    if port is None:
        return False
    lh = AddrRange.host(local)
    return any(
        e.local == lh
        and e.peer.contains(peer)
        and e.protocol == proto
        and e.ports.first <= port <= e.ports.last
        for e in state.allow_ports
    )


def chain_accepts(
    state: DesiredState, src: IPAddress, dst: IPAddress, proto: str, port: int | None
) -> bool:
    """Chain ``check`` of one node for a new connection (not established, not ND).

    ``proto`` "TCP"/"UDP"/"SCTP" with ``port``, or e.g. "ICMP" with None: only the
    all-protocol sets match it, as ``meta l4proto . th dport`` never equals a tcp/udp/sctp key.
    """
    s, d = AddrRange.host(src), AddrRange.host(dst)
    if s in state.node_addresses:
        return True
    if src == dst and s in state.local_addresses:
        return True
    if s in state.egress.isolated and not (
        _hit_all(state.egress, src, dst) or _hit_ports(state.egress, src, dst, proto, port)
    ):
        return False
    return not (
        d in state.ingress.isolated
        and not (
            _hit_all(state.ingress, dst, src) or _hit_ports(state.ingress, dst, src, proto, port)
        )
    )


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
