"""The Docker plugin over its unix socket, as dockerd drives it (calls in dockerd's order).

Kernel work is a fake that records veth pairs and bridge addresses; the allocator is CNI's
in-memory one plus ``claim``. The real kernel and a real dockerd are in tests/e2e/test_docker.py.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from weft.cni.server import IpamRefused, MemoryIpam
from weft.docker.plugin import DockerPlugin, DockerPluginConfig, host_ifname, peer_ifname
from weft.docker.server import CONTENT_TYPE, DockerPluginServer, setup_docker_plugin
from weft.router.config import RouterConfig
from weft.router.router import Router


class ClaimingIpam(MemoryIpam):
    """CNI's in-memory allocator plus claims, refusing idents weft's allocator refuses."""

    async def allocate(self, ident: str, subnet: str | None) -> str:
        assert "/" not in ident, ident
        return await super().allocate(ident, subnet)

    async def claim(self, ident: str, cidr: str) -> str:
        assert "/" not in ident, ident
        want = ipaddress.ip_interface(cidr)
        for other, held in self.by_ident.items():
            if ipaddress.ip_interface(held).ip == want.ip and other != ident:
                raise IpamRefused(f"{want.ip} is held by {other}")
        self.by_ident[ident] = str(want)
        return str(want)


class FakeKernel:
    def __init__(self) -> None:
        self.links: dict[str, tuple[str, str, int | None]] = {}  # host -> (peer, bridge, mtu)
        self.exposed: set[str] = set()

    def create(self, host: str, peer: str, bridge: str, mtu: int | None) -> None:
        self.links[host] = (peer, bridge, mtu)

    def delete(self, host: str) -> bool:
        return self.links.pop(host, None) is not None

    def expose(self, bridge: str, cidr: str) -> None:
        self.exposed.add(cidr)

    def hide(self, bridge: str, cidr: str) -> None:
        self.exposed.discard(cidr)


class Docker:
    """A client speaking to the plugin socket the way dockerd's plugin client does."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def raw(self, method: str, data: bytes) -> tuple[int, dict[str, Any]]:
        async with self.session.post(
            f"http://plugin/{method}", data=data, headers={"Content-Type": CONTENT_TYPE}
        ) as resp:
            assert resp.content_type == CONTENT_TYPE
            return resp.status, json.loads(await resp.read())

    async def call(self, method: str, body: Any = None) -> dict[str, Any]:
        status, reply = await self.raw(method, json.dumps(body).encode())
        assert status == 200 and "Err" not in reply, (method, status, reply)
        return reply

    async def err(self, method: str, body: Any) -> tuple[int, str]:
        status, reply = await self.raw(method, json.dumps(body).encode())
        assert status in (400, 500), (method, status, reply)
        assert set(reply) == {"Err"} and reply["Err"], reply
        return status, str(reply["Err"])


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ipam = ClaimingIpam("10.32.0.0/12")
        self.kernel = FakeKernel()
        self.config = DockerPluginConfig(
            name="wftest", socket_dir=tmp / "plugins", state_path=tmp / "state" / "docker.json"
        )
        self.server: DockerPluginServer | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> Docker:
        plugin = DockerPlugin(self.ipam, self.kernel, self.config, mtu=lambda: 1376)
        self.server = DockerPluginServer(plugin)
        await self.server.start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.config.socket_path))
        )
        return Docker(self.session)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.server is not None:
            await self.server.stop()

    async def restart(self) -> Docker:
        await self.stop()
        return await self.start()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        await e.stop()


NET = "4e1f" * 16  # Docker ids are 64 hex digits
EP1 = "a1" * 32
EP2 = "b2" * 32


