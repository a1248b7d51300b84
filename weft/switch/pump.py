"""The overlay switch: the sleeve and the kernel fast datapaths behind one ``Overlay``.

``make_overlay(config)`` (for ``weft.router.daemon.OVERLAY_FACTORIES``) builds the sleeve
(weft.sleeve.pump, always: it is every connection's fallback and owns the bridge and the TAP),
probes the kernel once (weft.fastdp.capabilities) and builds the fast parts
(:func:`_build_fast_parts`; each a :class:`weft.fastdp.part.FastPart`, best first: the OVS
datapath ``weft.fastdp.ovs_part`` where openvswitch is available, else the Linux VXLAN datapath
weft.fastdp.vxlan_part.VxlanPart). ``--datapath``: ``auto`` = the best healthy datapath
per connection (ovs, vxlan, sleeve); ``ovs`` / ``vxlan`` = that one only, no fallback (a
ConfigError when it cannot run here); ``sleeve`` = sleeve only.

Per connection (:class:`SwitchConnection`): every datapath both ends support starts at once; the
decision is :class:`weft.switch.core.PathSwitch` (pure, tested with a stepped clock).
Overlay-control messages travel in the envelope documented in switch_core.py (part 0 sleeve,
1 vxlan, 2 switch, 3 ovs) when both ends advertise ``overlay_switch``; with a plain-sleeve peer
they are bare sleeve messages.

Hello features added: ``overlay_switch`` 1, plus each running fast part's ``features()``
(vxlan: ``fastdp_vxlan`` 1, ``fastdp_vxlan_port`` (6784), ``fastdp_vni``).

MTU. Containers keep one MTU whichever datapath carries their traffic (a connection may change
datapath at any time and a container cannot follow): the bridge's, 1376 by default (``WEFT_MTU``).
The vxlan device gets ``underlay MTU - 50`` (1450 on 1500) and its heartbeats prove that size,
so a healthy vxlan path carries every container frame. When the vxlan MTU is below the
containers' (an underlay under 1426) vxlan is not used: "vxlan: overlay MTU N below the container
MTU M". The status ``mtu`` of a connection is the chosen path's.

Encryption. With a password every connection is encrypted, and a fast path must be too: where
the kernel has ESP (``caps.esp``), the vxlan part runs every link over IPsec ESP in transport
mode (weft.fastdp.esp_links with weft.fastdp.esp: kernel-chosen SPIs exchanged over the control
connection, keys from the connection's data keys, an nftables guard dropping plain VXLAN from
encrypted peers); a peer gets FDB entries only after its SAs and policies are in, and heartbeats
start only then, so nothing leaves unencrypted and a path is healthy only through ESP. The
overlay MTU leaves room for ESP (underlay - 90: 1410). Such a connection shows ``encrypted``
true and "ESP rfc4106(gcm(aes))" in its info. Where the kernel has no ESP no fast part is built
(a stale ``vxlan-weft`` from an earlier router is deleted at start) and connections say
"encrypted: kernel has no ESP; using sleeve". An ESP error on one connection leaves it on sleeve
with the reason (not retried); a kernel that turns out to lack ESP stops the fast path for new
connections.

Knobs not in RouterConfig (environment, read by ``make_overlay``):
``WEFT_FASTDP_HEARTBEAT`` = ``interval,healthy_interval,timeout`` seconds (default ``1,1,3``:
probe every second, 3 s without an answer = silent, fall back; back after two answers in a row);
``WEFT_FASTDP_RECOVERY_HOLD`` = seconds a recovered fast path must stay healthy before it carries
again (default 3). Tests use e.g. ``0.2,0.5,2`` and ``0.5``.

Metrics: each fallback (a move to a worse datapath) calls the callbacks given to
``overlay.on_fallback(cb)`` with ``(from, to)``: feed ``Metrics.fallback`` from it; the counts are
also in ``/status`` ``overlay.switch.fallbacks``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from aiohttp import web

from weft.errors import ConfigError
from weft.fastdp.capabilities import Capabilities
from weft.fastdp.esp_links import make_esp
from weft.fastdp.heartbeat import HeartbeatConfig
from weft.fastdp.part import FastLinkHandle, FastPart
from weft.fastdp.vxlan import VxlanConfig
from weft.gossip.peer import PeerName
from weft.overlay import (
    Overlay,
    OverlayConnection,
    OverlayConnectionParams,
    OverlayConnectionStatus,
    RoutesView,
)
from weft.switch.core import (
    PART_SLEEVE,
    PART_SWITCH,
    SLEEVE,
    DatapathChanged,
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

__all__ = [
    "FAST_DATAPATHS",
    "MODES",
    "FastPartContext",
    "SwitchConnection",
    "SwitchOverlay",
    "heartbeat_from_env",
    "make_overlay",
]

log = logging.getLogger("weft.switch")

FEATURE_SWITCH = "overlay_switch"
FAST_DATAPATHS = ("ovs", "vxlan")  # best first; sleeve is always last
MODES = ("auto", "ovs", "vxlan", "sleeve")
ESP_INFO = "ESP rfc4106(gcm(aes))"
HISTORY = 32  # datapath moves kept for the status


class _SleeveRoutes:
    """The routes the sleeve forwards along, minus what the tunnel already carries: a broadcast
    (or unknown unicast) we originate reaches peers whose connection a fast path carries through
    that datapath's flooding, so the sleeve leaves them out -- unless they relay it further
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

    def may_relay(self, src: PeerName, via: PeerName) -> bool:
        return self.inner.may_relay(src, via)

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
        self.fast: dict[str, FastLinkHandle] = {}  # datapath name -> this connection's link
        if unavailable:
            self.switch.unavailable(candidates[0], unavailable, now)
        if SLEEVE in candidates and overlay.sleeve is not None:
            sleeve_params = replace(
                params,
                send_control=self._send_sleeve,
                on_established=self._sleeve_changed,
                on_status_changed=self._sleeve_changed,
            )
            self.sleeve = overlay.sleeve.prepare_connection(sleeve_params)
        for part in overlay.fast_parts:
            if part.name not in candidates or unavailable:
                continue
            handle = part.start_link(
                params,
                partial(self._send_fast, part.part_id),
                partial(self._fast_health, part.name),
                partial(self._fast_failed, part.name),
            )
            if handle is None:
                self.switch.unavailable(part.name, part.problem, now)
            else:
                self.fast[part.name] = handle
                self.switch.path_state(part.name, False, handle.link.reason, now)  # "waiting..."
        if self.fast:
            self._send_switch(encode_macs(sorted(overlay.local_macs())))
        self._sleeve_changed()

    # -- OverlayConnection ----------------------------------------------------------------------

    def control_received(self, payload: bytes) -> None:
        if self.stopped:
            return
        if not self.envelope:
            if self.sleeve is not None:
                self.sleeve.control_received(payload)
            return
        part_id, body = split_envelope(payload)
        if part_id == PART_SLEEVE:
            if self.sleeve is not None:
                self.sleeve.control_received(body)
        elif part_id == PART_SWITCH:
            message = decode_switch_message(body)
            if isinstance(message, PathState):
                self.switch.peer_state(message.datapath, message.healthy, self.overlay.loop.time())
                self._after()
            elif isinstance(message, MacsAnnounced):
                for name, handle in self.fast.items():
                    self.overlay.part(name).peer_macs(handle, message.macs)
        else:
            part = self.overlay.part_by_id.get(part_id)
            link = self.fast.get(part.name) if part is not None else None
            if part is not None and link is not None:
                part.control_received(link, body)

    def status(self) -> OverlayConnectionStatus:
        chosen = self.switch.chosen or SLEEVE
        info = self.switch.info
        if chosen == SLEEVE:
            if self.sleeve is None:
                return OverlayConnectionStatus(SLEEVE, "failed", None, info or "no sleeve")
            s = self.sleeve.status()
            return OverlayConnectionStatus(SLEEVE, s.state, s.mtu, info or s.info, s.encrypted)
        part = self.overlay.parts.get(chosen)
        handle = self.fast.get(chosen)
        if self.switch.carrying:
            state = "established"
        elif handle is not None and handle.link.state.value == "pending":
            state = "pending"
        else:
            state = "failed"
        encrypted = part is not None and part.encrypted
        if encrypted and self.switch.carrying:
            info = f"{info}; {ESP_INFO}" if info else ESP_INFO
        beat = handle.link.heartbeat if handle is not None else None
        heard = rtt = None
        if beat is not None and beat.last_ack is not None:
            heard, rtt = max(0.0, self.overlay.loop.time() - beat.last_ack), beat.rtt
        return OverlayConnectionStatus(
            chosen,
            state,
            part.mtu if part is not None else None,
            info,
            encrypted,
            heard=heard,
            rtt=rtt,
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
        for name, handle in self.fast.items():
            self.overlay.part(name).stop_link(handle)
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

    def _send_fast(self, part_id: int, payload: bytes) -> None:
        if self.envelope:
            self._send(part_id, payload)

    def _send_switch(self, payload: bytes) -> None:
        if self.envelope:
            self._send(PART_SWITCH, payload)

    def send_macs(self, macs: frozenset[str]) -> None:
        if self.fast:
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

    def _fast_health(self, name: str, healthy: bool, reason: str) -> None:
        if self.stopped:
            return
        self.switch.path_state(name, healthy, reason, self.overlay.loop.time())
        self._send_switch(encode_path_state(name, healthy))
        self._after()

    def _fast_failed(self, name: str, reason: str) -> None:
        """The part cannot carry this connection, ever (e.g. its ESP setup failed)."""
        if self.stopped:
            return
        self.switch.unavailable(name, reason, self.overlay.loop.time())
        self._send_switch(encode_path_state(name, False))
        self._after()

    def _after(self) -> None:
        """Act on the switch's decisions: what each part carries, sleeve routes, metrics, the
        router's callbacks."""
        if self.stopped:
            return
        changed = False
        while (event := self.switch.next_event()) is not None:
            changed = True
            for name, handle in self.fast.items():
                self.overlay.part(name).set_carrying(handle, event.new == name)
            if event.old is None:
                continue
            log.info(
                "connection to %s: %s -> %s%s",
                self.remote,
                event.old,
                event.new,
                f" ({event.reason})" if event.reason else "",
            )
            worse = self.switch_worse(event.old, event.new)
            self.overlay.datapath_changed(self.remote, event, worse)
            if worse:
                self.overlay.fallback(event.old, event.new, event.code)
        if changed:
            self.overlay.carriers_changed()
        if self.switch.carrying and not self.established:
            self.established = True
            self.params.on_established()
        self.params.on_status_changed()
        self._arm()

    @staticmethod
    def switch_worse(old: str, new: str) -> bool:
        order = [*FAST_DATAPATHS, SLEEVE]
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
    """The router's data plane: sleeve plus, where the kernel allows, fast datapaths
    (``Overlay``). ``fast_parts`` best first (``ovs``, ``vxlan``); ``note`` says why there is
    none (shown on every connection when there is no fast part)."""

    def __init__(
        self,
        sleeve: Overlay | None,
        fast_parts: Sequence[FastPart] = (),
        *,
        mode: str = "auto",
        note: str = "",
        capabilities: Capabilities | None = None,
        switch_config: SwitchConfig | None = None,
        container_mtu: int | None = None,
    ) -> None:
        import asyncio

        if mode not in MODES:
            raise ConfigError(f"--datapath {mode!r}: expected one of {', '.join(MODES)}")
        order = {name: i for i, name in enumerate(FAST_DATAPATHS)}
        for part in fast_parts:
            if part.name not in order:
                raise ConfigError(f"unknown fast datapath {part.name!r}")
        self.fast_parts = sorted(fast_parts, key=lambda p: order[p.name])
        self.parts = {p.name: p for p in self.fast_parts}
        if len(self.parts) != len(self.fast_parts):
            raise ConfigError("two fast parts for the same datapath")
        self.part_by_id = {p.part_id: p for p in self.fast_parts}
        if mode in FAST_DATAPATHS and mode not in self.parts:
            raise ConfigError(note or f"{mode}: not available")
        self.loop = asyncio.get_running_loop()
        self.sleeve = sleeve
        self.mode = mode
        self.note = note
        self.capabilities = capabilities
        self.switch_config = switch_config or SwitchConfig()
        self.container_mtu = container_mtu
        self.local_name: PeerName | None = None
        self.conns: dict[PeerName, SwitchConnection] = {}
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self.fallback_reasons: Counter[tuple[str, str, str]] = Counter()  # from, to, code
        # The last moves between datapaths, newest last (the UI's "why" and events panel).
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._fallback_callbacks: list[Callable[[str, str], None]] = []
        self._routes: _SleeveRoutes | None = None
        self._announced: frozenset[str] = frozenset()
        for part in self.fast_parts:
            part.on_local_macs = self._local_macs

    def part(self, name: str) -> FastPart:
        return self.parts[name]

    # -- Overlay --------------------------------------------------------------------------------

    def features(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.sleeve.features()) if self.sleeve is not None else {}
        out[FEATURE_SWITCH] = 1
        for part in self.fast_parts:
            if not part.problem:
                out.update(part.features())
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
            "datapaths": [p.name for p in self.fast_parts] + [SLEEVE],
            "note": self.note,
            "vxlan_note": self.note,  # the earlier name of "note"
        }
        for name in FAST_DATAPATHS:
            part = self.parts.get(name)
            switch[name] = part.status() if part is not None else None
        switch.update(
            {
                "capabilities": self.capabilities.status() if self.capabilities else None,
                "container_mtu": self.container_mtu,
                "fallbacks": {f"{a}->{b}": n for (a, b), n in sorted(self.fallbacks.items())},
                "fallback_reasons": [
                    {"from": a, "to": b, "reason": c, "count": n}
                    for (a, b, c), n in sorted(self.fallback_reasons.items())
                ],
                "history": list(self.history),
                "connections": {str(p): c.switch.status() for p, c in self.conns.items()},
            }
        )
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
        for part in self.fast_parts:
            try:
                part.close()
            except Exception:
                log.exception("closing the %s datapath failed", part.name)
        closer = getattr(self.sleeve, "close", None)
        if callable(closer):
            closer()

    # -- for connections and the daemon ----------------------------------------------------------

    def on_fallback(self, callback: Callable[[str, str], None]) -> None:
        """``callback(from, to)`` on every move to a worse datapath (``Metrics.fallback``)."""
        self._fallback_callbacks.append(callback)

    def datapath_changed(self, peer: PeerName, event: DatapathChanged, worse: bool) -> None:
        """Remember a move between datapaths (``status()["switch"]["history"]``)."""
        self.history.append(
            {
                "at": round(time.time(), 3),  # wall clock: shown to people, compared across hosts
                "peer": str(peer),
                "kind": "fallback" if worse else "recovered",
                "from": event.old,
                "to": event.new,
                "reason": event.code if worse else "healthy",
                "info": event.reason,
            }
        )

    def fallback(self, old: str, new: str, code: str = "") -> None:
        self.fallbacks[(old, new)] += 1
        self.fallback_reasons[(old, new, code or "unknown")] += 1
        for callback in list(self._fallback_callbacks):
            try:
                callback(old, new)
            except Exception:
                log.exception("fallback callback failed")

    def local_macs(self) -> frozenset[str]:
        """Every MAC on our bridge (each fast part watches it; their union)."""
        macs: frozenset[str] = frozenset()
        for part in self.fast_parts:
            macs |= part.local_macs
        return macs

    def why_not(self, part: FastPart, params: OverlayConnectionParams) -> str:
        """Why ``part`` cannot carry this connection ("" when it can try)."""
        encrypted = params.data_send_key is not None
        if part.problem:
            return part.problem
        if encrypted and not part.encrypted:
            return "encrypted: kernel has no ESP"
        if part.encrypted and not encrypted:
            return f"{part.name}: runs with ESP only and this connection is not encrypted"
        if not part.ensure_started(params.local_name, params.remote_ip):  # once: the MTU
            return part.problem or f"{part.name}: could not start"
        features = params.remote_features
        if features.get(FEATURE_SWITCH) != 1:
            return f"{part.name}: the peer has no {part.name} datapath"
        why = part.peer_compatible(features)
        if why:
            return why
        if (
            self.container_mtu is not None
            and part.mtu is not None
            and (part.mtu < self.container_mtu)
        ):
            return (
                f"{part.name}: overlay MTU {part.mtu} below the container MTU {self.container_mtu}"
            )
        return ""

    def candidates_for(self, params: OverlayConnectionParams) -> tuple[list[str], list[str], str]:
        """``(candidates, notes, unavailable)`` for a new connection: the datapaths it starts
        (best first), why better ones are not started, and (forced fast datapath only) why the
        single candidate can never carry."""
        if self.mode == SLEEVE:
            return [SLEEVE], [], ""
        if self.mode in FAST_DATAPATHS:
            part = self.parts[self.mode]
            return [part.name], [], self.why_not(part, params)
        candidates: list[str] = []
        notes: list[str] = []
        for part in self.fast_parts:
            why = self.why_not(part, params)
            if why:
                notes.append(why)
            else:
                candidates.append(part.name)
        if not self.fast_parts:
            notes.append(self.note or "vxlan: not available")
        return [*candidates, SLEEVE], notes, ""

    def connection_stopped(self, conn: SwitchConnection) -> None:
        if self.conns.get(conn.remote) is conn:
            del self.conns[conn.remote]
            self.carriers_changed()

    def carried_by_fast_path(self) -> set[PeerName]:
        return {p for p, c in self.conns.items() if c.carried_by_fast_path}

    def carriers_changed(self) -> None:
        if self._routes is not None:
            self._routes.recompute()

    def _local_macs(self, _changed: frozenset[str]) -> None:
        macs = self.local_macs()
        if macs == self._announced:
            return
        self._announced = macs
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


