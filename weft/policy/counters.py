"""The policy table's counters, for /metrics: pure parsers of ``nft -j`` output + async runners.

* :func:`parse_counters` — ``nft -j list counters table inet weft-policy`` -> named counter ->
  :class:`Count` (the names are :data:`weft.policy.nft.COUNTERS`).
* :func:`parse_element_counters` — ``nft -j list table inet weft-policy`` -> set -> element ->
  :class:`Count`, each element written exactly as :func:`weft.policy.nft.set_elements` writes it
  (so a caller can map it back to the AllowAll/AllowPorts entry and its grants).

The parsers raise :class:`CountersParseError` (a ValueError) on output they cannot read; the
runners raise :class:`NftError` when nft fails (e.g. the table is not there yet).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weft.errors import WeftError
from weft.policy.compiler import AddrRange, PortRange
from weft.policy.nft import COUNTING_SETS, FAMILY, TABLE

__all__ = [
    "Count",
    "CountersParseError",
    "NftError",
    "parse_counters",
    "parse_element_counters",
    "read_counters",
    "read_element_counters",
]


class CountersParseError(ValueError):
    """nft's JSON is not what we expected; the text says where."""


class NftError(WeftError):
    """nft exited non-zero (its stderr is in the message)."""


@dataclass(frozen=True)
class Count:
    packets: int
    bytes: int


def _items(text: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise CountersParseError(f"nft output is not JSON: {err}") from None
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise CountersParseError('nft output has no "nftables" list')
    return [item for item in items if isinstance(item, dict)]


def _count(raw: Any, where: str) -> Count:
    if not isinstance(raw, dict):
        raise CountersParseError(f"{where}: counter is not an object")
    packets, octets = raw.get("packets"), raw.get("bytes")
    if type(packets) is not int or type(octets) is not int or packets < 0 or octets < 0:
        raise CountersParseError(f"{where}: packets/bytes not non-negative integers")
    return Count(packets, octets)


def parse_counters(text: str, table: str = TABLE) -> dict[str, Count]:
    """Named counters of ``table`` (other tables' counters, if listed, are ignored)."""
    out: dict[str, Count] = {}
    for item in _items(text):
        counter = item.get("counter")
        if not isinstance(counter, dict) or counter.get("table") != table:
            continue
        name = counter.get("name")
        if not isinstance(name, str):
            raise CountersParseError("a counter without a name")
        out[name] = _count(counter, f"counter {name}")
    return out


def _range(value: Any) -> list[Any] | None:
    """``{"range": [first, last]}`` -> ``[first, last]``; anything else -> None."""
    pair = value.get("range") if isinstance(value, dict) else None
    return pair if isinstance(pair, list) and len(pair) == 2 else None


def _address(value: Any) -> AddrRange:
    if isinstance(value, str):
        host = ipaddress.ip_address(value)
        return AddrRange.host(host)
    if isinstance(value, dict) and isinstance(value.get("prefix"), dict):
        prefix = value["prefix"]
        net = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
        return AddrRange(net.version, int(net.network_address), int(net.broadcast_address))
    if (
        isinstance(value, dict)
        and isinstance(value.get("range"), list)
        and len(value["range"]) == 2
    ):
        first, last = (ipaddress.ip_address(v) for v in value["range"])
        if first.version != last.version:
            raise CountersParseError(f"range across families: {value}")
        return AddrRange(first.version, int(first), int(last))
    raise CountersParseError(f"not an address, prefix or range: {value!r}")


def _port(value: Any) -> PortRange:
    if type(value) is int:
        return PortRange(value, value)
    if (
        isinstance(value, dict)
        and isinstance(value.get("range"), list)
        and len(value["range"]) == 2
    ):
        first, last = value["range"]
        if type(first) is int and type(last) is int:
            return PortRange(first, last)
    raise CountersParseError(f"not a port or port range: {value!r}")


def _element(value: Any) -> str:
    """One element's key in :func:`weft.policy.nft.set_elements` notation."""
    parts = value["concat"] if isinstance(value, dict) and "concat" in value else [value]
    if not isinstance(parts, list) or len(parts) not in (2, 4):
        raise CountersParseError(f"unexpected element shape: {value!r}")
    try:
        words = [str(_address(parts[0])), str(_address(parts[1]))]
        if len(parts) == 4:
            protocol = parts[2]
            if not isinstance(protocol, str):  # nft names tcp/udp/sctp; a number is not ours
                raise CountersParseError(f"protocol {protocol!r}")
            words += [protocol.lower(), str(_port(parts[3]))]
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CountersParseError):
            raise
        raise CountersParseError(f"element {value!r}: {err}") from None
    return " . ".join(words)


def parse_element_counters(
    text: str, sets: Sequence[str] = COUNTING_SETS, table: str = TABLE
) -> dict[str, dict[str, Count]]:
    """Per-element counters of ``sets`` (every listed one present, possibly empty)."""
    out: dict[str, dict[str, Count]] = {name: {} for name in sets}
    for item in _items(text):
        s = item.get("set")
        if not isinstance(s, dict) or s.get("table") != table or s.get("name") not in out:
            continue
        name = s["name"]
        elems = s.get("elem", [])
        if not isinstance(elems, list):
            raise CountersParseError(f"set {name}: elem is not a list")
        for raw in elems:
            elem = raw.get("elem") if isinstance(raw, dict) else None
            if not isinstance(elem, dict) or "counter" not in elem:
                raise CountersParseError(f"set {name}: element without a counter: {raw!r}")
            out[name][_element(elem.get("val"))] = _count(elem["counter"], f"set {name}")
    return out


async def _nft_json(*args: str, netns: str | None = None, timeout: float = 30.0) -> str:
    argv = ["nft", "-j", *args]
    if netns is not None:  # tests; the router runs in its own namespace
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NftError(f"{' '.join(argv)}: no answer in {timeout:g}s") from None
    if proc.returncode != 0:
        raise NftError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def read_counters(netns: str | None = None) -> dict[str, Count]:
    """The table's named counters, now."""
    return parse_counters(await _nft_json("list", "counters", "table", FAMILY, TABLE, netns=netns))


async def read_element_counters(netns: str | None = None) -> dict[str, dict[str, Count]]:
    """Per-element counters of the allow sets, now (lists the whole table: use sparingly)."""
    return parse_element_counters(await _nft_json("list", "table", FAMILY, TABLE, netns=netns))
