"""``--k8s`` NetworkPolicy: follow namespaces, pods and networkpolicies; enforce on this node.

Each kind is followed on its own task: LIST, then WATCH from the list's resourceVersion until the
server ends the watch, then LIST again; 410 Gone relists at once; any other failure (API down,
403, garbage) is retried with backoff and changes nothing in the kernel - the rules in force
stay until the API answers again. Every LIST and event goes to the :class:`PolicyEnforcer`,
which reconciles level-triggered from its full cache (weft/policy/reconcile.py).

The CNI plugin tells the enforcer about a pod at ADD time (``K8S_POD_NAMESPACE`` and
``K8S_POD_NAME`` in CNI_ARGS): if the pod is not in the cache yet it is fetched once (GET), and
the ADD returns only once its isolation is in the kernel.

Composition: :func:`setup_network_policy` after ``setup_k8s`` and CNI, before ``router.start()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from weft.errors import RemoteProtocolError
from weft.k8s.apiclient import failure_reason, get_object, list_objects, watch_objects
from weft.k8s.core import ApiHealth, ApiRecovered, K8sConfig
from weft.policy.model import IPAddress
from weft.policy.reconcile import (
    KINDS,
    EnforcerConfig,
    Kind,
    LocalPod,
    NftKernel,
    PolicyApplyError,
    PolicyEnforcer,
    PolicyKernel,
    parse_cni_args,
)

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

    from weft.k8s.discovery import K8sDiscovery

__all__ = ["BR_NETFILTER", "PolicyFollower", "enable_br_netfilter", "setup_network_policy"]

log = logging.getLogger("weft.policy")

_LISTS: dict[Kind, tuple[str, str, str]] = {  # kind -> (API class, method, list kind)
    "namespaces": ("CoreV1Api", "list_namespace", "NamespaceList"),
    "pods": ("CoreV1Api", "list_pod_for_all_namespaces", "PodList"),
    "networkpolicies": (
        "NetworkingV1Api", "list_network_policy_for_all_namespaces", "NetworkPolicyList"
    ),
}
BR_NETFILTER = ("/proc/sys/net/bridge/bridge-nf-call-iptables",
                "/proc/sys/net/bridge/bridge-nf-call-ip6tables")


def enable_br_netfilter() -> None:
    """Bridged pod traffic must pass the inet hooks (weft/policy/nft.py); LocalError if it
    cannot (module br_netfilter missing)."""
    from weft.errors import LocalError

    for path in BR_NETFILTER:
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write("1\n")
        except OSError as err:
            raise LocalError(
                f"network policy needs br_netfilter ({path}: {err.strerror});"
                " load it with `modprobe br_netfilter` or run with --no-network-policy"
            ) from None


class PolicyFollower:
    """The three LIST/WATCH loops feeding one enforcer; ``start``/``stop`` on the loop."""

    def __init__(
        self,
        config: K8sConfig,
        enforcer: PolicyEnforcer,
        api: Callable[[], ApiClient | None],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.enforcer = enforcer
        self._api = api
        self.clock = clock
        self.rng = rng or random.Random()
        self.health: dict[Kind, ApiHealth] = {k: ApiHealth(config, self.rng) for k in KINDS}
        self.lists: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(k), name=f"policy-{k}") for k in KINDS]
        self._tasks.append(loop.create_task(self.enforcer.run(), name="policy-enforce"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _call(self, kind: Kind) -> Any:
        from kubernetes_asyncio import client

        api_class, method, _ = _LISTS[kind]
        api = self._api()
        if api is None:
            raise RemoteProtocolError("no API client yet")
        return getattr(getattr(client, api_class)(api), method)

    async def _follow(self, kind: Kind) -> None:
        while True:
            try:
                items, version = await list_objects(
                    self._call(kind), _LISTS[kind][2], self.config.request_timeout
                )
                self.enforcer.listed(kind, items)
                self.lists[kind] += 1
                self._succeeded(kind)
                async with watch_objects(
                    self._call(kind), version, self.config.watch_timeout,
                    self.config.request_timeout,
                ) as events:
                    async for event_type, obj in events:
                        self.enforcer.watched(kind, event_type, obj)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # never stop following
                reason = failure_reason(err)
                if reason is None:
                    log.debug("policy: %s watch expired; listing again", kind)
                    continue
                await self._failed(kind, reason)

    def _succeeded(self, kind: Kind) -> None:
        if isinstance(self.health[kind].succeeded(self.clock()), ApiRecovered):
            log.info("policy: listing %s works again; enforcing from the fresh list", kind)

    async def _failed(self, kind: Kind, reason: str) -> None:
        delay, event = self.health[kind].failed(reason, self.clock())
        if event is not None:
            log.warning("policy: cannot follow %s (%s); the rules in force stay, retrying",
                        kind, reason)
        await asyncio.sleep(delay)

    async def fetch_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """GET one pod (CNI ADD before the watch showed it); None if that fails."""
        from kubernetes_asyncio import client

        api = self._api()
        if api is None:
            return None
        try:
            return await get_object(
                client.CoreV1Api(api).read_namespaced_pod, name, namespace,
                request_timeout=min(5.0, self.config.request_timeout),
            )
        except Exception as err:  # any failure: the pod is treated as pending (isolated)
            log.info("policy: cannot fetch pod %s/%s at CNI ADD (%s)", namespace, name, err)
            return None

    def status(self) -> dict[str, Any]:
        return self.enforcer.status() | {
            "api": {k: {None: "starting", True: "ok", False: "unreachable"}[h.ok]
                    for k, h in self.health.items()},
            "lists": dict(self.lists),
        }


class CniPolicyHook:
    """What the CNI service calls around an attachment (weft.cni.server.PodHook)."""

    def __init__(self, follower: PolicyFollower) -> None:
        self.follower = follower

    async def attached(self, container_id: str, args: str, addresses: Iterable[str]) -> None:
        ref = parse_cni_args(args)
        if ref is None:
            return  # not a Kubernetes pod (podman, a test): no policy applies to it
        ips: list[IPAddress] = []
        for cidr in addresses:
            ips.append(ipaddress.ip_interface(cidr).ip)
        enforcer = self.follower.enforcer
        if ref not in enforcer.cache.objects["pods"]:
            obj = await self.follower.fetch_pod(*ref)
            if obj is not None:
                enforcer.watched("pods", "ADDED", obj)
        await enforcer.pod_attached(LocalPod(ref[0], ref[1], container_id, tuple(sorted(
            ips, key=lambda a: (a.version, int(a))))))

    async def detached(self, container_id: str) -> None:
        await self.follower.enforcer.pod_detached(container_id)


def setup_network_policy(
    router: Any,
    discovery: K8sDiscovery,
    cni: Any | None,
    *,
    kernel: PolicyKernel | None = None,
    node_addresses: Callable[[], Iterable[IPAddress]] | None = None,
) -> PolicyFollower:
    """Enforce NetworkPolicy on this node (call before ``router.start()``).

    ``cni``: the CNI service (weft.cni.server.CniService) to hook, None without CNI.
    Raises LocalError when this host cannot enforce (no nft, no br_netfilter): an operator who
    did not ask for --no-network-policy must not get an open cluster silently.
    """
    config = discovery.config
    enable_br_netfilter()
    kernel = kernel or NftKernel()

    def addresses() -> Iterable[IPAddress]:
        out: list[IPAddress] = []
        node = discovery.view.nodes.get(config.node_name)
        if node is not None and node.internal_ip:
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_address(node.internal_ip))
        if node_addresses is not None:
            out.extend(node_addresses())
        return out

    enforcer = PolicyEnforcer(EnforcerConfig(node=config.node_name), kernel, addresses)
    follower = PolicyFollower(config, enforcer, lambda: discovery._api)
    if cni is not None:
        cni.add_pod_hook(CniPolicyHook(follower))

    async def on_startup(app: Any) -> None:
        del app
        await follower.start()

    async def on_cleanup(app: Any) -> None:
        del app
        await follower.stop()  # the rules stay in the kernel: no open window while restarting

    router.app.on_startup.append(on_startup)
    router.app.on_cleanup.append(on_cleanup)
    router.add_status_provider("policy", follower.status)

    async def remove(request: web.Request) -> web.Response:
        """``weft reset``: stop enforcing and delete the table (it otherwise outlives us)."""
        del request
        await follower.stop()
        try:
            await enforcer.remove()
        except PolicyApplyError as err:
            return web.json_response({"error": str(err)}, status=500)
        log.info("policy: rules removed (weft reset); not enforcing until the router restarts")
        return web.json_response({"removed": True})

    router.app.router.add_post("/policy/remove", remove)

    class _Source:
        def cluster_view(self) -> Any:
            return enforcer.cluster_view()

        def node_addresses(self) -> list[IPAddress]:
            return list(addresses())

        def status(self) -> dict[str, Any]:
            return follower.status()

        def denied_flows(self) -> list[dict[str, Any]]:
            return []

    try:
        from weft.policy.http import (  # type: ignore[import-not-found,unused-ignore]
            add_policy_routes,
        )
    except ImportError:  # explain and its routes land separately
        log.debug("policy: no /policy routes in this build")
    else:
        add_policy_routes(router.app, _Source(), node=config.node_name)
    return follower
