"""The Open vSwitch datapath as a fast part of the overlay switch (weft.switch.pump).

One :class:`OvsPart` per router, on kernels with the ``openvswitch`` module: the datapath
``weft-dp`` with a vxlan vport on UDP 6784 and a veth pair into the Linux bridge ``weft``
(weft.fastdp.ovs_datapath.OvsDatapath, Weave's "bridged fastdp"), and one
:class:`~weft.fastdp.link.FastPathLink` per connection whose peer runs OVS too. It follows the
contract in weft.fastdp.part, like the Linux VXLAN part (weft.fastdp.vxlan_part).

What the part does with the kernel:

* Start (with the first connection: it needs our peer name and the underlay address towards the
  first peer): a datapath, veth or vxlan device left by a crashed router is deleted (its flows go
  with it; ``status()["stale_removed"]`` names them), then the datapath is built. The bridge end
  of the veth and the sleeve's TAP are ``isolated`` bridge ports: no frame crosses between the
  tunnel and the sleeve. A kernel without ``openvswitch`` is found once by
  ``weft.fastdp.capabilities`` and the part is not built (the switch says why); a
  start that fails is reported in ``problem`` and not retried.
* Heartbeats: full-MTU probe frames sent through the tunnel with a packet-execute
  (``OvsDatapath.send_probe``); the far side gets them as miss upcalls on its vxlan vport
  (``handle_upcalls`` returns them, no flow is installed) and acknowledges them over the control
  connection (envelope part 3). So a connection is "healthy" on OVS only while a full-size frame
  crosses *this* datapath's tunnel.
* Peers: ``set_peers`` on every link start/stop and carrying change (``OvsPeer(ip, short id,
  carrying, vni)``); a change in who carries flushes every flow. Frames to or from peers that do
  not carry are dropped by the datapath: the sleeve carries them.
* Flows: misses are decided by ``OvsFlowPlanner`` (MAC learning, head-end flooding to carrying
  peers) and installed; the MACs peers announce (switch message) become locations in the planner,
  and the flows towards a MAC that moved are deleted. Idle flows are expired every
  ``OvsPartConfig.expire_interval`` seconds.
* The bridge: on a carrying change the bridge forgets what it learned on the veth and the TAP, and
  the MACs a carried peer announced get static bridge entries pointing at the veth (as the vxlan
  part does for its device).
* ESP (with a password; weft.fastdp.esp_links): every link is encrypted; per link the inbound
  guard, a kernel SPI exchanged over control, SAs and policies, and only then does the datapath
  hear of the peer (``set_peers``; withdrawn before the SAs go), so no flow or probe can tunnel
  to it in the clear; heartbeats start after the install. Overlay MTU underlay - 90.

VNI: every OVS connection uses the network VNI (0xFFFFFF, the Linux VXLAN datapath's), not Weave's
pairwise ``src | dst << 12``: the overlay does not know our own short id (it changes when short ids
clash), and the planner recognises the sender by VNI *and* the tunnel's source IP, which is
what the pairwise VNI was for. The wire is the Linux VXLAN part's.

Threads: every netlink call (pyroute2 and the OVS generic netlink client, which is not
thread-safe) runs on one worker thread, in order; the loop only schedules. The upcall socket is
watched by the loop; when readable, the reader is paused, the worker drains and decides the
upcalls, and the reader is resumed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from weft.errors import WeftError
from weft.fastdp.esp import ESP_OVERHEAD
from weft.fastdp.esp_links import EspLinks
from weft.fastdp.heartbeat import HeartbeatConfig, Probe, encode_probe
from weft.fastdp.link import FastPathLink
from weft.fastdp.netdev_stats import device_traffic
from weft.fastdp.ovs_datapath import OvsConfig
from weft.fastdp.ovs_flows import OvsPeer
from weft.fastdp.part_base import (
    FEATURE_ESP,
    FastPartBase,
    LinkHandle,
    flush_learned,
    local_bridge_macs,
    point_bridge_macs,
    source_address,
)
from weft.fastdp.vxlan import NETWORK_VNI
from weft.gossip.peer import PeerName
from weft.overlay import OverlayConnectionParams

__all__ = [
    "FEATURE_ESP",  # weft.fastdp.part_base's, for the tests and the switch
    "FEATURE_OVS",
    "FEATURE_OVS_PORT",
    "FEATURE_OVS_VNI",
    "KernelOvsHost",
    "OvsHost",
    "OvsLinkHandle",
    "OvsPart",
    "OvsPartConfig",
    "Worker",
    "make_part",
    "remove_stale_ovs",
]

log = logging.getLogger("weft.fastdp")

PART_OVS = 3  # the overlay-control envelope part of OVS links (switch_core.PART_OVS)
FEATURE_OVS = "fastdp_ovs"
FEATURE_OVS_PORT = "fastdp_ovs_port"
FEATURE_OVS_VNI = "fastdp_ovs_vni"


@dataclass(frozen=True)
class OvsPartConfig:
    """The OVS part's settings (defaults in brackets)."""

    # Names, port, underlay MTU (read from the interface towards the first peer when it is
    # the default 1500 and ``detect_mtu``) of the kernel objects.
    datapath: OvsConfig = field(default_factory=OvsConfig)
    detect_mtu: bool = True
    vni: int = NETWORK_VNI  # every connection's VNI (see the module docstring)
    local_ip: str | None = None  # tunnel source; None: our address towards the first peer
    expire_interval: float = 30.0  # seconds between idle-flow sweeps [30]
    flow_idle: float = 30.0  # a flow unused this long is deleted [30]
    mac_poll_interval: float = 2.0  # seconds between looks at our bridge's MACs [2]


