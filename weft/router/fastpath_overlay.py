"""The Linux VXLAN fast datapath as a part of the overlay switch (weft.router.switch).

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
import socket
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from weft.errors import WeftError
from weft.fastdp.errors import DatapathError
from weft.fastdp.esp import ESP_OVERHEAD
from weft.fastdp.fdb import normalize_mac
from weft.fastdp.heartbeat import (
    HealthChanged,
    HeartbeatConfig,
    HeartbeatState,
    decode_probe,
    encode_probe,
)
from weft.fastdp.link import FastPathLink
from weft.fastdp.vxlan import VXLAN_PORT, HeartbeatSocket, VxlanConfig, VxlanDatapath
from weft.gossip.peer import PeerName
from weft.router.esp_links import EspLink, EspLinks
from weft.router.overlay import OverlayConnectionParams
from weft.router.switch_core import PART_VXLAN

__all__ = ["VxlanLinkHandle", "VxlanPart", "flush_learned", "health_text", "local_bridge_macs"]

log = logging.getLogger("weft.fastdp")

NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_MASTER = 0x04
NTF_STICKY = 0x40
MAC_POLL_INTERVAL = 2.0  # seconds between looks at the bridge's learned MACs
FEATURE_VXLAN = "fastdp_vxlan"
FEATURE_VXLAN_PORT = "fastdp_vxlan_port"
FEATURE_VNI = "fastdp_vni"
FEATURE_ESP = "fastdp_esp"  # 1: our fast paths run over ESP (a password is set)


def health_text(state: HeartbeatState, reason: str) -> str:
    """The heartbeat reason as a connection shows it: an unhealthy one names the likely causes."""
    if state == HeartbeatState.UNHEALTHY and "blocked" not in reason and "MTU" not in reason:
        return f"{reason} (UDP {VXLAN_PORT} blocked or path MTU too small?)"
    return reason


def _source_address(remote_ip: str) -> str | None:
    """Our address on the route to ``remote_ip`` (None when there is none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_ip, VXLAN_PORT))
            return str(probe.getsockname()[0])
    except OSError:
        return None


@dataclass
class VxlanLinkHandle:
    """One connection's vxlan path, as the switch holds it."""

    remote: PeerName
    ip: str
    link: FastPathLink
    send_control: Callable[[bytes], None]  # a fast-path control message to the peer's link
    on_health: Callable[[bool, str], None]  # (healthy, reason) when it changes
    on_failed: Callable[[str], None] = lambda reason: None  # can never carry (why); once
    esp: EspLink | None = None  # with a password: this link's ESP
    carrying: bool = False
    macs: frozenset[str] = field(default_factory=frozenset)
    stopped: bool = False


def local_bridge_macs(ipr: Any, bridge: str, exclude: set[str]) -> set[str]:
    """MACs on ``bridge`` that are ours to announce: learned on ports other than ``exclude``
    (the TAP and the vxlan device), plus the bridge's own (the host's exposed address)."""
    found = ipr.link_lookup(ifname=bridge)
    if not found:
        return set()
    index = int(found[0])
    skip = {int(i) for name in exclude for i in ipr.link_lookup(ifname=name)}
    macs: set[str] = set()
    own = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
    if own:
        macs.add(str(own).lower())
    for msg in ipr.fdb("dump"):
        if msg.get_attr("NDA_MASTER") != index or int(msg["ifindex"]) in skip:
            continue
        if msg["state"] & (NUD_PERMANENT | NUD_NOARP):
            continue  # the ports' own addresses, static entries
        mac = msg.get_attr("NDA_LLADDR")
        if mac and not int(str(mac)[:2], 16) & 1:
            macs.add(str(mac).lower())
    return macs


def flush_learned(ipr: Any, bridge: str, ports: list[str]) -> int:
    """Forget what ``bridge`` learned on ``ports`` (dynamic entries only); return how many."""
    found = ipr.link_lookup(ifname=bridge)
    if not found:
        return 0
    index = int(found[0])
    wanted = {int(i) for name in ports for i in ipr.link_lookup(ifname=name)}
    gone = 0
    for msg in ipr.fdb("dump"):
        if msg.get_attr("NDA_MASTER") != index or int(msg["ifindex"]) not in wanted:
            continue
        if msg["state"] & (NUD_PERMANENT | NUD_NOARP):
            continue
        mac = msg.get_attr("NDA_LLADDR")
        try:
            ipr.fdb("del", ifindex=int(msg["ifindex"]), lladdr=mac, master=index, flags=NTF_MASTER)
            gone += 1
        except Exception:  # aged out meanwhile
            log.debug("flush of %s failed", mac, exc_info=True)
    return gone


