"""The host side of the OVS datapath as the overlay switch uses it (Weave's "bridged fastdp").

Owns: the datapath ``weft-dp``, its vxlan vport (UDP 6784), the veth pair into the Linux bridge
(``vethwe-b`` in the bridge, ``vethwe-dp`` as a netdev vport), the :class:`OvsClient` and the
:class:`OvsFlowPlanner`. The router adds ``fileno()`` to its loop and calls
:meth:`OvsDatapath.handle_upcalls` when readable; heartbeat probes that arrived come back from
it for the router to acknowledge over the control connection.

Every kernel call blocks for one netlink round trip; call from the router's loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from weft.errors import ConfigError
from weft.fastdp.errors import DatapathError, wrap_os_error
from weft.fastdp.heartbeat import Probe, decode_probe
from weft.fastdp.ovs import (
    DatapathInfo,
    OutputAction,
    OvsClient,
    SetTunnelAction,
    TunnelKey,
    VportType,
    pair_vni,
)
from weft.fastdp.ovs_flows import TUNNEL_TTL, OvsFlowPlanner, OvsPeer, OvsPorts
from weft.fastdp.vxlan import VXLAN_OVERHEAD_IPV4, VXLAN_PORT, overlay_mtu
from weft.gossip.peer import PeerName

__all__ = ["OvsConfig", "OvsDatapath"]


@dataclass(frozen=True)
class OvsConfig:
    datapath: str = "weft-dp"  # a datapath by this name at start is stale and removed
    bridge: str = "weft"  # the Linux bridge containers are on (must exist)
    bridge_veth: str = "vethwe-b"  # veth end in the bridge
    datapath_veth: str = "vethwe-dp"  # veth end in the datapath (netdev vport)
    vxlan_vport: str = "vxlan-6784"
    port: int = VXLAN_PORT
    underlay_mtu: int = 1500
    # Subtracted from the overlay MTU as well, e.g. esp.ESP_OVERHEAD when encrypting.
    extra_overhead: int = 0

    def __post_init__(self) -> None:
        for name in (self.datapath, self.bridge_veth, self.datapath_veth, self.vxlan_vport):
            if not 0 < len(name) < 16:
                raise ConfigError(f"interface name {name!r} must be 1..15 characters")
        overlay_mtu(self.underlay_mtu, VXLAN_OVERHEAD_IPV4 + self.extra_overhead)


class OvsDatapath:
    """``start`` -> ``set_peers`` whenever connections or their health change ->
    ``handle_upcalls`` when the upcall socket is readable -> ``send_probe`` for heartbeats ->
    ``stop``."""

    def __init__(
        self,
        ipr: Any,
        config: OvsConfig,
        local_name: PeerName,
        local_short_id: int,
        local_ip: str,
        client: OvsClient | None = None,
    ) -> None:
        self.ipr = ipr
        self.config = config
        self.local_name = local_name
        self.local_short_id = local_short_id
        self.local_ip = local_ip
        self.client = client or OvsClient()
        self.dp: DatapathInfo | None = None
        self.planner: OvsFlowPlanner | None = None
        self.mtu = overlay_mtu(config.underlay_mtu, VXLAN_OVERHEAD_IPV4 + config.extra_overhead)
        self.counters = {"upcalls": 0, "flows_installed": 0, "probes_received": 0, "errors": 0}
        self.last_error = ""
        # What start() found left by a crashed router and deleted (datapath, veth).
        self.stale_removed: list[str] = []

    def fileno(self) -> int:
        return self.client.fileno()

    def _link(self, op: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.ipr.link(*args, **kwargs)
        except Exception as err:
            raise wrap_os_error(op, err) from err

    def start(self) -> int:
        """Remove stale state, build datapath, vports and veth pair; returns the overlay MTU."""
        cfg = self.config
        self.stale_removed = []
        if self.client.remove_stale(cfg.datapath):
            self.stale_removed.append(cfg.datapath)
        for stale in self.ipr.link_lookup(ifname=cfg.bridge_veth):
            self._link(f"delete stale {cfg.bridge_veth}", "del", index=stale)
            self.stale_removed.append(cfg.bridge_veth)
        bridge = self.ipr.link_lookup(ifname=cfg.bridge)
        if not bridge:
            raise DatapathError(
                f"create OVS datapath {cfg.datapath}", f"bridge {cfg.bridge} missing"
            )
        self.dp = self.client.create_datapath(cfg.datapath)
        try:
            self._link(
                f"create veth {cfg.bridge_veth}/{cfg.datapath_veth}",
                "add",
                ifname=cfg.bridge_veth,
                kind="veth",
                peer={"ifname": cfg.datapath_veth},
            )
            (b_index,) = self.ipr.link_lookup(ifname=cfg.bridge_veth)
            (d_index,) = self.ipr.link_lookup(ifname=cfg.datapath_veth)
            self._link(
                f"attach {cfg.bridge_veth} to {cfg.bridge}",
                "set",
                index=b_index,
                master=bridge[0],
                mtu=self.mtu,
                state="up",
            )
            self._link(
                f"bring up {cfg.datapath_veth}", "set", index=d_index, mtu=self.mtu, state="up"
            )
            vx = self.client.create_vport(self.dp, VportType.VXLAN, cfg.vxlan_vport, cfg.port)
            br = self.client.create_vport(self.dp, VportType.NETDEV, cfg.datapath_veth)
        except BaseException:
            self.stop()
            raise
        self.planner = OvsFlowPlanner(
            self.local_name, self.local_short_id, self.local_ip, OvsPorts(br.port_no, vx.port_no)
        )
        return self.mtu

    def stop(self) -> None:
        """Delete the datapath (its vports and flows go with it) and the veth pair."""
        self.client.delete_datapath(self.config.datapath)
        for index in self.ipr.link_lookup(ifname=self.config.bridge_veth):
            with contextlib.suppress(Exception):  # already gone with its peer
                self.ipr.link("del", index=index)
        self.dp = None
        self.planner = None

    def _require(self) -> tuple[DatapathInfo, OvsFlowPlanner]:
        if self.dp is None or self.planner is None:
            raise DatapathError("use OVS datapath", "not started")
        return self.dp, self.planner

    def set_peers(self, peers: dict[PeerName, OvsPeer]) -> None:
        """Peers with an OVS path and whether each carries traffic; flushes flows on change."""
        dp, planner = self._require()
        if planner.set_peers(peers):
            self.client.flush_flows(dp)
            planner.flushed()

    def macs_changed(self, locations: dict[str, PeerName]) -> int:
        """MACs the peers announced (MAC -> peer, complete); deletes the flows towards MACs
        that moved and returns how many."""
        dp, planner = self._require()
        stale = planner.locate(locations)
        for key in stale:
            self.client.delete_flow(dp, key)
        return len(stale)

    def handle_upcalls(self, limit: int = 256) -> list[Probe]:
        """Decide and install flows for pending misses; return heartbeat probes that arrived.

        A kernel error on one packet is counted and kept in ``last_error``; the rest go on.
        """
        dp, planner = self._require()
        probes = []
        for up in self.client.receive_upcalls(limit):
            self.counters["upcalls"] += 1
            decision = planner.miss(up.key)
            if decision.kind == "heartbeat":
                probe = decode_probe(up.packet, self.local_name)
                if probe is not None:
                    self.counters["probes_received"] += 1
                    probes.append(probe)
                continue
            try:
                for key in decision.invalidate:
                    self.client.delete_flow(dp, key)
                self.client.install_flow(dp, decision.key, list(decision.actions), decision.mask)
                self.counters["flows_installed"] += 1
                if decision.kind == "forward" and up.key.in_port is not None:
                    self.client.execute(dp, up.packet, list(decision.actions), up.key.in_port)
            except DatapathError as err:
                self.counters["errors"] += 1
                self.last_error = str(err)
        return probes

    def send_probe(self, peer: PeerName, frame: bytes) -> bool:
        """Send a heartbeat probe frame through the tunnel to one peer (DF set); False when
        the peer is unknown or the kernel refused."""
        dp, planner = self._require()
        info = planner.peers.get(peer)
        if info is None:
            return False
        vni = info.vni if info.vni is not None else pair_vni(self.local_short_id, info.short_id)
        tunnel = TunnelKey(
            tun_id=vni,
            ipv4_src=self.local_ip,
            ipv4_dst=info.ip,
            ttl=TUNNEL_TTL,
            dont_fragment=True,
        )
        try:
            self.client.execute(
                dp, frame, [SetTunnelAction(tunnel), OutputAction(planner.ports.vxlan)]
            )
        except DatapathError as err:
            self.last_error = str(err)
            return False
        return True

    def expire_idle(self, now_ms: int, idle_ms: int = 60_000) -> int:
        """Delete flows unused for ``idle_ms`` (``now_ms`` from ``time.monotonic()``)."""
        dp, planner = self._require()
        idle = planner.idle_flows(self.client.dump_flows(dp), now_ms, idle_ms)
        for key in idle:
            self.client.delete_flow(dp, key)
        planner.forget(idle)
        return len(idle)

    def status(self) -> dict[str, Any]:
        flows = None
        if self.dp is not None:
            found = self.client.find_datapath(self.config.datapath)
            flows = found.flows if found else None
        return {
            "datapath": self.config.datapath,
            "mtu": self.mtu,
            "port": self.config.port,
            "flows": flows,
            "macs": len(self.planner.macs) if self.planner else 0,
            **self.counters,
            "last_error": self.last_error,
            "stale_removed": list(self.stale_removed),
        }
