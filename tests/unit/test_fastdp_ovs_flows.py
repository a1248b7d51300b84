"""The OVS miss planner: learning, tunnelling, flooding, drops, invalidation (pure)."""

from __future__ import annotations

from weft.fastdp.heartbeat import ETHERTYPE_WEFT
from weft.fastdp.ovs import (
    FlowInfo,
    FlowKey,
    OutputAction,
    SetTunnelAction,
    TunnelKey,
    pair_vni,
)
from weft.fastdp.ovs_flows import OvsFlowPlanner, OvsPeer, OvsPorts
from weft.gossip.peer import PeerName

A = PeerName.parse("02:00:00:00:00:0a")
B = PeerName.parse("02:00:00:00:00:0b")
C = PeerName.parse("02:00:00:00:00:0c")
PORTS = OvsPorts(bridge=2, vxlan=1)
LOCAL_MAC = "aa:00:00:00:00:01"
B_MAC = "be:00:00:00:00:01"  # even first octet: unicast
BCAST = "ff:ff:ff:ff:ff:ff"


def planner() -> OvsFlowPlanner:
    p = OvsFlowPlanner(A, 1, "10.0.0.1", PORTS)
    p.set_peers({B: OvsPeer("10.0.0.2", 2, True), C: OvsPeer("10.0.0.3", 3, True)})
    return p


def from_bridge(src: str, dst: str) -> FlowKey:
    return FlowKey(in_port=PORTS.bridge, eth_src=src, eth_dst=dst, ethertype=0x0800)


def from_b(src: str, dst: str, vni: int | None = None, ip: str = "10.0.0.2") -> FlowKey:
    tunnel = TunnelKey(
        tun_id=pair_vni(2, 1) if vni is None else vni, ipv4_src=ip, ipv4_dst="10.0.0.1", ttl=64
    )
    return FlowKey(in_port=PORTS.vxlan, eth_src=src, eth_dst=dst, ethertype=0x0806, tunnel=tunnel)


def tunnel_to(ip: str, sid: int) -> list[object]:
    return [
        SetTunnelAction(
            TunnelKey(
                tun_id=pair_vni(1, sid),
                ipv4_src="10.0.0.1",
                ipv4_dst=ip,
                ttl=64,
                dont_fragment=True,
            )
        ),
        OutputAction(PORTS.vxlan),
    ]


def test_broadcast_from_bridge_floods_to_every_carrying_peer_and_learns_source() -> None:
    p = planner()
    d = p.miss(from_bridge(LOCAL_MAC, BCAST))
    assert d.kind == "forward"
    assert list(d.actions) == tunnel_to("10.0.0.2", 2) + tunnel_to("10.0.0.3", 3)
    assert d.key == FlowKey(in_port=2, eth_src=LOCAL_MAC, eth_dst=BCAST)  # no ethertype
    assert d.mask.in_port == 0xFFFFFFFF and d.mask.ethertype is None
    assert p.macs[LOCAL_MAC] == A


def test_tunnel_miss_learns_remote_mac_and_invalidates_flood_flows() -> None:
    p = planner()
    flood = p.miss(from_bridge(LOCAL_MAC, B_MAC))  # unknown yet: flooded
    assert flood.reason.startswith("unknown destination")
    d = p.miss(from_b(B_MAC, LOCAL_MAC))
    assert d.kind == "forward" and list(d.actions) == [OutputAction(PORTS.bridge)]
    assert d.key.tunnel == TunnelKey(
        tun_id=pair_vni(2, 1), ipv4_src="10.0.0.2", ipv4_dst="10.0.0.1", ttl=64
    )
    assert d.mask.tunnel is not None and d.mask.tunnel.ttl == 0  # TTL never matched
    assert d.invalidate == (flood.key,)
    assert p.macs[B_MAC] == B
    # Now unicast goes to B only.
    d2 = p.miss(from_bridge(LOCAL_MAC, B_MAC))
    assert list(d2.actions) == tunnel_to("10.0.0.2", 2)


def test_tunnel_packets_from_strangers_are_dropped() -> None:
    p = planner()
    for key in (
        from_b(B_MAC, LOCAL_MAC, vni=pair_vni(9, 1)),  # unknown short id
        from_b(B_MAC, LOCAL_MAC, vni=pair_vni(2, 7)),  # not addressed to us
        from_b(B_MAC, LOCAL_MAC, ip="10.9.9.9"),  # right VNI, wrong source address
    ):
        d = p.miss(key)
        assert d.kind == "drop" and d.actions == ()
    assert B_MAC not in p.macs


