"""What to do with a packet the OVS datapath missed (a pure core: no I/O, no clock).

Topology on each host (Weave's "bridged fastdp"): the OVS datapath has a ``bridge`` port (a
netdev vport on a veth whose other end is in the Linux bridge ``weft``, where containers are)
and a ``vxlan`` port (UDP 6784). The kernel sends every frame without a matching flow up as a
miss upcall; the router asks :meth:`OvsFlowPlanner.miss` and gets a :class:`FlowDecision`:
install ``key/mask -> actions`` and execute the missed packet with the same actions.

Rules:

* From the bridge port: learn ``eth_src`` as local. A unicast destination located at a peer
  whose OVS path carries traffic is tunnelled to that peer (``set(tunnel) + output(vxlan)``);
  broadcast, multicast and unknown unicast go to every carrying peer (head-end replication,
  one set+output pair each); a destination that is local, or at a peer without a carrying OVS
  path, is dropped here (the Linux bridge or sleeve delivers it).
* From the vxlan port: the VNI is Weave's ``src_short_id | dst_short_id << 12``; the sender is
  the carrying peer with that short id *and* the tunnel's source IP (anything else is dropped).
  A peer running the Linux VXLAN datapath instead uses one fixed VNI both ways
  (``OvsPeer.vni``, the network VNI 0xFFFFFF), recognised by VNI and source IP.
  Learn ``eth_src`` at that peer; output to the bridge port.
* Fast-path heartbeat probes (ethertype 0x88B5 addressed to our peer name) never get a flow:
  the decision says ``heartbeat`` and the router acknowledges them over the control connection.

Flows are keyed on in-port + Ethernet source and destination (+ tunnel id/addresses on the
vxlan side), so a new source MAC always misses once and is learned. When a MAC's location
changes only the flows towards it are invalidated; when the set of carrying peers changes every
flow is flushed (rare, unlike Weave's flush on every route change).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from weft.errors import ConfigError
from weft.fastdp.heartbeat import ETHERTYPE_WEFT
from weft.fastdp.ovs import (
    Action,
    FlowInfo,
    FlowKey,
    OutputAction,
    SetTunnelAction,
    TunnelKey,
    exact_mask,
    pair_vni,
)
from weft.gossip.peer import PeerName

__all__ = ["FlowDecision", "OvsFlowPlanner", "OvsPeer", "OvsPorts"]

TUNNEL_TTL = 64


@dataclass(frozen=True)
class OvsPorts:
    bridge: int  # datapath port number of the netdev vport into the Linux bridge
    vxlan: int  # datapath port number of the vxlan vport


@dataclass(frozen=True)
class OvsPeer:
    ip: str
    short_id: int
    carrying: bool  # the overlay switch chose a kernel path for this connection
    # None: Weave's pairwise VNIs (the peer runs OVS). A number: that fixed VNI both ways, for
    # a peer running the Linux VXLAN datapath (vxlan.NETWORK_VNI).
    vni: int | None = None

    def tun_id_ok(self, tun_id: int) -> bool:
        return tun_id == self.vni


@dataclass(frozen=True)
class FlowDecision:
    """``kind``: "forward" (install + execute), "drop" (install an empty-action flow so the
    kernel stops asking, and do not execute) or "heartbeat" (no flow; hand to the router)."""

    kind: str
    key: FlowKey
    mask: FlowKey
    actions: tuple[Action, ...] = ()
    reason: str = ""
    # Flows made stale by what this miss taught us (a MAC moved): delete them.
    invalidate: tuple[FlowKey, ...] = ()


def _is_group(mac: str) -> bool:
    return bool(int(mac[:2], 16) & 1)


@dataclass
class OvsFlowPlanner:
    local_name: PeerName
    local_short_id: int
    local_ip: str
    ports: OvsPorts
    peers: dict[PeerName, OvsPeer] = field(default_factory=dict)
    # MAC -> where it lives (our own name for local containers).
    macs: dict[str, PeerName] = field(default_factory=dict)
    # Keys of flows we installed, by destination MAC, for targeted invalidation.
    _by_dst: dict[str, set[FlowKey]] = field(default_factory=dict)
    # The last announcement given to :meth:`locate`.
    _announced: dict[str, PeerName] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.local_short_id < 4096:
            raise ConfigError("short id must fit in 12 bits")

    # -- inputs ---------------------------------------------------------------------------------

    def set_peers(self, peers: Mapping[PeerName, OvsPeer]) -> bool:
        """Adopt the peers with an OVS path; True when every flow must be flushed."""
        new = dict(peers)
        flush = new != self.peers
        self.peers = new
        if flush:
            self._by_dst.clear()
            # MACs at peers that are gone or stopped carrying would route nowhere.
            self.macs = {
                mac: where
                for mac, where in self.macs.items()
                if where == self.local_name or (where in new and new[where].carrying)
            }
            for mac, where in self._announced.items():  # back with a peer that carries again
                if where in new and new[where].carrying:
                    self.macs.setdefault(mac, where)
        return flush

    def locate(self, locations: Mapping[str, PeerName]) -> tuple[FlowKey, ...]:
        """MACs the peers announced (MAC -> peer; the complete set each time). Each replaces
        what was announced or learned for that MAC; MACs no longer announced are forgotten if
        they were still where the announcement put them. Returns the flows to delete (those
        towards MACs whose location changed). Learning from misses goes on alongside."""
        stale: set[FlowKey] = set()
        for mac, where in self._announced.items():
            if mac not in locations and self.macs.get(mac) == where:
                del self.macs[mac]
                stale |= self._by_dst.pop(mac, set())
        for mac, where in locations.items():
            stale.update(self._learn(mac, where))
        self._announced = dict(locations)
        return tuple(sorted(stale, key=repr))

    # -- the miss -------------------------------------------------------------------------------

    def miss(self, key: FlowKey) -> FlowDecision:
        """Decide for a missed packet's key (as decoded from the upcall)."""
        src, dst = key.eth_src, key.eth_dst
        if src is None or dst is None or key.in_port is None:
            return self._drop(key, "not an Ethernet frame with an input port")
        if key.ethertype == ETHERTYPE_WEFT and dst == str(self.local_name):
            return FlowDecision("heartbeat", key, exact_mask(key), reason="fast-path probe")
        if key.in_port == self.ports.bridge:
            return self._from_bridge(key, src, dst)
        if key.in_port == self.ports.vxlan:
            return self._from_tunnel(key, src, dst)
        return self._drop(key, f"unexpected input port {key.in_port}")

    def _from_bridge(self, key: FlowKey, src: str, dst: str) -> FlowDecision:
        invalidate = self._learn(src, self.local_name)
        match = FlowKey(in_port=key.in_port, eth_src=src, eth_dst=dst)
        carrying = sorted(
            (name, p) for name, p in self.peers.items() if p.carrying and name != self.local_name
        )
        where = None if _is_group(dst) else self.macs.get(dst)
        if where is None:
            actions: list[Action] = []
            for _name, each in carrying:
                actions += self._to_peer(each)
            why = "broadcast" if _is_group(dst) else "unknown destination"
            return self._install(
                match, actions, f"{why}: flood to {len(carrying)} peers", invalidate
            )
        if where == self.local_name:
            return self._drop(match, "destination is local", invalidate)
        peer = self.peers.get(where)
        if peer is None or not peer.carrying:
            return self._drop(match, f"destination at {where} without an OVS path", invalidate)
        return self._install(match, self._to_peer(peer), f"to {where}", invalidate)

    def _from_tunnel(self, key: FlowKey, src: str, dst: str) -> FlowDecision:
        t = key.tunnel
        if t is None or t.tun_id is None or t.ipv4_src is None or t.ipv4_dst is None:
            return self._drop(key, "tunnel packet without tunnel metadata")
        src_sid, dst_sid = t.tun_id & 0xFFF, (t.tun_id >> 12) & 0xFFF
        match = FlowKey(
            in_port=key.in_port,
            eth_src=src,
            eth_dst=dst,
            tunnel=TunnelKey(
                tun_id=t.tun_id, ipv4_src=t.ipv4_src, ipv4_dst=t.ipv4_dst, ttl=t.ttl or TUNNEL_TTL
            ),
        )
        pairwise = not t.tun_id >> 24 and dst_sid == self.local_short_id
        sender = next(
            (
                name
                for name, p in self.peers.items()
                if p.carrying
                and p.ip == t.ipv4_src
                and (
                    p.tun_id_ok(t.tun_id)
                    if p.vni is not None
                    else pairwise and p.short_id == src_sid
                )
            ),
            None,
        )
        if sender is None:
            return self._drop(match, f"VNI {t.tun_id:#x} from {t.ipv4_src} is not a peer's")
        invalidate = self._learn(src, sender)
        return self._install(match, [OutputAction(self.ports.bridge)], f"from {sender}", invalidate)

    # -- helpers ----------------------------------------------------------------------------------

    def _to_peer(self, peer: OvsPeer) -> list[Action]:
        tunnel = TunnelKey(
            tun_id=peer.vni
            if peer.vni is not None
            else pair_vni(self.local_short_id, peer.short_id),
            ipv4_src=self.local_ip,
            ipv4_dst=peer.ip,
            ttl=TUNNEL_TTL,
            dont_fragment=True,  # an oversize frame fails visibly (heartbeats catch it)
        )
        return [SetTunnelAction(tunnel), OutputAction(self.ports.vxlan)]

    def _learn(self, mac: str, where: PeerName) -> tuple[FlowKey, ...]:
        if _is_group(mac) or self.macs.get(mac) == where:
            return ()
        self.macs[mac] = where
        # Flows towards this MAC were decided on its old (or unknown) location; flows that
        # flooded to "unknown" were keyed on the exact destination, so they go too.
        return tuple(sorted(self._by_dst.pop(mac, set()), key=repr))

    def _install(
        self,
        match: FlowKey,
        actions: list[Action],
        reason: str,
        invalidate: tuple[FlowKey, ...] = (),
    ) -> FlowDecision:
        if match.eth_dst is not None:
            self._by_dst.setdefault(match.eth_dst, set()).add(match)
        kind = "forward" if actions else "drop"
        return FlowDecision(kind, match, exact_mask(match), tuple(actions), reason, invalidate)

    def _drop(
        self, match: FlowKey, reason: str, invalidate: tuple[FlowKey, ...] = ()
    ) -> FlowDecision:
        return self._install(match, [], reason, invalidate)

    def flushed(self) -> None:
        """The router flushed the datapath's flows."""
        self._by_dst.clear()

    def forget(self, keys: list[FlowKey]) -> None:
        """The router deleted these flows (e.g. idle ones)."""
        for key in keys:
            if key.eth_dst is not None:
                known = self._by_dst.get(key.eth_dst)
                if known is not None:
                    known.discard(key)
                    if not known:
                        del self._by_dst[key.eth_dst]

    @staticmethod
    def idle_flows(flows: list[FlowInfo], now_ms: int, idle_ms: int) -> list[FlowKey]:
        """Flows not used for ``idle_ms`` (kernel monotonic ms, as ``time.monotonic()``);
        flows never used are left for the next round (their install time is not reported)."""
        return [f.key for f in flows if f.used_ms is not None and now_ms - f.used_ms >= idle_ms]