async def create_weft_network(d: Docker, net: str = NET) -> tuple[str, str]:
    """``docker network create -d weft --ipam-driver weft``: returns (pool id, gateway)."""
    pool = await d.call("IpamDriver.RequestPool", {"AddressSpace": "weft", "Pool": "",
                                                   "SubPool": "", "Options": {}, "V6": False})
    assert pool["Pool"] == "10.32.0.0/12"
    gw = await d.call(
        "IpamDriver.RequestAddress",
        {"PoolID": pool["PoolID"], "Address": "",
         "Options": {"RequestAddressType": "com.docker.network.gateway"}},
    )
    await d.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": net,
            "Options": {"com.docker.network.generic": {"foo": "bar"}},
            "IPv4Data": [{"AddressSpace": "weft", "Pool": pool["Pool"], "Gateway": gw["Address"]}],
            "IPv6Data": [],
        },
    )
    return str(pool["PoolID"]), str(gw["Address"])


async def test_activate_and_capabilities(env: Env) -> None:
    d = await env.start()
    assert await d.call("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    caps = await d.call("NetworkDriver.GetCapabilities")
    assert caps["Scope"] == "local"
    assert await d.call("IpamDriver.GetCapabilities") == {
        "RequiresMACAddress": False, "RequiresRequestReplay": False}
    spaces = await d.call("IpamDriver.GetDefaultAddressSpaces")
    assert spaces["LocalDefaultAddressSpace"] == "weft"


async def test_container_life_cycle_with_weft_ipam(env: Env) -> None:
    d = await env.start()
    pool_id, gw = await create_weft_network(d)
    assert gw == "10.32.0.1/12"
    assert env.kernel.exposed == {gw}  # the host gets its gateway on the bridge

    # docker run: address from our IPAM, then CreateEndpoint must NOT echo it back
    addr = await d.call("IpamDriver.RequestAddress",
                        {"PoolID": pool_id, "Address": "", "Options": {}})
    assert addr["Address"] == "10.32.0.2/12"
    reply = await d.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NET, "EndpointID": EP1, "Interface": {"Address": addr["Address"],
                                                            "AddressIPv6": "", "MacAddress": ""},
         "Options": {}},
    )
    assert reply == {}
    join = await d.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP1,
                                               "SandboxKey": "/var/run/docker/netns/x",
                                               "Options": {}})
    assert join["InterfaceName"] == {"SrcName": peer_ifname(EP1), "DstPrefix": "ethwe"}
    assert join["Gateway"] == "10.32.0.1"
    assert env.kernel.links[host_ifname(EP1)] == (peer_ifname(EP1), "weft", 1376)
    info = await d.call("NetworkDriver.EndpointOperInfo", {"NetworkID": NET, "EndpointID": EP1})
    assert info["Value"]["address"] == "10.32.0.2/12"
    assert await d.call("NetworkDriver.ProgramExternalConnectivity",
                        {"NetworkID": NET, "EndpointID": EP1, "Options": {}}) == {}

    # docker rm: Leave, DeleteEndpoint, ReleaseAddress
    await d.call("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NET, "EndpointID": EP1})
    await d.call("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP1})
    assert host_ifname(EP1) not in env.kernel.links
    await d.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP1})
    await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.32.0.2"})
    held = {ipaddress.ip_interface(c).ip for c in env.ipam.by_ident.values()}
    assert ipaddress.ip_address("10.32.0.2") not in held
    # the next container gets the freed address again
    again = await d.call("IpamDriver.RequestAddress",
                         {"PoolID": pool_id, "Address": "", "Options": {}})
    assert again["Address"] == "10.32.0.2/12"
    await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.32.0.2"})

    # docker network rm
    await d.call("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.32.0.1"})
    await d.call("IpamDriver.ReleasePool", {"PoolID": pool_id})
    assert env.kernel.exposed == set()
    assert env.ipam.by_ident == {}


