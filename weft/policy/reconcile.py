"""The NetworkPolicy reconciler: the cluster cache in, one atomic nftables transaction out.

Two parts, as elsewhere in weft:

* :class:`PolicyCache` (pure, no I/O): the API objects as LIST and WATCH deliver them, plus the
  pods this node's CNI plugin attached (known at CNI ADD, before kubelet posts ``status.podIP``).
  :meth:`PolicyCache.view` builds the :class:`ClusterView` the compiler reads. Malformed objects
  are skipped, each logged once per resourceVersion with its reason; the rest keep working.
* :class:`PolicyEnforcer` (asyncio): level-triggered. Every pass compiles the *whole* cache for
  this node and turns what the kernel holds into it - element changes when the last transaction
  is known to have landed, else the full table (start, after an error, and every
  ``resync_interval`` to repair drift). Events only wake it; they are never applied one by one,
  so nothing can drift (weave-npc's lost ipset entries, weave#3764). A failed transaction keeps
  the old rules, is counted, and is retried with backoff; the process never stops over it.

Until every kind (namespaces, pods, networkpolicies) has been listed once, nothing is written:
the rules a previous run left in the kernel stay in force while the router restarts, and the
first pass replaces them atomically with the current ones (stale elements go with them).

A pod attached by CNI but not (yet) in the cache has unknown labels. If its namespace has any
policy it is isolated both ways with nothing allowed (the synthetic policy
``weft-pending-pod-isolation`` says so in explain) until the API shows it; a namespace without
policies isolates nobody, so such a pod is open as it would be anyway.

Established connections: when a pass removes anything a local pod was allowed, each conntrack
entry of a local pod is evaluated against the new state (:func:`~weft.policy.verdict.chain_accepts`
on its original direction) and deleted if now denied, so the change cuts it instead of letting it
live on as "established" (beyond what the API requires; docs/NETWORKPOLICY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol

from weft.errors import LocalError
from weft.policy.compiler import DesiredState, compile_policy
from weft.policy.model import (
    ClusterView,
    IPAddress,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyObjectError,
    parse_namespace,
    parse_network_policy,
    parse_pod,
)
from weft.policy.nft import FAMILY, TABLE, render_full, render_update, set_elements
from weft.policy.verdict import chain_accepts

__all__ = [
    "KINDS",
    "PENDING_LABEL",
    "PENDING_POLICY",
    "EnforcerConfig",
    "Flow",
    "Kind",
    "LocalPod",
    "MemoryKernel",
    "NftKernel",
    "PolicyApplyError",
    "PolicyCache",
    "PolicyEnforcer",
    "PolicyKernel",
    "parse_cni_args",
]

log = logging.getLogger("weft.policy")

Kind = Literal["namespaces", "pods", "networkpolicies"]
KINDS: Final[tuple[Kind, ...]] = ("namespaces", "pods", "networkpolicies")
PENDING_LABEL: Final = "weft.works/pending-pod"
PENDING_POLICY: Final = "weft-pending-pod-isolation"
_PROTO_NAMES: Final = {6: "TCP", 17: "UDP", 132: "SCTP"}


class PolicyApplyError(LocalError):
    """The kernel refused a transaction (the old rules stay)."""


@dataclass(frozen=True)
class EnforcerConfig:
    """Settings of one node's enforcer (seconds for durations).

    * ``node`` — this node's name (``spec.nodeName`` of its pods).
    * ``resync_interval`` — 300: a full table rewrite this often, repairing drift even if
      someone edited the table by hand.
    * ``retry_initial`` / ``retry_max`` — 0.5 / 30: backoff after a failed transaction.
    * ``cut_established`` — True: delete conntrack entries of flows a change denies.
    """

    node: str
    resync_interval: float = 300.0
    retry_initial: float = 0.5
    retry_max: float = 30.0
    cut_established: bool = True


@dataclass(frozen=True)
class LocalPod:
    """A pod this node's CNI plugin attached: known before the API server has its address."""

    namespace: str
    name: str
    container_id: str
    ips: tuple[IPAddress, ...]


