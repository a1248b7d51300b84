"""The fast parts' bridge helpers against a fake netlink (weft.fastdp.part_base; the vxlan
part re-exports some from weft.fastdp.vxlan_part)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from weft.fastdp.errors import DatapathError
from weft.fastdp.heartbeat import HeartbeatState
from weft.fastdp.part_base import point_bridge_macs
from weft.fastdp.vxlan_part import flush_learned, health_text, local_bridge_macs

BRIDGE, TAP, VXLAN, VETH = 1, 2, 3, 4
REACHABLE, NOARP, PERMANENT = 0x02, 0x40, 0x80


@dataclass
class Msg:
    ifindex: int
    state: int
    attrs: dict[str, Any]

    def __getitem__(self, key: str) -> int:
        return {"ifindex": self.ifindex, "state": self.state}[key]

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


@dataclass
class FakeIpr:
    entries: list[Msg]
    deleted: list[tuple[int, str]] = field(default_factory=list)
    replaced: list[tuple[int, str, int, int]] = field(
        default_factory=list
    )  # port, mac, flags, state
    refuse: str = ""  # a MAC the kernel will not take

    def link_lookup(self, ifname: str) -> list[int]:
        return {"weft": [BRIDGE], "weft-tap": [TAP], "vxlan-weft": [VXLAN]}.get(ifname, [])

    def get_links(self, index: int) -> list[Msg]:
        return [Msg(index, 0, {"IFLA_ADDRESS": "02:AA:00:00:00:01"})]

    def fdb(self, command: str, **kwargs: Any) -> list[Msg]:
        if command == "dump":
            return list(self.entries)
        assert kwargs["master"] == BRIDGE
        if command == "replace":
            if kwargs["lladdr"] == self.refuse:
                raise OSError("refused")
            self.replaced.append(
                (kwargs["ifindex"], kwargs["lladdr"], kwargs["flags"], kwargs["state"])
            )
            return []
        assert command == "del"
        self.deleted.append((kwargs["ifindex"], kwargs["lladdr"]))
        return []


def entry(ifindex: int, mac: str, state: int = REACHABLE, master: int | None = BRIDGE) -> Msg:
    return Msg(ifindex, state, {"NDA_LLADDR": mac, "NDA_MASTER": master})


ENTRIES = [
    entry(VETH, "02:42:0a:00:00:02"),  # a container: ours to announce
    entry(VETH, "aa:bb:cc:00:00:01", PERMANENT),  # the veth's own address
    entry(VETH, "33:33:00:00:00:01", PERMANENT, None),  # a multicast entry of the device
    entry(VETH, "01:00:5e:00:00:01"),  # multicast, never announced
    entry(TAP, "02:42:0a:00:01:02"),  # learned from the sleeve: another peer's
    entry(VXLAN, "02:42:0a:00:02:02"),  # learned from the tunnel: another peer's
    entry(VXLAN, "02:42:0a:00:03:02", NOARP),  # our static entry for a carried peer
]


def test_local_macs_are_containers_and_the_bridge_itself() -> None:
    ipr = FakeIpr(ENTRIES)
    macs = local_bridge_macs(ipr, "weft", {"weft-tap", "vxlan-weft"})
    assert macs == {"02:42:0a:00:00:02", "02:aa:00:00:00:01"}
    assert local_bridge_macs(FakeIpr([]), "nobridge", set()) == set()


def test_flush_forgets_only_what_was_learned_on_the_given_ports() -> None:
    ipr = FakeIpr(ENTRIES)
    assert flush_learned(ipr, "weft", ["weft-tap", "vxlan-weft"]) == 2
    assert ipr.deleted == [(TAP, "02:42:0a:00:01:02"), (VXLAN, "02:42:0a:00:02:02")]


def testhealth_text_names_the_likely_causes_once() -> None:
    unanswered = "heartbeats through the tunnel unanswered for 2s"
    assert health_text(HeartbeatState.UNHEALTHY, unanswered) == (
        f"{unanswered} (UDP 6784 blocked or path MTU too small?)"
    )
    pending = "no full-size (1450 byte) heartbeat ... (UDP 6784 blocked or path MTU too small?)"
    assert health_text(HeartbeatState.UNHEALTHY, pending) == pending
    assert health_text(HeartbeatState.HEALTHY, "") == ""


def test_point_bridge_macs_keeps_exactly_the_desired_static_entries() -> None:
    ipr, installed = FakeIpr([]), set[str]()
    a, b, c = "02:42:0a:00:02:02", "02:42:0a:00:03:02", "02:42:0a:00:04:02"
    assert point_bridge_macs(ipr, "weft", "vxlan-weft", installed, frozenset({b, a}))
    assert ipr.replaced == [(VXLAN, a, 0x04 | 0x40, NOARP), (VXLAN, b, 0x04 | 0x40, NOARP)]
    assert installed == {a, b}
    ipr.replaced.clear()
    assert point_bridge_macs(ipr, "weft", "vxlan-weft", installed, frozenset({b, c}))
    assert ipr.deleted == [(VXLAN, a)] and ipr.replaced == [(VXLAN, c, 0x44, NOARP)]
    assert installed == {b, c}
    # no port (e.g. the device is gone): nothing done, and the caller hears so
    assert not point_bridge_macs(ipr, "weft", "weft-veth", installed, frozenset())
    assert installed == {b, c}
    ipr.refuse = a
    with pytest.raises(DatapathError, match="point bridge entry 02:42:0a:00:02:02 at vxlan-weft"):
        point_bridge_macs(ipr, "weft", "vxlan-weft", installed, frozenset({a, b, c}))
    assert installed == {b, c}
