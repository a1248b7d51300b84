"""Router side of the CNI plugin: ``POST /cni/{add,del,check,status,gc}``.

The plugin process (weft/cni/plugin.py) validates and converts versions; this side does the work
with the router's long-lived state: the address allocator (``CniIpam``, weft's IPAM by default) and
the kernel (weft/host/attach.py, run in worker threads so the event loop never blocks on netlink).

Contract with the plugin (JSON bodies, internal results are CNI 1.1.0 shaped):

- add ``{containerId, netns, ifname, args, network, config, ipam?}`` -> ``{"result": {...}}``;
  ``ipam`` is a delegated IPAM plugin's result (internal form) when the network does not use weft's.
- del ``{containerId, netns, ifname, network, config, weftIpam}`` -> ``{}``; idempotent.
- check ``{..., prevResult, weftIpam}`` -> ``{}`` or error 102 listing every problem.
- status ``{network}`` -> ``{}`` or 503 with code 50; gc ``{network, valid, weftIpam}`` ->
  ``{"released": [...]}``.
- errors: ``{"code", "msg", "details"}`` with HTTP 400 (codes 1-7), 409 (101), 503 (11, 50) or 500.

Allocations are keyed by attachment, ``cni:<network>:<containerId>:<ifname>`` (':' occurs in none
of the parts), so GC can tell which of a network's allocations are stale and one container may join
a network twice under two interface names.

Pending releases: a DEL that cannot reach the router (or that finds the allocator unavailable) is
written as ``<spool_dir>/<network>:<containerId>:<ifname>.json`` (the DEL request itself). The
service replays those files when the app starts, every ``drain_interval`` seconds while any remain,
and before serving an ADD for the same attachment, then deletes them.

Concurrency: one asyncio lock per attachment (runtimes serialise per container, but a replayed
spool file and a fresh ADD may meet); different attachments proceed in parallel, their kernel work
on the default executor's threads, their allocations on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web

from weft import jsonlimit
from weft.atomicfile import write_atomic
from weft.cni.plugin import (
    CURRENT,
    DEFAULT_SPOOL_DIR,
    ERR_CHECK_FAILED,
    ERR_DECODING,
    ERR_INTERFACE_EXISTS,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_IPAM,
    ERR_KERNEL,
    ERR_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    CniError,
    interface_name_problem,
    spool_name,
    valid_name,
)
from weft.cni.shim_server import Route, setup_shim_server
from weft.host import attach as kernel

__all__ = [
    "CniConfig",
    "CniIpam",
    "CniService",
    "IpamRefused",
    "IpamUnavailable",
    "MemoryIpam",
    "PodHook",
    "attachment_id",
    "cni_error",
    "local_routes",
    "setup_cni",
    "setup_routes",
]

log = logging.getLogger(__name__)


class IpamUnavailable(Exception):
    """The allocator cannot answer now (ring not ready, consensus pending): try again later."""


class IpamRefused(Exception):
    """The allocator answered no (no space left, invalid subnet); the message says why."""


class CniIpam(Protocol):
    """What the CNI routes need from the address allocator.

    All methods run on the router's event loop and may be called concurrently for different
    idents; each is idempotent per ident. ``allocate`` returns the ident's existing address when
    it has one. Raise IpamUnavailable for transient conditions and IpamRefused otherwise.
    """

    async def allocate(self, ident: str, subnet: str | None) -> str:
        """An address in CIDR form (``10.32.0.5/12``) for ``ident``."""
        ...

    async def release(self, ident: str) -> None:
        """Free every address of ``ident``; no error when it has none."""
        ...

    async def lookup(self, ident: str) -> list[str]:
        """The addresses (CIDR) held by ``ident``, empty when none."""
        ...

    async def idents(self, prefix: str) -> list[str]:
        """Every ident with an allocation that starts with ``prefix``."""
        ...

    def ready(self) -> bool:
        """True when ``allocate`` can succeed now."""
        ...


class MemoryIpam:
    """An in-memory CniIpam over one subnet: tests, benchmarks, and a router without weft IPAM."""

    def __init__(
        self,
        subnet: str = "10.32.0.0/12",
        reserved: tuple[str, ...] = (),
        state_path: str | None = None,
    ) -> None:
        """``state_path``: a JSON file that keeps the allocations across restarts."""
        self.network = ipaddress.ip_network(subnet)
        self.reserved = {ipaddress.ip_address(a) for a in reserved}
        self.by_ident: dict[str, str] = {}
        self.available = True
        self.state_path = state_path
        if state_path and os.path.exists(state_path):
            with open(state_path, encoding="utf-8") as f:
                self.by_ident = dict(json.load(f))

    def _save(self) -> None:
        if self.state_path:
            write_atomic(self.state_path, json.dumps(self.by_ident))

    async def allocate(self, ident: str, subnet: str | None) -> str:
        if not self.available:
            raise IpamUnavailable("allocator not ready")
        if ident in self.by_ident:
            return self.by_ident[ident]
        network = ipaddress.ip_network(subnet) if subnet else self.network
        used = {ipaddress.ip_interface(c).ip for c in self.by_ident.values()} | self.reserved
        for host in network.hosts():
            if host not in used:
                cidr = f"{host}/{network.prefixlen}"
                self.by_ident[ident] = cidr
                self._save()
                return cidr
        raise IpamRefused(f"no free address in {network}")

    async def claim(self, ident: str, cidr: str) -> str:
        """Exactly this address (bare: in the allocator's subnet) for ``ident``."""
        if not self.available:
            raise IpamUnavailable("allocator not ready")
        iface = ipaddress.ip_interface(cidr if "/" in cidr else f"{cidr}/{self.network.prefixlen}")
        wanted = f"{iface.ip}/{iface.network.prefixlen}"
        holders = [i for i, c in self.by_ident.items() if ipaddress.ip_interface(c).ip == iface.ip]
        if holders and holders != [ident]:
            raise IpamRefused(f"address {iface.ip} is already held by {holders[0]}")
        if iface.ip in self.reserved:
            raise IpamRefused(f"address {iface.ip} is reserved")
        self.by_ident[ident] = wanted
        self._save()
        return wanted

    async def release(self, ident: str) -> None:
        if not self.available:
            raise IpamUnavailable("allocator not ready")
        if self.by_ident.pop(ident, None) is not None:
            self._save()

    async def lookup(self, ident: str) -> list[str]:
        return [self.by_ident[ident]] if ident in self.by_ident else []

    async def idents(self, prefix: str) -> list[str]:
        return [i for i in self.by_ident if i.startswith(prefix)]

    def ready(self) -> bool:
        return self.available


def attachment_id(network: str, container_id: str, ifname: str) -> str:
    """The allocator key of one attachment (see module docstring)."""
    return f"cni:{network}:{container_id}:{ifname}"


@dataclass(frozen=True)
class CniConfig:
    """Router-side CNI settings.

    bridge: the host bridge containers join (default ``weft``, the sleeve data plane's).
    spool_dir: where plugins leave releases they could not deliver; must match the network
        config's ``spoolDir`` (default ``/var/lib/weft/cni-spool``).
    hairpin: hairpin mode on the host end when the network config has no ``hairpinMode``
        (default on: a container can reach itself through a published port).
    drain_interval: seconds between retries of pending releases while any remain (default 10).
    """

    bridge: str = "weft"
    spool_dir: str = DEFAULT_SPOOL_DIR
    hairpin: bool = True
    drain_interval: float = 10.0

    def __post_init__(self) -> None:
        if interface_name_problem(self.bridge):
            raise ValueError(f"bridge name {self.bridge!r}: {interface_name_problem(self.bridge)}")
        if self.drain_interval <= 0:
            raise ValueError("drain_interval must be positive")


def _string(body: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise CniError(ERR_DECODING, f"request field {key!r} must be a non-empty string")
    return value


def _ip_cidr(address: object) -> str:
    try:
        return str(ipaddress.ip_interface(str(address)))
    except ValueError:
        raise CniError(ERR_INVALID_CONFIG, "invalid address", repr(address)) from None


def _route_list(value: object, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CniError(ERR_INVALID_CONFIG, f"{where} must be a list")
    routes = []
    for route in value:
        if not isinstance(route, Mapping) or not isinstance(route.get("dst"), str):
            raise CniError(ERR_INVALID_CONFIG, f"{where}: each route needs a dst", repr(route))
        try:
            ipaddress.ip_network(route["dst"], strict=False)
            if route.get("gw") is not None:
                ipaddress.ip_address(route["gw"])
        except ValueError as err:
            raise CniError(ERR_INVALID_CONFIG, f"{where}: invalid route", str(err)) from None
        routes.append(dict(route))
    return routes


def _requested_address(config: Mapping[str, Any], args: str) -> str | None:
    """A static address asked for: ``runtimeConfig.ips`` (capability ``ips``, e.g. ``podman
    --ip``) or ``IP=`` in CNI_ARGS (the Kubernetes convention); CIDR or bare address."""
    runtime = config.get("runtimeConfig")
    ips = runtime.get("ips") if isinstance(runtime, Mapping) else None
    wanted: object = None
    if isinstance(ips, list) and ips:
        wanted = ips[0]
    else:
        for pair in args.split(";"):
            key, _, value = pair.partition("=")
            if key.strip() == "IP" and value.strip():
                wanted = value.strip()
    if wanted is None:
        return None
    try:
        text = str(wanted)
        if "/" in text:
            return str(ipaddress.ip_interface(text))
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise CniError(ERR_INVALID_CONFIG, "invalid static address", repr(wanted)) from None


@dataclass(frozen=True)
class _Attachment:
    network: str
    container_id: str
    netns: str  # CNI_NETNS, as the runtime named it (results carry it as ``sandbox``)
    ifname: str
    config: Mapping[str, Any]
    netns_path: str  # where this process can open it (see plugin.netns_ref)
    args: str = ""  # CNI_ARGS

    @property
    def ident(self) -> str:
        return attachment_id(self.network, self.container_id, self.ifname)

    @property
    def host_ifname(self) -> str:
        return kernel.host_ifname(self.network, self.container_id, self.ifname)


def _attachment(body: Mapping[str, Any], *, netns_required: bool) -> _Attachment:
    network = _string(body, "network")
    cid = _string(body, "containerId")
    ifname = _string(body, "ifname")
    netns = _string(body, "netns", required=netns_required)
    if not valid_name(network) or not valid_name(cid) or interface_name_problem(ifname):
        raise CniError(ERR_DECODING, "invalid network, containerId or ifname")
    config = body.get("config") or {}
    if not isinstance(config, Mapping):
        raise CniError(ERR_DECODING, "request field 'config' must be an object")
    ref = body.get("netnsRef")
    path = ref if isinstance(ref, str) and ref and os.path.exists(ref) else netns
    args = body.get("args") if isinstance(body.get("args"), str) else ""
    return _Attachment(network, cid, netns, ifname, config, path, str(args))


class PodHook(Protocol):
    """Told of every attachment: NetworkPolicy isolates a pod before its ADD returns."""

    async def attached(self, container_id: str, args: str, addresses: list[str]) -> None:
        """Before the interface is up; raising fails the ADD (the address is released)."""
        ...

    async def detached(self, container_id: str) -> None: ...


class CniService:
    """The CNI operations; ``setup_routes`` exposes them over HTTP."""

    def __init__(
        self,
        ipam: CniIpam,
        config: CniConfig | None = None,
        mtu: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``mtu`` gives the data path's MTU for container interfaces (None: the bridge's)."""
        self.ipam = ipam
        self.config = config or CniConfig()
        self.mtu = mtu
        self._locks: dict[str, Any] = {}  # ident -> [lock, users]
        self._drain_task: asyncio.Task[None] | None = None
        self._pod_hooks: list[PodHook] = []

    def add_pod_hook(self, hook: PodHook) -> None:
        self._pod_hooks.append(hook)

    # ------------------------------------------------------------------ locking and spool

    @contextlib.asynccontextmanager
    async def _locked(self, ident: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(ident, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:  # the last user tidies up
                self._locks.pop(ident, None)

    def _spool_path(self, att: _Attachment) -> str:
        return os.path.join(
            self.config.spool_dir, spool_name(att.network, att.container_id, att.ifname)
        )

    def _spool(self, body: Mapping[str, Any], att: _Attachment) -> None:
        os.makedirs(self.config.spool_dir, mode=0o700, exist_ok=True)
        write_atomic(self._spool_path(att), json.dumps(dict(body)), mode=0o600)

    def pending(self) -> list[str]:
        """Spool files waiting to be replayed."""
        try:
            names = os.listdir(self.config.spool_dir)
        except FileNotFoundError:
            return []
        return sorted(
            os.path.join(self.config.spool_dir, n)
            for n in names
            if n.endswith(".json") and not n.startswith(".")
        )

    async def _replay(self, path: str) -> bool:
        """Replay one spooled DEL (caller holds its lock); True when it is done and removed."""
        try:
            with open(path, encoding="utf-8") as f:
                body = json.load(f)
            att = _attachment(body, netns_required=False)
        except FileNotFoundError:
            return True
        except (ValueError, CniError) as err:
            log.warning("dropping unreadable pending release %s: %s", path, err)
            os.replace(path, path + ".bad")
            return True
        try:
            await self._delete(att, bool(body.get("weftIpam", True)))
        except IpamUnavailable:
            return False
        except IpamRefused as err:  # final: retrying cannot help, keep the file for a human
            log.warning("allocator refused pending release %s: %s", att.ident, err)
            os.replace(path, path + ".bad")
            return True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("released %s (pending since the router was unreachable)", att.ident)
        return True

    async def drain_spool(self) -> int:
        """Replay every pending release; returns how many remain."""
        remaining = 0
        for path in self.pending():
            name = os.path.basename(path)[: -len(".json")]
            network, _, rest = name.partition(":")
            cid, _, ifname = rest.partition(":")
            async with self._locked(attachment_id(network, cid, ifname)):
                try:
                    done = await self._replay(path)
                except Exception:
                    log.exception("replaying pending release %s", path)
                    done = False
            remaining += 0 if done else 1
        return remaining

    async def _drain_loop(self) -> None:
        while True:
            try:
                remaining = await self.drain_spool()
            except Exception:
                log.exception("draining pending CNI releases")
                remaining = 1
            if not remaining:
                return
            await asyncio.sleep(self.config.drain_interval)

    def kick_drain(self) -> None:
        """Start replaying pending releases in the background unless already doing so."""
        if (self._drain_task is None or self._drain_task.done()) and self.pending():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_loop())

    def status_json(self) -> dict[str, Any]:
        """The ``cni`` key of ``/status``: bridge, spool and how many releases are pending."""
        return {
            "bridge": self.config.bridge,
            "spool_dir": self.config.spool_dir,
            "pending_releases": len(self.pending()),
        }

    async def close(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task

    # ------------------------------------------------------------------ operations

    async def add(self, body: Mapping[str, Any]) -> dict[str, Any]:
        att = _attachment(body, netns_required=True)
        delegated = body.get("ipam")
        if delegated is not None and not isinstance(delegated, Mapping):
            raise CniError(ERR_DECODING, "request field 'ipam' must be a result object")
        async with self._locked(att.ident):
            if os.path.exists(self._spool_path(att)):
                await self._replay(self._spool_path(att))
            return await self._add(att, delegated)

    async def _add(self, att: _Attachment, delegated: Mapping[str, Any] | None) -> dict[str, Any]:
        conf = att.config
        if not os.path.exists(att.netns_path):
            raise CniError(ERR_UNKNOWN_CONTAINER, "network namespace does not exist", att.netns)
        mtu = conf.get("mtu") or self.mtu()
        if mtu is not None and (not isinstance(mtu, int) or not 68 <= mtu <= 65535):
            raise CniError(ERR_INVALID_CONFIG, "mtu must be an integer in 68..65535", repr(mtu))
        hairpin = conf.get("hairpinMode", self.config.hairpin)

        fresh = False
        gateways: dict[str, str] = {}
        if delegated is None:
            raw_ipam = conf.get("ipam")
            ipam_conf: Mapping[str, Any] = raw_ipam if isinstance(raw_ipam, Mapping) else {}
            subnet = ipam_conf.get("subnet") or conf.get("subnet")
            if subnet is not None:
                try:
                    subnet = str(ipaddress.ip_network(str(subnet)))
                except ValueError:
                    raise CniError(ERR_INVALID_CONFIG, "invalid subnet", repr(subnet)) from None
            routes = _route_list(ipam_conf.get("routes", conf.get("routes")), "routes")
            fresh = not await self.ipam.lookup(att.ident)
            wanted = _requested_address(att.config, att.args)
            try:
                if wanted is None:
                    addresses = [_ip_cidr(await self.ipam.allocate(att.ident, subnet))]
                else:
                    claim = getattr(self.ipam, "claim", None)
                    if claim is None:
                        raise CniError(ERR_INVALID_CONFIG, "this allocator cannot claim addresses")
                    addresses = [_ip_cidr(await claim(att.ident, wanted))]
            except IpamUnavailable as err:
                raise CniError(ERR_TRY_AGAIN_LATER, "allocator not ready", str(err)) from None
            except IpamRefused as err:
                raise CniError(ERR_IPAM, "address allocation failed", str(err)) from None
            dns = conf.get("dns") if isinstance(conf.get("dns"), Mapping) else None
        else:
            ips = delegated.get("ips") or []
            addresses = [_ip_cidr(ip.get("address")) for ip in ips if isinstance(ip, Mapping)]
            for ip in ips:
                gw = ip.get("gateway") if isinstance(ip, Mapping) else None
                if gw:
                    gateways[_ip_cidr(ip["address"])] = str(gw)
            routes = _route_list(delegated.get("routes"), "ipam routes")
            if not routes:
                routes = _route_list(conf.get("routes"), "routes")
            dns_conf = conf.get("dns")
            dns = dns_conf if isinstance(dns_conf, Mapping) and dns_conf else delegated.get("dns")
        for hook in self._pod_hooks:
            try:
                await hook.attached(att.container_id, att.args, list(addresses))
            except Exception as err:
                if fresh:
                    await self._release_quietly(att.ident)
                raise CniError(
                    ERR_TRY_AGAIN_LATER, "network policy for this pod is not in place", str(err)
                ) from None
        spec = kernel.AttachSpec(
            netns=att.netns_path,
            ifname=att.ifname,
            host_ifname=att.host_ifname,
            bridge=self.config.bridge,
            mtu=mtu,
            hairpin=bool(hairpin),
            addresses=tuple(addresses),
            routes=tuple(routes),
            gateways=gateways,
        )
        try:
            attached = await _in_kernel(kernel.attach, spec)
        except BaseException:
            if fresh:
                await self._release_quietly(att.ident)
            raise
        ips_out = []
        for cidr in addresses:
            entry: dict[str, Any] = {"address": cidr, "interface": 2}
            if cidr in attached.gateways:
                entry["gateway"] = attached.gateways[cidr]
            ips_out.append(entry)
        result: dict[str, Any] = {
            "cniVersion": CURRENT,
            "interfaces": [
                {
                    "name": self.config.bridge,
                    "mac": attached.bridge_mac,
                    "mtu": attached.bridge_mtu,
                },
                {"name": att.host_ifname, "mac": attached.host_mac, "mtu": attached.mtu},
                {
                    "name": att.ifname,
                    "mac": attached.container_mac,
                    "mtu": attached.mtu,
                    "sandbox": att.netns,
                },
            ],
            "ips": ips_out,
            "routes": [dict(r) for r in attached.routes],
        }
        if dns:
            result["dns"] = dict(dns)
        return result

    async def _release_quietly(self, ident: str) -> None:
        try:
            await self.ipam.release(ident)
        except Exception:
            log.exception("releasing %s after a failed ADD", ident)

    async def delete(self, body: Mapping[str, Any]) -> None:
        att = _attachment(body, netns_required=False)
        async with self._locked(att.ident):
            try:
                await self._delete(att, bool(body.get("weftIpam", True)))
            except IpamUnavailable:
                self._spool(body, att)
                self.kick_drain()

    async def _delete(self, att: _Attachment, weft_ipam: bool) -> None:
        """Remove the veth pair, then release the address (IpamUnavailable: caller decides)."""
        await _in_kernel(kernel.detach, att.host_ifname)
        for hook in self._pod_hooks:
            try:
                await hook.detached(att.container_id)
            except Exception:
                log.exception("pod hook on DEL of %s", att.ident)
        if weft_ipam:
            await self.ipam.release(att.ident)

    async def check(self, body: Mapping[str, Any]) -> None:
        att = _attachment(body, netns_required=True)
        prev = body.get("prevResult")
        if not isinstance(prev, Mapping):
            raise CniError(ERR_INVALID_CONFIG, "required prevResult missing for CHECK")
        interfaces = prev.get("interfaces") or []
        ours = [
            i
            for i, iface in enumerate(interfaces)
            if isinstance(iface, Mapping)
            and iface.get("name") == att.ifname
            and iface.get("sandbox") in (att.netns, None, "")
        ]
        if not ours:
            raise CniError(ERR_CHECK_FAILED, f"prevResult has no interface {att.ifname}")
        index = ours[-1]
        ips = [
            ip
            for ip in prev.get("ips") or []
            if isinstance(ip, Mapping) and ip.get("interface") == index
        ]
        addresses = tuple(_ip_cidr(ip.get("address")) for ip in ips)
        subnets = [ipaddress.ip_interface(c).network for c in addresses]
        gateways = {_ip_cidr(ip["address"]): str(ip["gateway"]) for ip in ips if ip.get("gateway")}
        routes = []
        for route in _route_list(prev.get("routes"), "prevResult routes"):
            gw = route.get("gw")
            if (gw and any(ipaddress.ip_address(gw) in net for net in subnets)) or (
                not gw and gateways
            ):
                routes.append(route)
        problems = []
        async with self._locked(att.ident):
            if bool(body.get("weftIpam", True)):
                held = {
                    str(ipaddress.ip_interface(c).ip) for c in await self.ipam.lookup(att.ident)
                }
                for cidr in addresses:
                    if str(ipaddress.ip_interface(cidr).ip) not in held:
                        problems.append(f"address {cidr} is not allocated to {att.ident}")
            problems += await _in_kernel(
                kernel.check,
                att.netns_path,
                att.ifname,
                att.host_ifname,
                self.config.bridge,
                addresses,
                routes,
            )
        if problems:
            raise CniError(ERR_CHECK_FAILED, "attachment is not as expected", "; ".join(problems))

    async def status(self, body: Mapping[str, Any]) -> None:
        del body
        if await _in_kernel(kernel.bridge_info, self.config.bridge) is None:
            raise CniError(ERR_NOT_AVAILABLE, f"bridge {self.config.bridge} does not exist")
        if not self.ipam.ready():
            raise CniError(ERR_NOT_AVAILABLE, "address allocator not ready")

    async def gc(self, body: Mapping[str, Any]) -> dict[str, Any]:
        network = _string(body, "network")
        valid_list = body.get("valid") or []
        if not isinstance(valid_list, list):
            raise CniError(ERR_DECODING, "request field 'valid' must be a list")
        valid = {
            attachment_id(network, str(a.get("containerID")), str(a.get("ifname")))
            for a in valid_list
            if isinstance(a, Mapping)
        }
        released: list[str] = []
        errors: list[str] = []
        try:
            idents = await self.ipam.idents(f"cni:{network}:")
        except IpamUnavailable as err:
            raise CniError(ERR_TRY_AGAIN_LATER, "address allocator not ready", str(err)) from None
        for ident in idents:
            if ident in valid:
                continue
            _, _, cid, ifname = ident.split(":", 3)
            att = _Attachment(network, cid, "", ifname, {}, "")
            async with self._locked(ident):
                try:
                    await self._delete(att, True)
                    released.append(ident)
                except Exception as err:
                    errors.append(f"{ident}: {err}")
        if errors:
            raise CniError(ERR_TRY_AGAIN_LATER, "GC incomplete", "; ".join(errors))
        return {"released": released}


# ---------------------------------------------------------------------- HTTP


_T = TypeVar("_T")

_CNI_CODES = {
    kernel.AttachFailure.NETNS_GONE: ERR_UNKNOWN_CONTAINER,
    kernel.AttachFailure.BRIDGE_MISSING: ERR_TRY_AGAIN_LATER,
    kernel.AttachFailure.INTERFACE_EXISTS: ERR_INTERFACE_EXISTS,
    kernel.AttachFailure.KERNEL: ERR_KERNEL,
}


def cni_error(err: kernel.AttachError) -> CniError:
    """The CNI error for a failed kernel step: the one place kernel failures get their codes."""
    return CniError(_CNI_CODES[err.failure], err.msg, err.details)


async def _in_kernel(fn: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking kernel step in a worker thread, its AttachError as a CniError."""
    try:
        return await asyncio.to_thread(fn, *args)
    except kernel.AttachError as err:
        raise cni_error(err) from None


_HTTP_STATUS = {1: 400, 2: 400, 3: 404, 4: 400, 5: 500, 6: 400, 7: 400, 11: 503, 50: 503, 51: 503}


def _error_answer(err: CniError) -> tuple[int, bytes]:
    status = _HTTP_STATUS.get(err.code, 409 if err.code == ERR_INTERFACE_EXISTS else 500)
    return status, json.dumps({"code": err.code, "msg": err.msg, "details": err.details}).encode()


Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any] | None]]


