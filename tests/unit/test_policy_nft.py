"""weft.policy.nft: the script's shape (the kernel's verdict is tests/integ/test_policy_nft.py)."""

from __future__ import annotations

import pytest

from tests.unit.policy_support import ip, ns, pod, policy, view_of
from weft.policy.compiler import AddrRange, compile_policy
from weft.policy.model import ClusterView
from weft.policy.nft import (
    COUNTERS,
    COUNTING_SETS,
    DENY_PREFIX,
    LOG_GROUP,
    SET_TYPES,
    render_full,
    render_update,
    set_elements,
)


def view(extra: bool = False) -> ClusterView:
    pods = [
        pod("x", "a", ["10.32.1.1", "fd00::1"], node="n1", ports=[("web", 8080, "TCP")]),
        pod("y", "a", "10.32.2.1", node="n2"),
    ]
    if extra:
        pods.append(pod("y", "b", "10.32.2.2", node="n2"))
    return view_of(
        [ns("x"), ns("y")],
        pods,
        [
            policy(
                "x",
                "p",
                ingress=[
                    {"from": [{"namespaceSelector": {}}], "ports": [{"port": "web"}]},
                    {
                        "from": [
                            {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}
                        ]
                    },
                ],
            )
        ],
    )


def test_addr_range_notation() -> None:
    assert str(AddrRange.host(ip("10.0.0.5"))) == "10.0.0.5"
    assert str(AddrRange(4, int(ip("10.0.0.0")), int(ip("10.255.255.255")))) == "10.0.0.0/8"
    assert str(AddrRange(4, int(ip("10.0.0.3")), int(ip("10.0.0.9")))) == "10.0.0.3-10.0.0.9"
    assert str(AddrRange.everything(6)) == "::/0"
    assert str(AddrRange.host(ip("::5"))) == "::5"  # a small v6 value stays v6


def test_full_script_replaces_the_table_and_lists_elements() -> None:
    state = compile_policy(view(), "n1", [ip("10.32.0.254")])
    script = render_full(state)
    lines = script.splitlines()
    assert lines[1:4] == [
        "add table inet weft-policy",
        "delete table inet weft-policy",
        "table inet weft-policy {",
    ]
    assert "\t\t\t10.32.1.1 . 10.32.1.1/32 . tcp . 8080," not in script  # hosts are bare
    assert "\t\t\t10.32.1.1 . 10.32.1.1 . tcp . 8080," in script  # x/a from itself (selector)
    assert "\t\t\t10.32.1.1 . 10.32.2.1 . tcp . 8080," in script
    assert "\t\t\t10.32.1.1 . 192.168.0.0/24," in script
    assert "\t\t\t10.32.1.1 . 192.168.2.0-192.168.255.255," in script
    assert "\t\t\t10.32.0.254," in script
    assert "\t\t\tfd00::1 . fd00::1 . tcp . 8080," in script
    assert script == render_full(compile_policy(view(), "n1", [ip("10.32.0.254")]))


def test_update_is_elements_only_deletes_first() -> None:
    old = compile_policy(view(), "n1", ())
    new = compile_policy(view(extra=True), "n1", ())
    update = render_update(old, new).splitlines()
    # 10.32.2.1 grows into 10.32.2.1-10.32.2.2: the old element goes before the range comes
    assert update == [
        "delete element inet weft-policy in_ports4 { 10.32.1.1 . 10.32.2.1 . tcp . 8080 }",
        "add element inet weft-policy in_ports4 { 10.32.1.1 . 10.32.2.1-10.32.2.2 . tcp . 8080 }",
    ]
    assert render_update(new, new) == ""
    assert set_elements(new)["in_isolated4"] == ["10.32.1.1"]


def test_counters_limit_and_log_are_fixed_rules() -> None:
    state = compile_policy(view(), "n1", [ip("10.32.0.254")])
    script = render_full(state)
    lines = script.splitlines()
    for name in COUNTERS:
        assert f"\tcounter {name} {{ }}" in lines
    assert "\tlimit deny_log { rate 50/second burst 100 packets }" in lines
    # each allow set counts per element; the isolation and helper sets do not
    for name in SET_TYPES:
        block = script.split(f"\tset {name} {{\n", 1)[1].split("\n\t}", 1)[0]
        assert ("\t\tcounter" in block.splitlines()) == (name in COUNTING_SETS), name
    assert len(COUNTING_SETS) == 8
    ingress4 = script.split("\tchain ingress4 {\n", 1)[1].split("\n\t}", 1)[0].splitlines()
    assert ingress4 == [
        '\t\tip daddr . ip saddr @in_all4 counter name "allowed_in4" return',
        '\t\tip daddr . ip saddr . meta l4proto . th dport @in_ports4 counter name "allowed_in4"'
        " return",
        '\t\tlimit name "deny_log" log prefix "weft-deny-in" group 4783',
        '\t\tcounter name "denied_in4" drop comment "ingress denied"',
    ]
    egress6 = script.split("\tchain egress6 {\n", 1)[1].split("\n\t}", 1)[0]
    assert 'log prefix "weft-deny-out" group 4783' in egress6
    assert 'counter name "denied_out6" drop' in egress6
    # the rule list does not depend on the cluster: another state, the same rules
    other = render_full(compile_policy(view(extra=True), "n1", ()))
    assert script.split("\tchain forward {")[1] == other.split("\tchain forward {")[1]


def test_log_settings() -> None:
    state = compile_policy(view(), "n1", ())
    script = render_full(state, log_group=7, log_rate=5, log_burst=9)
    assert "\tlimit deny_log { rate 5/second burst 9 packets }" in script.splitlines()
    assert script.count("group 7\n") == 4 and "4783" not in script
    assert LOG_GROUP == 4783 and DENY_PREFIX == {
        "ingress": "weft-deny-in",
        "egress": "weft-deny-out",
    }
    for bad in ({"log_group": 70000}, {"log_rate": 0}, {"log_burst": 0}):
        with pytest.raises(ValueError):
            render_full(state, **bad)