def parse_cni_args(args: str) -> tuple[str, str] | None:
    """(namespace, pod) from CNI_ARGS (``K8S_POD_NAMESPACE=..;K8S_POD_NAME=..``), None if absent."""
    values: dict[str, str] = {}
    for part in args.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    namespace, name = values.get("K8S_POD_NAMESPACE"), values.get("K8S_POD_NAME")
    if not namespace or not name:
        return None
    return namespace, name


def _key(obj: Any) -> tuple[str, str] | None:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        return None
    namespace = meta.get("namespace")
    return (namespace if isinstance(namespace, str) else "", meta["name"])


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


@dataclass
class _Entry:
    version: str
    parsed: Namespace | Pod | NetworkPolicy | None  # None: malformed (logged once)


_PARSERS: Final[dict[Kind, Callable[[Any], Namespace | Pod | NetworkPolicy]]] = {
    "namespaces": parse_namespace,
    "pods": parse_pod,
    "networkpolicies": parse_network_policy,
}


@dataclass
class PolicyCache:
    """The API objects this node knows, parsed once per resourceVersion (one owner: the loop)."""

    node: str
    objects: dict[Kind, dict[tuple[str, str], _Entry]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    synced: set[Kind] = field(default_factory=set)
    local: dict[tuple[str, str], LocalPod] = field(default_factory=dict)
    malformed: dict[str, str] = field(default_factory=dict)  # "Kind ns/name" -> reason

    @property
    def ready(self) -> bool:
        return self.synced == set(KINDS)

    def _store(self, kind: Kind, key: tuple[str, str], obj: Mapping[str, Any]) -> None:
        version = _version(obj)
        old = self.objects[kind].get(key)
        if old is not None and version and old.version == version:
            return
        ref = f"{kind} {key[0] + '/' if key[0] else ''}{key[1]}"
        try:
            parsed: Namespace | Pod | NetworkPolicy | None = _PARSERS[kind](obj)
            self.malformed.pop(ref, None)
        except PolicyObjectError as err:
            parsed = None
            if self.malformed.get(ref) != str(err):
                log.warning("policy: skipping malformed %s: %s", ref, err)
            self.malformed[ref] = str(err)
        self.objects[kind][key] = _Entry(version, parsed)

    def listed(self, kind: Kind, items: Iterable[Any]) -> None:
        """A LIST's items replace everything known of ``kind``."""
        keep: set[tuple[str, str]] = set()
        for obj in items:
            key = _key(obj)
            if key is None:
                log.warning("policy: skipping a %s item without metadata.name", kind)
                continue
            keep.add(key)
            self._store(kind, key, obj)
        for key in set(self.objects[kind]) - keep:
            del self.objects[kind][key]
        self.synced.add(kind)

    def watched(self, kind: Kind, event_type: str, obj: Any) -> bool:
        """One WATCH event; False when it changed nothing (bookmarks, unknown types)."""
        if event_type == "BOOKMARK":
            return False
        key = _key(obj)
        if key is None:
            log.warning("policy: skipping a %s %s event without metadata.name", kind, event_type)
            return False
        if event_type == "DELETED":
            return self.objects[kind].pop(key, None) is not None
        if event_type in ("ADDED", "MODIFIED"):
            self._store(kind, key, obj)
            return True
        log.warning("policy: ignoring a %s watch event of type %r", kind, event_type)
        return False

    def attached(self, pod: LocalPod) -> None:
        self.local[(pod.namespace, pod.name)] = pod

    def detached(self, container_id: str) -> bool:
        for key, pod in list(self.local.items()):
            if pod.container_id == container_id:
                del self.local[key]
                return True
        return False

    def view(self) -> ClusterView:
        """The cluster as the compiler must see it on this node, now."""
        namespaces = [e.parsed for e in self.objects["namespaces"].values()
                      if isinstance(e.parsed, Namespace)]
        policies = [e.parsed for e in self.objects["networkpolicies"].values()
                    if isinstance(e.parsed, NetworkPolicy)]
        pods: dict[tuple[str, str], Pod] = {}
        for key, entry in self.objects["pods"].items():
            if isinstance(entry.parsed, Pod):
                pods[key] = entry.parsed
        isolating = {p.namespace for p in policies}
        pending: set[str] = set()
        for key, local in self.local.items():
            known = pods.get(key)
            if known is not None:
                if known.node not in (None, self.node):
                    continue  # the API says it runs elsewhere now: the attachment is stale
                phase = "Running" if known.phase == "Pending" else known.phase
                pods[key] = replace(known, ips=local.ips, node=self.node, phase=phase)
                continue
            labels: dict[str, str] = {}
            if local.namespace in isolating:
                labels[PENDING_LABEL] = "true"
                pending.add(local.namespace)
            pods[key] = Pod(local.namespace, local.name, labels, local.ips, "Running", self.node)
        for namespace in sorted(pending):
            policies.append(
                NetworkPolicy(
                    namespace,
                    PENDING_POLICY,
                    LabelSelector(((PENDING_LABEL, "true"),)),
                    policy_types=("Ingress", "Egress"),
                )
            )
        # an address that a pod of this node holds is no longer another (stale) pod's
        local_ips = {a for p in pods.values() if p.node == self.node for a in p.ips}
        cleaned = [
            p if p.node == self.node or not (set(p.ips) & local_ips) else replace(p, ips=())
            for p in pods.values()
        ]
        return ClusterView.build(namespaces, cleaned, policies)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.objects.items()} | {"attached": len(self.local)}


