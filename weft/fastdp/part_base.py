"""What the fast parts (weft.fastdp.part) share: the bridge helpers and the loop side of
their links.

Both kernel datapaths, the Linux VXLAN device (weft.fastdp.vxlan_part.VxlanPart) and Open
vSwitch (weft.fastdp.ovs_part.OvsPart), sit behind one port of the Linux bridge ``weft`` and
drive one :class:`~weft.fastdp.link.FastPathLink` per connection the same way; they differ in
how they reach the kernel. So:

* bridge helpers (worker thread; ``ipr`` is a pyroute2 ``IPRoute``): :func:`local_bridge_macs`
  (the MACs we announce), :func:`flush_learned` (forget what the bridge learned on the tunnel's
  port and the TAP when a connection changes datapath), :func:`point_bridge_macs` (static, sticky
  entries ``MAC -> tunnel port`` for the MACs carried peers announced);
* :class:`FastPartBase`: the links, their heartbeats, timers and ESP events on the loop, and the
  switch's per-connection calls (``start_link`` ... ``stop_link``). A part supplies the kernel
  side through a few hooks (``_handle_made``, ``_link_added``, ``_link_removed``,
  ``_carrying_changed``, ``_flush``, ``_macs_changed``, ``_point_macs``, ``_send_probes``,
  ``_publish``, ``_withdraw``, ``_tunnel_source``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from weft.errors import WeftError
from weft.fastdp.errors import DatapathError
from weft.fastdp.esp_links import EspLink, EspLinks
from weft.fastdp.fdb import normalize_mac
from weft.fastdp.heartbeat import HealthChanged, HeartbeatConfig, HeartbeatState
from weft.fastdp.link import FastPathLink
from weft.fastdp.vxlan import VXLAN_PORT
from weft.gossip.peer import PeerName
from weft.overlay import OverlayConnectionParams

__all__ = [
    "FEATURE_ESP",
    "FastPartBase",
    "LinkHandle",
    "flush_learned",
    "health_text",
    "local_bridge_macs",
    "mac_locations",
    "point_bridge_macs",
    "source_address",
]

log = logging.getLogger("weft.fastdp")

NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_MASTER = 0x04
NTF_STICKY = 0x40
FEATURE_ESP = "fastdp_esp"  # 1: our fast paths run over ESP (a password is set)


def health_text(state: HeartbeatState, reason: str) -> str:
    """The heartbeat reason as a connection shows it: an unhealthy one names the likely causes."""
    if state == HeartbeatState.UNHEALTHY and "blocked" not in reason and "MTU" not in reason:
        return f"{reason} (UDP {VXLAN_PORT} blocked or path MTU too small?)"
    return reason


def source_address(remote_ip: str, port: int = VXLAN_PORT) -> str | None:
    """Our address on the route to ``remote_ip`` (None when there is none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((remote_ip, port))
            return str(probe.getsockname()[0])
    except OSError:
        return None


# -- the bridge (worker thread) ------------------------------------------------------------------


def local_bridge_macs(ipr: Any, bridge: str, exclude: set[str]) -> set[str]:
    """MACs on ``bridge`` that are ours to announce: learned on ports other than ``exclude``
    (the TAP and the tunnel's port), plus the bridge's own (the host's exposed address)."""
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


def point_bridge_macs(
    ipr: Any, bridge: str, port: str, installed: set[str], desired: frozenset[str]
) -> bool:
    """Exactly ``desired`` get static, sticky entries on ``bridge`` towards ``port``.
    ``installed`` (what earlier calls installed) is updated in place. False, and nothing done,
    when the bridge or the port does not exist; DatapathError when an entry cannot be made."""
    bridge_index = ipr.link_lookup(ifname=bridge)
    port_index = ipr.link_lookup(ifname=port)
    if not bridge_index or not port_index:
        return False
    for mac in sorted(installed - desired):
        try:
            ipr.fdb(
                "del", ifindex=port_index[0], lladdr=mac, master=bridge_index[0], flags=NTF_MASTER
            )
        except Exception:  # already gone (e.g. with the port)
            log.debug("removing bridge entry %s failed", mac, exc_info=True)
        installed.discard(mac)
    for mac in sorted(desired - installed):
        try:
            ipr.fdb(
                "replace",
                ifindex=port_index[0],
                lladdr=mac,
                master=bridge_index[0],
                flags=NTF_MASTER | NTF_STICKY,
                state=NUD_NOARP,  # static: forwarded, never aged, not local
            )
        except Exception as err:
            raise DatapathError(f"point bridge entry {mac} at {port}", str(err)) from err
        installed.add(mac)
    return True


# -- the links on the loop ---------------------------------------------------------------------


@dataclass
class LinkHandle:
    """One connection's path on a fast part, as the switch holds it."""

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


H = TypeVar("H", bound=LinkHandle)


class FastPartBase(Generic[H]):
    """The loop side every fast part shares (create inside the running loop). Subclasses set
    ``name``, ``part_id``, ``handle_type``, ``log_label``, ``feature_keys`` and
    ``datapath_label`` and implement the hooks below."""

    name: str
    part_id: int
    handle_type: type[H]  # the part's LinkHandle
    log_label = "fast-path"  # how log lines name the part
    # The hello features saying we run the datapath, its UDP port and its VNI; how reasons
    # name the datapath.
    feature_keys: tuple[str, str, str]
    datapath_label: str

    def __init__(
        self,
        *,
        bridge: str,
        tap: str | None,
        heartbeat: HeartbeatConfig | None,
        on_local_macs: Callable[[frozenset[str]], None],
        esp: EspLinks | None,
        clock: Callable[[], float] | None = None,
        call_at: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.bridge = bridge
        self.tap = tap
        self.heartbeat = heartbeat or HeartbeatConfig()
        self.on_local_macs = on_local_macs
        # With ESP every link is encrypted (see weft.fastdp.esp_links).
        self.esp = esp
        self.encrypted = esp is not None
        self._clock = clock or self.loop.time
        self._call_at = call_at or self.loop.call_at
        self.links: dict[PeerName, H] = {}
        self.local_name: PeerName | None = None
        self.mtu: int | None = None
        self.problem = ""  # non-empty: the part cannot run here (why)
        self.local_macs: frozenset[str] = frozenset()
        self._timer: Any = None
        self._closed = False

    # -- what we offer ---------------------------------------------------------------------------

    def features(self) -> dict[str, Any]:
        has, port_key, vni_key = self.feature_keys
        port, vni = self._port_vni()
        out: dict[str, Any] = {has: 1, port_key: port, vni_key: vni}
        if self.encrypted:
            out[FEATURE_ESP] = 1
        return out

    def peer_compatible(self, remote_features: Mapping[str, Any]) -> str:
        """ "" when the peer runs the datapath on our port and VNI (with ESP when we do), else
        why not."""
        has, port_key, vni_key = self.feature_keys
        name, label = self.name, self.datapath_label
        if remote_features.get(has) != 1:
            return f"{name}: the peer has no {label} datapath"
        port, vni = remote_features.get(port_key), remote_features.get(vni_key)
        our_port, our_vni = self._port_vni()
        if port != our_port or vni != our_vni:
            return (
                f"{name}: the peer uses UDP {port} VNI {vni}, we use UDP {our_port} VNI {our_vni}"
            )
        if self.encrypted and remote_features.get(FEATURE_ESP) != 1:
            return f"{name}: the peer's {label} datapath has no ESP"
        return ""

    # -- hooks -----------------------------------------------------------------------------------

    def _port_vni(self) -> tuple[int, int]:
        """The UDP port and VNI our tunnel uses (what peers must match)."""
        raise NotImplementedError

    def ensure_started(self, local_name: PeerName, remote_ip: str) -> bool:
        raise NotImplementedError

    def _accepts(self, params: OverlayConnectionParams, on_failed: Callable[[str], None]) -> bool:
        """Whether this connection may have a link here (else ``on_failed`` was told why)."""
        return True

    def _handle_made(self, handle: H, params: OverlayConnectionParams) -> None:
        """A new link's handle, before it joins ``links``: fill in the part's own fields."""

    def _tunnel_source(self) -> str | None:
        """Our underlay address (known once started)."""
        raise NotImplementedError

    def _link_added(self, handle: H) -> None:
        """A link is in ``links`` (its ESP, if any, started): tell the kernel side."""
        raise NotImplementedError

    def _link_removed(self, handle: H) -> None:
        """A link left ``links``: tell the kernel side."""
        raise NotImplementedError

    def _carrying_changed(self, handle: H) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """Queue: the bridge forgets what it learned on the tunnel's port and the TAP."""
        raise NotImplementedError

    def _macs_changed(self, locations: dict[str, PeerName]) -> None:
        """Queue: the peers' MACs (``MAC -> peer``) for the datapath."""
        raise NotImplementedError

    def _point_macs(self, desired: frozenset[str]) -> None:
        """Queue: exactly ``desired`` get static bridge entries towards the tunnel."""
        raise NotImplementedError

    def _send_probes(self, link: FastPathLink, probes: list[tuple[int, int]]) -> None:
        """Send heartbeat probes ``(seq, size)`` through the tunnel."""
        raise NotImplementedError

    def _publish(self, handle: H) -> None:
        """*Worker*, right after the peer's SAs and policies are installed."""
        raise NotImplementedError

    def _withdraw(self, remote: PeerName) -> Callable[[], None]:
        """*Worker* job, before the peer's ESP goes or is replaced."""
        raise NotImplementedError

    # -- per connection --------------------------------------------------------------------------

    def start_link(
        self,
        params: OverlayConnectionParams,
        send_control: Callable[[bytes], None],
        on_health: Callable[[bool, str], None],
        on_failed: Callable[[str], None],
    ) -> H | None:
        """Start probing the peer through the tunnel (after ESP is installed, when encrypted);
        None when the part cannot run here."""
        if not self.ensure_started(params.local_name, params.remote_ip) or self.mtu is None:
            return None
        if not self._accepts(params, on_failed):
            return None
        remote = params.remote_name
        old = self.links.pop(remote, None)
        if old is not None:
            old.stopped = True
        now = self._clock()
        link = FastPathLink(
            params.local_name, remote, self.mtu, self.encrypted, now, self.heartbeat
        )
        handle = self.handle_type(
            remote, params.remote_ip, link, send_control, on_health, on_failed
        )
        self._handle_made(handle, params)
        self.links[remote] = handle
        if self.esp is not None:
            local_ip = self._tunnel_source()
            assert local_ip is not None  # ensure_started refuses ESP without it
            handle.esp = self.esp.link_started(
                remote, local_ip, params.remote_ip, params.data_send_key, params.data_recv_key
            )  # the kernel hears of the peer once ESP is installed (_publish)
        self._link_added(handle)
        self._process(handle)
        if old is not None and old.esp is not None and self.esp is not None:
            # after the new link's first job took its guard reference: the peer's plaintext
            # stays dropped throughout
            self.esp.link_stopped(old.esp, self._withdraw(remote))
        return handle

    def control_received(self, handle: H, payload: bytes) -> None:
        if handle.stopped:
            return
        handle.link.control_received(payload, self._clock())  # raises RemoteProtocolError
        self._process(handle)

    def set_carrying(self, handle: H, carrying: bool) -> None:
        if handle.stopped or handle.carrying == carrying:
            return
        handle.carrying = carrying
        self._carrying_changed(handle)
        self._flush()
        self._sync_bridge()

    def peer_macs(self, handle: H, macs: frozenset[str]) -> None:
        if handle.stopped or handle.macs == macs:
            return
        handle.macs = macs
        self._push_macs()
        self._sync_bridge()

    def stop_link(self, handle: H) -> None:
        if handle.stopped:
            return
        handle.stopped = True
        if self.links.get(handle.remote) is handle:
            del self.links[handle.remote]
            self._link_removed(handle)
            self._push_macs()
            if handle.carrying:
                self._flush()
                self._sync_bridge()
        if handle.esp is not None and self.esp is not None:
            self.esp.link_stopped(handle.esp, self._withdraw(handle.remote))
        self._arm()

    def links_status(self) -> dict[str, Any]:
        """The links as ``status()`` shows them."""
        return {
            str(h.remote): {
                "ip": h.ip,
                "state": h.link.state.value,
                "reason": h.link.reason,
                "carrying": h.carrying,
                "macs": len(h.macs),
            }
            for h in self.links.values()
        }

    # -- MACs ------------------------------------------------------------------------------------

    def _push_macs(self) -> None:
        self._macs_changed(mac_locations(self.links.values()))

    def _sync_bridge(self) -> None:
        """Static bridge entries ``MAC -> tunnel port`` for every MAC of a carried peer."""
        local = self.local_macs
        desired = frozenset(
            mac
            for h in self.links.values()
            if h.carrying
            for mac in h.macs
            if mac not in local  # a container that moved here is ours now
        )
        self._point_macs(desired)

    def _local_macs_found(self, macs: frozenset[str]) -> None:
        """The bridge's MACs as last polled: announce and re-point when they changed."""
        if macs != self.local_macs:
            self.local_macs = macs
            self.on_local_macs(macs)
            self._sync_bridge()

    # -- heartbeats on the loop ------------------------------------------------------------------

    def _process(self, handle: H) -> None:
        link = handle.link
        for message in link.control_to_send():
            try:
                handle.send_control(message)
            except Exception:  # the control connection is closing; stop_link follows
                log.debug("%s control to %s failed", self.log_label, handle.remote, exc_info=True)
        self._send_probes(link, list(link.probes_to_send()))
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
                    log.exception("%s health callback failed for %s", self.log_label, handle.remote)
        self._arm()

    def _resume(self, handle: H) -> None:
        if not handle.stopped and not self._closed:
            self._process(handle)

    def _esp_failed(self, handle: H, reason: str) -> None:
        if self.esp is not None and self.esp.fatal and not self.problem:
            self.problem = self.esp.fatal  # the kernel cannot: new connections stay on sleeve
        if not handle.stopped:
            handle.on_failed(reason)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadlines = [t for h in self.links.values() if (t := h.link.get_timer()) is not None]
        if deadlines and not self._closed:
            self._timer = self._call_at(min(deadlines), self.handle_timer)

    def handle_timer(self) -> None:
        """Heartbeat timers that are due (the loop's timer; tests call it after stepping)."""
        self._timer = None
        now = self._clock()
        for handle in list(self.links.values()):
            timer = handle.link.get_timer()
            if timer is not None and timer <= now + 0.001:  # asyncio may fire a hair early
                handle.link.handle_timer(now)
                self._process(handle)
        self._arm()


def mac_locations(handles: Iterable[LinkHandle]) -> dict[str, PeerName]:
    """``MAC -> peer`` for every valid MAC the links' peers announced."""
    locations: dict[str, PeerName] = {}
    for handle in handles:
        for mac in handle.macs:
            try:
                locations[normalize_mac(mac)] = handle.remote
            except WeftError:
                continue
    return locations
