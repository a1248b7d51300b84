"""The overlay switch: the sleeve and the kernel VXLAN datapath behind one ``Overlay``.

``make_overlay(config)`` (for ``weft.router.daemon.OVERLAY_FACTORIES``) builds the sleeve
(weft.router.sleeve, always: it is every connection's fallback and owns the bridge and the TAP),
probes the kernel once (weft.fastdp.capabilities) and, where vxlan links can be created, adds the
VXLAN datapath (weft.router.fastpath_overlay.VxlanPart). ``--datapath``: ``auto`` = the best
healthy datapath per connection (ovs, vxlan, sleeve); ``vxlan`` = vxlan only, no fallback;
``sleeve`` = sleeve only.

Per connection (:class:`SwitchConnection`): every datapath both ends support starts at once; the
decision is :class:`weft.router.switch_core.PathSwitch` (pure, tested with a stepped clock).
Overlay-control messages travel in the envelope documented in switch_core.py (part 0 sleeve,
1 vxlan, 2 switch) when both ends advertise ``overlay_switch``; with a plain-sleeve peer they are
bare sleeve messages.

Hello features added: ``overlay_switch`` 1; with vxlan running: ``fastdp_vxlan`` 1,
``fastdp_vxlan_port`` (6784), ``fastdp_vni``.

MTU. Containers keep one MTU whichever datapath carries their traffic (a connection may change
datapath at any time and a container cannot follow): the bridge's, 1376 by default (``WEFT_MTU``).
The vxlan device gets ``underlay MTU - 50`` (1450 on 1500) and its heartbeats prove that size,
so a healthy vxlan path carries every container frame. When the vxlan MTU is below the
containers' (an underlay under 1426) vxlan is not used: "vxlan: overlay MTU N below the container
MTU M". The status ``mtu`` of a connection is the chosen path's.

Encryption. With a password every connection is encrypted. Fast paths then need kernel ESP
(weft.fastdp.esp); the ESP wiring is not in the switch yet, so with a password the vxlan device
is never created (a stale one from an earlier router is deleted) and connections say
"encrypted: kernel has no ESP; using sleeve" (or "... ESP fast path not wired yet") — no
unencrypted VXLAN can leave.

Knobs not in RouterConfig (environment, read by ``make_overlay``):
``WEFT_FASTDP_HEARTBEAT`` = ``interval,healthy_interval,timeout`` seconds (default ``1,5,15``:
probe every second until healthy, every 5 s after, 15 s without an answer = fall back);
``WEFT_FASTDP_RECOVERY_HOLD`` = seconds a recovered fast path must stay healthy before it carries
again (default 3). Tests use e.g. ``0.2,0.5,2`` and ``0.5``.

Metrics: each fallback (a move to a worse datapath) calls the callbacks given to
``overlay.on_fallback(cb)`` with ``(from, to)``: feed ``Metrics.fallback`` from it; the counts are
also in ``/status`` ``overlay.switch.fallbacks``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from weft.errors import ConfigError
from weft.fastdp.capabilities import Capabilities
from weft.fastdp.heartbeat import HeartbeatConfig
from weft.fastdp.vxlan import VxlanConfig
from weft.gossip.peer import PeerName
from weft.router.fastpath_overlay import VxlanLinkHandle, VxlanPart
from weft.router.overlay import (
    Overlay,
    OverlayConnection,
    OverlayConnectionParams,
    OverlayConnectionStatus,
    RoutesView,
)
from weft.router.switch_core import (
    PART_SLEEVE,
    PART_SWITCH,
    PART_VXLAN,
    SLEEVE,
    MacsAnnounced,
    PathState,
    PathSwitch,
    SwitchConfig,
    decode_switch_message,
    encode_macs,
    encode_path_state,
    split_envelope,
    wrap,
)

__all__ = ["SwitchConnection", "SwitchOverlay", "heartbeat_from_env", "make_overlay"]

log = logging.getLogger("weft.switch")

FEATURE_SWITCH = "overlay_switch"
FEATURE_VXLAN = "fastdp_vxlan"
FEATURE_VXLAN_PORT = "fastdp_vxlan_port"
FEATURE_VNI = "fastdp_vni"
MODES = ("auto", "vxlan", "sleeve")


class _SleeveRoutes:
    """The routes the sleeve forwards along, minus what the tunnel already carries: a broadcast
    (or unknown unicast) we originate reaches peers whose connection vxlan carries through the
    vxlan device's flood entries, so the sleeve leaves them out -- unless they relay it further
    (a partial mesh), where a duplicate at that peer beats a peer never reached."""

    def __init__(self, overlay: SwitchOverlay, inner: RoutesView) -> None:
        self._overlay = overlay
        self.inner = inner
        self.skip: frozenset[PeerName] = frozenset()

    def recompute(self) -> None:
        carried = self._overlay.carried_by_fast_path()
        relays: set[PeerName] = set()
        table = getattr(self.inner, "unicast_table", None)
        if carried and callable(table):
            relays = {hop for dst, hop in table().items() if dst != hop}
        self.skip = frozenset(carried - relays)

    def unicast_next_hop(self, dst: PeerName) -> PeerName | None:
        return self.inner.unicast_next_hop(dst)

    def broadcast_next_hops(self, src: PeerName) -> list[PeerName]:
        hops = self.inner.broadcast_next_hops(src)
        skip = self.skip
        if skip and src == self._overlay.local_name:
            return [h for h in hops if h not in skip]
        return hops


class SwitchConnection:
    """One control connection's data paths (implements ``OverlayConnection``)."""

    def __init__(self, overlay: SwitchOverlay, params: OverlayConnectionParams) -> None:
        self.overlay = overlay
        self.params = params
        self.remote = params.remote_name
        self.stopped = False
        self.established = False
        features = params.remote_features
        self.envelope = features.get(FEATURE_SWITCH) == 1
        self.encrypted = params.data_send_key is not None
        loop = overlay.loop
        now = loop.time()
        self._timer: Any = None
        candidates, notes, unavailable = overlay.candidates_for(params)
        self.switch = PathSwitch(candidates, now, overlay.switch_config)
        for note in notes:
            self.switch.note(note)
        self.sleeve: OverlayConnection | None = None
        self.vx: VxlanLinkHandle | None = None
        if unavailable:
            self.switch.unavailable(candidates[0], unavailable, now)
        if SLEEVE in candidates and overlay.sleeve is not None:
            sleeve_params = OverlayConnectionParams(
                local_name=params.local_name,
                remote_name=params.remote_name,
                remote_short_id=params.remote_short_id,
                remote_ip=params.remote_ip,
                outbound=params.outbound,
                data_send_key=params.data_send_key,
                data_recv_key=params.data_recv_key,
                remote_features=params.remote_features,
                send_control=self._send_sleeve,
                on_established=self._sleeve_changed,
                on_status_changed=self._sleeve_changed,
            )
            self.sleeve = overlay.sleeve.prepare_connection(sleeve_params)
        if "vxlan" in candidates and not unavailable and overlay.vxlan is not None:
            self.vx = overlay.vxlan.start_link(
                params.local_name,
                params.remote_name,
                params.remote_ip,
                self._send_vxlan,
                self._vxlan_health,
            )
            if self.vx is None:
                self.switch.unavailable("vxlan", overlay.vxlan.problem, now)
            else:
                self.switch.path_state("vxlan", False, self.vx.link.reason, now)  # "waiting..."
                self._send_switch(encode_macs(sorted(overlay.vxlan.local_macs)))
        self._sleeve_changed()

    # -- OverlayConnection ----------------------------------------------------------------------

    def control_received(self, payload: bytes) -> None:
        if self.stopped:
            return
        if not self.envelope:
            if self.sleeve is not None:
                self.sleeve.control_received(payload)
            return
        part, body = split_envelope(payload)
        if part == PART_SLEEVE:
            if self.sleeve is not None:
                self.sleeve.control_received(body)
        elif part == PART_VXLAN:
            if self.vx is not None and self.overlay.vxlan is not None:
                self.overlay.vxlan.control_received(self.vx, body)
        else:
            message = decode_switch_message(body)
            if isinstance(message, PathState):
                self.switch.peer_state(message.datapath, message.healthy, self.overlay.loop.time())
                self._after()
            elif (
                isinstance(message, MacsAnnounced)
                and self.vx is not None
                and self.overlay.vxlan is not None
            ):
                self.overlay.vxlan.peer_macs(self.vx, message.macs)

    def status(self) -> OverlayConnectionStatus:
        chosen = self.switch.chosen or SLEEVE
        info = self.switch.info
        if chosen == SLEEVE:
            if self.sleeve is None:
                return OverlayConnectionStatus(SLEEVE, "failed", None, info or "no sleeve")
            s = self.sleeve.status()
            return OverlayConnectionStatus(SLEEVE, s.state, s.mtu, info or s.info, s.encrypted)
        vxlan = self.overlay.vxlan
        if self.switch.carrying:
            state = "established"
        elif self.vx is not None and self.vx.link.state.value == "pending":
            state = "pending"
        else:
            state = "failed"
        return OverlayConnectionStatus(
            chosen, state, vxlan.mtu if vxlan is not None else None, info, False
        )

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sleeve is not None:
            self.sleeve.stop()
        if self.vx is not None and self.overlay.vxlan is not None:
            self.overlay.vxlan.stop_link(self.vx)
        self.overlay.connection_stopped(self)

    # -- inside ---------------------------------------------------------------------------------

    @property
    def carried_by_fast_path(self) -> bool:
        return self.switch.chosen not in (None, SLEEVE) and self.switch.carrying

    def _send(self, part: int, payload: bytes) -> None:
        if self.stopped:
            return
        self.params.send_control(wrap(part, payload) if self.envelope else payload)

    def _send_sleeve(self, payload: bytes) -> None:
        self._send(PART_SLEEVE, payload)

    def _send_vxlan(self, payload: bytes) -> None:
        if self.envelope:
            self._send(PART_VXLAN, payload)

    def _send_switch(self, payload: bytes) -> None:
        if self.envelope:
            self._send(PART_SWITCH, payload)

    def send_macs(self, macs: frozenset[str]) -> None:
        if self.vx is not None:
            self._send_switch(encode_macs(sorted(macs)))

    def _sleeve_changed(self) -> None:
        if self.stopped:
            return
        sleeve = getattr(self, "sleeve", None)  # the sleeve may call back from its constructor
        if sleeve is not None:
            s = sleeve.status()
            ok = s.state == "established"
            if ok != self.switch.healthy(SLEEVE) or not ok:
                reason = s.info if not ok else ""
                self.switch.path_state(SLEEVE, ok, reason or s.state, self.overlay.loop.time())
        self._after()

    def _vxlan_health(self, healthy: bool, reason: str) -> None:
        if self.stopped:
            return
        self.switch.path_state("vxlan", healthy, reason, self.overlay.loop.time())
        self._send_switch(encode_path_state("vxlan", healthy))
        self._after()

    def _after(self) -> None:
        """Act on the switch's decisions: FDB, sleeve routes, metrics, the router's callbacks."""
        if self.stopped:
            return
        changed = False
        while (event := self.switch.next_event()) is not None:
            changed = True
            if self.vx is not None and self.overlay.vxlan is not None:
                self.overlay.vxlan.set_carrying(self.vx, event.new == "vxlan")
            if event.old is None:
                continue
            log.info(
                "connection to %s: %s -> %s%s",
                self.remote,
                event.old,
                event.new,
                f" ({event.reason})" if event.reason else "",
            )
            if self.switch_worse(event.old, event.new):
                self.overlay.fallback(event.old, event.new)
        if changed:
            self.overlay.carriers_changed()
        if self.switch.carrying and not self.established:
            self.established = True
            self.params.on_established()
        self.params.on_status_changed()
        self._arm()

    def switch_worse(self, old: str, new: str) -> bool:
        order = ["ovs", "vxlan", SLEEVE]
        return order.index(new) > order.index(old)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.switch.get_timer()
        if deadline is not None and not self.stopped:
            self._timer = self.overlay.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.switch.handle_timer(self.overlay.loop.time() + 0.001)
        self._after()