# ---------------------------------------------------------------------- the kernel


@dataclass(frozen=True)
class Flow:
    """A conntrack entry's original direction."""

    src: IPAddress
    dst: IPAddress
    protocol: str  # TCP, UDP, SCTP or e.g. ICMP
    port: int | None


class PolicyKernel(Protocol):
    """Where the rules go: nftables for real, a dict in the tests."""

    async def apply(self, script: str) -> None:
        """Run one nft transaction; PolicyApplyError when it is refused (nothing changed)."""
        ...

    async def cut(self, denied: Callable[[Flow], bool]) -> int:
        """Forget the conntrack entries whose original direction ``denied`` rejects (one pass
        over the table); returns how many went."""
        ...

    async def remove(self) -> None:
        """Delete the table (``weft reset``)."""
        ...


class NftKernel:
    """``nft -f -`` in this process's network namespace; conntrack through pyroute2."""

    def __init__(self, nft: str | None = None) -> None:
        found = nft or shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft")
                                               else None)
        if found is None:
            raise LocalError(
                "network policy needs the nft command (Debian package nftables);"
                " install it or run with --no-network-policy"
            )
        self.nft = found

    async def apply(self, script: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            self.nft, "-f", "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(script.encode())
        if proc.returncode != 0:
            raise PolicyApplyError(f"nft refused the transaction: {err.decode().strip()[:500]}")

    async def cut(self, denied: Callable[[Flow], bool]) -> int:
        return await asyncio.to_thread(_conntrack_cut, denied)

    async def remove(self) -> None:
        await self.apply(f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")


def _tuple_flow(t: Any) -> Flow | None:
    try:
        src = ipaddress.ip_address(t.saddr)
        dst = ipaddress.ip_address(t.daddr)
    except (ValueError, TypeError):
        return None
    proto = _PROTO_NAMES.get(int(t.proto or 0), f"proto-{t.proto}")
    port = int(t.dport) if proto in ("TCP", "UDP", "SCTP") and t.dport is not None else None
    return Flow(src, dst, proto, port)


def _conntrack_cut(denied: Callable[[Flow], bool]) -> int:
    from pyroute2 import Conntrack

    cut = 0
    with Conntrack() as ct:
        for entry in list(ct.dump_entries()):
            flow = _tuple_flow(entry.tuple_orig)
            if flow is not None and denied(flow):
                with contextlib.suppress(Exception):  # gone meanwhile
                    ct.delete(entry)
                    cut += 1
    return cut


class MemoryKernel:
    """A kernel for unit tests: keeps every script applied and a list of tracked flows."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail_next = 0
        self.tracked: list[Flow] = []
        self.removed = False

    async def apply(self, script: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise PolicyApplyError("nft refused the transaction: (test) injected failure")
        self.scripts.append(script)
        self.removed = False

    async def cut(self, denied: Callable[[Flow], bool]) -> int:
        before = len(self.tracked)
        self.tracked = [f for f in self.tracked if not denied(f)]
        return before - len(self.tracked)

    async def remove(self) -> None:
        self.removed = True


# ---------------------------------------------------------------------- the enforcer


def _removed_anything(old: DesiredState | None, new: DesiredState) -> bool:
    """True when ``new`` may deny a flow ``old`` allowed (something allowed went, or a pod
    became isolated)."""
    if old is None:
        return True
    before, after = set_elements(old), set_elements(new)
    for name, items in before.items():
        if "isolated" in name:
            if set(after[name]) - set(items):
                return True
        elif set(items) - set(after[name]):
            return True
    return False


class PolicyEnforcer:
    """Keeps this node's nftables table equal to the compiled cache (see the module docstring).

    Feed it from the API follower (:meth:`listed`, :meth:`watched`) and the CNI plugin
    (:meth:`pod_attached`, :meth:`pod_detached`); :meth:`run` is its loop.
    """

    def __init__(
        self,
        config: EnforcerConfig,
        kernel: PolicyKernel,
        node_addresses: Callable[[], Iterable[IPAddress]] = tuple,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kernel = kernel
        self.node_addresses = node_addresses
        self.clock = clock
        self.cache = PolicyCache(config.node)
        self.applied: DesiredState | None = None  # what the kernel holds, when known
        self._full_due = True
        self._last_full = float("-inf")
        self._wakeup = asyncio.Event()
        self._pending_since: float | None = None  # earliest change not yet in the kernel
        self._lock = asyncio.Lock()
        self.passes = 0
        self.transactions = 0
        self.errors = 0
        self.last_error: str | None = None
        self.cut_flows = 0
        self.latencies: deque[float] = deque(maxlen=1000)  # change -> in the kernel, seconds
        self._failures = 0

    # ------------------------------------------------------------------ input

    def _changed(self) -> None:
        if self._pending_since is None:
            self._pending_since = self.clock()
        self._wakeup.set()

    def listed(self, kind: Kind, items: Iterable[Any]) -> None:
        self.cache.listed(kind, items)
        self._changed()

    def watched(self, kind: Kind, event_type: str, obj: Any) -> None:
        if self.cache.watched(kind, event_type, obj):
            self._changed()

    async def pod_attached(self, pod: LocalPod) -> None:
        """CNI ADD: the pod's isolation (and its address in local peer sets) is in the kernel
        when this returns; PolicyApplyError if the kernel refused (the ADD must fail)."""
        self.cache.attached(pod)
        self._changed()
        if not self.cache.ready:  # the kernel may hold a previous run's rules: not this pod's
            raise PolicyApplyError("network policy is not in sync with the API server yet")
        if not await self.reconcile():  # the pod must not run unprotected
            raise PolicyApplyError(self.last_error or "network policy not applied")

    async def pod_detached(self, container_id: str) -> None:
        if self.cache.detached(container_id):
            self._changed()

    # ------------------------------------------------------------------ the pass

    def compile(self) -> DesiredState:
        return compile_policy(self.cache.view(), self.config.node, self.node_addresses())

    async def reconcile(self) -> bool:
        """One pass; True when the kernel now holds the compiled state."""
        async with self._lock:
            if not self.cache.ready:
                return False
            started = self._pending_since
            self._pending_since = None
            self.passes += 1
            try:
                desired = self.compile()
            except Exception as err:  # a compiler bug must not stop enforcement of the rest
                log.exception("policy: compiling the cluster view failed; keeping the old rules")
                self._error(f"compile: {type(err).__name__}: {err}")
                return False
            now = self.clock()
            applied = self.applied
            full = (applied is None or self._full_due
                    or now - self._last_full >= self.config.resync_interval)
            script = render_full(desired) if applied is None or full else render_update(
                applied, desired)
            if script:
                try:
                    await self.kernel.apply(script)
                except PolicyApplyError as err:
                    self._error(str(err))
                    self._full_due = True
                    if started is not None:  # still to do
                        self._pending_since = started
                    return False
                self.transactions += 1
            if full:
                self._last_full = now
            previous, self.applied, self._full_due = self.applied, desired, False
            self._failures = 0
            if started is not None:
                self.latencies.append(max(0.0, self.clock() - started))
            if self.config.cut_established and _removed_anything(previous, desired):
                await self._cut(desired)
            return True

    def _error(self, reason: str) -> None:
        self.errors += 1
        self._failures += 1
        if reason != self.last_error:
            log.error("policy: %s", reason)
        self.last_error = reason

    async def _cut(self, state: DesiredState) -> None:
        local = {r.start() for r in state.local_addresses}
        if not local:
            return

        def denied(f: Flow) -> bool:  # pure: safe on the worker thread
            return (f.src in local or f.dst in local) and not chain_accepts(
                state, f.src, f.dst, f.protocol, f.port)

        try:
            n = await self.kernel.cut(denied)
        except Exception as err:  # conntrack is best effort; the rules are in
            log.warning("policy: could not cut denied established flows: %s", err)
            return
        if n:
            self.cut_flows += n
            log.info("policy: cut %d established flows a change denies", n)

    # ------------------------------------------------------------------ loop

    def _retry_delay(self) -> float:
        c = self.config
        return float(min(c.retry_max, c.retry_initial * 2 ** max(0, self._failures - 1)))

    async def run(self) -> None:
        """Reconcile on every change (coalescing those that arrive meanwhile), after failures
        with backoff, and every ``resync_interval``."""
        while True:
            timeout = self.config.resync_interval
            if self._failures:
                timeout = self._retry_delay()
            # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that
            # arrives as the event is set (the router's stop would then hang)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.exception("policy: reconcile pass failed")
                self._error(f"{type(err).__name__}: {err}")

    async def remove(self) -> None:
        """Delete the table (``weft reset``): policy is off on this node until the next pass."""
        async with self._lock:
            await self.kernel.remove()
            self.applied = None
            self._full_due = True

    # ------------------------------------------------------------------ reading

    def cluster_view(self) -> ClusterView | None:
        return self.cache.view() if self.cache.ready else None

    def status(self) -> dict[str, Any]:
        latencies = sorted(self.latencies)

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 4)

        applied = self.applied
        return {
            "node": self.config.node,
            "synced": self.cache.ready,
            "kinds_synced": sorted(self.cache.synced),
            "objects": self.cache.counts(),
            "local_pods": len(applied.pods) if applied else 0,
            "isolated": {
                "ingress": len(applied.ingress.isolated) if applied else 0,
                "egress": len(applied.egress.isolated) if applied else 0,
            },
            "passes": self.passes,
            "transactions": self.transactions,
            "errors": self.errors,
            "last_error": self.last_error,
            "malformed": dict(sorted(self.cache.malformed.items())),
            "cut_flows": self.cut_flows,
            "enforce_latency": {"p50": pct(0.5), "p99": pct(0.99), "samples": len(latencies)},
            "pending": self._pending_since is not None,
        }