class OvsHost(Protocol):
    """The kernel side of the part (worker thread only); :class:`KernelOvsHost` in production,
    an in-memory fake in tests."""

    def start(self) -> int:
        """Clean stale state, build the datapath; return the overlay MTU."""
        ...

    def fileno(self) -> int | None:
        """The upcall socket for the loop (None: the caller polls ``handle_upcalls``)."""
        ...

    def stale_removed(self) -> list[str]: ...

    def set_peers(self, peers: dict[PeerName, OvsPeer]) -> None: ...

    def macs_changed(self, locations: dict[str, PeerName]) -> int: ...

    def handle_upcalls(self) -> list[Probe]: ...

    def send_probe(self, peer: PeerName, frame: bytes) -> bool: ...

    def expire_idle(self, idle_seconds: float) -> int: ...

    def flush_learned(self) -> int:
        """The bridge forgets what it learned on the veth and the TAP; returns how many."""
        ...

    def point_macs(self, macs: frozenset[str]) -> int:
        """Exactly ``macs`` have static bridge entries towards the datapath; returns how many."""
        ...

    def local_macs(self) -> set[str]: ...

    def status(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


class Worker(Protocol):
    """Runs kernel jobs in order off the loop and hands results back on it."""

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        """Run and wait (blocks the loop: start and stop only)."""
        ...

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        """Queue ``fn(*args)``; ``then(result, error)`` runs on the loop afterwards."""
        ...

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Queue ``fn()`` and return its future (the ESP driver's jobs, weft.fastdp.esp_links)."""
        ...

    def close(self) -> None: ...


class _ThreadWorker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="weft-ovs")
        self.closed = False

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        return self.pool.submit(fn, *args).result(timeout=timeout)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any, BaseException | None], None] | None = None,
    ) -> None:
        if self.closed:
            return
        future: Future[Any] = self.pool.submit(fn, *args)
        if then is None:
            return

        def done(fut: Future[Any]) -> None:
            err = fut.exception()
            result = fut.result() if err is None else None
            if not self.closed and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(then, result, err)

        future.add_done_callback(done)

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        return self.pool.submit(fn)

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown(wait=False)