async def test_gateway_release_in_docker_20_order_and_shared_pools(env: Env) -> None:
    """dockerd 20.10 calls ReleaseAddress(gateway) and ReleasePool before DeleteNetwork."""
    d = await env.start()
    pool_id, gw = await create_weft_network(d, NET)
    await create_weft_network(d, "5e" * 32)  # a second network on the same pool
    gw_ip = gw.split("/")[0]
    # first network removed: the gateway stays (the other network uses it)
    await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": gw_ip})
    await d.call("IpamDriver.ReleasePool", {"PoolID": pool_id})
    await d.call("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert list(env.ipam.by_ident.values()) == [gw] and env.kernel.exposed == {gw}
    await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": gw_ip})
    await d.call("IpamDriver.ReleasePool", {"PoolID": pool_id})
    await d.call("NetworkDriver.DeleteNetwork", {"NetworkID": "5e" * 32})
    assert env.ipam.by_ident == {} and env.kernel.exposed == set()


async def test_specific_addresses_and_subpool(env: Env) -> None:
    d = await env.start()
    pool = await d.call("IpamDriver.RequestPool", {"Pool": "10.40.0.0/16",
                                                   "SubPool": "10.40.8.0/24"})
    assert pool["Pool"] == "10.40.0.0/16"
    got = await d.call("IpamDriver.RequestAddress",
                       {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
    assert got["Address"].startswith("10.40.8.") and got["Address"].endswith("/16")
    fixed = await d.call("IpamDriver.RequestAddress",
                         {"PoolID": pool["PoolID"], "Address": "10.40.3.3", "Options": {}})
    assert fixed["Address"] == "10.40.3.3/16"
    status, err = await d.err("IpamDriver.RequestAddress",
                              {"PoolID": pool["PoolID"], "Address": "10.40.3.3", "Options": {}})
    assert status == 500 and "10.40.3.3" in err and "held by" in err
    status, err = await d.err("IpamDriver.RequestAddress",
                              {"PoolID": pool["PoolID"], "Address": "10.41.0.1", "Options": {}})
    assert status == 400 and "not in the pool" in err


async def test_null_ipam_network_gets_weft_addresses(env: Env) -> None:
    """``--ipam-driver null``: Docker has no address, so CreateEndpoint allocates and returns it."""
    d = await env.start()
    await d.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NET, "Options": {},
        "IPv4Data": [{"AddressSpace": "null", "Pool": "0.0.0.0/0"}], "IPv6Data": []})
    reply = await d.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP1, "Interface": {}, "Options": {}})
    address = reply["Interface"]["Address"]
    assert ipaddress.ip_interface(address).network == ipaddress.ip_network("10.32.0.0/12")
    # a retried CreateEndpoint answers the same
    again = await d.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP1, "Interface": {}, "Options": {}})
    assert again == reply
    join = await d.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP1,
                                               "SandboxKey": "/x"})
    gateway = join["Gateway"]
    assert gateway and gateway != address.split("/")[0]
    assert f"{gateway}/12" in env.kernel.exposed
    await d.call("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP1})
    await d.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP1})
    assert [ipaddress.ip_interface(c).ip for c in env.ipam.by_ident.values()] == [
        ipaddress.ip_address(gateway)]
    await d.call("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
    assert env.ipam.by_ident == {} and env.kernel.exposed == set()


DOCKER_IPAM_NET = {"NetworkID": NET, "IPv4Data": [
    {"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16", "Gateway": "172.18.0.1/16"}]}


async def test_network_with_dockers_own_ipam_is_refused_naming_the_flag(env: Env) -> None:
    """``docker network create -d weft NET``: Docker's IPAM picks the same addresses on every
    host, so CreateNetwork refuses it with an error Docker shows, naming the missing flag."""
    d = await env.start()
    status, err = await d.err("NetworkDriver.CreateNetwork", DOCKER_IPAM_NET)
    assert status == 400 and "--ipam-driver wftest" in err, err
    assert env.kernel.exposed == set() and env.ipam.by_ident == {}
    state = env.config.state_path
    assert state is not None and (not state.exists() or NET not in state.read_text())
    # nothing was kept: a later Join on it is refused as unknown, not served
    status, err = await d.err("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP2, "Interface": {"Address": "172.18.0.2/16"}})
    assert "not a weft network" in err
    await create_weft_network(d)  # with weft's IPAM it is accepted


async def test_docker_default_ipam_address_is_not_echoed(env: Env) -> None:
    """A network with Docker's IPAM made by an older plugin (which accepted it) keeps working."""
    assert env.config.state_path is not None
    env.config.state_path.parent.mkdir(parents=True)
    env.config.state_path.write_text(json.dumps({"version": 1, "networks": [{
        "id": NET, "pool": "172.18.0.0/16", "gateway": "172.18.0.1/16",
        "address_space": "LocalDefault", "options": {}, "gateway_ident": None, "endpoints": []}]}))
    d = await env.start()
    assert env.kernel.exposed == set()  # not ours: the same gateway may exist on every host
    reply = await d.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP2, "Interface": {"Address": "172.18.0.2/16"}})
    assert reply == {}
    join = await d.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP2,
                                               "SandboxKey": "/x"})
    assert join["Gateway"] == "172.18.0.1"
    assert env.ipam.by_ident == {}


