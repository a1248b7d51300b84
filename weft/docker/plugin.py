"""The Docker plugin's logic: libnetwork's remote NetworkDriver and IpamDriver, over weft's IPAM.

Docker (libnetwork) calls a legacy plugin with ``POST /<Method>`` and a JSON body; the HTTP layer
is weft/docker/server.py. Here are the methods, each taking the decoded body and returning the
reply object, raising :class:`~weft.errors.ConfigError` for a malformed request and another
:class:`~weft.errors.WeftError` for a failure; the server turns both into ``{"Err": "..."}``.

What Docker does, observed with Debian's docker.io 20.10 (and what libnetwork's remote driver
requires):

* ``docker network create -d weft --ipam-driver weft NET``: ``Plugin.Activate`` once, then
  ``IpamDriver.RequestPool`` and ``RequestAddress`` for the gateway, then
  ``NetworkDriver.CreateNetwork`` with ``IPv4Data[0] = {AddressSpace, Pool, Gateway}``.
  CreateNetwork refuses a network whose addresses another IPAM driver manages (Docker's default
  one included: it would hand out the same addresses on every host); ``--ipam-driver null`` is
  fine (CreateEndpoint then allocates from weft's IPAM). Docker
  never replays CreateNetwork to a plugin that restarted, so networks are persisted
  (``DockerPluginConfig.state_path``) and reloaded at start.
* ``docker run --network NET``: ``RequestAddress`` (our IPAM), ``CreateEndpoint`` with
  ``Interface.Address`` set by whichever IPAM driver the network uses - a driver must not echo an
  address Docker already assigned (libnetwork refuses it). Only when Docker has none (the
  ``null`` IPAM driver) does CreateEndpoint allocate from weft's IPAM and return it. Then
  ``Join``: we create a veth pair whose host end is on the weft bridge and return the other end's
  name; Docker moves it into the container, renames it ``ethwe<N>`` and configures it. Join
  always returns a gateway: without one libnetwork silently adds the container to a
  ``docker_gwbridge`` network.
* on exit / ``docker rm``: ``Leave`` (we delete the veth pair), ``DeleteEndpoint``, then
  ``ReleaseAddress``; ``docker network rm``: ``DeleteNetwork``, ``ReleaseAddress`` (gateway),
  ``ReleasePool``.

IPAM identities (the allocator is keyed by an ident, as for CNI; no '/' in them, so a pool
``10.32.0.0/12`` appears as ``10.32.0.0_12``): ``docker:ip:<pool>:<random>``
for addresses Docker requests (RequestAddress carries no endpoint id, so a fresh ident per request,
found again by address), ``docker:gw:<pool>`` for a pool's gateway (one per host and pool: each
host gets its own gateway address, exposed on its bridge), ``docker:ep:<endpoint>`` for addresses
CreateEndpoint allocated. The address -> ident map is rebuilt from the allocator at start, so the
allocator's own persistence is the only one IPAM needs.

All methods run on the router's event loop; kernel work goes to a worker thread. One lock
serialises the methods: Docker calls a plugin serially per network anyway, and the calls are
cheap except veth creation (about a millisecond).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from weft.atomicfile import write_atomic
from weft.cni.server import CniIpam, IpamRefused, IpamUnavailable
from weft.errors import ConfigError, LocalError, WeftError

__all__ = [
    "DockerIpam",
    "DockerPlugin",
    "DockerPluginConfig",
    "Endpoint",
    "EndpointKernel",
    "Network",
    "NetworkStore",
]

log = logging.getLogger("weft.docker")

ADDRESS_SPACE: Final = "weft"  # our address space name (both local and global defaults)
GATEWAY_TYPE: Final = "com.docker.network.gateway"  # RequestAddress Options[RequestAddressType]
GENERIC_OPTIONS: Final = "com.docker.network.generic"  # CreateNetwork Options: the -o key=values
POOL_PREFIX: Final = "weft:"
_MAX_ID: Final = 128


class DockerIpam(CniIpam, Protocol):
    """The allocator as the Docker plugin uses it: CNI's interface plus claims of one address.

    ``claim(ident, cidr)`` takes exactly that address (``docker run --ip``, ``--gateway``) for
    ``ident``, idempotently; IpamRefused when another ident holds it or it is outside the range.
    An allocator without ``claim`` still serves every request that names no address.
    """

    async def claim(self, ident: str, cidr: str) -> str: ...


class EndpointKernel(Protocol):
    """The kernel work of Join/Leave; runs in a worker thread (blocking calls are fine).

    ``create(host, peer, bridge, mtu)`` makes a veth pair, ``host`` up on ``bridge`` and ``peer``
    left in the host namespace for Docker to take; a stale pair named ``host`` is replaced.
    ``delete(host)`` removes the pair (False when it did not exist). ``expose``/``hide`` add or
    remove a host address (CIDR) on the bridge, idempotently.
    """

    def create(self, host: str, peer: str, bridge: str, mtu: int | None) -> None: ...

    def delete(self, host: str) -> bool: ...

    def expose(self, bridge: str, cidr: str) -> None: ...

    def hide(self, bridge: str, cidr: str) -> None: ...


@dataclass(frozen=True)
class DockerPluginConfig:
    """Docker plugin settings.

    * ``name`` — ``weft``: the driver name users give to ``docker network create -d`` and
      ``--ipam-driver``; the socket is ``<socket_dir>/<name>.sock``.
    * ``socket_dir`` — ``/run/docker/plugins``: where dockerd looks for plugin sockets.
    * ``state_path`` — ``/var/lib/weft/docker-networks.json``: the networks and endpoints, kept
      across router restarts (None: memory only, for tests).
    * ``bridge`` — ``weft``: the bridge containers join (the data plane's).
    * ``default_pool`` — ``10.32.0.0/12``: the pool RequestPool gives when none is asked for and
      where CreateEndpoint allocates for networks without an IPAM pool; use the IPAM's default
      subnet.
    * ``ifname_prefix`` — ``ethwe``: Docker names the container interface ``<prefix><N>``.
    * ``expose_gateway`` — True: a gateway address from weft's IPAM is put on the bridge, so
      containers reach their host (each host has its own gateway address).
    """

    name: str = "weft"
    socket_dir: Path = Path("/run/docker/plugins")
    state_path: Path | None = Path("/var/lib/weft/docker-networks.json")
    bridge: str = "weft"
    default_pool: str = "10.32.0.0/12"
    ifname_prefix: str = "ethwe"
    expose_gateway: bool = True

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\0 ") or len(self.name) > 64:
            raise ConfigError(f"docker plugin name {self.name!r} invalid: a short word, no '/'")
        try:
            pool = ipaddress.IPv4Network(self.default_pool)
        except ValueError as err:
            raise ConfigError(f"docker default pool {self.default_pool!r}: {err}") from None
        if pool.prefixlen > 30:
            raise ConfigError(f"docker default pool {pool} is too small (need /30 or larger)")
        if not 0 < len(self.ifname_prefix) <= 12 or "/" in self.ifname_prefix:
            raise ConfigError(f"interface prefix {self.ifname_prefix!r} invalid")

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f"{self.name}.sock"


@dataclass
class Endpoint:
    id: str
    address: str | None = None  # CIDR, as the container has it
    ident: str | None = None  # our IPAM ident when CreateEndpoint allocated the address
    joined: bool = False


@dataclass
class Network:
    id: str
    pool: str | None  # the IPv4 subnet (CIDR) or None without an IPAM pool (null IPAM)
    gateway: str | None  # CIDR
    address_space: str  # "weft" when our IPAM manages the pool
    options: dict[str, str] = field(default_factory=dict)
    gateway_ident: str | None = None  # our IPAM ident when the plugin allocated the gateway
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        """True when weft's IPAM hands out this network's addresses (unique across hosts)."""
        return self.address_space == ADDRESS_SPACE or self.pool is None


class NetworkStore:
    """The networks, persisted as one JSON file rewritten atomically after each change."""

    VERSION: Final = 1

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.networks: dict[str, Network] = {}

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            nets = doc["networks"]
            for raw in nets:
                eps = {e["id"]: Endpoint(**e) for e in raw.pop("endpoints", [])}
                net = Network(**raw, endpoints=eps)
                self.networks[net.id] = net
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(
                f"cannot read the Docker networks in {self.path}: {err}; move it away to start"
                " without them"
            ) from None

    def save(self) -> None:
        if self.path is None:
            return
        nets = []
        for net in self.networks.values():
            raw = asdict(net)
            raw["endpoints"] = list(raw["endpoints"].values())
            nets.append(raw)
        data = json.dumps({"version": self.VERSION, "networks": nets}, indent=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, data)


# ---------------------------------------------------------------------- request parsing


def _obj(body: Mapping[str, Any], key: str, *, required: bool = False) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key} is required")
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be an object, not {type(value).__name__}")
    return dict(value)


def _str(body: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise ConfigError(f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {type(value).__name__}")
    return value


def _id(body: Mapping[str, Any], key: str) -> str:
    value = _str(body, key)
    if len(value) > _MAX_ID or not all(c.isalnum() or c in "-_." for c in value):
        raise ConfigError(f"{key} {value[:80]!r} is not a valid Docker id")
    return value


def _cidr(value: str, what: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not an IP address with a prefix") from None
    if not isinstance(iface, ipaddress.IPv4Interface):
        raise ConfigError(f"{what} {value!r}: IPv6 is not supported by weft")
    if "/" not in value:
        raise ConfigError(f"{what} {value!r} has no prefix length")
    return iface


def _network(value: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        raise ConfigError(f"{what} {value!r} is not a subnet: {err}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ConfigError(f"{what} {value!r}: IPv6 is not supported by weft")
    return net


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def host_ifname(endpoint_id: str) -> str:
    """The host end of an endpoint's veth: ``vwd`` + 12 hex digits (15 characters)."""
    return "vwd" + _digest(endpoint_id)


def peer_ifname(endpoint_id: str) -> str:
    """The container end until Docker moves and renames it: ``vwi`` + 12 hex digits."""
    return "vwi" + _digest(endpoint_id)


class _PoolId:
    """``weft:<pool>`` or ``weft:<pool>|<subpool>``: stateless, so pools survive restarts."""

    def __init__(self, pool: ipaddress.IPv4Network, sub: ipaddress.IPv4Network | None) -> None:
        self.pool = pool
        self.sub = sub

    def __str__(self) -> str:
        return POOL_PREFIX + str(self.pool) + (f"|{self.sub}" if self.sub else "")

    @property
    def key(self) -> str:
        """The pool in allocator idents, which may not contain '/': ``10.32.0.0_12``."""
        return str(self.pool).replace("/", "_")

    @classmethod
    def parse(cls, text: str) -> _PoolId:
        if not text.startswith(POOL_PREFIX):
            raise ConfigError(f"PoolID {text[:80]!r} is not one of weft's (weft:<subnet>)")
        pool, _, sub = text[len(POOL_PREFIX) :].partition("|")
        return cls(_network(pool, "PoolID"), _network(sub, "PoolID") if sub else None)


# ---------------------------------------------------------------------- the plugin


class DockerPlugin:
    """The NetworkDriver and IpamDriver methods; see the module docstring for the protocol."""

    def __init__(
        self,
        ipam: CniIpam,
        kernel: EndpointKernel,
        config: DockerPluginConfig | None = None,
        mtu: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``mtu``: the data path's MTU for container interfaces (None: the bridge's)."""
        self.ipam = ipam
        self.kernel = kernel
        self.config = config or DockerPluginConfig()
        self.mtu = mtu
        self.store = NetworkStore(self.config.state_path)
        self.store.load()
        self._lock = asyncio.Lock()
        self._by_address: dict[str, str] | None = None  # address (no prefix) -> ident
        self.methods: dict[str, Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]] = {
            "Plugin.Activate": self.activate,
            "NetworkDriver.GetCapabilities": self.net_capabilities,
            "NetworkDriver.CreateNetwork": self.create_network,
            "NetworkDriver.DeleteNetwork": self.delete_network,
            "NetworkDriver.CreateEndpoint": self.create_endpoint,
            "NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "NetworkDriver.EndpointOperInfo": self.endpoint_info,
            "NetworkDriver.Join": self.join,
            "NetworkDriver.Leave": self.leave,
            "NetworkDriver.ProgramExternalConnectivity": self.nothing,
            "NetworkDriver.RevokeExternalConnectivity": self.nothing,
            "NetworkDriver.DiscoverNew": self.nothing,
            "NetworkDriver.DiscoverDelete": self.nothing,
            "NetworkDriver.AllocateNetwork": self.nothing,
            "NetworkDriver.FreeNetwork": self.nothing,
            "IpamDriver.GetCapabilities": self.ipam_capabilities,
            "IpamDriver.GetDefaultAddressSpaces": self.address_spaces,
            "IpamDriver.RequestPool": self.request_pool,
            "IpamDriver.ReleasePool": self.nothing,
            "IpamDriver.RequestAddress": self.request_address,
            "IpamDriver.ReleaseAddress": self.release_address,
        }

    async def call(self, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Run one method (serialised); ConfigError for an unknown method or bad body."""
        handler = self.methods.get(method)
        if handler is None:
            raise ConfigError(f"unknown plugin method {method[:80]!r}")
        log.debug("docker %s %s", method, json.dumps(body)[:500])
        async with self._lock:
            return await handler(body)

    async def start(self) -> None:
        """Re-expose the gateways of known networks (the bridge may be new after a restart)."""
        for net in self.store.networks.values():
            await self._expose(net)

    def status(self) -> dict[str, Any]:
        """The ``docker`` object of ``/status``."""
        return {
            "plugin": self.config.name,
            "socket": str(self.config.socket_path),
            "networks": [
                {
                    "id": net.id[:12],
                    "pool": net.pool,
                    "gateway": net.gateway,
                    "ipam": "weft" if net.ours else net.address_space,
                    "endpoints": len(net.endpoints),
                }
                for net in self.store.networks.values()
            ],
        }

    # ------------------------------------------------------------------ generic

    async def activate(self, body: Mapping[str, Any]) -> dict[str, Any]:
        del body
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    async def nothing(self, body: Mapping[str, Any]) -> dict[str, Any]:
        del body
        return {}

    async def net_capabilities(self, body: Mapping[str, Any]) -> dict[str, Any]:
        del body
        # "local": each host keeps its own network record (no cluster store needed); the
        # containers on same-named networks of different hosts still share one L2 mesh.
        return {"Scope": "local", "ConnectivityScope": "global"}

    # ------------------------------------------------------------------ networks

    async def create_network(self, body: Mapping[str, Any]) -> dict[str, Any]:
        net_id = _id(body, "NetworkID")
        options = _obj(body, "Options")
        generic = options.get(GENERIC_OPTIONS) or {}
        if not isinstance(generic, Mapping):
            raise ConfigError(f"Options[{GENERIC_OPTIONS}] must be an object")
        v4 = body.get("IPv4Data") or []
        v6 = body.get("IPv6Data") or []
        if not isinstance(v4, list) or not isinstance(v6, list):
            raise ConfigError("IPv4Data and IPv6Data must be lists")
        if v6:
            raise ConfigError("IPv6 is not supported by weft (create the network without --ipv6)")
        if len(v4) > 1:
            raise ConfigError("weft networks take one IPv4 pool, not several")
        pool: str | None = None
        gateway: str | None = None
        space = "null"
        if v4:
            data = v4[0]
            if not isinstance(data, Mapping):
                raise ConfigError("IPv4Data[0] must be an object")
            space = _str(data, "AddressSpace", required=False) or "default"
            pool_text = _str(data, "Pool", required=False)
            if pool_text and pool_text != "0.0.0.0/0":  # the null IPAM driver's pool
                pool = str(_network(pool_text, "IPv4Data Pool"))
            gw_text = _str(data, "Gateway", required=False)
            if gw_text:
                gw = _cidr(gw_text, "IPv4Data Gateway")
                if pool is not None and gw.ip not in ipaddress.ip_network(pool):
                    raise ConfigError(f"gateway {gw_text} is not in the pool {pool}")
                gateway = str(gw)
        existing = self.store.networks.get(net_id)
        if existing is not None:
            return {}  # a retried create
        net = Network(
            net_id,
            pool,
            gateway,
            space,
            {str(k): str(v) for k, v in generic.items()},
        )
        if not net.ours:
            # Another IPAM (Docker's own by default) picks addresses on each host alone, so two
            # hosts hand out the same one on the shared layer 2: refuse rather than warn in a log
            # nobody reads. Docker shows this error to the user and releases its pool.
            name = self.config.name
            raise ConfigError(
                f"weft networks need weft's IPAM (this one uses {space!r}, whose addresses"
                f" collide across hosts): add --ipam-driver {name}, e.g. `docker network create"
                f" -d {name} --ipam-driver {name} NET` (or --ipam-driver null)"
            )
        if net.pool is None and net.gateway is None:
            # No IPAM pool: endpoints get weft addresses; the network still needs a gateway.
            net.gateway_ident = f"docker:gw:{net_id}"
            net.gateway = await self._allocate(net.gateway_ident, None)
        self.store.networks[net_id] = net
        self.store.save()
        await self._expose(net)
        log.info(
            "docker network %s created: pool %s, gateway %s", net_id[:12], net.pool, net.gateway
        )
        return {}

    async def delete_network(self, body: Mapping[str, Any]) -> dict[str, Any]:
        net_id = _id(body, "NetworkID")
        net = self.store.networks.pop(net_id, None)
        if net is None:
            return {}  # idempotent: Docker retries a delete after a plugin error
        for ep in net.endpoints.values():
            await self._drop_endpoint(ep)
        self.store.save()
        await self._hide(net)
        if net.gateway_ident:
            await self._release(net.gateway_ident)
        log.info("docker network %s deleted", net_id[:12])
        return {}

    def _net(self, body: Mapping[str, Any], *, endpoint: bool = True) -> Network:
        """The request's network (its EndpointID, if required, is checked first)."""
        net_id = _id(body, "NetworkID")
        if endpoint:
            _id(body, "EndpointID")
        net = self.store.networks.get(net_id)
        if net is None:
            raise LocalError(f"network {net_id[:12]} is not a weft network known to this host")
        return net

    async def _expose(self, net: Network) -> None:
        if not (self.config.expose_gateway and net.ours and net.gateway):
            return
        try:
            await asyncio.to_thread(self.kernel.expose, self.config.bridge, net.gateway)
        except (OSError, WeftError) as err:
            log.warning("cannot put gateway %s on bridge %s: %s", net.gateway, self.config.bridge,
                        err)

    async def _hide(self, net: Network) -> None:
        if not (self.config.expose_gateway and net.ours and net.gateway):
            return
        if any(n.gateway == net.gateway for n in self.store.networks.values()):
            return  # still another network's gateway
        with contextlib.suppress(OSError, WeftError):
            await asyncio.to_thread(self.kernel.hide, self.config.bridge, net.gateway)

    # ------------------------------------------------------------------ endpoints

    async def create_endpoint(self, body: Mapping[str, Any]) -> dict[str, Any]:
        net = self._net(body)
        ep_id = _id(body, "EndpointID")
        iface = _obj(body, "Interface")
        if _str(iface, "AddressIPv6", required=False):
            raise ConfigError("IPv6 is not supported by weft")
        given = _str(iface, "Address", required=False)
        known = net.endpoints.get(ep_id)
        if known is not None:
            # a retried create: answer as the first time
            return {} if known.ident is None else {"Interface": {"Address": known.address}}
        ep = Endpoint(ep_id)
        reply: dict[str, Any] = {}
        if given:
            ep.address = str(_cidr(given, "Interface Address"))
        else:
            ep.ident = f"docker:ep:{ep_id}"
            ep.address = await self._allocate(ep.ident, net.pool)
            reply = {"Interface": {"Address": ep.address}}
        net.endpoints[ep_id] = ep
        self.store.save()
        return reply

    async def delete_endpoint(self, body: Mapping[str, Any]) -> dict[str, Any]:
        # Idempotent and lenient: a failure here would leave `docker rm` half done.
        net_id, ep_id = _id(body, "NetworkID"), _id(body, "EndpointID")
        net = self.store.networks.get(net_id)
        ep = net.endpoints.pop(ep_id, None) if net is not None else None
        if ep is None:
            await asyncio.to_thread(self.kernel.delete, host_ifname(ep_id))
            return {}
        await self._drop_endpoint(ep)
        self.store.save()
        return {}

    async def _drop_endpoint(self, ep: Endpoint) -> None:
        await asyncio.to_thread(self.kernel.delete, host_ifname(ep.id))
        if ep.ident:
            await self._release(ep.ident)

    async def endpoint_info(self, body: Mapping[str, Any]) -> dict[str, Any]:
        net = self._net(body)
        ep_id = _id(body, "EndpointID")
        ep = net.endpoints.get(ep_id)
        if ep is None:
            raise LocalError(f"endpoint {ep_id[:12]} not found in network {net.id[:12]}")
        return {
            "Value": {
                "address": ep.address,
                "host_ifname": host_ifname(ep.id),
                "bridge": self.config.bridge,
            }
        }

    async def join(self, body: Mapping[str, Any]) -> dict[str, Any]:
        net = self._net(body)
        ep_id = _id(body, "EndpointID")
        _str(body, "SandboxKey")
        ep = net.endpoints.get(ep_id)
        if ep is None:
            raise LocalError(f"endpoint {ep_id[:12]} not found in network {net.id[:12]}")
        host, peer = host_ifname(ep_id), peer_ifname(ep_id)
        await asyncio.to_thread(self.kernel.create, host, peer, self.config.bridge, self.mtu())
        ep.joined = True
        self.store.save()
        return {
            "InterfaceName": {"SrcName": peer, "DstPrefix": self.config.ifname_prefix},
            "Gateway": self._gateway(net, ep),
            "StaticRoutes": [],
            "DisableGatewayService": True,
        }

    def _gateway(self, net: Network, ep: Endpoint) -> str:
        """The network's gateway, else the first host address of the endpoint's subnet.

        Never empty: without a gateway Docker adds the container to ``docker_gwbridge``.
        """
        if net.gateway:
            return str(ipaddress.ip_interface(net.gateway).ip)
        subnet = ipaddress.ip_interface(ep.address).network if ep.address else None
        if subnet is None:
            subnet = ipaddress.ip_network(net.pool or self.config.default_pool)
        return str(next(subnet.hosts()))

    async def leave(self, body: Mapping[str, Any]) -> dict[str, Any]:
        # Lenient like DeleteEndpoint: the veth goes whatever we remember of the network.
        net_id, ep_id = _id(body, "NetworkID"), _id(body, "EndpointID")
        await asyncio.to_thread(self.kernel.delete, host_ifname(ep_id))
        net = self.store.networks.get(net_id)
        ep = net.endpoints.get(ep_id) if net is not None else None
        if ep is not None:
            ep.joined = False
            self.store.save()
        return {}

    # ------------------------------------------------------------------ IPAM driver

    async def ipam_capabilities(self, body: Mapping[str, Any]) -> dict[str, Any]:
        del body
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    async def address_spaces(self, body: Mapping[str, Any]) -> dict[str, Any]:
        del body
        return {
            "LocalDefaultAddressSpace": ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": ADDRESS_SPACE,
        }

    async def request_pool(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if body.get("V6"):
            raise ConfigError("IPv6 is not supported by weft")
        _str(body, "AddressSpace", required=False)
        pool_text = _str(body, "Pool", required=False)
        pool = _network(pool_text or self.config.default_pool, "Pool")
        sub_text = _str(body, "SubPool", required=False)
        sub = _network(sub_text, "SubPool") if sub_text else None
        if sub is not None and not sub.subnet_of(pool):
            raise ConfigError(f"SubPool {sub} is not inside Pool {pool}")
        return {"PoolID": str(_PoolId(pool, sub)), "Pool": str(pool), "Data": {}}

    async def request_address(self, body: Mapping[str, Any]) -> dict[str, Any]:
        pid = _PoolId.parse(_str(body, "PoolID"))
        options = _obj(body, "Options")
        wanted = _str(body, "Address", required=False)
        gateway = options.get("RequestAddressType") == GATEWAY_TYPE
        unique = f"docker:ip:{pid.key}:{secrets.token_hex(8)}"
        ident = f"docker:gw:{pid.key}" if gateway else unique
        if wanted:
            try:
                addr = ipaddress.IPv4Address(wanted.split("/")[0])
            except ValueError:
                raise ConfigError(f"Address {wanted[:80]!r} is not an IPv4 address") from None
            if addr not in pid.pool:
                raise ConfigError(f"Address {addr} is not in the pool {pid.pool}")
            cidr = await self._claim(ident, f"{addr}/{pid.pool.prefixlen}")
        else:
            cidr = await self._allocate(ident, str(pid.sub or pid.pool))
        got = ipaddress.ip_interface(cidr).ip
        if got not in pid.pool:
            await self._release(ident)
            raise LocalError(f"the allocator returned {cidr}, outside the pool {pid.pool}")
        by_address = await self._address_map()
        by_address[str(got)] = ident
        return {"Address": f"{got}/{pid.pool.prefixlen}", "Data": {}}

    async def release_address(self, body: Mapping[str, Any]) -> dict[str, Any]:
        _PoolId.parse(_str(body, "PoolID"))
        text = _str(body, "Address")
        try:
            addr = str(ipaddress.IPv4Address(text.split("/")[0]))
        except ValueError:
            raise ConfigError(f"Address {text[:80]!r} is not an IPv4 address") from None
        by_address = await self._address_map()
        ident = by_address.get(addr)
        if ident is None:
            log.info("docker released %s, which weft did not allocate here", addr)
            return {}
        if ident.startswith("docker:gw:"):
            # Docker 20.10 releases the gateway before DeleteNetwork (others after it): keep a
            # pool's gateway while a second network on this host still uses it.
            users = [
                n for n in self.store.networks.values()
                if n.gateway and str(ipaddress.ip_interface(n.gateway).ip) == addr
            ]
            if len(users) > 1:
                return {}
        await self._release(ident)
        return {}

    # ------------------------------------------------------------------ allocator calls

    async def _address_map(self) -> dict[str, str]:
        """address -> ident of our allocations, rebuilt from the allocator on first use."""
        if self._by_address is None:
            found: dict[str, str] = {}
            try:
                for ident in await self.ipam.idents("docker:"):
                    for cidr in await self.ipam.lookup(ident):
                        found[str(ipaddress.ip_interface(cidr).ip)] = ident
            except IpamUnavailable as err:
                raise LocalError(f"the address allocator is not ready: {err}") from None
            self._by_address = found
        return self._by_address

    async def _allocate(self, ident: str, subnet: str | None) -> str:
        try:
            return str(ipaddress.ip_interface(await self.ipam.allocate(ident, subnet)))
        except IpamUnavailable as err:
            raise LocalError(f"the address allocator is not ready, try again: {err}") from None
        except IpamRefused as err:
            raise LocalError(f"no address for {ident}: {err}") from None

    async def _claim(self, ident: str, cidr: str) -> str:
        claim = getattr(self.ipam, "claim", None)
        if claim is None:
            raise LocalError("this router's allocator cannot claim a given address")
        try:
            return str(ipaddress.ip_interface(await claim(ident, cidr)))
        except IpamUnavailable as err:
            raise LocalError(f"the address allocator is not ready, try again: {err}") from None
        except IpamRefused as err:
            raise LocalError(f"cannot have {cidr}: {err}") from None

    async def _release(self, ident: str) -> None:
        try:
            await self.ipam.release(ident)
        except IpamUnavailable as err:
            raise LocalError(f"the address allocator is not ready, try again: {err}") from None
        if self._by_address is not None:
            for addr, owner in list(self._by_address.items()):
                if owner == ident:
                    del self._by_address[addr]
