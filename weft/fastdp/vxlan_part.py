"""The Linux VXLAN fast datapath as a part of the overlay switch (weft.switch.pump).

One :class:`VxlanPart` per router: the ``vxlan-weft`` device on the ``weft`` bridge
(weft.fastdp.vxlan.VxlanDatapath), the heartbeat packet socket, and one
:class:`~weft.fastdp.link.FastPathLink` per connection whose peer also runs vxlan. The switch
tells it which connections vxlan *carries*; only those get flood and MAC entries in the vxlan
FDB (weft.fastdp.fdb), so the kernel sends a peer's frames into the tunnel exactly while the
switch says so.

How frames choose between the tunnel and the sleeve on one host. The bridge ``weft`` has the
containers' veths, the sleeve's TAP and the vxlan device. Both the TAP and the vxlan device are
bridge ports with ``isolated on``: isolated ports only talk to non-isolated ones, so a frame never
crosses from the tunnel to the sleeve or back (no loops, no broadcast storms between the two
datapaths), while containers reach both. The bridge learns a remote container's MAC on the port
its frames arrive from: the vxlan port for peers whose connection vxlan carries (they send by
vxlan too: the switch makes both ends agree), the TAP otherwise. When a connection changes
datapath, what the bridge learned on the TAP and vxlan ports is flushed, so the next frame goes
by the new path at once instead of after the bridge's ageing time; and the MACs a carried peer
announced (below) get static, sticky bridge entries pointing at the vxlan port, so frames to them
go into the tunnel whatever the bridge learned, and only while vxlan carries that peer (a silent
receiver cannot leave them on the sleeve). Broadcast and unknown unicast
from a container go to both ports: the vxlan device replicates to the carrying peers (its
all-zero FDB entries), the sleeve to the others (the switch hides carrying peers from the
sleeve's own broadcast routes; see switch.py).

Which MACs live where: each router announces the MACs it has on its bridge (learned on the
containers' ports, plus the bridge's own) to its peers over the control connection (switch
message, see switch_core.py); they become ``MAC -> peer IP`` entries while vxlan carries that
peer, so known unicast goes to one peer instead of every carrying one.

Every netlink call runs on one worker thread, in order (pyroute2's synchronous API refuses to
run on a thread with a running event loop); the loop only sends and receives heartbeat frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from weft.errors import WeftError
from weft.fastdp.esp import ESP_OVERHEAD
from weft.fastdp.esp_links import EspLinks
from weft.fastdp.heartbeat import HeartbeatConfig, decode_probe, encode_probe
from weft.fastdp.link import FastPathLink
from weft.fastdp.netdev_stats import device_traffic
from weft.fastdp.part_base import (
    FastPartBase,
    LinkHandle,
    flush_learned,
    health_text,
    local_bridge_macs,
    point_bridge_macs,
    source_address,
)
from weft.fastdp.vxlan import HeartbeatSocket, VxlanConfig, VxlanDatapath
from weft.gossip.peer import PeerName
from weft.overlay import PART_VXLAN

# flush_learned, health_text and local_bridge_macs live in weft.fastdp.part_base (both parts
# use them); they stay importable from here.
__all__ = ["VxlanLinkHandle", "VxlanPart", "flush_learned", "health_text", "local_bridge_macs"]

log = logging.getLogger("weft.fastdp")

MAC_POLL_INTERVAL = 2.0  # seconds between looks at the bridge's learned MACs
FEATURE_VXLAN = "fastdp_vxlan"
FEATURE_VXLAN_PORT = "fastdp_vxlan_port"
FEATURE_VNI = "fastdp_vni"


@dataclass
class VxlanLinkHandle(LinkHandle):
    """One connection's vxlan path, as the switch holds it."""