@dataclass(frozen=True)
class FastPartContext:
    """What a fast part needs to be built (see :func:`_build_fast_parts`)."""

    config: Any  # the RouterConfig
    mode: str  # auto, ovs or vxlan (never sleeve here)
    caps: Capabilities
    bridge: str  # the sleeve's bridge (containers' veths are on it)
    tap: str | None  # the sleeve's TAP on that bridge
    container_mtu: int | None
    heartbeat: HeartbeatConfig
    encrypted: bool  # a password is set: every part must run its links over ESP


def _build_ovs_part(ctx: FastPartContext) -> tuple[FastPart | None, str]:
    """The OVS part, where the kernel has openvswitch and the part is in this build.

    Contract for ``weft.fastdp.ovs_part``: ``make_part(ctx: FastPartContext) -> FastPart``
    (name ``"ovs"``, part_id ``switch_core.PART_OVS``); raising says why it cannot run here.
    """
    if not ctx.caps.openvswitch.available:
        return None, f"ovs: {ctx.caps.openvswitch.detail}"
    try:
        from weft.fastdp import ovs_part  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None, "ovs: the OVS part is not in this build"
    make = getattr(ovs_part, "make_part", None)
    if not callable(make):
        return None, "ovs: the OVS part is not in this build"
    try:
        part: FastPart = make(ctx)
    except Exception as err:  # the other datapaths still run; say why there is no OVS
        log.exception("ovs datapath unavailable")
        return None, f"ovs: {type(err).__name__}: {err}"
    return part, ""