class SwitchOverlay:
    """The router's data plane: sleeve plus, where the kernel allows, vxlan (``Overlay``)."""

    def __init__(
        self,
        sleeve: Overlay | None,
        vxlan: VxlanPart | None,
        *,
        mode: str = "auto",
        vxlan_note: str = "",
        capabilities: Capabilities | None = None,
        switch_config: SwitchConfig | None = None,
        container_mtu: int | None = None,
    ) -> None:
        import asyncio

        if mode not in MODES:
            raise ConfigError(f"--datapath {mode!r}: expected one of {', '.join(MODES)}")
        self.loop = asyncio.get_running_loop()
        self.sleeve = sleeve
        self.vxlan = vxlan
        self.mode = mode
        self.vxlan_note = vxlan_note
        self.capabilities = capabilities
        self.switch_config = switch_config or SwitchConfig()
        self.container_mtu = container_mtu
        self.local_name: PeerName | None = None
        self.conns: dict[PeerName, SwitchConnection] = {}
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self._fallback_callbacks: list[Callable[[str, str], None]] = []
        self._routes: _SleeveRoutes | None = None
        if vxlan is not None:
            vxlan.on_local_macs = self._local_macs

    # -- Overlay --------------------------------------------------------------------------------

    def features(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.sleeve.features()) if self.sleeve is not None else {}
        out[FEATURE_SWITCH] = 1
        if self.vxlan is not None and not self.vxlan.problem:
            out[FEATURE_VXLAN] = 1
            out[FEATURE_VXLAN_PORT] = self.vxlan.device_config.port
            out[FEATURE_VNI] = self.vxlan.device_config.vni
        return out

    def prepare_connection(self, params: OverlayConnectionParams) -> OverlayConnection:
        self.local_name = params.local_name
        # A connection that replaces one to the same peer takes over; the router stops the old
        # one, and every part ignores a stop of what is no longer current.
        conn = SwitchConnection(self, params)
        self.conns[params.remote_name] = conn
        return conn

    def routes_changed(self, routes: RoutesView) -> None:
        self._routes = _SleeveRoutes(self, routes)
        self._routes.recompute()
        if self.sleeve is not None:
            self.sleeve.routes_changed(self._routes)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.sleeve.status()) if self.sleeve is not None else {}
        out["datapath"] = self.mode
        switch: dict[str, Any] = {
            "datapaths": ([] if self.vxlan is None else ["vxlan"]) + [SLEEVE],
            "vxlan_note": self.vxlan_note,
            "vxlan": self.vxlan.status() if self.vxlan is not None else None,
            "capabilities": self.capabilities.status() if self.capabilities else None,
            "container_mtu": self.container_mtu,
            "fallbacks": {f"{a}->{b}": n for (a, b), n in sorted(self.fallbacks.items())},
            "connections": {str(p): c.switch.status() for p, c in self.conns.items()},
        }
        out["switch"] = switch
        return out

    def setup_routes(self, app: web.Application, allocate: Any = None, release: Any = None) -> None:
        """The bridge API (via the sleeve, which owns the bridge); IPAM hooks passed through."""
        hook = getattr(self.sleeve, "setup_routes", None)
        if callable(hook):
            hook(app, allocate, release)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.stop()
        if self.vxlan is not None:
            self.vxlan.close()
        closer = getattr(self.sleeve, "close", None)
        if callable(closer):
            closer()

    # -- for connections and the daemon ----------------------------------------------------------

    def on_fallback(self, callback: Callable[[str, str], None]) -> None:
        """``callback(from, to)`` on every move to a worse datapath (``Metrics.fallback``)."""
        self._fallback_callbacks.append(callback)

    def fallback(self, old: str, new: str) -> None:
        self.fallbacks[(old, new)] += 1
        for callback in list(self._fallback_callbacks):
            try:
                callback(old, new)
            except Exception:
                log.exception("fallback callback failed")

    def candidates_for(self, params: OverlayConnectionParams) -> tuple[list[str], list[str], str]:
        """``(candidates, notes, unavailable)`` for a new connection: the datapaths it starts
        (best first), why better ones are not started, and (forced vxlan only) why the single
        candidate can never carry."""
        features = params.remote_features
        encrypted = params.data_send_key is not None
        why_not = ""
        if self.vxlan is not None and not encrypted:
            self.vxlan.ensure_started(params.local_name, params.remote_ip)  # once: the MTU
        if self.vxlan is None:
            why_not = self.vxlan_note or "vxlan: not available"
        elif self.vxlan.problem:
            why_not = self.vxlan.problem
        elif encrypted:
            why_not = "encrypted: kernel has no ESP"  # never reached: no VxlanPart with a password
        elif features.get(FEATURE_VXLAN) != 1 or features.get(FEATURE_SWITCH) != 1:
            why_not = "vxlan: the peer has no vxlan datapath"
        elif (
            features.get(FEATURE_VXLAN_PORT) != self.vxlan.device_config.port
            or features.get(FEATURE_VNI) != self.vxlan.device_config.vni
        ):
            why_not = (
                f"vxlan: the peer uses UDP {features.get(FEATURE_VXLAN_PORT)} VNI "
                f"{features.get(FEATURE_VNI)}, we use UDP {self.vxlan.device_config.port} VNI "
                f"{self.vxlan.device_config.vni}"
            )
        elif (
            self.container_mtu is not None
            and self.vxlan.mtu is not None
            and self.vxlan.mtu < self.container_mtu
        ):
            why_not = (
                f"vxlan: overlay MTU {self.vxlan.mtu} below the container MTU {self.container_mtu}"
            )
        if self.mode == "vxlan":
            return ["vxlan"], [], why_not
        if self.mode == SLEEVE or why_not:
            return [SLEEVE], [why_not] if why_not and self.mode != SLEEVE else [], ""
        return ["vxlan", SLEEVE], [], ""

    def connection_stopped(self, conn: SwitchConnection) -> None:
        if self.conns.get(conn.remote) is conn:
            del self.conns[conn.remote]
            self.carriers_changed()

    def carried_by_fast_path(self) -> set[PeerName]:
        return {p for p, c in self.conns.items() if c.carried_by_fast_path}

    def carriers_changed(self) -> None:
        if self._routes is not None:
            self._routes.recompute()

    def _local_macs(self, macs: frozenset[str]) -> None:
        for conn in list(self.conns.values()):
            try:
                conn.send_macs(macs)
            except Exception:
                log.debug("MAC announcement to %s failed", conn.remote, exc_info=True)