async def test_leave_and_delete_endpoint_are_lenient(env: Env) -> None:
    """Docker's container removal must not fail on what the plugin no longer knows."""
    d = await env.start()
    env.kernel.links[host_ifname(EP1)] = (peer_ifname(EP1), "weft", None)  # a stale pair
    assert await d.call("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP1}) == {}
    assert host_ifname(EP1) not in env.kernel.links
    assert await d.call("NetworkDriver.DeleteEndpoint",
                        {"NetworkID": NET, "EndpointID": EP1}) == {}
    await create_weft_network(d)
    for _ in range(2):  # twice: idempotent
        assert await d.call("NetworkDriver.DeleteEndpoint",
                            {"NetworkID": NET, "EndpointID": EP2}) == {}


async def test_network_survives_plugin_restart(env: Env) -> None:
    d = await env.start()
    pool_id, _ = await create_weft_network(d)
    addr = await d.call("IpamDriver.RequestAddress",
                        {"PoolID": pool_id, "Address": "", "Options": {}})
    await d.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP1, "Interface": {"Address": addr["Address"]}})
    await d.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP1, "SandboxKey": "/x"})

    env.kernel.exposed.clear()  # the router restarts with a fresh bridge
    d = await env.restart()  # Docker does not replay CreateNetwork
    assert env.kernel.exposed == {"10.32.0.1/12"}
    addr2 = await d.call("IpamDriver.RequestAddress",
                         {"PoolID": pool_id, "Address": "", "Options": {}})
    assert addr2["Address"] == "10.32.0.3/12"
    await d.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NET, "EndpointID": EP2, "Interface": {"Address": addr2["Address"]}})
    join = await d.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP2,
                                               "SandboxKey": "/y"})
    assert join["Gateway"] == "10.32.0.1"
    # the first container goes away after the restart: the address map was rebuilt
    await d.call("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": EP1})
    await d.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": EP1})
    await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.32.0.2"})
    held = sorted(str(ipaddress.ip_interface(c).ip) for c in env.ipam.by_ident.values())
    assert held == ["10.32.0.1", "10.32.0.3"]
    assert host_ifname(EP1) not in env.kernel.links and host_ifname(EP2) in env.kernel.links