def _build_vxlan_part(ctx: FastPartContext) -> tuple[FastPart | None, str]:
    if not ctx.caps.vxlan.available:
        return None, f"vxlan: {ctx.caps.vxlan.detail}"
    from weft.fastdp.vxlan_part import VxlanPart

    try:
        part = VxlanPart(
            bridge=ctx.bridge,
            tap=ctx.tap,
            heartbeat=ctx.heartbeat,
            device=VxlanConfig(bridge=ctx.bridge),
            esp=make_esp("vxlan") if ctx.encrypted else None,
        )
    except Exception as err:  # the sleeve still runs; say why there is no vxlan
        log.exception("vxlan datapath unavailable")
        return None, f"vxlan: {type(err).__name__}: {err}"
    return part, ""


def _build_fast_parts(ctx: FastPartContext) -> tuple[list[FastPart], str]:
    """The fast parts for ``ctx.mode``, best first, and a note when there is none (why).

    OVS first. Both datapaths listen on UDP 6784, so a host runs one of them: vxlan only where
    OVS is not built. A connection between an OVS host and a vxlan-only host therefore stays on
    sleeve ("ovs: the peer has no OVS datapath"): the wire formats would match, but the two parts do
    not yet present themselves to each other (different envelope parts and heartbeat catchers).
    With a password a kernel without ESP gets none: nothing may leave unencrypted; with ESP the
    parts run every link over it (:func:`make_esp`; ``ovs_part.make_part`` takes one too).
    """
    if ctx.encrypted and not ctx.caps.esp.available:
        return [], "encrypted: kernel has no ESP"
    parts: list[FastPart] = []
    notes: list[str] = []
    if ctx.mode in ("auto", "ovs"):
        ovs, why = _build_ovs_part(ctx)
        if ovs is not None:
            parts.append(ovs)
        elif why:
            notes.append(why)
    if ctx.mode in ("auto", "vxlan") and not parts:
        vxlan, why = _build_vxlan_part(ctx)
        if vxlan is not None:
            parts.append(vxlan)
        elif why:
            notes.append(why)
    if parts:
        return parts, ""
    wanted = [n for n in notes if ctx.mode == "auto" or n.startswith(f"{ctx.mode}:")]
    return [], "; ".join(wanted)


