"""Router-side CNI logic with the kernel replaced by a recording fake (no root needed).

Allocation and release around kernel failures, the pending-release spool, GC scoping, CHECK's
allocation check, the HTTP error mapping and concurrent ADDs. Real veths: tests/integ.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from weft.cni import server
from weft.cni.plugin import CniError
from weft.cni.server import (
    CniConfig,
    CniService,
    MemoryIpam,
    attachment_id,
    setup_routes,
)
from weft.host import attach as kernel


class FakeKernel:
    def __init__(self) -> None:
        self.attached: dict[str, kernel.AttachSpec] = {}
        self.fail_with: kernel.AttachError | None = None
        self.problems: list[str] = []
        self.bridge = True

    def attach(self, spec: kernel.AttachSpec) -> kernel.Attached:
        if self.fail_with is not None:
            raise self.fail_with
        self.attached[spec.host_ifname] = spec
        gateways = {c: "10.32.0.1" for c in spec.addresses}
        routes = spec.routes or tuple({"dst": "0.0.0.0/0", "gw": "10.32.0.1"} for _ in gateways)
        return kernel.Attached(
            host_mac="aa:00:00:00:00:01",
            container_mac="aa:00:00:00:00:02",
            mtu=spec.mtu or 1376,
            gateways=gateways,
            routes=routes,
            bridge_mac="aa:00:00:00:00:00",
            bridge_mtu=1376,
        )

    def detach(self, host_name: str) -> bool:
        return self.attached.pop(host_name, None) is not None

    def check(
        self,
        netns: str,
        ifname: str,
        host_name: str,
        bridge: str,
        addresses: Sequence[str],
        routes: Sequence[Mapping[str, Any]],
    ) -> list[str]:
        return list(self.problems)

    def bridge_info(self, bridge: str) -> kernel.BridgeInfo | None:
        return (
            kernel.BridgeInfo(1, "aa:00:00:00:00:00", 1376, ("10.32.0.1/12",))
            if self.bridge
            else None
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = FakeKernel()
    for name in ("attach", "detach", "check", "bridge_info"):
        monkeypatch.setattr(kernel, name, getattr(k, name))
    return k


@pytest.fixture
def ipam() -> MemoryIpam:
    return MemoryIpam("10.32.0.0/12", reserved=("10.32.0.1",))


@pytest.fixture
def service(ipam: MemoryIpam, tmp_path: Path) -> CniService:
    return CniService(ipam, CniConfig(spool_dir=str(tmp_path / "spool"), drain_interval=0.01))


def request(
    cid: str = "c1", ifname: str = "eth0", network: str = "weftnet", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "containerId": cid,
        "netns": "/proc/self/ns/net",
        "ifname": ifname,
        "network": network,
        "config": {"cniVersion": "1.0.0", "name": network, "type": "weft"},
    }
    body.update(extra)
    return body


async def test_add_allocates_and_attaches(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    result = await service.add(request())
    assert result["ips"] == [{"address": "10.32.0.2/12", "interface": 2, "gateway": "10.32.0.1"}]
    assert result["interfaces"][2] == {
        "name": "eth0",
        "mac": "aa:00:00:00:00:02",
        "mtu": 1376,
        "sandbox": "/proc/self/ns/net",
    }
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.32.0.1"}]
    assert ipam.by_ident == {attachment_id("weftnet", "c1", "eth0"): "10.32.0.2/12"}
    (spec,) = fake.attached.values()
    assert spec.addresses == ("10.32.0.2/12",) and spec.hairpin is True and spec.mtu is None


async def test_configured_routes_mtu_subnet_and_dns(fake: FakeKernel, service: CniService) -> None:
    config = {
        "cniVersion": "1.0.0",
        "name": "weftnet",
        "type": "weft",
        "mtu": 1300,
        "hairpinMode": False,
        "dns": {"nameservers": ["10.32.0.53"]},
        "ipam": {"subnet": "10.40.0.0/16", "routes": [{"dst": "192.168.0.0/16"}]},
    }
    result = await service.add(request(config=config))
    assert result["ips"][0]["address"] == "10.40.0.1/16"
    assert result["routes"] == [{"dst": "192.168.0.0/16"}]
    assert result["dns"] == {"nameservers": ["10.32.0.53"]}
    (spec,) = fake.attached.values()
    assert spec.mtu == 1300 and spec.hairpin is False


@pytest.mark.parametrize(
    "config",
    [{"mtu": 10}, {"mtu": "big"}, {"ipam": {"subnet": "nope"}}, {"routes": [{"gw": "1.2.3.4"}]}],
)
async def test_bad_config_is_error_7_and_takes_nothing(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam, config: dict[str, Any]
) -> None:
    with pytest.raises(CniError) as err:
        await service.add(request(config={"name": "weftnet", **config}))
    assert err.value.code == 7
    assert ipam.by_ident == {} and fake.attached == {}


async def test_kernel_failure_releases_a_fresh_allocation(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    fake.fail_with = kernel.AttachError(
        kernel.AttachFailure.INTERFACE_EXISTS, "interface eth0 already exists in the container"
    )
    with pytest.raises(CniError) as err:
        await service.add(request())
    assert err.value.code == 101
    assert ipam.by_ident == {}


async def test_kernel_failure_keeps_an_existing_allocation(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    await service.add(request())
    fake.fail_with = kernel.AttachError(
        kernel.AttachFailure.INTERFACE_EXISTS, "interface eth0 already exists in the container"
    )
    with pytest.raises(CniError):
        await service.add(request())  # a second ADD must not break the first attachment
    assert ipam.by_ident == {attachment_id("weftnet", "c1", "eth0"): "10.32.0.2/12"}


async def test_allocator_states_map_to_codes(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    ipam.available = False
    with pytest.raises(CniError) as err:
        await service.add(request())
    assert err.value.code == 11
    ipam.available = True
    small = CniService(MemoryIpam("10.9.0.0/30"), service.config)
    await small.add(request("a"))
    await small.add(request("b"))
    with pytest.raises(CniError) as err:
        await small.add(request("c"))
    assert err.value.code == 103 and "no free address" in err.value.details


async def test_delegated_addresses_are_used_as_given(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    delegated = {
        "ips": [{"address": "192.168.5.9/24", "gateway": "192.168.5.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"domain": "x"},
    }
    result = await service.add(request(ipam=delegated))
    assert result["ips"][0]["address"] == "192.168.5.9/24"
    assert result["dns"] == {"domain": "x"}
    (spec,) = fake.attached.values()
    assert spec.gateways == {"192.168.5.9/24": "192.168.5.1"}
    assert ipam.by_ident == {}
    await service.delete(request(weftIpam=False))
    assert fake.attached == {}


async def test_delete_is_idempotent(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    await service.add(request())
    await service.delete(request(netns=""))
    await service.delete(request(netns=""))
    assert ipam.by_ident == {} and fake.attached == {}


async def test_delete_with_allocator_unavailable_spools_and_drains(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam, tmp_path: Path
) -> None:
    await service.add(request())
    ipam.available = False
    await service.delete(request())
    spool = tmp_path / "spool"
    assert [p.name for p in spool.iterdir()] == ["weftnet:c1:eth0.json"]
    assert fake.attached == {}  # the kernel part is done at once
    ipam.available = True
    assert await service.drain_spool() == 0
    assert ipam.by_ident == {} and list(spool.iterdir()) == []


async def test_spooled_release_from_the_plugin_is_replayed_by_a_drain(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam, tmp_path: Path
) -> None:
    await service.add(request())
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "weftnet:c1:eth0.json").write_text(json.dumps(request(weftIpam=True)))
    (spool / "garbage.json").write_text("{not json")
    result = await service.add(request("c2"))
    # an ADD for another attachment does not wait for c1's pending release; a drain does it
    assert attachment_id("weftnet", "c1", "eth0") in ipam.by_ident
    await service.drain_spool()
    assert attachment_id("weftnet", "c1", "eth0") not in ipam.by_ident
    assert result["ips"][0]["address"] == "10.32.0.3/12"
    assert sorted(p.name for p in spool.iterdir()) == ["garbage.json.bad"]


async def test_pending_release_for_the_same_attachment_runs_before_its_add(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam, tmp_path: Path
) -> None:
    await service.add(request())
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "weftnet:c1:eth0.json").write_text(json.dumps(request(weftIpam=True)))
    fake.attached.clear()  # the container went away with its veth
    result = await service.add(request())
    assert result["ips"][0]["address"] == "10.32.0.2/12"
    assert list(spool.iterdir()) == []


async def test_check_reports_a_lost_allocation(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    result = await service.add(request())
    await service.check(request(prevResult=result))
    ipam.by_ident.clear()
    with pytest.raises(CniError) as err:
        await service.check(request(prevResult=result))
    assert err.value.code == 102 and "is not allocated" in err.value.details
    fake.problems = ["address 10.32.0.2/12 is missing on eth0"]
    with pytest.raises(CniError) as err:
        await service.check(request(prevResult=result, weftIpam=False))
    assert err.value.details == "address 10.32.0.2/12 is missing on eth0"


async def test_check_needs_our_interface_in_prev_result(
    fake: FakeKernel, service: CniService
) -> None:
    result = await service.add(request())
    with pytest.raises(CniError) as err:
        await service.check(request(ifname="net9", prevResult=result))
    assert err.value.code == 102


async def test_gc_releases_only_this_networks_stale_attachments(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    for cid in ("keep", "drop"):
        await service.add(request(cid))
    await service.add(request("other", network="othernet"))
    answer = await service.gc(
        {"network": "weftnet", "valid": [{"containerID": "keep", "ifname": "eth0"}]}
    )
    assert answer == {"released": [attachment_id("weftnet", "drop", "eth0")]}
    assert set(ipam.by_ident) == {
        attachment_id("weftnet", "keep", "eth0"),
        attachment_id("othernet", "other", "eth0"),
    }


async def test_status(fake: FakeKernel, service: CniService, ipam: MemoryIpam) -> None:
    await service.status({})
    fake.bridge = False
    with pytest.raises(CniError) as err:
        await service.status({})
    assert err.value.code == 50
    fake.bridge = True
    ipam.available = False
    with pytest.raises(CniError) as err:
        await service.status({})
    assert err.value.code == 50


async def test_twenty_concurrent_adds_get_distinct_addresses(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    results = await asyncio.gather(*(service.add(request(f"p{i}")) for i in range(20)))
    addresses = {r["ips"][0]["address"] for r in results}
    assert len(addresses) == 20
    await asyncio.gather(*(service.delete(request(f"p{i}")) for i in range(20)))
    assert ipam.by_ident == {} and fake.attached == {}


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture
async def client(fake: FakeKernel, service: CniService) -> Any:
    app = web.Application()
    setup_routes(app, service)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_http_add_and_errors(client: Any, fake: FakeKernel) -> None:
    response = await client.post("/cni/add", json=request())
    assert response.status == 200
    assert (await response.json())["result"]["ips"][0]["address"] == "10.32.0.2/12"

    fake.fail_with = kernel.AttachError(kernel.AttachFailure.INTERFACE_EXISTS, "exists")
    response = await client.post("/cni/add", json=request("x"))
    assert response.status == 409 and (await response.json())["code"] == 101

    response = await client.post("/cni/add", data=b"{nope")
    assert response.status == 400 and (await response.json())["code"] == 6

    response = await client.post("/cni/add", json={"containerId": "a b"})
    assert response.status == 400 and (await response.json())["code"] == 6

    response = await client.post("/cni/del", json=request(), headers={"Origin": "http://evil"})
    assert response.status == 403

    fake.bridge = False
    response = await client.post("/cni/status", json={"network": "weftnet"})
    assert response.status == 503 and (await response.json())["code"] == 50


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000], ids=["arrays", "objects"])
async def test_http_deeply_nested_body_is_code_6_not_999(client: Any, body: bytes) -> None:
    # before weft.jsonlimit: RecursionError -> 500 with code 999 "internal error"
    response = await client.post("/cni/add", data=body)
    answer = await response.json()
    assert response.status == 400 and answer["code"] == 6, answer


async def test_http_unexpected_failure_is_999(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(spec: kernel.AttachSpec) -> kernel.Attached:
        raise RuntimeError("netlink went away")

    monkeypatch.setattr(kernel, "attach", boom)
    response = await client.post("/cni/add", json=request())
    body = await response.json()
    assert response.status == 500 and body["code"] == 999 and "netlink went away" in body["details"]


def test_memory_ipam_persists(tmp_path: Path) -> None:
    state = tmp_path / "alloc.json"
    first = MemoryIpam("10.32.0.0/12", state_path=str(state))
    assert asyncio.run(first.allocate("a", None)) == "10.32.0.1/12"
    second = MemoryIpam("10.32.0.0/12", state_path=str(state))
    assert asyncio.run(second.lookup("a")) == ["10.32.0.1/12"]
    asyncio.run(second.release("a"))
    assert json.loads(state.read_text()) == {}


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        CniConfig(bridge="way-too-long-bridge-name")
    with pytest.raises(ValueError):
        CniConfig(drain_interval=0)
    assert server.CniConfig().bridge == "weft"


def test_setup_cni_adds_routes_and_status(tmp_path: Path) -> None:
    class FakeRouter:
        def __init__(self) -> None:
            self.app = web.Application()
            self.providers: dict[str, Any] = {}

        def add_status_provider(self, key: str, fn: Any) -> None:
            self.providers[key] = fn

    router = FakeRouter()
    service = server.setup_cni(router, MemoryIpam(), CniConfig(spool_dir=str(tmp_path / "s")))
    paths = {r.resource.canonical for r in router.app.router.routes() if r.resource is not None}
    assert {"/cni/add", "/cni/del", "/cni/check", "/cni/status", "/cni/gc"} <= paths
    assert router.providers["cni"]() == {
        "bridge": "weft",
        "spool_dir": str(tmp_path / "s"),
        "pending_releases": 0,
    }
    assert service.config.spool_dir == str(tmp_path / "s")


async def test_static_address_from_runtime_config_or_cni_args(
    fake: FakeKernel, service: CniService, ipam: MemoryIpam
) -> None:
    config = {"name": "weftnet", "runtimeConfig": {"ips": ["10.32.9.9/12"]}}
    result = await service.add(request("s1", config=config))
    assert result["ips"][0]["address"] == "10.32.9.9/12"
    result = await service.add(request("s2", args="IgnoreUnknown=1;IP=10.32.9.10"))
    assert result["ips"][0]["address"] == "10.32.9.10/12"
    with pytest.raises(CniError) as err:  # held by s1
        await service.add(request("s3", args="IP=10.32.9.9"))
    assert err.value.code == 103 and "already held" in err.value.details
    with pytest.raises(CniError) as err:
        await service.add(request("s4", args="IP=not-an-ip"))
    assert err.value.code == 7
    assert set(ipam.by_ident) == {
        attachment_id("weftnet", "s1", "eth0"),
        attachment_id("weftnet", "s2", "eth0"),
    }
    await service.delete(request("s1"))
    result = await service.add(request("s3", args="IP=10.32.9.9"))
    assert result["ips"][0]["address"] == "10.32.9.9/12"


async def test_static_address_needs_an_allocator_that_claims(
    fake: FakeKernel, tmp_path: Path
) -> None:
    class NoClaim(MemoryIpam):
        claim = None  # type: ignore[assignment]

    service = CniService(NoClaim(), CniConfig(spool_dir=str(tmp_path)))
    with pytest.raises(CniError) as err:
        await service.add(request(args="IP=10.32.9.9"))
    assert err.value.code == 7


async def test_a_refused_pending_release_is_set_aside(
    fake: FakeKernel,
    service: CniService,
    ipam: MemoryIpam,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "weftnet:c1:eth0.json").write_text(json.dumps(request(weftIpam=True)))

    async def refuse(ident: str) -> None:
        raise server.IpamRefused("not yours")

    monkeypatch.setattr(ipam, "release", refuse)
    assert await service.drain_spool() == 0
    assert [p.name for p in spool.iterdir()] == ["weftnet:c1:eth0.json.bad"]


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (kernel.AttachFailure.NETNS_GONE, 3),
        (kernel.AttachFailure.BRIDGE_MISSING, 11),
        (kernel.AttachFailure.INTERFACE_EXISTS, 101),
        (kernel.AttachFailure.KERNEL, 100),
    ],
)
async def test_each_kernel_failure_gets_its_cni_code(
    fake: FakeKernel, service: CniService, failure: kernel.AttachFailure, code: int
) -> None:
    fake.fail_with = kernel.AttachError(failure, "it failed", "where")
    with pytest.raises(CniError) as err:
        await service.add(request())
    assert (err.value.code, err.value.msg, err.value.details) == (code, "it failed", "where")