def test_not_carrying_peers_get_nothing() -> None:
    p = planner()
    assert p.set_peers({B: OvsPeer("10.0.0.2", 2, False), C: OvsPeer("10.0.0.3", 3, True)})
    d = p.miss(from_bridge(LOCAL_MAC, BCAST))
    assert list(d.actions) == tunnel_to("10.0.0.3", 3)
    assert p.miss(from_b(B_MAC, LOCAL_MAC)).kind == "drop"  # B's tunnel is not in use


def test_local_destination_dropped_and_mac_move_invalidates() -> None:
    p = planner()
    p.miss(from_bridge(LOCAL_MAC, BCAST))
    p.miss(from_b(B_MAC, LOCAL_MAC))
    d = p.miss(from_bridge("aa:00:00:00:00:02", LOCAL_MAC))
    assert d.kind == "drop" and d.reason == "destination is local"
    to_b = p.miss(from_bridge(LOCAL_MAC, B_MAC))
    # B's container moved to C: learning it from C's tunnel invalidates the flow towards it.
    moved = from_b(B_MAC, LOCAL_MAC, vni=pair_vni(3, 1), ip="10.0.0.3")
    d2 = p.miss(moved)
    assert d2.kind == "forward" and to_b.key in d2.invalidate and p.macs[B_MAC] == C


def test_heartbeat_probe_gets_no_flow() -> None:
    p = planner()
    probe = FlowKey(
        in_port=PORTS.vxlan,
        eth_src=str(B),
        eth_dst=str(A),
        ethertype=ETHERTYPE_WEFT,
        tunnel=TunnelKey(tun_id=pair_vni(2, 1), ipv4_src="10.0.0.2", ipv4_dst="10.0.0.1"),
    )
    assert p.miss(probe).kind == "heartbeat"


def test_peer_changes_flush_and_forget_macs_of_gone_peers() -> None:
    p = planner()
    p.miss(from_b(B_MAC, LOCAL_MAC))
    assert not p.set_peers(dict(p.peers))  # same peers: nothing to flush
    assert p.set_peers({C: OvsPeer("10.0.0.3", 3, True)})
    assert B_MAC not in p.macs


def test_odd_keys_and_idle_flows() -> None:
    p = planner()
    assert p.miss(FlowKey(in_port=2)).kind == "drop"
    assert p.miss(FlowKey(in_port=9, eth_src=LOCAL_MAC, eth_dst=BCAST)).kind == "drop"
    k1 = FlowKey(in_port=2, eth_src=LOCAL_MAC, eth_dst=BCAST)
    k2 = FlowKey(in_port=2, eth_src=LOCAL_MAC, eth_dst=B_MAC)
    flows = [
        FlowInfo(k1, None, (), used_ms=1_000),
        FlowInfo(k2, None, (), used_ms=55_000),
        FlowInfo(FlowKey(in_port=1), None, (), used_ms=None),
    ]
    assert OvsFlowPlanner.idle_flows(flows, now_ms=61_000, idle_ms=10_000) == [k1]
    p.forget([k1])


def test_peer_on_the_linux_vxlan_datapath_uses_the_network_vni_both_ways() -> None:
    p = OvsFlowPlanner(A, 1, "10.0.0.1", PORTS)
    p.set_peers({B: OvsPeer("10.0.0.2", 2, True, vni=0xFFFFFF)})
    d = p.miss(from_bridge(LOCAL_MAC, BCAST))
    tunnel = d.actions[0]
    assert isinstance(tunnel, SetTunnelAction) and tunnel.tunnel.tun_id == 0xFFFFFF
    assert p.miss(from_b(B_MAC, LOCAL_MAC, vni=0xFFFFFF)).kind == "forward"
    assert p.macs[B_MAC] == B
    # Pairwise VNIs from that address are not B's; the network VNI from elsewhere neither.
    assert p.miss(from_b("be:00:00:00:00:02", LOCAL_MAC)).kind == "drop"
    assert (
        p.miss(from_b("be:00:00:00:00:03", LOCAL_MAC, vni=0xFFFFFF, ip="10.0.0.9")).kind == "drop"
    )