class KernelOvsHost:
    """:class:`OvsHost` on the real kernel: pyroute2 for links and the bridge, the OVS client
    for the datapath. Everything on the part's worker thread."""

    def __init__(
        self,
        config: OvsPartConfig,
        local_name: PeerName,
        local_ip: str,
        tap: str | None,
    ) -> None:
        self.config = config
        self.local_name = local_name
        self.local_ip = local_ip
        self.tap = tap
        self._ipr: Any = None
        self._dp: Any = None
        self._stale: list[str] = []
        self._installed: set[str] = set()

    def start(self) -> int:
        from pyroute2 import IPRoute

        from weft.fastdp.ovs_datapath import OvsDatapath
        from weft.fastdp.vxlan import VxlanConfig, VxlanDevice

        cfg = self.config.datapath
        self._ipr = IPRoute()
        # A Linux VXLAN device left by an earlier router holds UDP 6784 (and would forward
        # containers' frames on its own): it goes before our vxlan vport binds the port.
        self._stale = VxlanDevice(self._ipr, VxlanConfig(bridge=cfg.bridge)).remove_stale()
        if self.config.detect_mtu and cfg.underlay_mtu == OvsConfig().underlay_mtu:
            cfg = replace(cfg, underlay_mtu=self._underlay_mtu())
        dp = OvsDatapath(self._ipr, cfg, self.local_name, 0, self.local_ip)
        mtu = dp.start()
        self._dp = dp
        self._stale += dp.stale_removed
        if self._stale:
            log.warning("removed what an earlier router left: %s", ", ".join(self._stale))
        ports = list(self._ipr.link_lookup(ifname=cfg.bridge_veth))
        if self.tap is not None:
            ports += self._ipr.link_lookup(ifname=self.tap)
        for port in ports:  # no frame crosses between the tunnel and the sleeve
            self._ipr.brport("set", index=int(port), isolated=1)
        return int(mtu)

    def _underlay_mtu(self) -> int:
        for addr in self._ipr.get_addr(family=socket.AF_INET):
            if addr.get_attr("IFA_ADDRESS") == self.local_ip:
                (link,) = self._ipr.get_links(int(addr["index"]))
                return int(link.get_attr("IFLA_MTU"))
        return OvsConfig().underlay_mtu

    def fileno(self) -> int | None:
        return int(self._dp.fileno())

    def stale_removed(self) -> list[str]:
        return list(self._stale)

    def set_peers(self, peers: dict[PeerName, OvsPeer]) -> None:
        self._dp.set_peers(peers)

    def macs_changed(self, locations: dict[str, PeerName]) -> int:
        return int(self._dp.macs_changed(locations))

    def handle_upcalls(self) -> list[Probe]:
        return list(self._dp.handle_upcalls())

    def send_probe(self, peer: PeerName, frame: bytes) -> bool:
        return bool(self._dp.send_probe(peer, frame))

    def expire_idle(self, idle_seconds: float) -> int:
        now_ms = int(time.monotonic() * 1000)  # the kernel's flow "used" clock
        return int(self._dp.expire_idle(now_ms, int(idle_seconds * 1000)))

    def _ports(self) -> list[str]:
        return [self.config.datapath.bridge_veth] + ([self.tap] if self.tap else [])

    def flush_learned(self) -> int:
        return flush_learned(self._ipr, self.config.datapath.bridge, self._ports())

    def point_macs(self, macs: frozenset[str]) -> int:
        cfg = self.config.datapath
        if not point_bridge_macs(self._ipr, cfg.bridge, cfg.bridge_veth, self._installed, macs):
            return 0
        return len(self._installed)

    def local_macs(self) -> set[str]:
        return local_bridge_macs(self._ipr, self.config.datapath.bridge, set(self._ports()))

    def status(self) -> dict[str, Any]:
        return dict(self._dp.status()) if self._dp is not None else {}

    def stop(self) -> None:
        try:
            if self._dp is not None:
                self._dp.stop()
                self._dp.client.close()
        finally:
            self._dp = None
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None


@dataclass(kw_only=True)
class OvsLinkHandle(LinkHandle):
    """One connection's OVS path, as the switch holds it."""

    short_id: int = 0  # the peer's short id (12 bits)


