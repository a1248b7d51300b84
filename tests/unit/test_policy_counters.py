"""weft.policy.counters' parsers on nft 1.0.6's JSON (captured from a loaded weft-policy table)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.policy_support import ip
from tests.unit.test_policy_nft import view
from weft.policy.compiler import compile_policy
from weft.policy.counters import (
    Count,
    CountersParseError,
    parse_counters,
    parse_element_counters,
)
from weft.policy.nft import COUNTERS, COUNTING_SETS, set_elements

META = {
    "metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}
}


def doc(*items: dict[str, Any]) -> str:
    return json.dumps({"nftables": [META, *items]})


def counter(name: str, packets: int, octets: int, table: str = "weft-policy") -> dict[str, Any]:
    return {
        "counter": {
            "family": "inet",
            "name": name,
            "table": table,
            "handle": 2,
            "packets": packets,
            "bytes": octets,
        }
    }


def elem(val: Any, packets: int = 0) -> dict[str, Any]:
    return {"elem": {"val": val, "counter": {"packets": packets, "bytes": packets * 60}}}


def a_set(name: str, elems: list[Any]) -> dict[str, Any]:
    return {
        "set": {
            "family": "inet",
            "name": name,
            "table": "weft-policy",
            "type": ["ipv4_addr", "ipv4_addr"],
            "handle": 20,
            "flags": ["interval"],
            "elem": elems,
            "stmt": [{"counter": None}],
        }
    }


def test_named_counters() -> None:
    text = doc(
        *(counter(name, i, i * 100) for i, name in enumerate(COUNTERS)),
        counter("allowed_in4", 99, 99, table="someone-else"),
    )
    counts = parse_counters(text)
    assert set(counts) == set(COUNTERS)
    assert counts["allowed_in4"] == Count(0, 0) and counts["denied_out6"] == Count(7, 700)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"nftables": {}}),
        doc({"counter": {"table": "weft-policy", "packets": 1, "bytes": 1}}),  # no name
        doc(counter("denied_in4", -1, 0)),
        doc({"counter": {"table": "weft-policy", "name": "x", "packets": "1", "bytes": 1}}),
    ],
)
def test_unreadable_counters_raise_one_value_error(text: str) -> None:
    with pytest.raises(CountersParseError):
        parse_counters(text)


def test_element_counters_in_set_elements_notation() -> None:
    text = doc(
        {
            "set": {
                "family": "inet",
                "name": "node4",
                "table": "weft-policy",
                "elem": ["10.32.0.254"],
            }
        },
        a_set(
            "in_all4",
            [
                elem({"concat": ["10.32.1.1", {"prefix": {"addr": "192.168.0.0", "len": 24}}]}, 3),
                elem({"concat": ["10.32.1.1", {"range": ["192.168.2.0", "192.168.255.255"]}]}),
                elem({"concat": ["10.32.1.1", {"prefix": {"addr": "0.0.0.0", "len": 0}}]}),
                # a range nft did not fold into a prefix is still written as set_elements would
                elem({"concat": ["10.32.1.1", {"range": ["10.0.0.0", "10.0.0.255"]}]}),
            ],
        ),
        a_set(
            "out_ports6",
            [
                elem(
                    {
                        "concat": [
                            "fd00::1",
                            {"prefix": {"addr": "fd00::2:0", "len": 112}},
                            "udp",
                            {"range": [0, 65535]},
                        ]
                    },
                    5,
                ),
                elem({"concat": ["fd00::1", "fd00:0::1:1", "tcp", 8080]}),
            ],
        ),
    )
    counts = parse_element_counters(text)
    assert set(counts) == set(COUNTING_SETS) and "node4" not in counts
    assert counts["in_all4"] == {
        "10.32.1.1 . 192.168.0.0/24": Count(3, 180),
        "10.32.1.1 . 192.168.2.0-192.168.255.255": Count(0, 0),
        "10.32.1.1 . 0.0.0.0/0": Count(0, 0),
        "10.32.1.1 . 10.0.0.0/24": Count(0, 0),
    }
    assert counts["out_ports6"] == {
        "fd00::1 . fd00::2:0/112 . udp . 0-65535": Count(5, 300),
        "fd00::1 . fd00::1:1 . tcp . 8080": Count(0, 0),
    }
    assert counts["in_ports4"] == {}


def test_element_keys_are_the_renderers() -> None:
    """What set_elements writes, as nft would list it, parses back to the same strings."""
    state = compile_policy(view(), "n1", [ip("10.32.0.254")])
    listed = {
        "in_all4": [
            elem({"concat": ["10.32.1.1", {"prefix": {"addr": "192.168.0.0", "len": 24}}]}),
            elem({"concat": ["10.32.1.1", {"range": ["192.168.2.0", "192.168.255.255"]}]}),
        ],
        "in_ports4": [
            elem({"concat": ["10.32.1.1", "10.32.1.1", "tcp", 8080]}),
            elem({"concat": ["10.32.1.1", "10.32.2.1", "tcp", 8080]}),
        ],
        "in_ports6": [elem({"concat": ["fd00::1", "fd00::1", "tcp", 8080]})],
    }
    counts = parse_element_counters(doc(*(a_set(n, e) for n, e in listed.items())))
    expected = set_elements(state)
    for name in COUNTING_SETS:
        assert sorted(counts[name]) == sorted(expected[name]), name


@pytest.mark.parametrize(
    "bad",
    [
        ["10.32.1.1"],  # an element without a counter
        [elem({"concat": ["10.32.1.1"]})],
        [elem({"concat": ["nonsense", "10.0.0.1"]})],
        [elem({"concat": ["10.0.0.1", {"range": ["10.0.0.1", "::1"]}]})],
        [elem({"concat": ["10.0.0.1", {"prefix": {"addr": "10.0.0.0"}}]})],
        [elem({"concat": ["10.0.0.1", "10.0.0.2", 6, 80]})],
        [elem({"concat": ["10.0.0.1", "10.0.0.2", "tcp", "http"]})],
        [elem({"concat": ["10.0.0.1", {"set": []}]})],
    ],
)
def test_unreadable_elements_raise_one_value_error(bad: list[Any]) -> None:
    with pytest.raises(CountersParseError):
        parse_element_counters(doc(a_set("in_all4", bad)))