def operations(service: CniService) -> dict[str, Handler]:
    """The ``/cni`` routes and what each runs."""

    async def add(body: Mapping[str, Any]) -> dict[str, Any]:
        return {"result": await service.add(body)}

    async def delete(body: Mapping[str, Any]) -> None:
        await service.delete(body)

    async def check(body: Mapping[str, Any]) -> None:
        await service.check(body)

    async def status(body: Mapping[str, Any]) -> None:
        await service.status(body)

    return {
        "/cni/add": add,
        "/cni/del": delete,
        "/cni/check": check,
        "/cni/status": status,
        "/cni/gc": service.gc,
    }


async def dispatch(service: CniService, op: Handler, raw: bytes) -> tuple[int, bytes]:
    """One ``/cni`` request, body as sent: (HTTP status, JSON answer). The HTTP routes and the
    router's in-process client for the shim (weft/cni/shim_server.py) both answer through this,
    so the plugin logic sees byte-identical answers either way."""
    try:
        try:
            body = jsonlimit.loads(raw)
        except ValueError:
            raise CniError(ERR_DECODING, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise CniError(ERR_DECODING, "request body is not a JSON object")
        answer = await op(body)
    except CniError as err:
        return _error_answer(err)
    except Exception as err:
        log.exception("CNI request failed")
        return _error_answer(CniError(ERR_INTERNAL, "internal error", repr(err)))
    finally:
        service.kick_drain()
    return 200, json.dumps(answer or {}).encode()


def local_routes(service: CniService) -> dict[str, Route]:
    """The ``/cni`` routes in-process, for the shim's socket: byte-identical to the HTTP ones."""
    return {
        path: functools.partial(dispatch, service, op) for path, op in operations(service).items()
    }


def _handler(service: CniService, op: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Origin"):
            return web.json_response({"error": "cross-site request refused"}, status=403)
        status, data = await dispatch(service, op, await request.read())
        return web.Response(body=data, status=status, content_type="application/json")

    return handle


def setup_routes(app: web.Application, service: CniService) -> None:
    """Add ``POST /cni/{add,del,check,status,gc}`` to ``app``; replay pending releases at start."""
    for route, op in operations(service).items():
        app.router.add_post(route, _handler(service, op))

    async def on_startup(app: web.Application) -> None:
        del app
        service.kick_drain()

    async def on_cleanup(app: web.Application) -> None:
        del app
        await service.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)


class _Composable(Protocol):
    """The parts of weft.router.router.Router that CNI plugs into."""

    app: web.Application

    def add_status_provider(self, key: str, fn: Callable[[], Any]) -> None: ...


def setup_cni(
    router: _Composable,
    ipam: CniIpam,
    config: CniConfig | None = None,
    mtu: Callable[[], int | None] = lambda: None,
) -> CniService:
    """Compose CNI into a router before it starts: the /cni routes, a ``cni`` status key, and
    the compiled shim's socket beside the router's API socket (``router.config.api_socket``;
    weft/cni/shim_server.py)."""
    service = CniService(ipam, config, mtu)
    setup_routes(router.app, service)
    api_socket = getattr(getattr(router, "config", None), "api_socket", None)
    setup_shim_server(router.app, local_routes(service), str(api_socket) if api_socket else None)
    router.add_status_provider("cni", service.status_json)
    return service


async def serve_unix(app: web.Application, path: str) -> web.AppRunner:
    """Serve ``app`` on a unix socket at ``path`` (replacing a stale socket file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    return runner


def main(argv: list[str] | None = None) -> int:
    """A CNI-only router (in-memory allocator, no mesh) for tests and benchmarks::

    python -m weft.cni.server --socket /run/weft/weft.sock --subnet 10.32.0.0/12
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m weft.cni.server", description=main.__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--bridge", default="weft")
    parser.add_argument("--subnet", default="10.32.0.0/12")
    parser.add_argument("--reserve", action="append", default=[], help="address not to allocate")
    parser.add_argument("--spool-dir", default=DEFAULT_SPOOL_DIR)
    parser.add_argument("--mtu", type=int, default=None)
    parser.add_argument("--state", default=None, help="JSON file keeping allocations")
    parser.add_argument(
        "--shim-socket",
        default=None,
        help="the CNI shim's socket (default: cni.sock beside --socket)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        ipam = MemoryIpam(args.subnet, tuple(args.reserve), args.state)
        config = CniConfig(bridge=args.bridge, spool_dir=args.spool_dir)
        service = CniService(ipam, config, mtu=lambda: args.mtu)
        app = web.Application()
        setup_routes(app, service)
        setup_shim_server(app, local_routes(service), args.socket, args.shim_socket)
        runner = await serve_unix(app, args.socket)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
