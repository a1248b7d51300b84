"""The /attach and /detach routes' IPAM idents: one namespace, one ident, whichever form named it
(issue 13: ``weft attach /run/netns/NAME`` failed with ``invalid container id``)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.host.bridge import Attachment
from weft.host.bridge_api import netns_ident, setup_routes
from weft.ipam.allocator import AllocationSucceeded, Allocator, IpamConfig
from weft.router.api import _errors  # the API's own error boundary


def test_a_name_and_its_run_netns_path_are_one_ident() -> None:
    assert netns_ident("c1") == "netns:c1"  # as before: existing allocations stay found
    assert netns_ident("/run/netns/c1") == "netns:c1"
    assert netns_ident("/run/netns//c1") == "netns:c1"
    assert netns_ident("/run/netns/./c1") == "netns:c1"


def test_other_paths_get_their_own_slash_free_idents() -> None:
    proc = netns_ident("/proc/4242/ns/net")
    assert proc == "netns-path:%2Fproc%2F4242%2Fns%2Fnet"
    assert netns_ident("/proc/4243/ns/net") != proc
    # no name can produce a path's ident: names all map under "netns:"
    assert not netns_ident("netns-path:%2Fproc%2F4242%2Fns%2Fnet").startswith("netns-path:")
    assert all("/" not in netns_ident(p) for p in ("/var/run/docker/netns/ab", "/x/y/../z"))
    with pytest.raises(ConfigError, match="too long"):
        netns_ident("/" + "d/" * 200 + "net")


class _Bridge:
    """The kernel half, remembered in a dict by path (the real one is in tests/integ)."""

    def __init__(self) -> None:
        self.attached: dict[str, str] = {}

    @staticmethod
    def _path(netns: str) -> str:
        return netns if "/" in netns else f"/run/netns/{netns}"

    def attach(self, netns: str, ips: list[str], ifname: str, mtu: int | None) -> Attachment:
        path = self._path(netns)
        self.attached[path] = netns
        return Attachment(netns, path, ifname, "vwe0", "02:00:00:00:00:01", ips)

    def detach(self, netns: str) -> bool:
        return self.attached.pop(self._path(netns), None) is not None


async def test_attach_by_one_form_detach_by_the_other_releases_the_address() -> None:
    # The real allocator (one peer owns the range) checks idents: it refused
    # "netns:/run/netns/c1", which failed `weft attach /run/netns/c1`.
    ipam = Allocator(PeerName(0x020000000001), IpamConfig(), now=0.0)

    async def allocate(ident: str) -> list[str]:
        rid = ipam.allocate(ident, None, 0.0)
        while (ev := ipam.next_event()) is not None:
            if isinstance(ev, AllocationSucceeded) and ev.request_id == rid:
                return [ev.allocation.cidr]
        raise AssertionError(f"no allocation for {ident}")

    async def release(ident: str) -> None:
        ipam.release(ident, 0.0)

    app = web.Application(middlewares=[_errors])
    setup_routes(app, _Bridge(), allocate, release)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        for attach_as, detach_as in [
            ("/run/netns/c1", "c1"),
            ("c1", "/run/netns/c1"),
            ("/proc/4242/ns/net", "/proc/4242/ns/net"),
        ]:
            r = await client.post("/attach", json={"netns": attach_as})
            assert r.status == 200, await r.text()
            assert (await r.json())["addresses"] == ["10.32.0.1/12"]
            assert len(ipam.allocations()) == 1
            r = await client.post("/detach", json={"netns": detach_as})
            assert r.status == 200, await r.text()
            assert ipam.allocations() == [], (attach_as, detach_as)
