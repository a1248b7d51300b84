"""The --k8s decisions without I/O: node parsing, targets, who reclaims, API backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import PeerName
from weft.k8s.core import (
    ApiHealth,
    ApiRecovered,
    ApiUnreachable,
    K8sConfig,
    NodeDeleted,
    NodeView,
    TargetsChanged,
    choose_reclaims,
    parse_node,
    peer_name_for_node,
)


def node(name: str, *addresses: tuple[str, str]) -> dict[str, object]:
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1"},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
    }


def test_peer_names_from_node_names() -> None:
    a, b = peer_name_for_node("node-a"), peer_name_for_node("node-b")
    assert a == peer_name_for_node("node-a") != b
    for p in (a, b):
        assert p >> 40 & 0x02 and not p >> 40 & 0x01  # locally administered, unicast
    with pytest.raises(ConfigError, match="node name is empty"):
        peer_name_for_node("")


def test_parse_node() -> None:
    n = parse_node(node("a", ("Hostname", "a"), ("InternalIP", "fd00::1"),
                        ("InternalIP", "10.1.2.3"), ("ExternalIP", "192.0.2.9")))
    assert (n.name, n.internal_ip) == ("a", "10.1.2.3")  # IPv4 preferred, ExternalIP ignored
    assert parse_node(node("b", ("InternalIP", "fd00::2"))).internal_ip == "fd00::2"
    assert parse_node(node("c")).internal_ip is None
    assert parse_node({"metadata": {"name": "d"}, "status": None}).internal_ip is None
    assert parse_node(node("e", ("InternalIP", "garbage"))).internal_ip is None
    bads: list[object] = [[], {"metadata": {}}, {"metadata": {"name": 3}}, "x"]
    for bad in bads:
        with pytest.raises(RemoteProtocolError):
            parse_node(bad)


def drain(view: NodeView) -> list[object]:
    out: list[object] = []
    while (ev := view.next_event()) is not None:
        out.append(ev)
    return out


def test_node_view_targets_follow_list_and_watch() -> None:
    view = NodeView(K8sConfig(node_name="n1"))
    view.listed([node(f"n{i}", ("InternalIP", f"10.0.0.{i}")) for i in (1, 2, 3)])
    assert drain(view) == [TargetsChanged(("10.0.0.2:6783", "10.0.0.3:6783"))]
    view.watched("ADDED", node("n4"))  # no address yet: not a target
    assert drain(view) == []
    view.watched("MODIFIED", node("n4", ("InternalIP", "10.0.0.4")))
    assert drain(view) == [TargetsChanged(("10.0.0.2:6783", "10.0.0.3:6783", "10.0.0.4:6783"))]
    view.watched("BOOKMARK", {"metadata": {"resourceVersion": "9"}})
    view.watched("DELETED", node("n3", ("InternalIP", "10.0.0.3")))
    assert drain(view) == [
        NodeDeleted("n3", peer_name_for_node("n3")),
        TargetsChanged(("10.0.0.2:6783", "10.0.0.4:6783")),
    ]
    view.watched("DELETED", node("n3"))  # again: nothing new
    assert drain(view) == []
    # a relist that misses n2 means it was deleted while we were not watching
    view.listed([node("n1", ("InternalIP", "10.0.0.1")), node("n4", ("InternalIP", "10.0.0.4"))])
    assert drain(view) == [
        NodeDeleted("n2", peer_name_for_node("n2")),
        TargetsChanged(("10.0.0.4:6783",)),
    ]
    with pytest.raises(RemoteProtocolError, match="unexpected watch event type"):
        view.watched("ERROR", node("n1"))
    assert view.peers() == {peer_name_for_node("n1"), peer_name_for_node("n4")}


def test_observer_outside_the_list_dials_every_node() -> None:
    view = NodeView(K8sConfig(node_name="elsewhere", port=7000))
    view.listed([node(f"n{i}", ("InternalIP", f"10.0.0.{i}")) for i in (1, 2, 3)])
    assert view.targets == ("10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000")


P = [PeerName(0x020000000000 + i) for i in range(10)]


def test_choose_reclaims_rules() -> None:
    listed = {P[1], P[2], P[3]}
    owners = {P[1]: 100, P[2]: 100, P[3]: 100, P[7]: 50, P[8]: 0}
    # P[7] owns space, is no node's peer, unreachable: the lowest live node takes it
    assert choose_reclaims(P[1], listed, owners, {P[2], P[3]}) == [P[7]]
    assert choose_reclaims(P[2], listed, owners, {P[1], P[3]}) == []
    assert choose_reclaims(P[3], listed, owners, {P[1], P[2]}) == []
    # the lowest is down: the next one decides (P[1] is listed but unreachable)
    assert choose_reclaims(P[2], listed, owners, {P[3]}) == [P[7]]
    # an orphan still reachable over the mesh is not taken
    assert choose_reclaims(P[1], listed, owners, {P[2], P[3], P[7]}) == []
    # cut off from the majority: never
    assert choose_reclaims(P[1], listed, owners, set()) == []
    assert choose_reclaims(P[1], {P[1], P[2]}, owners, set()) == []  # 1 of 2 is no majority
    # our own node is not listed (yet): never
    assert choose_reclaims(P[0], listed, owners, listed) == []


@settings(max_examples=300, deadline=None)
@given(
    listed=st.sets(st.integers(0, 9), min_size=1, max_size=8),
    down=st.sets(st.integers(0, 9)),
    orphans=st.sets(st.integers(10, 14), min_size=1),
)
def test_exactly_one_live_peer_reclaims_each_orphan(
    listed: set[int], down: set[int], orphans: set[int]
) -> None:
    names = {i: PeerName(0x020000000000 + i) for i in range(15)}
    node_peers = {names[i] for i in listed}
    live = {names[i] for i in listed - down}
    owners = {names[i]: 10 for i in listed | orphans}
    deciders = {
        p: choose_reclaims(p, node_peers, owners, live - {p}) for p in live
    }
    takers = [p for p, chosen in deciders.items() if chosen]
    if 2 * len(live) > len(node_peers):
        assert takers == [min(live)]
        assert deciders[min(live)] == sorted(names[i] for i in orphans)
    else:
        assert takers == []


def test_api_health_logs_state_changes_and_backs_off() -> None:
    health = ApiHealth(K8sConfig(node_name="n1", retry_initial=1, retry_max=8),
                       random.Random(4))
    assert health.succeeded(0.0) is None  # the first success is no recovery
    delays = []
    events = []
    for i in range(8):
        delay, ev = health.failed("connection refused", float(i))
        delays.append(delay)
        events.append(ev)
    assert events[0] == ApiUnreachable("connection refused")
    assert events[1:] == [None] * 7  # once per state change, not per retry
    assert 0.5 <= delays[0] < 1.5 and all(d <= 8 for d in delays)
    assert max(delays[4:]) >= 4  # grew towards the cap
    assert health.succeeded(9.0) == ApiRecovered(8)
    assert health.succeeded(10.0) is None
    assert health.failed("x", 11.0)[1] == ApiUnreachable("x")  # a new outage: logged again


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        K8sConfig(node_name="")
    with pytest.raises(ConfigError, match="retry_max"):
        K8sConfig(node_name="a", retry_initial=5, retry_max=1)
    with pytest.raises(ConfigError, match="port"):
        K8sConfig(node_name="a", port=0)


def test_cli_options_make_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from weft.k8s.cli import add_k8s_arguments, k8s_config_from_args

    parser = argparse.ArgumentParser()
    add_k8s_arguments(parser)
    assert k8s_config_from_args(parser.parse_args([]), 6783) is None
    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(ConfigError, match="NODE_NAME"):
        k8s_config_from_args(parser.parse_args(["--k8s"]), 6783)
    monkeypatch.setenv("NODE_NAME", "worker-1")
    cfg = k8s_config_from_args(parser.parse_args(["--k8s", "--k8s-label-selector", "a=b"]), 7000)
    assert cfg is not None
    assert (cfg.node_name, cfg.port, cfg.label_selector, cfg.api_url) == (
        "worker-1", 7000, "a=b", None)
    cfg = k8s_config_from_args(
        parser.parse_args(["--k8s", "--k8s-node-name", "n2", "--k8s-api", "https://x:6443"]), 1)
    assert cfg is not None and (cfg.node_name, cfg.api_url) == ("n2", "https://x:6443")