class VxlanPart(FastPartBase[VxlanLinkHandle]):
    """The vxlan datapath of one router (create inside the running loop); a
    :class:`weft.fastdp.part.FastPart`."""

    name = "vxlan"
    part_id = PART_VXLAN
    handle_type = VxlanLinkHandle
    feature_keys = (FEATURE_VXLAN, FEATURE_VXLAN_PORT, FEATURE_VNI)
    datapath_label = "vxlan"

    def __init__(
        self,
        *,
        bridge: str,
        tap: str | None,
        heartbeat: HeartbeatConfig | None = None,
        device: VxlanConfig | None = None,
        on_local_macs: Callable[[frozenset[str]], None] = lambda macs: None,
        esp: EspLinks | None = None,
    ) -> None:
        super().__init__(
            bridge=bridge, tap=tap, heartbeat=heartbeat, on_local_macs=on_local_macs, esp=esp
        )
        self.device_config = device or VxlanConfig(bridge=bridge)
        # With ESP the overlay MTU leaves room for ESP, and a peer's FDB entries exist only
        # while its SAs and policies do.
        if esp is not None:
            self.device_config = replace(self.device_config, extra_overhead=ESP_OVERHEAD)
        self.flushes = 0
        self.fdb_error = ""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weft-vxlan")
        self._ipr: Any = None
        self._dp: VxlanDatapath | None = None
        self._sock: HeartbeatSocket | None = None
        self._mac_timer: asyncio.TimerHandle | None = None
        self._bridge_installed: set[str] = set()  # worker thread only
        self.bridge_entries = 0
        if esp is not None:
            esp.bind(self.loop, self._pool.submit)

    # -- what we offer ---------------------------------------------------------------------------

    def _port_vni(self) -> tuple[int, int]:
        return self.device_config.port, self.device_config.vni

    # -- lifecycle (the device starts with the first connection: it needs our peer name) --------

    def ensure_started(self, local_name: PeerName, remote_ip: str) -> bool:
        """Start the device once (blocks the loop for a few netlink round trips, once); False
        when it cannot run here, with the reason in ``problem``. Tunnel packets leave from the
        address we reach the first peer from (unless the config names one), and the underlay
        MTU is that interface's."""
        if self.local_name is not None:
            return not self.problem
        self.local_name = local_name
        if self.device_config.local_ip is None:
            local_ip = source_address(remote_ip)
            if local_ip is not None:
                self.device_config = replace(self.device_config, local_ip=local_ip)
        if self.esp is not None and self.device_config.local_ip is None:
            self.problem = f"vxlan: ESP needs our underlay address, and no route to {remote_ip}"
            return False
        try:
            self.mtu = self._pool.submit(self._start, local_name).result(timeout=30)
        except Exception as err:
            self.problem = f"vxlan: {err}"
            log.warning("vxlan datapath unavailable: %s", err)
            return False
        assert self._sock is not None
        self.loop.add_reader(self._sock.fileno(), self._on_probes)
        log.info("vxlan datapath on %s, MTU %s", self.device_config.name, self.mtu)
        self._mac_timer = self.loop.call_later(0.1, self._poll_macs)
        return True

    def _start(self, local_name: PeerName) -> int:
        from pyroute2 import IPRoute

        if self.esp is not None:  # stale SAs gone and the inbound guard up before the device
            self.esp.start()
        self._ipr = IPRoute()
        dp = VxlanDatapath(self._ipr, self.device_config, local_name)
        mtu = dp.start()
        self._dp = dp
        index = self._ipr.link_lookup(ifname=self.device_config.name)[0]
        ports = [index]
        if self.tap is not None:
            ports += self._ipr.link_lookup(ifname=self.tap)
        for port in ports:  # see the module docstring: no frame crosses tunnel <-> sleeve
            self._ipr.brport("set", index=int(port), isolated=1)
        self._sock = HeartbeatSocket(self.device_config.name)
        return mtu

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._timer, self._mac_timer):
            if timer is not None:
                timer.cancel()
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.links.clear()

        def stop() -> None:
            try:
                if self._dp is not None:
                    self._dp.stop()  # the device (and its FDB) first, then what encrypted it
            finally:
                if self.esp is not None:
                    self.esp.stop()
                if self._ipr is not None:
                    self._ipr.close()

        try:
            self._pool.submit(stop).result(timeout=30)
        except Exception:
            log.exception("stopping the vxlan datapath failed")
        self._pool.shutdown(wait=False)

    # -- per connection (FastPartBase drives the links; the device's FDB follows) -------------

    def _tunnel_source(self) -> str | None:
        return self.device_config.local_ip

    def _link_added(self, handle: VxlanLinkHandle) -> None:
        if self.esp is None:  # with ESP the FDB entry comes once ESP is installed (_publish)
            self._submit(self._dp_call, "peer_started", handle.remote, handle.ip)

    def _link_removed(self, handle: VxlanLinkHandle) -> None:
        self._submit(self._dp_call, "peer_stopped", handle.remote)

    def _carrying_changed(self, handle: VxlanLinkHandle) -> None:
        self._submit(self._dp_call, "peer_carrying", handle.remote, handle.carrying)

    def _macs_changed(self, locations: dict[str, PeerName]) -> None:
        self._submit(self._dp_call, "macs_changed", locations)

    def _point_macs(self, desired: frozenset[str]) -> None:
        self._submit(self._apply_bridge, desired)

    def status(self) -> dict[str, Any]:
        return {
            "device": self.device_config.name,
            "encrypted": self.encrypted,
            "esp": self.esp.status() if self.esp is not None else None,
            "port": self.device_config.port,
            "vni": self.device_config.vni,
            "mtu": self.mtu,
            "problem": self.problem,
            "fdb_error": self.fdb_error,
            "local_macs": len(self.local_macs),
            "flushes": self.flushes,
            "bridge_entries": self.bridge_entries,
            "links": self.links_status(),
            "traffic": device_traffic(self.device_config.name),
        }

    # -- worker-thread jobs ---------------------------------------------------------------------

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._closed or self._dp is None:
            return
        future: Future[Any] = self._pool.submit(fn, *args)
        future.add_done_callback(self._job_done)

    def _job_done(self, future: Future[Any]) -> None:
        err = future.exception()
        text = str(err) if err is not None else ""
        if err is not None and not isinstance(err, WeftError):
            log.error("vxlan datapath job failed: %r", err)

        def record() -> None:
            self.fdb_error = text

        if not self._closed:
            self.loop.call_soon_threadsafe(record)

    def _dp_call(self, method: str, *args: Any) -> None:
        assert self._dp is not None
        getattr(self._dp, method)(*args)

    def _flush(self) -> None:
        self._submit(self._flush_learned)

    def _flush_learned(self) -> None:
        ports = [self.device_config.name] + ([self.tap] if self.tap else [])
        self.flushes += flush_learned(self._ipr, self.bridge, ports)

    def _apply_bridge(self, desired: frozenset[str]) -> None:
        installed = self._bridge_installed
        if point_bridge_macs(self._ipr, self.bridge, self.device_config.name, installed, desired):
            self.bridge_entries = len(installed)

    def _poll_macs(self) -> None:
        self._mac_timer = None
        if self._closed:
            return
        exclude = {self.device_config.name} | ({self.tap} if self.tap else set())
        future = self._pool.submit(local_bridge_macs, self._ipr, self.bridge, exclude)

        def done(fut: Future[set[str]]) -> None:
            macs = frozenset(fut.result()) if fut.exception() is None else self.local_macs
            self.loop.call_soon_threadsafe(self._macs_polled, macs)

        future.add_done_callback(done)

    def _macs_polled(self, macs: frozenset[str]) -> None:
        if self._closed:
            return
        self._local_macs_found(macs)
        self._mac_timer = self.loop.call_later(MAC_POLL_INTERVAL, self._poll_macs)

    # -- heartbeats on the loop -----------------------------------------------------------------

    def _on_probes(self) -> None:
        sock = self._sock
        if sock is None or self.local_name is None:
            return
        for frame in sock.receive():
            probe = decode_probe(frame, self.local_name)
            if probe is None:
                continue
            handle = self.links.get(probe.src)
            if handle is not None:
                handle.link.probe_received(probe)
                self._process(handle)

    def _send_probes(self, link: FastPathLink, probes: list[tuple[int, int]]) -> None:
        sock = self._sock
        for seq, size in probes:
            if sock is not None:
                sock.send(encode_probe(link.local, link.remote, seq, size))

    # -- ESP (see weft.fastdp.esp_links) --------------------------------------------------------

    def _publish(self, handle: VxlanLinkHandle) -> None:
        """Worker, right after the peer's SAs and policies are installed: its FDB entries."""
        dp = self._dp
        if dp is None or handle.stopped:
            return
        dp.peer_started(handle.remote, handle.ip)
        if handle.carrying:
            dp.peer_carrying(handle.remote, True)

    def _withdraw(self, remote: PeerName) -> Callable[[], None]:
        """Worker, before the peer's ESP goes or is replaced: no FDB entry towards it."""

        def withdraw() -> None:
            if self._dp is not None:
                self._dp.peer_stopped(remote)

        return withdraw