def make_overlay(config: Any) -> SwitchOverlay:
    """The router's data plane from its ``RouterConfig`` (inside the running loop).

    ``config.datapath``: ``auto``, ``ovs``, ``vxlan``, ``sleeve`` (a forced fast datapath that
    cannot run here is a ConfigError saying why). The sleeve is built by
    ``weft.sleeve.pump.make_overlay`` (its errors propagate: the daemon decides whether they
    are fatal); the kernel is probed once, here; the fast parts come from
    :func:`_build_fast_parts`.
    """
    from weft.fastdp.capabilities import probe_capabilities
    from weft.sleeve import pump as sleeve_module

    mode = str(getattr(config, "datapath", "auto") or "auto")
    if mode not in MODES:
        raise ConfigError(f"--datapath {mode!r}: expected one of {', '.join(MODES)}")
    heartbeat, switch_config = heartbeat_from_env()
    sleeve = sleeve_module.make_overlay(config)
    parts: list[FastPart] = []
    try:
        bridge = sleeve.bridge.name
        container_mtu = sleeve.bridge.mtu
        tap = sleeve.tap.name if sleeve.tap is not None else None
        caps: Capabilities | None = None
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
                    pool.submit(_remove_stale_vxlan, VxlanConfig(bridge=bridge)).result(timeout=60)
                if caps.openvswitch.available and (encrypted or mode == "vxlan"):
                    # The same for an OVS datapath left by an earlier router (its veth is in our
                    # bridge; it also holds UDP 6784) where no OVS part will start to remove it.
                    from weft.fastdp.ovs_datapath import OvsConfig
                    from weft.fastdp.ovs_part import remove_stale_ovs

                    pool.submit(remove_stale_ovs, OvsConfig(bridge=bridge)).result(timeout=60)
            ctx = FastPartContext(
                config, mode, caps, bridge, tap, container_mtu, heartbeat, encrypted
            )
            parts, note = _build_fast_parts(ctx)
        if mode in FAST_DATAPATHS and mode not in {p.name for p in parts}:
            # the daemon says "--datapath vxlan is not available here: <note>"
            raise ConfigError(note or f"{mode}: not available")
        names = [p.name for p in parts] + [SLEEVE]
        log.info("datapaths: %s%s", ", ".join(names), f" ({note})" * bool(note))
        return SwitchOverlay(
            sleeve,
            parts,
            mode=mode,
            note=note,
            capabilities=caps,
            switch_config=switch_config,
            container_mtu=container_mtu,
        )
    except BaseException:
        for part in parts:
            try:
                part.close()
            except Exception:
                log.exception("closing the %s datapath failed", part.name)
        sleeve.close()
        raise
