"""weft.policy.reconcile: the cache, the level-triggered passes and what reaches the kernel
(an in-memory kernel; weft/policy/nft.py's scripts are checked against nft in tests/integ)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.unit.policy_support import ip, ns, pod, policy
from weft.policy.compiler import AddrRange
from weft.policy.reconcile import (
    PENDING_POLICY,
    EnforcerConfig,
    Flow,
    LocalPod,
    MemoryKernel,
    PolicyApplyError,
    PolicyEnforcer,
    parse_cni_args,
)
from weft.policy.verdict import chain_accepts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def versioned(obj: dict[str, Any], version: int) -> dict[str, Any]:
    obj["metadata"]["resourceVersion"] = str(version)
    return obj


def deny_all(namespace: str, name: str = "deny-all") -> dict[str, Any]:
    return policy(namespace, name, policyTypes=["Ingress", "Egress"])


def enforcer(kernel: MemoryKernel | None = None, **config: Any) -> tuple[PolicyEnforcer, Clock]:
    clock = Clock()
    e = PolicyEnforcer(
        EnforcerConfig(node="n1", **config),
        kernel or MemoryKernel(),
        lambda: [ip("192.168.0.1")],
        clock,
    )
    return e, clock


def sync(e: PolicyEnforcer, namespaces: list[Any], pods: list[Any], policies: list[Any]) -> None:
    e.listed("namespaces", namespaces)
    e.listed("pods", pods)
    e.listed("networkpolicies", policies)


def isolated(e: PolicyEnforcer, address: str, direction: str = "ingress") -> bool:
    assert e.applied is not None
    return AddrRange.host(ip(address)) in e.applied.direction(direction).isolated  # type: ignore[arg-type]


def allows(e: PolicyEnforcer, src: str, dst: str, port: int = 80) -> bool:
    assert e.applied is not None
    return chain_accepts(e.applied, ip(src), ip(dst), "TCP", port)


async def test_nothing_is_written_until_every_kind_was_listed() -> None:
    kernel = MemoryKernel()
    e, _ = enforcer(kernel)
    e.listed("namespaces", [ns("x")])
    e.listed("pods", [pod("x", "a", "10.32.1.1")])
    assert not await e.reconcile()
    assert kernel.scripts == [] and e.cluster_view() is None
    e.listed("networkpolicies", [deny_all("x")])
    assert await e.reconcile()
    assert len(kernel.scripts) == 1
    assert kernel.scripts[0].splitlines()[1:3] == [
        "add table inet weft-policy", "delete table inet weft-policy"]  # replaces a stale table
    assert "10.32.1.1" in kernel.scripts[0] and isolated(e, "10.32.1.1")
    assert e.status()["synced"] and e.status()["transactions"] == 1


async def test_changes_after_the_first_pass_are_element_updates_and_bursts_coalesce() -> None:
    kernel = MemoryKernel()
    e, clock = enforcer(kernel)
    sync(e, [ns("x")], [pod("x", "a", "10.32.1.1"), pod("x", "b", "10.32.1.2")], [])
    await e.reconcile()
    for i, name in enumerate(("c", "d", "e")):  # three events, one pass
        e.watched("pods", "ADDED", pod("x", name, f"10.32.1.{10 + i}"))
    e.watched("networkpolicies", "ADDED", deny_all("x"))
    clock.now += 0.25
    assert await e.reconcile()
    assert len(kernel.scripts) == 2
    update = kernel.scripts[1]
    assert "table inet weft-policy {" not in update  # no rule list, only elements
    assert update.startswith("add element inet weft-policy") or "add element" in update
    assert all(isolated(e, f"10.32.1.{n}") for n in (1, 2, 10, 11, 12))
    assert e.status()["enforce_latency"]["samples"] == 2
    assert e.latencies[-1] == pytest.approx(0.25)
    # no change: no transaction at all
    assert await e.reconcile()
    assert len(kernel.scripts) == 2


async def test_a_refused_transaction_keeps_the_old_rules_and_the_next_pass_is_full() -> None:
    kernel = MemoryKernel()
    e, _clock = enforcer(kernel)
    sync(e, [ns("x")], [pod("x", "a", "10.32.1.1")], [])
    await e.reconcile()
    before = e.applied
    kernel.fail_next = 1
    e.watched("networkpolicies", "ADDED", deny_all("x"))
    assert not await e.reconcile()
    assert e.applied is before and e.errors == 1
    assert "injected failure" in (e.status()["last_error"] or "")
    assert e.status()["pending"]  # the change is still owed
    assert await e.reconcile()
    assert kernel.scripts[-1].splitlines()[1] == "add table inet weft-policy"  # full rewrite
    assert isolated(e, "10.32.1.1")


async def test_a_full_rewrite_repairs_drift_every_resync_interval() -> None:
    kernel = MemoryKernel()
    e, clock = enforcer(kernel, resync_interval=60.0)
    sync(e, [ns("x")], [pod("x", "a", "10.32.1.1")], [deny_all("x")])
    await e.reconcile()
    clock.now += 30
    e.watched("pods", "ADDED", pod("x", "b", "10.32.1.2"))
    await e.reconcile()
    assert "table inet weft-policy {" not in kernel.scripts[-1]
    clock.now += 31
    await e.reconcile()  # nothing changed, but the table is rewritten whole
    assert "table inet weft-policy {" in kernel.scripts[-1]


async def test_a_malformed_object_is_skipped_logged_once_and_the_rest_enforced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e, _ = enforcer()
    bad = policy("x", "broken", ingress=[{"ports": [{"port": 80, "protocol": "ICMP"}]}])
    with caplog.at_level(logging.WARNING, logger="weft.policy"):
        sync(e, [ns("x")], [pod("x", "a", "10.32.1.1")], [versioned(bad, 5), deny_all("x")])
        e.listed("networkpolicies", [versioned(bad, 5), deny_all("x")])  # a relist: same version
        e.watched("networkpolicies", "MODIFIED", versioned(bad, 6))  # same problem, new version
        await e.reconcile()
    assert sum("x/broken" in r.getMessage() for r in caplog.records) == 1
    assert isolated(e, "10.32.1.1")  # deny-all still applies
    assert list(e.status()["malformed"]) == ["networkpolicies x/broken"]
    assert "protocol" in e.status()["malformed"]["networkpolicies x/broken"]
    fixed = policy("x", "broken", ingress=[{"ports": [{"port": 80, "protocol": "TCP"}]}])
    e.watched("networkpolicies", "MODIFIED", versioned(fixed, 7))
    await e.reconcile()
    assert e.status()["malformed"] == {}
    # now enforced: port 80 from anyone, nothing else
    assert allows(e, "10.32.9.9", "10.32.1.1", 80) and not allows(e, "10.32.9.9", "10.32.1.1", 81)


async def test_a_pod_attached_by_cni_is_isolated_before_the_api_has_its_address() -> None:
    kernel = MemoryKernel()
    e, _ = enforcer(kernel)
    web = pod("x", "web", None, labels={"app": "web"}, phase="Pending")
    allow_from_client = policy(
        "x", "web-from-client", podSelector={"matchLabels": {"app": "web"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}])
    sync(e, [ns("x")],
         [web, pod("x", "client", "10.32.1.9", labels={"app": "client"}),
          pod("x", "other", "10.32.1.8", labels={"app": "other"})],
         [allow_from_client])
    await e.reconcile()
    await e.pod_attached(LocalPod("x", "web", "cid-1", (ip("10.32.1.5"),)))
    assert isolated(e, "10.32.1.5")
    assert allows(e, "10.32.1.9", "10.32.1.5") and not allows(e, "10.32.1.8", "10.32.1.5")
    # the API later posts the same address: nothing changes; DEL takes it away
    e.watched("pods", "MODIFIED", pod("x", "web", "10.32.1.5", labels={"app": "web"}))
    await e.reconcile()
    assert isolated(e, "10.32.1.5")
    await e.pod_detached("cid-1")
    e.watched("pods", "DELETED", web)
    await e.reconcile()
    assert not isolated(e, "10.32.1.5")


async def test_an_unknown_pod_in_a_namespace_with_policies_is_denied_until_the_api_shows_it(
) -> None:
    e, _ = enforcer()
    # selects by label: whether it selects the new pod is unknown until the API shows it
    allow_all_in = policy("x", "open", podSelector={"matchLabels": {"app": "new"}}, ingress=[{}])
    sync(e, [ns("x"), ns("y")], [pod("y", "peer", "10.32.2.1", node="n2")], [allow_all_in])
    await e.reconcile()
    await e.pod_attached(LocalPod("x", "new", "cid-2", (ip("10.32.1.7"),)))
    assert isolated(e, "10.32.1.7", "ingress") and isolated(e, "10.32.1.7", "egress")
    assert not allows(e, "10.32.2.1", "10.32.1.7") and not allows(e, "10.32.1.7", "10.32.2.1")
    view = e.cluster_view()
    assert view is not None and any(p.name == PENDING_POLICY for p in view.policies)
    e.watched("pods", "ADDED", pod("x", "new", None, labels={"app": "new"}, phase="Pending"))
    await e.reconcile()
    assert allows(e, "10.32.2.1", "10.32.1.7") and allows(e, "10.32.1.7", "10.32.2.1")
    # in a namespace without policies a pod is open whether known or not
    await e.pod_attached(LocalPod("y", "free", "cid-3", (ip("10.32.2.9"),)))
    assert not isolated(e, "10.32.2.9") and allows(e, "10.32.1.7", "10.32.2.9")


async def test_pod_attached_fails_while_not_in_sync_or_when_the_kernel_refuses() -> None:
    kernel = MemoryKernel()
    e, _ = enforcer(kernel)
    with pytest.raises(PolicyApplyError, match="not in sync"):
        await e.pod_attached(LocalPod("x", "a", "c1", (ip("10.32.1.1"),)))
    sync(e, [ns("x")], [], [deny_all("x")])
    kernel.fail_next = 2
    with pytest.raises(PolicyApplyError, match="injected"):
        await e.pod_attached(LocalPod("x", "a", "c1", (ip("10.32.1.1"),)))


async def test_a_change_that_denies_an_established_flow_cuts_it_and_only_it() -> None:
    kernel = MemoryKernel()
    e, _ = enforcer(kernel)
    pods = [pod("x", "a", "10.32.1.1", labels={"app": "a"}),
            pod("x", "b", "10.32.1.2", labels={"app": "b"}),
            pod("x", "c", "10.32.1.3", labels={"app": "c"})]
    sync(e, [ns("x")], pods, [])
    await e.reconcile()
    kernel.tracked = [
        Flow(ip("10.32.1.2"), ip("10.32.1.1"), "TCP", 80),  # b -> a: stays allowed
        Flow(ip("10.32.1.3"), ip("10.32.1.1"), "TCP", 80),  # c -> a: to be denied
        Flow(ip("10.32.1.3"), ip("10.32.1.2"), "TCP", 80),  # c -> b: b not isolated
        Flow(ip("192.168.0.1"), ip("10.32.1.1"), "TCP", 8080),  # the node's probe
    ]
    e.watched("networkpolicies", "ADDED", policy(
        "x", "a-from-b", podSelector={"matchLabels": {"app": "a"}},
        ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]))
    await e.reconcile()
    assert kernel.tracked == [
        Flow(ip("10.32.1.2"), ip("10.32.1.1"), "TCP", 80),
        Flow(ip("10.32.1.3"), ip("10.32.1.2"), "TCP", 80),
        Flow(ip("192.168.0.1"), ip("10.32.1.1"), "TCP", 8080),
    ]
    assert e.status()["cut_flows"] == 1


async def test_removing_the_table_forces_a_full_pass() -> None:
    kernel = MemoryKernel()
    e, _ = enforcer(kernel)
    sync(e, [ns("x")], [pod("x", "a", "10.32.1.1")], [deny_all("x")])
    await e.reconcile()
    await e.remove()
    assert kernel.removed and e.applied is None
    e.watched("pods", "ADDED", pod("x", "b", "10.32.1.2"))
    await e.reconcile()
    assert "table inet weft-policy {" in kernel.scripts[-1]


def test_cni_args_name_the_pod() -> None:
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a;K8S_POD_INFRA_CONTAINER_ID=abc"
    assert parse_cni_args(args) == ("x", "a")
    assert parse_cni_args("IgnoreUnknown=1") is None
    assert parse_cni_args("") is None
    assert parse_cni_args("K8S_POD_NAMESPACE=x;K8S_POD_NAME=") is None
