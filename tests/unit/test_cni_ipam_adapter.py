"""ServiceIpam: weft's allocator errors and shapes mapped onto the CNI interface."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from weft.cni.ipam_adapter import ServiceIpam
from weft.cni.server import IpamRefused, IpamUnavailable
from weft.errors import ConfigError
from weft.ipam.allocator import (
    AddressInUseError,
    Allocation,
    NotReadyError,
    RangeFullError,
    RequestTimeoutError,
)

NET = IPv4Network("10.32.0.0/12")


class FakeService:
    """Async writes, sync reads, like the router's IPAM service."""

    def __init__(self) -> None:
        self.held: dict[str, Allocation] = {}
        self.next = 1
        self.fail: Exception | None = None

    async def allocate(self, cid: str, subnet: str | None) -> Allocation:
        if self.fail:
            raise self.fail
        if cid not in self.held:
            self.held[cid] = Allocation(cid, NET.network_address + self.next, NET)
            self.next += 1
        return self.held[cid]

    async def claim(self, cid: str, address: str, subnet: str) -> Allocation:
        if self.fail:
            raise self.fail
        self.held[cid] = Allocation(cid, IPv4Address(address), IPv4Network(subnet))
        return self.held[cid]

    async def release(self, cid: str) -> list[Allocation]:
        if self.fail:
            raise self.fail
        gone = self.held.pop(cid, None)
        return [gone] if gone else []

    def lookup(self, cid: str) -> list[Allocation]:
        return [self.held[cid]] if cid in self.held else []

    def allocations(self) -> list[Allocation]:
        return list(self.held.values())

    def ready(self) -> bool:
        return self.fail is None


async def test_round_trip() -> None:
    service = FakeService()
    ipam = ServiceIpam(service)
    assert await ipam.allocate("cni:n:a:eth0", None) == "10.32.0.1/12"
    assert await ipam.allocate("cni:n:a:eth0", None) == "10.32.0.1/12"
    assert await ipam.allocate("docker:x", None) == "10.32.0.2/12"
    assert await ipam.claim("cni:n:b:eth0", "10.32.0.9/12") == "10.32.0.9/12"
    assert await ipam.lookup("cni:n:a:eth0") == ["10.32.0.1/12"]
    assert await ipam.idents("cni:n:") == ["cni:n:a:eth0", "cni:n:b:eth0"]
    await ipam.release("cni:n:a:eth0")
    await ipam.release("cni:n:a:eth0")
    assert await ipam.lookup("cni:n:a:eth0") == []
    assert ipam.ready()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (NotReadyError("ring not ready"), IpamUnavailable),
        (RequestTimeoutError("no donor answered"), IpamUnavailable),
        (RangeFullError("no space"), IpamRefused),
        (ConfigError("subnet outside the range"), IpamRefused),
        (AddressInUseError("held by x"), IpamRefused),
    ],
)
async def test_errors_are_mapped(error: Exception, expected: type[Exception]) -> None:
    service = FakeService()
    service.fail = error
    ipam = ServiceIpam(service)
    with pytest.raises(expected, match=str(error)):
        await ipam.allocate("cni:n:a:eth0", None)
    with pytest.raises(expected):
        await ipam.claim("cni:n:a:eth0", "10.32.0.9/12")
    assert not ipam.ready()


async def test_claim_without_support_is_refused() -> None:
    class NoClaim:
        async def allocate(self, cid: str, subnet: Any) -> str:
            return "10.32.0.5/12"

    with pytest.raises(IpamRefused):
        await ServiceIpam(NoClaim()).claim("x", "10.32.0.9/12")
    assert await ServiceIpam(NoClaim()).allocate("x", None) == "10.32.0.5/12"
    assert ServiceIpam(NoClaim()).ready()


async def test_claim_of_a_bare_address_uses_the_default_subnet() -> None:
    service = FakeService()
    seen: list[tuple[str, str, Any]] = []
    original = service.claim

    async def spy(cid: str, address: str, subnet: Any) -> Allocation:
        seen.append((cid, address, subnet))
        return await original(cid, address, subnet or "10.32.0.0/12")

    service.claim = spy  # type: ignore[method-assign]
    assert await ServiceIpam(service).claim("x", "10.32.0.7") == "10.32.0.7/12"
    assert seen == [("x", "10.32.0.7", None)]