@pytest.mark.parametrize(
    ("method", "body", "status", "words"),
    [
        ("NetworkDriver.CreateNetwork", {}, 400, "NetworkID is required"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": "a/b"}, 400, "not a valid Docker id"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv6Data": [{"Pool": "fd00::/64"}]},
         400, "IPv6"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [{"Pool": "10.1.0.1/16"}]},
         400, "IPv4Data Pool"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": "x"}, 400, "must be lists"),
        ("NetworkDriver.CreateNetwork", {"NetworkID": NET, "IPv4Data": [
            {"Pool": "10.1.0.0/16", "Gateway": "10.2.0.1/16"}]}, 400, "not in the pool"),
        ("NetworkDriver.CreateEndpoint", {"NetworkID": NET, "EndpointID": EP1}, 500,
         "not a weft network"),
        ("NetworkDriver.Join", {"NetworkID": NET}, 400, "EndpointID is required"),
        ("NetworkDriver.Leave", {"NetworkID": 7, "EndpointID": EP1}, 400,
         "NetworkID must be a string"),
        ("IpamDriver.RequestPool", {"Pool": "nonsense"}, 400, "Pool 'nonsense'"),
        ("IpamDriver.RequestPool", {"V6": True}, 400, "IPv6"),
        ("IpamDriver.RequestPool", {"Pool": "10.1.0.0/16", "SubPool": "10.2.0.0/24"}, 400,
         "SubPool"),
        ("IpamDriver.RequestAddress", {"PoolID": "bogus"}, 400, "PoolID 'bogus'"),
        ("IpamDriver.RequestAddress", {"PoolID": "weft:10.1.0.0/16", "Address": "x"}, 400,
         "Address 'x'"),
        ("IpamDriver.ReleaseAddress", {"PoolID": "weft:10.1.0.0/16"}, 400,
         "Address is required"),
        ("NetworkDriver.NoSuchThing", {}, 400, "unknown plugin method"),
    ],
)
async def test_malformed_requests_get_err_naming_the_problem(
    env: Env, method: str, body: dict[str, Any], status: int, words: str
) -> None:
    d = await env.start()
    got_status, err = await d.err(method, body)
    assert got_status == status
    assert err.startswith(method + ": ") and words in err, err


async def test_garbage_bodies(env: Env) -> None:
    d = await env.start()
    status, reply = await d.raw("NetworkDriver.CreateNetwork", b"{not json")
    assert status == 400 and "not JSON" in reply["Err"]
    status, reply = await d.raw("NetworkDriver.CreateNetwork", b"[1, 2]")
    assert status == 400 and "JSON object" in reply["Err"]
    status, reply = await d.raw("Plugin.Activate", b"")  # no body at all is fine
    assert status == 200 and reply["Implements"]
    # nothing changed
    assert not (env.tmp / "state" / "docker.json").exists()


async def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "docker.json"
    state.write_text("{garbage")
    with pytest.raises(Exception, match="move it away"):
        DockerPlugin(MemoryIpam(), FakeKernel(), DockerPluginConfig(state_path=state))


async def test_setup_docker_plugin_serves_with_the_router(tmp_path: Path) -> None:
    config = RouterConfig(
        data_dir=tmp_path / "data", port=0, http_addr="127.0.0.1:0", api_socket=None,
        nickname="dockertest",
    )
    router = Router(config)
    plugin_config = DockerPluginConfig(name="wfsetup", socket_dir=tmp_path / "plugins",
                                       state_path=tmp_path / "data" / "docker.json")
    server = setup_docker_plugin(router, ClaimingIpam(), plugin_config, kernel=FakeKernel())
    await router.start()
    try:
        assert plugin_config.socket_path.is_socket()
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(plugin_config.socket_path))
        ) as session:
            d = Docker(session)
            await create_weft_network(d)
        status = router.status()
        assert status["docker"]["plugin"] == "wfsetup"
        assert status["docker"]["networks"][0]["id"] == NET[:12]
        assert status["docker"]["networks"][0]["gateway"] == "10.32.0.1/12"
    finally:
        await router.stop()
    assert not plugin_config.socket_path.exists()
    assert server.plugin.store.networks  # kept on disk for the next start