def heartbeat_from_env() -> tuple[HeartbeatConfig, SwitchConfig]:
    """``WEFT_FASTDP_HEARTBEAT`` and ``WEFT_FASTDP_RECOVERY_HOLD`` (see the module docstring)."""
    text = os.environ.get("WEFT_FASTDP_HEARTBEAT", "")
    hb = HeartbeatConfig()
    if text:
        try:
            interval, healthy, timeout = (float(x) for x in text.split(","))
        except ValueError:
            raise ConfigError(
                f"WEFT_FASTDP_HEARTBEAT={text!r}: expected interval,healthy_interval,timeout"
            ) from None
        hb = HeartbeatConfig(interval=interval, healthy_interval=healthy, timeout=timeout)
    hold_text = os.environ.get("WEFT_FASTDP_RECOVERY_HOLD", "")
    try:
        hold = float(hold_text) if hold_text else SwitchConfig().recovery_hold
    except ValueError:
        raise ConfigError(f"WEFT_FASTDP_RECOVERY_HOLD={hold_text!r} is not a number") from None
    return hb, SwitchConfig(recovery_hold=hold)


def _remove_stale_vxlan(device: VxlanConfig) -> None:
    from pyroute2 import IPRoute

    from weft.fastdp.vxlan import VxlanDevice

    with IPRoute() as ipr:
        VxlanDevice(ipr, device).remove_stale()


