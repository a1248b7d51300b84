"""Prometheus metrics: gauges match the status model at every scrape; counters; label bounds."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from weft.ui.metrics import (
    CONNECTION_STATES,
    Metrics,
    connection_counts,
    ipam_counts,
    label_token,
    partitions,
)
from weft.ui.server import setup_routes
from weft.ui.synthetic import peer_name, synthetic_status

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def connection_gauges(samples: Samples) -> dict[tuple[str, str, str], int]:
    out = {}
    for (name, labels), value in samples.items():
        if name == "weft_connections":
            d = dict(labels)
            out[(d["state"], d["datapath"], d["encryption"])] = int(value)
    return out


def mixed_status() -> dict[str, Any]:
    status = synthetic_status(8, degree=6, datapaths=("ovs", "vxlan", "sleeve"), seed=2)
    conns = status["router"]["connections"]
    conns[0]["state"] = "pending"
    conns[1]["state"] = "failed"
    conns[1]["encrypted"] = False
    conns.append(
        {
            "peer": "",
            "nickname": "",
            "address": "10.0.0.9:6783",
            "outbound": True,
            "state": "retrying",
            "info": "connection refused",
            "encrypted": False,
            "datapath": "none",
            "mtu": None,
        }
    )
    return status


def test_connection_gauges_match_status_exactly() -> None:
    status = mixed_status()
    metrics = Metrics(get_status=lambda: status)
    gauges = connection_gauges(scrape(metrics))
    expected = connection_counts(status)
    assert {k: v for k, v in gauges.items() if v} == expected
    # Counted from the status by hand, independently of connection_counts.
    for conn in status["router"]["connections"]:
        key = (conn["state"], conn["datapath"], "yes" if conn["encrypted"] else "no")
        assert gauges[key] == sum(
            1
            for c in status["router"]["connections"]
            if (c["state"], c["datapath"], "yes" if c["encrypted"] else "no") == key
        )
    assert sum(gauges.values()) == len(status["router"]["connections"])
    # Zero series for every known state of each datapath/encryption in use.
    for _, datapath, encryption in expected:
        for state in CONNECTION_STATES:
            assert (state, datapath, encryption) in gauges


def test_gauges_follow_the_status_at_scrape_time() -> None:
    holder = {"status": synthetic_status(3)}
    metrics = Metrics(get_status=lambda: holder["status"])
    assert sum(connection_gauges(scrape(metrics)).values()) == 2
    changed = copy.deepcopy(holder["status"])
    changed["router"]["connections"][0]["state"] = "failed"
    holder["status"] = changed
    gauges = connection_gauges(scrape(metrics))
    assert gauges[("failed", "ovs", "yes")] == 1
    assert gauges[("established", "ovs", "yes")] == 0


async def test_metrics_endpoint_matches_status_endpoint() -> None:
    status = mixed_status()
    app = web.Application()
    metrics = Metrics(get_status=lambda: status)
    setup_routes(app, lambda: status, metrics=metrics)

    async def handle_status(request: web.Request) -> web.Response:
        return web.json_response(status)

    app.router.add_get("/status", handle_status)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
        got_status = await (await client.get("/status")).json()
    gauges: dict[tuple[str, str, str], int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "weft_connections" and s.value:
                gauges[(s.labels["state"], s.labels["datapath"], s.labels["encryption"])] = int(
                    s.value
                )
    assert gauges == connection_counts(got_status)


def test_peers_partitions_and_unreachable() -> None:
    status = synthetic_status(10, partitions=2, seed=4)
    samples = scrape(Metrics(get_status=lambda: status))
    assert samples[("weft_peers", ())] == 10
    assert samples[("weft_partitions", ())] == 2
    assert samples[("weft_unreachable_peers", ())] == 5
    groups = partitions(status)
    assert peer_name(1) in groups[0] and len(groups[0]) == 5


def test_one_sided_connection_does_not_join_partitions() -> None:
    status = synthetic_status(3)
    gone = peer_name(3)
    for p in status["router"]["peers"]:
        if p["name"] != gone:  # the others dropped it; its own record is stale
            p["connections"] = [c for c in p["connections"] if c["name"] != gone]
    groups = partitions(status)
    assert groups == [{peer_name(1), peer_name(2)}, {gone}]


def test_ipam_gauges() -> None:
    status = synthetic_status(4)
    status["ipam"] = {
        "range": "10.32.0.0/12",
        "entries": [
            {"peer": peer_name(1), "owned": 100, "free": 60, "reachable": True},  # us
            {"peer": peer_name(2), "owned": 50, "free": 50},
            {"peer": peer_name(3), "owned": 30, "free": 10, "reachable": False},
            {"peer": peer_name(4), "owned": "x", "free": -1, "reachable": False},  # malformed
            "garbage",
        ],
    }
    assert ipam_counts(status) == {"owned": 100, "free": 60, "allocated": 40, "unreachable": 30}
    status["ipam"]["allocated"] = 38  # what the allocator says it handed out wins
    status["ipam"]["unreachable"] = 31
    samples = scrape(Metrics(get_status=lambda: status))
    assert samples[("weft_ipam_owned_addresses", ())] == 100
    assert samples[("weft_ipam_free_addresses", ())] == 60
    assert samples[("weft_ipam_allocated_addresses", ())] == 38
    assert samples[("weft_ipam_unreachable_addresses", ())] == 31


def test_no_ipam_section_no_ipam_series() -> None:
    status = synthetic_status(2, ipam=False)
    samples = scrape(Metrics(get_status=lambda: status))
    assert not any(name.startswith("weft_ipam") for name, _ in samples)


def test_fastdp_flows_from_status_or_source() -> None:
    status: dict[str, Any] = synthetic_status(2)
    metrics = Metrics(get_status=lambda: status)
    assert ("weft_fastdp_flows", ()) not in scrape(metrics)
    status["overlay"] = {"flows": 17}
    assert scrape(metrics)[("weft_fastdp_flows", ())] == 17
    metrics.set_fastdp_flows_source(lambda: 42)
    assert scrape(metrics)[("weft_fastdp_flows", ())] == 42


def test_counters() -> None:
    m = Metrics()
    m.connection_terminated("Wrong password: confirm did not open")
    m.connection_terminated("wrong password")
    m.connection_terminated("protocol version mismatch (ours 1..2, theirs 3..4)")
    m.gossip_sent("topology", 120)
    m.gossip_sent("topology", 80, messages=2)
    m.gossip_received("ipam", 33)
    m.sleeve_sent(packets=10, nbytes=14000)
    m.sleeve_received(packets=3, nbytes=900)
    m.sleeve_dropped("replay")
    m.sleeve_dropped("decrypt", packets=4)
    m.fallback("ovs", "sleeve")
    s = scrape(m)
    assert s[("weft_connection_terminations_total", (("reason", "wrong_password"),))] == 2
    assert (
        s[("weft_connection_terminations_total", (("reason", "protocol_version_mismatch"),))] == 1
    )
    assert s[("weft_gossip_messages_total", (("channel", "topology"), ("direction", "out")))] == 3
    assert s[("weft_gossip_bytes_total", (("channel", "topology"), ("direction", "out")))] == 200
    assert s[("weft_gossip_bytes_total", (("channel", "ipam"), ("direction", "in")))] == 33
    assert s[("weft_sleeve_packets_total", (("direction", "out"),))] == 10
    assert s[("weft_sleeve_bytes_total", (("direction", "out"),))] == 14000
    assert s[("weft_sleeve_bytes_total", (("direction", "in"),))] == 900
    assert s[("weft_sleeve_drops_total", (("reason", "replay"),))] == 1
    assert s[("weft_sleeve_drops_total", (("reason", "decrypt"),))] == 4
    assert s[("weft_sleeve_drops_total", (("reason", "oversize"),))] == 0  # preset, zero
    fallback = (("from_datapath", "ovs"), ("reason", "unknown"), ("to_datapath", "sleeve"))
    assert s[("weft_datapath_fallbacks_total", fallback)] == 1
    # No status source: no connection gauges, no crash.
    assert not any(name == "weft_connections" for name, _ in s)


def test_free_text_labels_are_bounded() -> None:
    m = Metrics()
    for i in range(200):
        m.connection_terminated(f"reason number {i} word{i}")
        m.sleeve_dropped(f"weird{i}")
        m.gossip_received(f"chan{i}", 1)
    s = scrape(m)
    reasons = {dict(lb)["reason"] for name, lb in s if name == "weft_connection_terminations_total"}
    assert len(reasons) <= 33 and "other" in reasons
    drops = {dict(lb)["reason"] for name, lb in s if name == "weft_sleeve_drops_total"}
    assert len(drops) <= 33 and "other" in drops
    channels = {dict(lb)["channel"] for name, lb in s if name == "weft_gossip_messages_total"}
    assert len(channels) <= 33


def test_registries_are_per_router() -> None:
    a, b = Metrics(), Metrics()  # the global registry would refuse the second set of names
    a.connection_terminated("eof")
    assert scrape(a)[("weft_connection_terminations_total", (("reason", "eof"),))] == 1
    assert ("weft_connection_terminations_total", (("reason", "eof"),)) not in scrape(b)


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("Wrong password: x", "wrong_password"),
        ("heartbeats unanswered for 60s; using sleeve", "heartbeats_unanswered_for_60s"),
        ("EOF", "eof"),
        ("", "unknown"),
        ("   ::: ", "unknown"),
        ("read 12 bytes", "read_bytes"),
        (42, "unknown"),
        ("x" * 500, "x" * 40),
    ],
)
def test_label_token(text: object, token: str) -> None:
    assert label_token(text) == token


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"router": 5},
        {"router": {"connections": "x", "peers": [1, None, {"name": 3}]}},
        {"router": {"connections": [None, {"state": 7, "datapath": None}]}},
        {"ipam": []},
    ],
)
def test_odd_status_documents_do_not_break_scrapes(status: Mapping[str, Any]) -> None:
    samples = scrape(Metrics(get_status=lambda: status))
    assert ("weft_peers", ()) in samples


def test_counters_from_the_status_model_plus_increments() -> None:
    status: dict[str, Any] = synthetic_status(2)
    status["router"]["counters"] = {
        "accepted": 4,
        "dial_failed": 2,
        "closed_wrong_password": 3,
        "closed_heartbeat_timeout": 1,
    }
    status["overlay"] = {
        "datapath": "sleeve",
        "stats": {
            "messages_in": 10,
            "messages_out": 12,
            "tap_frames_in": 30,
            "tap_frames_out": 31,
            "bytes_in": 1000,
            "relayed": 5,
        },
        "drops": {"tampered": 2, "no_route": 7, "replayed": 1},
    }
    metrics = Metrics(get_status=lambda: status)
    metrics.connection_terminated("wrong password")
    metrics.sleeve_dropped("tampered", packets=3)
    s = scrape(metrics)
    # Terminations come only from connection_terminated (the daemon wires it to the router's
    # on_connection_closed), never also from the closed_* counters: no double counting.
    assert s[("weft_connection_terminations_total", (("reason", "wrong_password"),))] == 1
    assert ("weft_connection_terminations_total", (("reason", "heartbeat_timeout"),)) not in s
    assert not any(dict(lb).get("event", "").startswith("closed_") for _, lb in s)
    assert s[("weft_connection_events_total", (("event", "accepted"),))] == 4
    assert s[("weft_connection_events_total", (("event", "dial_failed"),))] == 2
    assert s[("weft_sleeve_packets_total", (("direction", "in"),))] == 10
    assert s[("weft_sleeve_packets_total", (("direction", "out"),))] == 12
    assert s[("weft_sleeve_frames_total", (("direction", "out"),))] == 31
    assert s[("weft_sleeve_bytes_total", (("direction", "in"),))] == 1000
    assert s[("weft_sleeve_bytes_total", (("direction", "out"),))] == 0
    assert s[("weft_sleeve_drops_total", (("reason", "tampered"),))] == 5
    assert s[("weft_sleeve_drops_total", (("reason", "no_route"),))] == 7
    assert s[("weft_sleeve_drops_total", (("reason", "oversize"),))] == 0
    # Counters follow the status: a later scrape sees the new values.
    status["overlay"]["stats"]["messages_in"] = 11
    assert scrape(metrics)[("weft_sleeve_packets_total", (("direction", "in"),))] == 11


async def test_setup_routes_binds_and_exposes_metrics() -> None:
    from weft.ui.server import metrics_of

    status = synthetic_status(3)
    early = Metrics()  # made before the router exists, handed to the data plane
    early.fallback("ovs", "sleeve")
    app = web.Application()
    setup_routes(app, lambda: status, metrics=early)
    assert metrics_of(app) is early
    async with TestClient(TestServer(app)) as client:
        text = await (await client.get("/metrics")).text()
    assert 'weft_connections{datapath="ovs",encryption="yes",state="established"} 1.0' in text
    assert (
        'weft_datapath_fallbacks_total{from_datapath="ovs",reason="unknown",to_datapath="sleeve"}'
        " 1.0" in text
    )
    other = web.Application()
    setup_routes(other, lambda: status)
    assert metrics_of(other) is not early


def test_mesh_stats_source() -> None:
    from weft.gossip.mesh import MeshStats

    stats = MeshStats(
        messages_sent=5,
        bytes_sent=500,
        messages_received=4,
        bytes_received=400,
        records_sent=9,
        records_received=8,
        records_new=2,
    )
    metrics = Metrics(get_status=lambda: synthetic_status(2))
    assert ("weft_mesh_messages_total", (("direction", "out"),)) not in scrape(metrics)
    metrics.set_mesh_stats_source(lambda: stats)
    s = scrape(metrics)
    assert s[("weft_mesh_messages_total", (("direction", "out"),))] == 5
    assert s[("weft_mesh_messages_total", (("direction", "in"),))] == 4
    assert s[("weft_mesh_bytes_total", (("direction", "out"),))] == 500
    assert s[("weft_topology_records_total", (("event", "new"),))] == 2
    stats.messages_sent += 1  # read at scrape time
    assert scrape(metrics)[("weft_mesh_messages_total", (("direction", "out"),))] == 6
    metrics.set_mesh_stats_source(lambda: {"bytes_sent": 7, "records_new": "x"})  # a mapping
    s = scrape(metrics)
    assert s[("weft_mesh_bytes_total", (("direction", "out"),))] == 7
    assert s[("weft_topology_records_total", (("event", "new"),))] == 0


def test_gossip_by_channel_from_the_mesh_counters() -> None:
    from weft.gossip.mesh import MeshStats
    from weft.gossip.wire import encode_gossip

    stats = MeshStats()
    stats.count("topology", 100, sent=False)
    stats.count("topology", 50, sent=True)
    stats.count("ipam", 30, sent=True)
    metrics = Metrics(get_status=lambda: synthetic_status(2))
    metrics.set_mesh_stats_source(lambda: stats)
    s = scrape(metrics)
    key = (("channel", "topology"), ("direction", "in"))
    assert s[("weft_gossip_messages_total", key)] == 1
    assert s[("weft_gossip_bytes_total", key)] == 100
    assert s[("weft_gossip_bytes_total", (("channel", "ipam"), ("direction", "out")))] == 30
    # the sender side reads the channel off an encoded envelope without decoding it
    from weft.gossip.mesh import _peek_channel
    from weft.gossip.peer import PeerName

    assert _peek_channel(encode_gossip("ipam", PeerName(1), b"x" * 100)) == "ipam"
    assert _peek_channel(b"\x00garbage") == "other"


def test_broken_status_producer_does_not_break_scrapes() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug")

    metrics = Metrics(get_status=broken)
    metrics.sleeve_dropped("replayed")
    s = scrape(metrics)
    assert s[("weft_status_up", ())] == 0
    assert s[("weft_sleeve_drops_total", (("reason", "replayed"),))] == 1
    assert scrape(Metrics(get_status=lambda: synthetic_status(2)))[("weft_status_up", ())] == 1


def labelled(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_per_connection_series_carry_the_row_values() -> None:
    status = synthetic_status(3, datapaths=("vxlan", "sleeve"))
    first, second = status["router"]["connections"]
    first.update(heard=0.4, rtt=0.0021, mtu=1410, stats={"bytes_in": 500, "bytes_out": 700})
    second.update(state="degraded", heard=3.5)
    s = scrape(Metrics(get_status=lambda: status))
    p1, p2 = first["peer"], second["peer"]
    assert s[("weft_connection_heard_seconds", (("peer", p1),))] == 0.4
    assert s[("weft_connection_rtt_seconds", (("peer", p1),))] == 0.0021
    assert s[("weft_connection_mtu_bytes", (("peer", p1),))] == 1410
    assert ("weft_connection_rtt_seconds", (("peer", p2),)) not in s  # not known: no sample
    ctrl = "weft_connection_control_bytes_total"
    assert s[(ctrl, (("direction", "out"), ("peer", p1)))] == 700
    assert s[("weft_connection_state", (("peer", p2), ("state", "degraded")))] == 1
    assert s[("weft_connection_state", (("peer", p2), ("state", "established")))] == 0
    assert s[("weft_connection_datapath", (("datapath", first["datapath"]), ("peer", p1)))] == 1
    assert s[("weft_connection_datapath", (("datapath", "ovs"), ("peer", p1)))] == 0
    assert s[("weft_connection_encrypted", (("peer", p1),))] == 1
    info = labelled(s, "weft_connection_info")
    assert {dict(k)["nickname"] for k in info} == {first["nickname"], second["nickname"]}
    assert s[("weft_connection_heard_max_seconds", ())] == 3.5
    assert s[("weft_connection_series_omitted", ())] == 0


def test_per_connection_series_are_bounded_and_slots_stay_put() -> None:
    status = synthetic_status(40, degree=39)
    conns = status["router"]["connections"]
    n = len(conns)
    assert n > 30
    conns[-1]["heard"] = 9.0  # beyond the limit, but the max gauge still sees it
    conns.append(dict(conns[0], state="failed", address="10.9.9.9:6783"))  # same peer twice
    metrics = Metrics(get_status=lambda: status, per_peer_limit=10)
    s = scrape(metrics)
    peers = {dict(k)["peer"] for k in labelled(s, "weft_connection_info")}
    assert len(peers) == 10 and peers == set(sorted({c["peer"] for c in conns})[:10])
    assert len(labelled(s, "weft_connection_state")) == 10 * len(CONNECTION_STATES)
    assert s[("weft_connection_series_omitted", ())] == n - 10
    assert s[("weft_connection_heard_max_seconds", ())] == 9.0
    # A peer that goes frees its slot for the next; the others keep theirs.
    gone = min(peers)
    status["router"]["connections"] = [c for c in conns if c["peer"] != gone]
    after = {dict(k)["peer"] for k in labelled(scrape(metrics), "weft_connection_info")}
    assert len(after) == 10 and gone not in after and peers - {gone} <= after


def test_dial_and_handshake_failures_by_reason_with_zero_series() -> None:
    status: dict[str, Any] = synthetic_status(2)
    s = scrape(Metrics(get_status=lambda: status))
    assert s[("weft_dial_failures_total", (("reason", "connection_refused"),))] == 0
    assert s[("weft_handshake_failures_total", (("reason", "wrong_password"),))] == 0
    status["router"]["failures"] = {
        "dial": {"connection_refused": 3, "timeout": 1},
        "handshake": {"wrong_password": 2, "io_error": 1},
    }
    s = scrape(Metrics(get_status=lambda: status))
    assert s[("weft_dial_failures_total", (("reason", "connection_refused"),))] == 3
    assert s[("weft_dial_failures_total", (("reason", "timeout"),))] == 1
    assert s[("weft_handshake_failures_total", (("reason", "wrong_password"),))] == 2
    assert s[("weft_handshake_failures_total", (("reason", "io_error"),))] == 1


def switch_status() -> dict[str, Any]:
    status: dict[str, Any] = synthetic_status(2)
    status["overlay"] = {
        "datapath": "auto",
        "switch": {
            "datapaths": ["vxlan", "sleeve"],
            "note": "ovs: ovs_datapath: no such generic netlink family (openvswitch module"
            " not loaded/available)",
            "ovs": None,
            "vxlan": {
                "problem": "",
                "traffic": {"bytes_in": 9000, "frames_in": 10, "bytes_out": 4500, "frames_out": 5},
            },
            "capabilities": {
                "openvswitch": {"available": False, "detail": "openvswitch module not loaded"},
                "vxlan": {"available": True, "detail": "vxlan links can be created"},
                "esp": {"available": False, "detail": "Operation not permitted"},
            },
            "fallback_reasons": [
                {"from": "vxlan", "to": "sleeve", "reason": "heartbeat_lost", "count": 2}
            ],
        },
    }
    return status


def test_datapath_capabilities_and_availability_with_reasons() -> None:
    s = scrape(Metrics(get_status=switch_status))
    caps = labelled(s, "weft_datapath_capability")
    assert caps == {
        (("capability", "openvswitch"), ("reason", "module_missing")): 0,
        (("capability", "vxlan"), ("reason", "available")): 1,
        (("capability", "esp"), ("reason", "not_permitted")): 0,
    }
    available = labelled(s, "weft_datapath_available")
    assert available == {
        (("datapath", "ovs"), ("reason", "module_missing")): 0,
        (("datapath", "vxlan"), ("reason", "available")): 1,
        (("datapath", "sleeve"), ("reason", "available")): 1,
    }


def test_fastdp_traffic_and_fallbacks_by_reason_from_the_status() -> None:
    status = switch_status()
    metrics = Metrics(get_status=lambda: status)
    s = scrape(metrics)
    assert s[("weft_fastdp_frames_total", (("datapath", "vxlan"), ("direction", "in")))] == 10
    assert s[("weft_fastdp_bytes_total", (("datapath", "vxlan"), ("direction", "out")))] == 4500
    fallbacks = labelled(s, "weft_datapath_fallbacks_total")
    key = (("from_datapath", "vxlan"), ("reason", "heartbeat_lost"), ("to_datapath", "sleeve"))
    assert fallbacks[key] == 2
    # pre-seeded: every reason of every move this router can make, zero until it happens
    assert {dict(k)["reason"] for k in fallbacks} == {
        "heartbeat_lost",
        "peer_heartbeat_lost",
        "mtu",
        "unavailable",
    }
    assert all(dict(k)["from_datapath"] == "vxlan" for k in fallbacks)  # no ovs here
    # without a switch (sleeve only) nothing to fall back from
    status["overlay"] = {"datapath": "sleeve", "switch": {"datapaths": ["sleeve"]}}
    assert not labelled(scrape(metrics), "weft_datapath_fallbacks_total")


def test_build_info_process_collectors_containers_and_mesh_ipam() -> None:
    import weft

    status = synthetic_status(4, containers=3)
    status["router"]["protocol"] = "1..3"
    s = scrape(Metrics(get_status=lambda: status))
    (labels,) = labelled(s, "weft_build_info")
    assert dict(labels)["version"] == weft.__version__ and dict(labels)["protocol"] == "1..3"
    assert ("process_cpu_seconds_total", ()) in s
    assert any(name == "python_info" for name, _ in s)
    assert s[("weft_containers", ())] == 3
    assert s[("weft_encrypted", ())] == 1
    entries = status["ipam"]["entries"]
    mesh = labelled(s, "weft_ipam_mesh_addresses")
    assert mesh[(("state", "owned"),)] == sum(e["owned"] for e in entries)
    assert mesh[(("state", "free"),)] == sum(e["free"] for e in entries)
    assert s[("weft_ipam_range_addresses", ())] == 1 << 20
    assert mesh[(("state", "unowned"),)] == (1 << 20) - sum(e["owned"] for e in entries)
    no_bridge = synthetic_status(2)
    no_bridge.pop("containers", None)
    assert ("weft_containers", ()) not in scrape(Metrics(get_status=lambda: no_bridge))
    assert not any(
        n.startswith("process_")
        for n, _ in scrape(Metrics(get_status=lambda: status, process_collectors=False))
    )