def test_cli_options_make_the_config(tmp_path: Path) -> None:
    import argparse

    from weft.docker.cli import add_docker_arguments, docker_config_from_args

    parser = argparse.ArgumentParser()
    add_docker_arguments(parser)
    assert docker_config_from_args(parser.parse_args([]), tmp_path) is None
    cfg = docker_config_from_args(parser.parse_args(["--docker-plugin"]), tmp_path)
    assert cfg is not None and cfg.socket_path == Path("/run/docker/plugins/weft.sock")
    assert cfg.state_path == tmp_path / "docker-networks.json"
    cfg = docker_config_from_args(
        parser.parse_args(["--docker-plugin", "mesh", "--docker-plugin-dir", str(tmp_path)]),
        tmp_path, "10.40.0.0/16")
    assert cfg is not None and cfg.socket_path == tmp_path / "mesh.sock"
    assert cfg.default_pool == "10.40.0.0/16"


async def test_with_weft_ipam_service(tmp_path: Path) -> None:
    """The same calls over the real allocator (IpamService behind CNI's ServiceIpam adapter)."""
    from weft.cni.ipam_adapter import ServiceIpam
    from weft.gossip.peer import PeerName
    from weft.ipam.service import IpamService, config_from_flags

    name = PeerName.parse("02:00:00:00:00:01")
    service = IpamService(name, config_from_flags("10.32.0.0/12", init=f"seed={name}"), tmp_path)
    env = Env(tmp_path)
    env.ipam = ServiceIpam(service)  # type: ignore[assignment]
    try:
        d = await env.start()
        pool_id, gw = await create_weft_network(d)
        addresses = []
        for ep in (EP1, EP2):
            got = await d.call("IpamDriver.RequestAddress",
                               {"PoolID": pool_id, "Address": "", "Options": {}})
            addresses.append(got["Address"])
            assert await d.call("NetworkDriver.CreateEndpoint", {
                "NetworkID": NET, "EndpointID": ep, "Interface": {"Address": got["Address"]}}) == {}
            await d.call("NetworkDriver.Join", {"NetworkID": NET, "EndpointID": ep,
                                                "SandboxKey": "/x"})
        assert len({gw, *addresses}) == 3
        fixed = await d.call("IpamDriver.RequestAddress",
                             {"PoolID": pool_id, "Address": "10.32.7.7", "Options": {}})
        assert fixed["Address"] == "10.32.7.7/12"
        status, err = await d.err("IpamDriver.RequestAddress",
                                  {"PoolID": pool_id, "Address": "10.32.7.7", "Options": {}})
        assert status == 500 and "10.32.7.7" in err
        held = {a.cidr for a in service.allocations()}
        assert held == {gw, *addresses, "10.32.7.7/12"}
        # a restart of the plugin finds its allocations in the allocator
        d = await env.restart()
        for ep, address in zip((EP1, EP2), addresses, strict=True):
            await d.call("NetworkDriver.Leave", {"NetworkID": NET, "EndpointID": ep})
            await d.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NET, "EndpointID": ep})
            await d.call("IpamDriver.ReleaseAddress",
                         {"PoolID": pool_id, "Address": address.split("/")[0]})
        await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "10.32.7.7"})
        await d.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": gw.split("/")[0]})
        await d.call("NetworkDriver.DeleteNetwork", {"NetworkID": NET})
        assert service.allocations() == []
    finally:
        await env.stop()
        service.close()


async def test_a_live_plugin_socket_is_not_stolen(env: Env, tmp_path: Path) -> None:
    await env.start()
    second = DockerPluginServer(DockerPlugin(ClaimingIpam(), FakeKernel(), env.config))
    with pytest.raises(Exception, match="another process serves"):
        await second.start()
    assert env.config.socket_path.is_socket()
    d = Docker(env.session)  # type: ignore[arg-type]
    assert (await d.call("Plugin.Activate"))["Implements"]
    # a stale socket file (its server gone) is replaced
    await env.stop()
    stale = env.config.socket_path
    import socket as socket_mod

    sock = socket_mod.socket(socket_mod.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    d = await env.start()
    assert (await d.call("Plugin.Activate"))["Implements"]
