"""Peer identity: 48-bit names shown like MAC addresses, per-start UIDs, short ids."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from weft.errors import ConfigError

__all__ = ["SHORT_ID_BITS", "PeerIdentity", "PeerName", "random_peer_name", "random_uid"]

SHORT_ID_BITS = 12  # fits the fast datapath's VXLAN VNI (src | dst << 12), as in Weave
_NAME_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class PeerName(int):
    """A 48-bit peer name, stable across restarts; shown as ``aa:bb:cc:dd:ee:ff``."""

    def __new__(cls, value: int) -> PeerName:
        if not 0 <= value < 1 << 48:
            raise ConfigError(f"peer name {value:#x} does not fit in 48 bits")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> PeerName:
        """Parse ``aa:bb:cc:dd:ee:ff`` (case-insensitive)."""
        normal = text.strip().lower()
        if not _NAME_RE.match(normal):
            raise ConfigError(
                f"invalid peer name {text!r}: expected six hex pairs like 6e:1f:aa:00:12:ff"
            )
        return cls(int(normal.replace(":", ""), 16))

    def __str__(self) -> str:
        raw = f"{int(self):012x}"
        return ":".join(raw[i : i + 2] for i in range(0, 12, 2))

    def __repr__(self) -> str:
        return f"PeerName({self})"


def random_peer_name(rng: random.Random) -> PeerName:
    """A fresh random name with the locally-administered bit set and multicast bit clear."""
    value = rng.getrandbits(48)
    value |= 0x02 << 40
    value &= ~(0x01 << 40)
    return PeerName(value)


def random_uid(rng: random.Random) -> int:
    """A fresh non-zero 64-bit incarnation id, new on every start."""
    return rng.getrandbits(64) or 1


@dataclass(frozen=True)
class PeerIdentity:
    """Who a peer is in one incarnation."""

    name: PeerName
    nickname: str
    uid: int
    short_id: int
