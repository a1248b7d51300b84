"""Which forwarding entries the Linux VXLAN device should hold (a pure core, no I/O).

The vxlan device runs with learning off: every remote it sends to is an entry put there by the
router, so a forged UDP packet cannot redirect traffic and what the kernel does is always what
``/status`` says. Three kinds of entry, all ``(MAC, remote underlay IP)``:

* **Heartbeat entries** ``peer-name-as-MAC -> peer IP`` for every peer whose fast path is being
  tried (pending, healthy or unhealthy). A peer name is a 48-bit unicast, locally administered
  value, so it is a valid MAC; fast-path heartbeat frames are addressed to it (see heartbeat.py),
  which makes them go to exactly that peer.
* **Flood entries** ``00:00:00:00:00:00 -> peer IP`` for every peer whose direct connection is
  *carrying* traffic over VXLAN. The kernel sends broadcast, multicast and unknown unicast to every
  all-zero entry: head-end replication to the peers we have a working direct fast path to.
* **MAC entries** ``container MAC -> peer IP`` for MACs the router has located at a peer that
  carries traffic over VXLAN, so known unicast goes to one peer instead of all.

MACs located at peers without a carrying fast connection get no entry: those frames are the
overlay switch's to send by sleeve (possibly over several hops).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from weft.errors import ConfigError
from weft.gossip.peer import PeerName

__all__ = [
    "ZERO_MAC",
    "FastPeer",
    "FdbDiff",
    "FdbEntry",
    "FdbPlanner",
    "diff_fdb",
    "mac_of_peer",
    "normalize_mac",
]

ZERO_MAC = "00:00:00:00:00:00"


def normalize_mac(text: str) -> str:
    """``AA-bb:CC...`` -> ``aa:bb:cc:dd:ee:ff``; ConfigError when it is not a MAC."""
    raw = text.strip().lower().replace("-", ":")
    parts = raw.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ConfigError(f"invalid MAC address {text!r}")
    try:
        int("".join(parts), 16)
    except ValueError:
        raise ConfigError(f"invalid MAC address {text!r}") from None
    return raw


def mac_of_peer(name: PeerName) -> str:
    """The MAC a peer's fast-path heartbeats are addressed to (its name, same spelling)."""
    return str(name)


def _is_multicast(mac: str) -> bool:
    return bool(int(mac[:2], 16) & 1)


@dataclass(frozen=True, order=True)
class FdbEntry:
    """One forwarding entry of the vxlan device: frames to ``mac`` go to ``dst`` (underlay IP)."""

    mac: str
    dst: str

    @property
    def is_flood(self) -> bool:
        return self.mac == ZERO_MAC


@dataclass(frozen=True)
class FastPeer:
    """A peer we have a direct connection to whose VXLAN path is started.

    ``carrying`` is True when the overlay switch chose VXLAN for this connection (its heartbeats
    are answered); only then does it get flood and MAC entries.
    """

    ip: str
    carrying: bool


@dataclass(frozen=True)
class FdbDiff:
    """What to change in the kernel: ``remove`` first, then ``add``."""

    add: tuple[FdbEntry, ...]
    remove: tuple[FdbEntry, ...]

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove


def diff_fdb(current: Iterable[FdbEntry], desired: Iterable[FdbEntry]) -> FdbDiff:
    """Entries to add and remove to turn ``current`` into ``desired`` (sorted, deterministic)."""
    cur = set(current)
    want = set(desired)
    return FdbDiff(add=tuple(sorted(want - cur)), remove=tuple(sorted(cur - want)))


class FdbPlanner:
    """Computes the complete desired FDB of the local vxlan device from the router's state."""

    def __init__(self, local_name: PeerName) -> None:
        self.local_name = local_name

    def desired(
        self,
        fast_peers: Mapping[PeerName, FastPeer],
        mac_locations: Mapping[str, PeerName],
    ) -> frozenset[FdbEntry]:
        """``fast_peers``: direct connections with a started VXLAN path, by remote peer name.
        ``mac_locations``: container MAC -> the peer it lives at (as learned by the router).
        Invalid IPs raise ConfigError; malformed or multicast MACs and MACs at ourselves or at
        peers without a carrying fast path are skipped.
        """
        entries: set[FdbEntry] = set()
        for name, peer in fast_peers.items():
            if name == self.local_name:
                continue
            ip = _check_ip(peer.ip)
            entries.add(FdbEntry(mac_of_peer(name), ip))
            if peer.carrying:
                entries.add(FdbEntry(ZERO_MAC, ip))
        for raw_mac, where in mac_locations.items():
            try:
                mac = normalize_mac(raw_mac)
            except ConfigError:
                continue
            if mac == ZERO_MAC or _is_multicast(mac) or where == self.local_name:
                continue
            at = fast_peers.get(where)
            if at is None or not at.carrying:
                continue
            entries.add(FdbEntry(mac, _check_ip(at.ip)))
        _check_one_dst_per_mac(entries)
        return frozenset(entries)


def _check_ip(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(f"fast datapath peer address {text!r} is not an IPv4 address") from None


def _check_one_dst_per_mac(entries: set[FdbEntry]) -> None:
    # Only the flood MAC may have several remotes; a unicast MAC at two places would make the
    # kernel keep one arbitrarily. mac_locations maps a MAC to one peer, and peer names map to
    # their own peer, so this holds unless two peers share an IP (a caller bug).
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.is_flood:
            continue
        other = seen.setdefault(entry.mac, entry.dst)
        if other != entry.dst:
            raise ConfigError(f"MAC {entry.mac} would be forwarded to both {other} and {entry.dst}")