class OvsPart(FastPartBase[OvsLinkHandle]):
    """The OVS datapath of one router (create inside the running loop).

    ``make_host``, ``worker``, ``clock`` and ``call_at`` replace the kernel, the worker thread and
    the loop's clock and timers (tests).
    """

    name = "ovs"
    part_id = PART_OVS
    handle_type = OvsLinkHandle
    log_label = "OVS"
    feature_keys = (FEATURE_OVS, FEATURE_OVS_PORT, FEATURE_OVS_VNI)
    datapath_label = "OVS"

    def __init__(
        self,
        *,
        bridge: str,
        tap: str | None,
        heartbeat: HeartbeatConfig | None = None,
        config: OvsPartConfig | None = None,
        on_local_macs: Callable[[frozenset[str]], None] = lambda macs: None,
        make_host: Callable[[PeerName, str], OvsHost] | None = None,
        worker: Worker | None = None,
        clock: Callable[[], float] | None = None,
        call_at: Callable[[float, Callable[[], None]], Any] | None = None,
        esp: EspLinks | None = None,
    ) -> None:
        super().__init__(
            bridge=bridge,
            tap=tap,
            heartbeat=heartbeat,
            on_local_macs=on_local_macs,
            esp=esp,
            clock=clock,
            call_at=call_at,
        )
        self.config = config or OvsPartConfig()
        # With ESP every link is encrypted (weft.fastdp.esp_links): the overlay MTU leaves room
        # for ESP, and the datapath knows a peer (so can tunnel to it) only while its SAs and
        # policies exist.
        overhead = ESP_OVERHEAD if esp is not None else self.config.datapath.extra_overhead
        self.config = replace(
            self.config,
            datapath=replace(self.config.datapath, bridge=bridge, extra_overhead=overhead),
        )
        self._make_host = make_host or self._kernel_host
        self._worker: Worker = worker or _ThreadWorker(self.loop)
        self.local_ip: str | None = None
        self.error = ""  # the last kernel job that failed (empty when the last one succeeded)
        self.counters = {
            "flushes": 0,
            "flows_expired": 0,
            "probes_sent": 0,
            "probes_failed": 0,
            "probes_received": 0,
            "bridge_entries": 0,
        }
        self.stale_removed: list[str] = []
        self.kernel: dict[str, Any] = {}  # the datapath's own status, refreshed by the worker
        self._host: OvsHost | None = None
        self._fd: int | None = None
        self._reading = False
        self._expire_timer: Any = None
        self._mac_timer: Any = None
        self._wanted: dict[PeerName, OvsPeer] = {}  # worker only: the last peers from the loop
        self._published: set[PeerName] = set()  # worker only: peers whose ESP is installed
        if esp is not None:
            esp.bind(self.loop, self._worker.submit)

    def _later(self, delay: float, fn: Callable[[], None]) -> Any:
        return self._call_at(self._clock() + delay, fn)

    def _kernel_host(self, local_name: PeerName, local_ip: str) -> OvsHost:
        return KernelOvsHost(self.config, local_name, local_ip, self.tap)

    # -- the part's face to the switch -------------------------------------------------------------

    def features(self) -> dict[str, Any]:
        return {} if self.problem else super().features()

    def _port_vni(self) -> tuple[int, int]:
        return self.config.datapath.port, self.config.vni

    def ensure_started(self, local_name: PeerName, remote_ip: str) -> bool:
        """Start the datapath once (blocks the loop for the netlink round trips, once); False
        with ``problem`` set when it cannot run here (not retried)."""
        if self.local_name is not None:
            return not self.problem
        self.local_name = local_name
        port = self.config.datapath.port
        local_ip = self.config.local_ip or source_address(remote_ip, port)
        if local_ip is None:
            self.problem = f"ovs: no route to {remote_ip} for the tunnel"
            return False
        self.local_ip = local_ip
        try:
            host = self._make_host(local_name, local_ip)
            self.mtu = int(self._worker.call(self._start_host, host, timeout=60))
            self._host = host
            self.stale_removed = list(self._worker.call(host.stale_removed))
            self._fd = self._worker.call(host.fileno)
        except Exception as err:
            self.problem = f"ovs: {err}"
            log.warning("OVS datapath unavailable: %s", err)
            return False
        log.info("OVS datapath %s on %s, MTU %s", self.config.datapath.datapath, local_ip, self.mtu)
        self._resume_reading()
        self._mac_timer = self._later(0.1, self._poll_macs)
        self._expire_timer = self._later(self.config.expire_interval, self._expire)
        self._refresh_kernel()
        return True

    def _start_host(self, host: OvsHost) -> int:
        if self.esp is not None:  # stale SAs gone and the inbound guard up before the tunnel
            self.esp.start()
        return host.start()

    def _stop_host(self, host: OvsHost | None) -> None:
        try:
            if host is not None:
                host.stop()  # the datapath (and its flows) first, then what encrypted it
        finally:
            if self.esp is not None:
                self.esp.stop()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._timer, self._expire_timer, self._mac_timer):
            if timer is not None:
                timer.cancel()
        self._pause_reading()
        self.links.clear()
        try:
            self._worker.call(self._stop_host, self._host)
        except Exception:
            log.exception("stopping the OVS datapath failed")
        self._worker.close()

    # -- per connection ----------------------------------------------------------------------------

    def _accepts(self, params: OverlayConnectionParams, on_failed: Callable[[str], None]) -> bool:
        """A connection without data keys on an ESP part, or with them on a part without ESP,
        can never carry: ``on_failed`` says why."""
        if (params.data_send_key is not None) != self.encrypted:
            on_failed(
                "ovs: encrypted connections need ESP on this datapath"
                if not self.encrypted
                else "ovs: an unencrypted connection on an ESP datapath"
            )
            return False
        return True

    def _handle_made(self, handle: OvsLinkHandle, params: OverlayConnectionParams) -> None:
        handle.short_id = params.remote_short_id & 0xFFF

    def _tunnel_source(self) -> str | None:
        return self.local_ip  # set by ensure_started

    def _link_added(self, handle: OvsLinkHandle) -> None:
        self._push_peers()  # with ESP the datapath hears of the peer once installed (_publish)

    def _link_removed(self, handle: OvsLinkHandle) -> None:
        self._push_peers()

    def _carrying_changed(self, handle: OvsLinkHandle) -> None:
        self._push_peers()
        self._push_macs()

    def _flush(self) -> None:
        self._run(self._host_call("flush_learned"), then=self._flushed)

    def _macs_changed(self, locations: dict[str, PeerName]) -> None:
        self._run(self._host_call("macs_changed"), locations)

    def status(self) -> dict[str, Any]:
        self._refresh_kernel()  # the next status shows the kernel's newer counters
        return {
            "datapath": self.config.datapath.datapath,
            "port": self.config.datapath.port,
            "vni": self.config.vni,
            "local_ip": self.local_ip,
            "mtu": self.mtu,
            "encrypted": self.encrypted,
            "esp": self.esp.status() if self.esp is not None else None,
            "problem": self.problem,
            "error": self.error,
            "stale_removed": list(self.stale_removed),
            "local_macs": len(self.local_macs),
            **self.counters,
            "kernel": dict(self.kernel),
            "links": self.links_status(),
            "traffic": device_traffic(self.config.datapath.vxlan_vport),
        }

    # -- kernel jobs (worker thread) ---------------------------------------------------------------

    def _host_call(self, method: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            host = self._host
            assert host is not None
            return getattr(host, method)(*args)

        call.__name__ = method
        return call

    def _run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any], None] | None = None,
    ) -> None:
        """Queue a kernel job; a failure is logged and shown in ``error``."""
        if self._closed or self._host is None:
            return
        name = getattr(fn, "__name__", "job")

        def done(result: Any, err: BaseException | None) -> None:
            if self._closed:
                return
            if err is not None:
                self.error = f"{name}: {err}"
                if isinstance(err, WeftError):
                    log.warning("OVS datapath: %s", self.error)
                else:
                    log.error("OVS datapath job %s failed: %r", name, err)
                return
            self.error = ""
            if then is not None:
                then(result)

        self._worker.run(fn, *args, then=done)

    def _flushed(self, count: Any) -> None:
        self.counters["flushes"] += int(count)

    def _push_peers(self) -> None:
        peers = {
            h.remote: OvsPeer(h.ip, h.short_id, h.carrying, vni=self.config.vni)
            for h in self.links.values()
        }
        self._run(self._set_peers, peers)

    def _set_peers(self, peers: dict[PeerName, OvsPeer]) -> None:
        """*Worker*: the datapath knows the peers the loop has links for -- with ESP, only
        those whose SAs and policies are installed (published)."""
        self._wanted = peers
        self._apply_peers()

    def _apply_peers(self) -> None:
        host = self._host
        if host is None:
            return
        peers = self._wanted
        if self.encrypted:
            peers = {name: p for name, p in peers.items() if name in self._published}
        host.set_peers(peers)

    def _point_macs(self, desired: frozenset[str]) -> None:
        def done(count: Any) -> None:
            self.counters["bridge_entries"] = int(count)

        self._run(self._host_call("point_macs"), desired, then=done)

    def _refresh_kernel(self) -> None:
        def done(status: Any) -> None:
            self.kernel = dict(status)

        self._run(self._host_call("status"), then=done)

    # -- timers ------------------------------------------------------------------------------------

    def _poll_macs(self) -> None:
        self._mac_timer = None
        if self._closed:
            return

        def done(macs: Any) -> None:
            self._local_macs_found(frozenset(str(m) for m in macs))

        self._run(self._host_call("local_macs"), then=done)
        self._mac_timer = self._later(self.config.mac_poll_interval, self._poll_macs)

    def _expire(self) -> None:
        """Delete idle flows (and refresh the kernel's counters for ``status``)."""
        self._expire_timer = None
        if self._closed:
            return

        def done(count: Any) -> None:
            self.counters["flows_expired"] += int(count)

        self._run(self._host_call("expire_idle"), self.config.flow_idle, then=done)
        self._refresh_kernel()
        self._expire_timer = self._later(self.config.expire_interval, self._expire)

    def expire_now(self) -> None:
        """One idle-flow sweep now (what the timer does)."""
        if self._expire_timer is not None:
            self._expire_timer.cancel()
        self._expire()

    # -- upcalls -----------------------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if self._fd is not None and not self._reading and not self._closed:
            self.loop.add_reader(self._fd, self.upcalls_ready)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._fd is not None and self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def upcalls_ready(self) -> None:
        """The upcall socket is readable (or, with a fake host, a test says so): the worker
        drains it; the reader is paused meanwhile so the loop does not spin."""
        if self._closed or self._host is None:
            return
        self._pause_reading()
        host = self._host

        def done(result: Any, err: BaseException | None) -> None:
            if self._closed:
                return
            if err is not None:
                self.error = f"handle_upcalls: {err}"
                log.warning("OVS upcalls: %s", err)
                self._later(1.0, self._resume_reading)  # do not spin on an error
                return
            self._resume_reading()
            self.probes_arrived(list(result))

        self._worker.run(host.handle_upcalls, then=done)

    def probes_arrived(self, probes: list[Probe]) -> None:
        for probe in probes:
            self.counters["probes_received"] += 1
            handle = self.links.get(probe.src)
            if handle is not None:
                handle.link.probe_received(probe)
                self._process(handle)

    # -- heartbeats on the loop --------------------------------------------------------------------

    def _send_probes(self, link: FastPathLink, probes: list[tuple[int, int]]) -> None:
        for seq, size in probes:
            frame = encode_probe(link.local, link.remote, seq, size)
            self._run(self._host_call("send_probe"), link.remote, frame, then=self._probe_sent)

    # -- ESP (see weft.fastdp.esp_links) --------------------------------------------------------

    def _publish(self, handle: OvsLinkHandle) -> None:
        """*Worker*, right after the peer's SAs and policies are installed: the datapath may
        tunnel to it (probes first; container frames once the switch says it carries)."""
        self._published.add(handle.remote)
        self._apply_peers()

    def _withdraw(self, remote: PeerName) -> Callable[[], None]:
        """*Worker*, before the peer's ESP goes or is replaced: the datapath forgets the peer
        (its flows are flushed), so nothing is tunnelled to it unencrypted."""

        def withdraw() -> None:
            self._published.discard(remote)
            self._apply_peers()

        return withdraw

    def _probe_sent(self, ok: Any) -> None:
        self.counters["probes_sent" if ok else "probes_failed"] += 1


