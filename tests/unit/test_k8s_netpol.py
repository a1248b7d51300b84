"""weft.k8s.netpol: the real kubernetes_asyncio client against a fake API server, feeding the
enforcer (in-memory kernel): LIST then WATCH, 410 relists, an API away changes nothing, and a
CNI ADD fetches a pod the watch has not shown yet."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.fake_k8s import FakeKubeApi
from tests.unit.policy_support import ip, ns, pod, policy
from weft.k8s.apiclient import make_api_client
from weft.k8s.core import K8sConfig
from weft.k8s.netpol import CniPolicyHook, PolicyFollower
from weft.policy.compiler import AddrRange
from weft.policy.reconcile import EnforcerConfig, MemoryKernel, PolicyEnforcer


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    server = FakeKubeApi()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def follower(api: FakeKubeApi) -> AsyncIterator[tuple[PolicyFollower, MemoryKernel]]:
    config = K8sConfig(node_name="n1", api_url=api.url, retry_initial=0.05, retry_max=0.2,
                       watch_timeout=30)
    kernel = MemoryKernel()
    enforcer = PolicyEnforcer(EnforcerConfig(node="n1", retry_initial=0.05, retry_max=0.2),
                              kernel, lambda: [ip("192.168.0.1")])
    client = await make_api_client(config)
    f = PolicyFollower(config, enforcer, lambda: client, rng=random.Random(1))
    await f.start()
    try:
        yield f, kernel
    finally:
        await f.stop()
        await client.close()


def isolated(f: PolicyFollower, address: str) -> bool:
    applied = f.enforcer.applied
    return applied is not None and AddrRange.host(ip(address)) in applied.ingress.isolated


async def seed(api: FakeKubeApi, *objects: tuple[str, dict[str, Any]]) -> None:
    for kind, obj in objects:
        await api.put(kind, obj)


async def test_list_then_watch_enforces_every_change(
    api: FakeKubeApi, follower: tuple[PolicyFollower, MemoryKernel]
) -> None:
    f, _kernel = follower
    await seed(api, ("namespaces", ns("x")), ("pods", pod("x", "a", "10.32.1.1")))
    await wait_for(lambda: f.enforcer.applied is not None, "the first pass")
    assert not isolated(f, "10.32.1.1")
    await api.put("networkpolicies", policy("x", "deny", policyTypes=["Ingress"]))
    await wait_for(lambda: isolated(f, "10.32.1.1"), "the policy in the kernel")
    await api.put("pods", pod("x", "b", "10.32.1.2"))
    await wait_for(lambda: isolated(f, "10.32.1.2"), "a new pod isolated")
    await api.delete("networkpolicies", "x", "deny")
    await wait_for(lambda: not isolated(f, "10.32.1.1"), "the policy gone")
    assert {k for k, how in api.requests if how == "WATCH"} == {
        "namespaces", "pods", "networkpolicies"}
    status = f.status()
    assert status["api"] == {"namespaces": "ok", "pods": "ok", "networkpolicies": "ok"}
    assert status["errors"] == 0 and status["transactions"] >= 4
    assert status["enforce_latency"]["samples"] >= 3


async def test_an_expired_watch_relists(
    api: FakeKubeApi, follower: tuple[PolicyFollower, MemoryKernel]
) -> None:
    f, _ = follower
    await seed(api, ("namespaces", ns("x")), ("pods", pod("x", "a", "10.32.1.1")))
    await wait_for(lambda: f.enforcer.applied is not None, "the first pass")
    lists = f.lists["networkpolicies"]
    await api.expire_watch("networkpolicies")
    await wait_for(lambda: f.lists["networkpolicies"] > lists, "a relist")
    await api.put("networkpolicies", policy("x", "deny"))
    await wait_for(lambda: isolated(f, "10.32.1.1"), "the policy after a relist")
    assert f.health["networkpolicies"].failures == 0


async def test_while_the_api_is_away_the_rules_in_force_stay(
    api: FakeKubeApi, follower: tuple[PolicyFollower, MemoryKernel]
) -> None:
    f, kernel = follower
    await seed(api, ("namespaces", ns("x")), ("pods", pod("x", "a", "10.32.1.1")),
               ("networkpolicies", policy("x", "deny")))
    await wait_for(lambda: isolated(f, "10.32.1.1"), "the policy in the kernel")
    scripts = len(kernel.scripts)
    await api.set_down(True)
    await wait_for(lambda: f.health["pods"].failures >= 2, "failed relists")
    assert len(kernel.scripts) == scripts and isolated(f, "10.32.1.1")
    assert f.status()["api"]["pods"] == "unreachable"
    await api.set_down(False)
    await api.delete("networkpolicies", "x", "deny")
    await wait_for(lambda: not isolated(f, "10.32.1.1"), "enforcing again")


async def test_a_forbidden_kind_blocks_enforcement_but_not_the_process(
    api: FakeKubeApi, follower: tuple[PolicyFollower, MemoryKernel]
) -> None:
    f, kernel = follower
    api.forbidden.add("networkpolicies")
    await seed(api, ("namespaces", ns("x")), ("pods", pod("x", "a", "10.32.1.1")))
    await wait_for(lambda: f.health["networkpolicies"].failures >= 1, "a 403")
    assert kernel.scripts == []  # without the policies nothing is known to be right
    assert "403" in (f.health["networkpolicies"].last_error or "")
    api.forbidden.clear()
    await wait_for(lambda: f.enforcer.applied is not None, "enforcing after RBAC is fixed")


async def test_cni_add_fetches_a_pod_the_watch_has_not_shown(
    api: FakeKubeApi, follower: tuple[PolicyFollower, MemoryKernel]
) -> None:
    f, _ = follower
    await seed(api, ("namespaces", ns("x")),
               ("networkpolicies", policy("x", "web", podSelector={
                   "matchLabels": {"app": "web"}}, ingress=[{"ports": [{"port": 80}]}])))
    await wait_for(lambda: f.enforcer.applied is not None, "the first pass")
    # the pod exists in the API (kubelet calls CNI only for scheduled pods), but the watch has
    # not delivered it: take the watch's view away by adding it behind its back
    f.enforcer.cache.objects["pods"].clear()
    api.objects["pods"][("x", "web")] = pod("x", "web", None, labels={"app": "web"},
                                            phase="Pending")
    hook = CniPolicyHook(f)
    await hook.attached("cid-9", "K8S_POD_NAMESPACE=x;K8S_POD_NAME=web", ["10.32.1.5/12"])
    assert ("pods", "GET") in api.requests
    assert isolated(f, "10.32.1.5")
    view = f.enforcer.cluster_view()
    assert view is not None
    web = view.pod("x", "web")
    assert web is not None and web.labels["app"] == "web"  # labels from the GET, not pending
    await hook.detached("cid-9")
    await hook.attached("cid-10", "IgnoreUnknown=1", ["10.32.1.6/12"])  # not a pod: no-op
    assert not isolated(f, "10.32.1.6")
