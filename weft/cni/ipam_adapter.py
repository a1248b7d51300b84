"""weft's distributed allocator behind the CNI interface (``weft.cni.server.CniIpam``).

The router's IPAM service (weft/ipam) allocates, claims and releases by container id, waits while
the ring is not ready (bounded) and raises weft errors. CNI (and the Docker driver) want the
narrower ``CniIpam``: CIDR strings, idents with a prefix, and two outcomes besides success -
"try again later" (:class:`IpamUnavailable`) and "no" (:class:`IpamRefused`). This adapter maps
one onto the other without assuming whether the service's read methods are sync or async.

Mapping: ``NotReadyError``, ``RequestTimeoutError`` and a ring conflict -> unavailable (code 11);
``RangeFullError``, ``ConfigError`` (bad subnet), ``AddressInUseError`` -> refused (code 103).
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from weft.cni.server import IpamRefused, IpamUnavailable
from weft.errors import ConfigError, WeftError

__all__ = ["ServiceIpam"]

T = TypeVar("T")

_UNAVAILABLE = ("NotReadyError", "RequestTimeoutError", "RingConflictError")
_REFUSED = ("RangeFullError", "AddressInUseError", "UnknownPeerError")


def _classify(err: BaseException) -> Exception:
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & set(_UNAVAILABLE):
        return IpamUnavailable(str(err))
    if names & set(_REFUSED) or isinstance(err, ConfigError):
        return IpamRefused(str(err))
    return IpamUnavailable(str(err))


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _cidr(item: Any) -> str:
    """An allocation as CIDR text: ``Allocation`` (``.cidr``), a dict, or a string."""
    if isinstance(item, str):
        return str(ipaddress.ip_interface(item))
    cidr = getattr(item, "cidr", None)
    if cidr is None and isinstance(item, dict):
        cidr = item.get("cidr") or item.get("address")
    if cidr is None:
        raise IpamUnavailable(f"allocator returned {item!r}")
    return str(ipaddress.ip_interface(str(cidr)))


def _ident(item: Any) -> str:
    cid = getattr(item, "container_id", None)
    if cid is None and isinstance(item, dict):
        cid = item.get("container_id")
    return str(cid)


class ServiceIpam:
    """``CniIpam`` over the router's IPAM service.

    The service is expected to offer ``allocate(container_id, subnet)`` and
    ``release(container_id)`` (async), ``lookup(container_id)``, ``allocations()`` and
    ``ready()`` (sync or async), and
    optionally ``claim(container_id, address, subnet)``; allocations expose ``container_id`` and
    ``cidr`` (weft.ipam.allocator.Allocation).
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    async def _guarded(self, fn: Callable[..., Awaitable[T] | T], *args: Any) -> T:
        try:
            result: T = await _call(fn, *args)
        except (IpamUnavailable, IpamRefused):
            raise
        except WeftError as err:
            raise _classify(err) from None
        return result

    async def allocate(self, ident: str, subnet: str | None) -> str:
        allocation = await self._guarded(self.service.allocate, ident, subnet)
        return _cidr(allocation)

    async def claim(self, ident: str, cidr: str) -> str:
        """Claim a specific address (static IPs: CIDR, or bare for the default subnet); refused
        when another ident holds it."""
        claim = getattr(self.service, "claim", None)
        if claim is None:
            raise IpamRefused("this allocator cannot claim specific addresses")
        if "/" in cidr:
            iface = ipaddress.ip_interface(cidr)
            address, subnet = str(iface.ip), str(iface.network)
        else:  # a bare address: in the allocator's default subnet
            address, subnet = str(ipaddress.ip_address(cidr)), None
        allocation = await self._guarded(claim, ident, address, subnet)
        return _cidr(allocation)

    async def release(self, ident: str) -> None:
        await self._guarded(self.service.release, ident)

    async def lookup(self, ident: str) -> list[str]:
        found = await self._guarded(self.service.lookup, ident)
        return [_cidr(a) for a in found or []]

    async def idents(self, prefix: str) -> list[str]:
        everything = await self._guarded(self.service.allocations)
        return sorted({_ident(a) for a in everything or [] if _ident(a).startswith(prefix)})

    def ready(self) -> bool:
        ready = getattr(self.service, "ready", None)
        if ready is None:
            return True
        value = ready() if callable(ready) else ready
        return bool(value)