def remove_stale_ovs(config: OvsConfig | None = None) -> list[str]:
    """Delete a datapath and veth left by an earlier router (kernel with openvswitch, router
    running without the OVS part: nothing may forward containers' frames behind its back).
    Blocking; run off the loop. Returns what was removed."""
    from pyroute2 import IPRoute

    from weft.fastdp.ovs import OvsClient

    cfg = config or OvsConfig()
    removed = []
    client = OvsClient()
    try:
        if client.remove_stale(cfg.datapath):
            removed.append(cfg.datapath)
    finally:
        client.close()
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=cfg.bridge_veth):
            ipr.link("del", index=index)
            removed.append(cfg.bridge_veth)
    if removed:
        log.warning("removed what an earlier router left: %s", ", ".join(removed))
    return removed


class PartContext(Protocol):
    """What :func:`make_part` reads from the switch's ``FastPartContext``."""

    @property
    def bridge(self) -> str: ...

    @property
    def tap(self) -> str | None: ...

    @property
    def heartbeat(self) -> HeartbeatConfig: ...

    @property
    def encrypted(self) -> bool: ...


def make_part(ctx: PartContext, config: OvsPartConfig | None = None) -> OvsPart:
    """The OVS part for ``weft.switch.pump._build_fast_parts`` (called only where the
    capability probe, done once, found openvswitch). With a password (``ctx.encrypted``; the
    switch builds parts then only where the kernel has ESP) every link runs over ESP."""
    esp: EspLinks | None = None
    if ctx.encrypted:
        from weft.fastdp.esp_links import make_esp  # xfrm + strict guard

        esp = make_esp("ovs")
    return OvsPart(bridge=ctx.bridge, tap=ctx.tap, heartbeat=ctx.heartbeat, config=config, esp=esp)
