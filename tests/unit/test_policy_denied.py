"""weft.policy.denied: the ring of denied flows, stepped with an injected clock."""

from __future__ import annotations

import json

import pytest

from tests.unit.policy_support import ip
from weft.policy.compiler import Direction
from weft.policy.denied import DeniedLog, protocol_name
from weft.policy.model import IPAddress
from weft.policy.nflog import DeniedPacket

PODS = {"10.32.1.1": "x/a", "10.32.1.2": "x/b", "10.32.2.1": "y/a"}
ISOLATING = {
    ("10.32.1.1", "ingress"): ["x/b-policy", "x/a-in"],
    ("10.32.1.1", "egress"): ["x/a-in"],
}


def resolve(address: IPAddress) -> str | None:
    return PODS.get(str(address))


def isolating(address: IPAddress, direction: Direction) -> list[str]:
    return list(ISOLATING.get((str(address), direction), []))


def packet(
    prefix: str = "weft-deny-in",
    src: str = "10.32.2.1",
    dst: str = "10.32.1.1",
    protocol: int = 6,
    sport: int | None = 40000,
    dport: int | None = 80,
) -> DeniedPacket:
    return DeniedPacket(prefix, ip(src).version, ip(src), ip(dst), protocol, sport, dport)


def test_ingress_and_egress_records_name_pods_and_policies() -> None:
    log = DeniedLog()
    inbound = log.record(packet(), 100.0, resolve, isolating)
    assert inbound is not None
    assert inbound.to_json() == {
        "time": 100.0,
        "last": 100.0,
        "count": 1,
        "direction": "ingress",
        "source": "10.32.2.1",
        "source_pod": "y/a",
        "destination": "10.32.1.1",
        "destination_pod": "x/a",
        "protocol": "TCP",
        "port": 80,
        "isolated_pod": "x/a",  # ingress: the destination's isolation
        "policies": ["x/a-in", "x/b-policy"],
    }
    outbound = log.record(
        packet("weft-deny-out", "10.32.1.1", "192.0.2.9", 1, None, None), 101.0, resolve, isolating
    )
    assert outbound is not None
    assert (outbound.direction, outbound.isolated_pod, outbound.policies) == (
        "egress",
        "x/a",  # egress: the source's isolation
        ("x/a-in",),
    )
    assert (outbound.destination_pod, outbound.protocol, outbound.port) == (None, "ICMP", None)
    doc = log.to_json()
    assert [f["direction"] for f in doc["flows"]] == ["egress", "ingress"]  # newest first
    assert json.loads(json.dumps(doc)) == doc  # plain JSON


def test_same_flow_within_the_window_merges_new_source_ports_too() -> None:
    log = DeniedLog(merge_window=1.0)
    log.record(packet(sport=1), 10.0, resolve, isolating)
    log.record(packet(sport=2), 10.5, resolve, isolating)
    log.record(packet(sport=3), 11.4, resolve, isolating)  # within 1 s of the last one
    [flow] = log.flows()
    assert (flow.count, flow.time, flow.last) == (3, 10.0, 11.4)
    log.record(packet(), 12.5, resolve, isolating)  # 1.1 s later: a new record
    log.record(packet(dport=81), 12.5, resolve, isolating)  # another port: another flow
    assert [(f.count, f.port) for f in log.flows()] == [(3, 80), (1, 80), (1, 81)]
    assert log.packets == 5


def test_bounded_oldest_first_out() -> None:
    log = DeniedLog(max_entries=3, rate=1000, burst=1000)
    for port in range(5):
        log.record(packet(dport=port), 1.0, resolve, isolating)
    assert [f.port for f in log.flows()] == [2, 3, 4]
    # the evicted flow is no longer merged into: it starts a new record
    log.record(packet(dport=0), 1.0, resolve, isolating)
    assert [f.port for f in log.flows()] == [3, 4, 0]
    assert log.to_json(limit=2)["flows"][0]["port"] == 0
    assert len(log.to_json(limit=2)["flows"]) == 2


def test_new_records_are_rate_limited_merges_are_not() -> None:
    log = DeniedLog(rate=2.0, burst=3)
    for port in range(5):
        log.record(packet(dport=port), 50.0, resolve, isolating)
    assert [f.port for f in log.flows()] == [0, 1, 2] and log.suppressed == 2
    merged = log.record(packet(dport=0), 50.2, resolve, isolating)  # no token needed
    assert merged is not None and merged.count == 2
    assert log.record(packet(dport=9), 50.2, resolve, isolating) is None  # 0.4 tokens
    assert log.record(packet(dport=9), 50.5, resolve, isolating) is not None  # 1.0 token
    assert log.record(packet(dport=10), 50.5, resolve, isolating) is None
    assert log.record(packet(dport=10), 60.0, resolve, isolating) is not None  # refilled
    assert log.suppressed == 4
    # a clock stepping back does not mint tokens
    for port in range(20, 30):
        log.record(packet(dport=port), 10.0, resolve, isolating)
    assert len([f for f in log.flows() if f.port is not None and f.port >= 20]) <= 3


def test_foreign_prefixes_are_counted_and_ignored() -> None:
    log = DeniedLog()
    assert log.record(packet(prefix="someone-else"), 1.0, resolve, isolating) is None
    assert log.flows() == [] and log.foreign == 1 and log.packets == 0


def test_ipv6_and_unknown_addresses() -> None:
    log = DeniedLog()
    flow = log.record(
        packet("weft-deny-in", "fd00::2:1", "fd00::1:1", 132, 5, 9), 1.0, resolve, isolating
    )
    assert flow is not None
    assert flow.to_json()["source"] == "fd00::2:1"
    assert (flow.source_pod, flow.isolated_pod, flow.policies, flow.protocol) == (
        None,
        None,
        (),
        "SCTP",
    )


def test_protocol_names() -> None:
    assert [protocol_name(n) for n in (6, 17, 132, 1, 58, 136, 47)] == [
        "TCP",
        "UDP",
        "SCTP",
        "ICMP",
        "ICMPv6",
        "UDPLite",
        "47",
    ]


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError):
        DeniedLog(max_entries=0)
    with pytest.raises(ValueError):
        DeniedLog(rate=0)