class VxlanPart:
    """The vxlan datapath of one router (create inside the running loop); a
    :class:`weft.router.fast_part.FastPart`."""

    name = "vxlan"
    part_id = PART_VXLAN

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
        self.loop = asyncio.get_running_loop()
        self.bridge = bridge
        self.tap = tap
        self.heartbeat = heartbeat or HeartbeatConfig()
        self.device_config = device or VxlanConfig(bridge=bridge)
        self.on_local_macs = on_local_macs
        # With ESP every link is encrypted (see weft.router.esp_links): the overlay MTU leaves
        # room for ESP, and a peer's FDB entries exist only while its SAs and policies do.
        self.esp = esp
        self.encrypted = esp is not None
        if esp is not None:
            self.device_config = replace(self.device_config, extra_overhead=ESP_OVERHEAD)
        self.links: dict[PeerName, VxlanLinkHandle] = {}
        self.local_name: PeerName | None = None
        self.mtu: int | None = None
        self.problem = ""  # non-empty: the device could not start (why)
        self.local_macs: frozenset[str] = frozenset()
        self.flushes = 0
        self.fdb_error = ""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weft-vxlan")
        self._ipr: Any = None
        self._dp: VxlanDatapath | None = None
        self._sock: HeartbeatSocket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._mac_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._bridge_installed: set[str] = set()  # worker thread only
        self.bridge_entries = 0
        if esp is not None:
            esp.bind(self.loop, self._pool.submit)

    # -- what we offer ---------------------------------------------------------------------------

    def features(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            FEATURE_VXLAN: 1,
            FEATURE_VXLAN_PORT: self.device_config.port,
            FEATURE_VNI: self.device_config.vni,
        }
        if self.encrypted:
            out[FEATURE_ESP] = 1
        return out

    def peer_compatible(self, remote_features: Mapping[str, Any]) -> str:
        """ "" when the peer runs vxlan on our port and VNI, else why not."""
        if remote_features.get(FEATURE_VXLAN) != 1:
            return "vxlan: the peer has no vxlan datapath"
        port, vni = remote_features.get(FEATURE_VXLAN_PORT), remote_features.get(FEATURE_VNI)
        if port != self.device_config.port or vni != self.device_config.vni:
            return (
                f"vxlan: the peer uses UDP {port} VNI {vni}, we use UDP "
                f"{self.device_config.port} VNI {self.device_config.vni}"
            )
        if self.encrypted and remote_features.get(FEATURE_ESP) != 1:
            return "vxlan: the peer's vxlan datapath has no ESP"
        return ""

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
            local_ip = _source_address(remote_ip)
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

    # -- per connection -------------------------------------------------------------------------

    def start_link(
        self,
        params: OverlayConnectionParams,
        send_control: Callable[[bytes], None],
        on_health: Callable[[bool, str], None],
        on_failed: Callable[[str], None],
    ) -> VxlanLinkHandle | None:
        """Start probing the peer through the tunnel; None when vxlan cannot run here."""
        local, remote, ip = params.local_name, params.remote_name, params.remote_ip
        if not self.ensure_started(local, ip) or self.mtu is None:
            return None
        old = self.links.pop(remote, None)
        if old is not None:
            old.stopped = True
        now = self.loop.time()
        link = FastPathLink(local, remote, self.mtu, self.encrypted, now, self.heartbeat)
        handle = VxlanLinkHandle(remote, ip, link, send_control, on_health, on_failed)
        self.links[remote] = handle
        if self.esp is not None:
            local_ip = self.device_config.local_ip
            assert local_ip is not None  # ensure_started refuses ESP without it
            handle.esp = self.esp.link_started(
                remote, local_ip, ip, params.data_send_key, params.data_recv_key
            )  # the FDB entry comes once ESP is installed (_publish)
        else:
            self._submit(self._dp_call, "peer_started", remote, ip)
        self._process(handle)
        if old is not None and old.esp is not None and self.esp is not None:
            # after the new link's first job took its guard reference: the peer's plaintext
            # stays dropped throughout
            self.esp.link_stopped(old.esp, self._withdraw(remote))
        return handle

    def control_received(self, handle: VxlanLinkHandle, payload: bytes) -> None:
        if handle.stopped:
            return
        handle.link.control_received(payload, self.loop.time())  # raises RemoteProtocolError
        self._process(handle)

    def set_carrying(self, handle: VxlanLinkHandle, carrying: bool) -> None:
        if handle.stopped or handle.carrying == carrying:
            return
        handle.carrying = carrying
        self._submit(self._dp_call, "peer_carrying", handle.remote, carrying)
        self._submit(self._flush)
        self._sync_bridge()

    def peer_macs(self, handle: VxlanLinkHandle, macs: frozenset[str]) -> None:
        if handle.stopped or handle.macs == macs:
            return
        handle.macs = macs
        self._push_macs()
        self._sync_bridge()

    def stop_link(self, handle: VxlanLinkHandle) -> None:
        if handle.stopped:
            return
        handle.stopped = True
        if self.links.get(handle.remote) is handle:
            del self.links[handle.remote]
            self._submit(self._dp_call, "peer_stopped", handle.remote)
            self._push_macs()
            if handle.carrying:
                self._submit(self._flush)
                self._sync_bridge()
        if handle.esp is not None and self.esp is not None:
            self.esp.link_stopped(handle.esp, self._withdraw(handle.remote))
        self._arm()

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
            "links": {
                str(h.remote): {
                    "ip": h.ip,
                    "state": h.link.state.value,
                    "reason": h.link.reason,
                    "carrying": h.carrying,
                    "macs": len(h.macs),
                }
                for h in self.links.values()
            },
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
        ports = [self.device_config.name] + ([self.tap] if self.tap else [])
        self.flushes += flush_learned(self._ipr, self.bridge, ports)

    def _sync_bridge(self) -> None:
        """Static bridge entries ``MAC -> vxlan port`` for every MAC of a carried peer."""
        local = self.local_macs
        desired = frozenset(
            mac
            for h in self.links.values()
            if h.carrying
            for mac in h.macs
            if mac not in local  # a container that moved here is ours now
        )
        self._submit(self._apply_bridge, desired)

    def _apply_bridge(self, desired: frozenset[str]) -> None:
        ipr = self._ipr
        bridge = ipr.link_lookup(ifname=self.bridge)
        port = ipr.link_lookup(ifname=self.device_config.name)
        if not bridge or not port:
            return
        for mac in sorted(self._bridge_installed - desired):
            try:
                ipr.fdb("del", ifindex=port[0], lladdr=mac, master=bridge[0], flags=NTF_MASTER)
            except Exception:  # already gone (e.g. with the device)
                log.debug("removing bridge entry %s failed", mac, exc_info=True)
            self._bridge_installed.discard(mac)
        for mac in sorted(desired - self._bridge_installed):
            try:
                ipr.fdb(
                    "replace",
                    ifindex=port[0],
                    lladdr=mac,
                    master=bridge[0],
                    flags=NTF_MASTER | NTF_STICKY,
                    state=NUD_NOARP,  # static: forwarded, never aged, not local
                )
            except Exception as err:
                raise DatapathError(
                    f"point bridge entry {mac} at {self.device_config.name}", str(err)
                ) from err
            self._bridge_installed.add(mac)
        self.bridge_entries = len(self._bridge_installed)

    def _push_macs(self) -> None:
        locations: dict[str, PeerName] = {}
        for handle in self.links.values():
            for mac in handle.macs:
                try:
                    locations[normalize_mac(mac)] = handle.remote
                except WeftError:
                    continue
        self._submit(self._dp_call, "macs_changed", locations)

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
        if macs != self.local_macs:
            self.local_macs = macs
            self.on_local_macs(macs)
            self._sync_bridge()
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

    def _process(self, handle: VxlanLinkHandle) -> None:
        link = handle.link
        for message in link.control_to_send():
            try:
                handle.send_control(message)
            except Exception:  # the control connection is closing; stop_link follows
                log.debug("fast-path control to %s failed", handle.remote, exc_info=True)
        sock = self._sock
        for seq, size in link.probes_to_send():
            if sock is not None:
                sock.send(encode_probe(link.local, link.remote, seq, size))
        while (event := link.next_event()) is not None:
            if (
                self.esp is not None
                and handle.esp is not None
                and self.esp.handle_event(
                    handle.esp,
                    link,
                    event,
                    resume=partial(self._resume, handle),
                    failed=partial(self._esp_failed, handle),
                    publish=partial(self._publish, handle),
                    withdraw=self._withdraw(handle.remote),
                )
            ):
                continue
            if isinstance(event, HealthChanged):
                healthy = event.state == HeartbeatState.HEALTHY
                try:
                    handle.on_health(healthy, health_text(event.state, event.reason))
                except Exception:
                    log.exception("fast-path health callback failed for %s", handle.remote)
        self._arm()

    # -- ESP (see weft.router.esp_links) --------------------------------------------------------

    def _resume(self, handle: VxlanLinkHandle) -> None:
        if not handle.stopped and not self._closed:
            self._process(handle)

    def _esp_failed(self, handle: VxlanLinkHandle, reason: str) -> None:
        if self.esp is not None and self.esp.fatal and not self.problem:
            self.problem = self.esp.fatal  # the kernel cannot: new connections stay on sleeve
        if not handle.stopped:
            handle.on_failed(reason)

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

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadlines = [t for h in self.links.values() if (t := h.link.get_timer()) is not None]
        if deadlines and not self._closed:
            self._timer = self.loop.call_at(min(deadlines), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        for handle in list(self.links.values()):
            timer = handle.link.get_timer()
            if timer is not None and timer <= now + 0.001:  # asyncio may fire a hair early
                handle.link.handle_timer(now)
                self._process(handle)
        self._arm()