def make_overlay(config: Any) -> SwitchOverlay:
    """The router's data plane from its ``RouterConfig`` (inside the running loop).

    ``config.datapath``: ``auto`` (also what ``none``-less callers mean), ``vxlan``, ``sleeve``.
    The sleeve is built by ``weft.router.sleeve.make_overlay`` (its errors propagate: the
    daemon decides whether they are fatal); the kernel is probed once, here.
    """
    from weft.fastdp.capabilities import probe_capabilities
    from weft.router import sleeve as sleeve_module

    mode = str(getattr(config, "datapath", "auto") or "auto")
    if mode == "ovs":
        raise ConfigError("--datapath ovs: the OVS datapath is not wired into the switch yet")
    if mode not in MODES:
        raise ConfigError(f"--datapath {mode!r}: expected one of {', '.join(MODES)}")
    heartbeat, switch_config = heartbeat_from_env()
    sleeve = sleeve_module.make_overlay(config)
    try:
        bridge = sleeve.bridge.name
        container_mtu = sleeve.bridge.mtu
        tap = sleeve.tap.name if sleeve.tap is not None else None
        device = VxlanConfig(bridge=bridge)
        caps: Capabilities | None = None
        vxlan: VxlanPart | None = None
        note = ""
        encrypted = getattr(config, "password", None) is not None
        if mode == SLEEVE:
            note = "vxlan: not used (--datapath sleeve)"
        else:
            with ThreadPoolExecutor(1) as pool:  # pyroute2's sync API: not on the loop's thread
                caps = pool.submit(probe_capabilities).result(timeout=60)
                if encrypted:
                    # Nothing may leave unencrypted: a vxlan device left by an earlier router
                    # (enslaved to our bridge, with its FDB) goes before any container traffic.
                    # If that fails, the router must not run.
                    pool.submit(_remove_stale_vxlan, device).result(timeout=60)
            if not caps.vxlan.available:
                note = f"vxlan: {caps.vxlan.detail}"
            elif encrypted and not caps.esp.available:
                note = "encrypted: kernel has no ESP"
            elif encrypted:
                note = "encrypted: the ESP fast path is not wired into the switch yet"
            else:
                try:
                    vxlan = VxlanPart(bridge=bridge, tap=tap, heartbeat=heartbeat, device=device)
                except Exception as err:  # the sleeve still runs; say why there is no vxlan
                    log.exception("vxlan datapath unavailable")
                    note = f"vxlan: {type(err).__name__}: {err}"
        if mode == "vxlan" and vxlan is None:
            raise ConfigError(note)  # the daemon says "--datapath vxlan is not available here"
        log.info(
            "datapaths: %s%s", "vxlan, sleeve" if vxlan else "sleeve", f" ({note})" * bool(note)
        )
        return SwitchOverlay(
            sleeve,
            vxlan,
            mode=mode,
            vxlan_note=note,
            capabilities=caps,
            switch_config=switch_config,
            container_mtu=container_mtu,
        )
    except BaseException:
        sleeve.close()
        raise
