"""The seam between the mesh and the data plane (after weaveworks/mesh ``overlay.go``).

The router owns control connections; for each one that completes its handshake it asks the
overlay to ``prepare_connection``. The overlay connection proves its own path (e.g. sleeve UDP
heartbeats acknowledged over the control connection via ``send_control``) and calls
``on_established`` once it carries traffic, which makes the mesh connection "established" and so
eligible for data routes. All methods run on the event loop and must not block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from weft.gossip.peer import PeerName

__all__ = [
    "PART_OVS",
    "PART_SLEEVE",
    "PART_SWITCH",
    "PART_VXLAN",
    "NullOverlay",
    "Overlay",
    "OverlayConnection",
    "OverlayConnectionParams",
    "OverlayConnectionStatus",
    "RoutesView",
]

# Which sub-overlay an overlay-control message is for: the first byte of the switch's envelope
# (weft/switch/core.py describes the envelope). Here, below the switch and the datapaths, so a
# datapath names its own part without importing the switch that hosts it.
PART_SLEEVE = 0
PART_VXLAN = 1
PART_SWITCH = 2
PART_OVS = 3


@dataclass(frozen=True)
class OverlayConnectionStatus:
    """What status, UI and metrics show about a connection's data path."""

    datapath: str  # "sleeve", "vxlan", "ovs" or "none"
    # "pending", "established", "degraded" (it stopped carrying heartbeats: silent for 3 s)
    # or "failed"
    state: str
    mtu: int | None = None
    info: str = ""  # human reason, e.g. "heartbeats unanswered for 60s; using sleeve"
    encrypted: bool = False
    # Seconds since the carrying path's heartbeat was last answered (None: never / not known),
    # and the round trip of the last answered one.
    heard: float | None = None
    rtt: float | None = None


@dataclass(frozen=True)
class OverlayConnectionParams:
    local_name: PeerName
    remote_name: PeerName
    remote_short_id: int
    remote_ip: str  # the control connection's remote IP; UDP address is learned later
    outbound: bool
    # Per-direction data-plane keys from the handshake (None without a password).
    data_send_key: bytes | None
    data_recv_key: bytes | None
    remote_features: Mapping[str, Any]
    send_control: Callable[[bytes], None]  # an overlay-control message to the remote's overlay
    on_established: Callable[[], None]
    on_status_changed: Callable[[], None] = field(default=lambda: None)


class OverlayConnection(Protocol):
    def control_received(self, payload: bytes) -> None:
        """An overlay-control message from the remote's overlay connection."""
        ...

    def status(self) -> OverlayConnectionStatus: ...

    def stop(self) -> None:
        """The control connection is gone; release everything (idempotent)."""
        ...


class RoutesView(Protocol):
    """Read-only routes the overlay forwards along (computed by the gossip core)."""

    def unicast_next_hop(self, dst: PeerName) -> PeerName | None: ...

    def broadcast_next_hops(self, src: PeerName) -> list[PeerName]: ...

    def may_relay(self, src: PeerName, via: PeerName) -> bool:
        """Whether traffic that entered the overlay at ``src`` may reach us from neighbour
        ``via`` (``via`` is ``src``, or one hop closer to it than we are on these routes)."""
        ...


class Overlay(Protocol):
    def features(self) -> dict[str, Any]:
        """Advertised in our handshake hello (msgpack-able)."""
        ...

    def prepare_connection(self, params: OverlayConnectionParams) -> OverlayConnection: ...

    def routes_changed(self, routes: RoutesView) -> None: ...

    def status(self) -> dict[str, Any]:
        """Overlay-wide status for ``/status`` (msgpack/JSON-able)."""
        ...


class _NullConnection:
    def __init__(self, params: OverlayConnectionParams) -> None:
        self._params = params
        params.on_established()

    def control_received(self, payload: bytes) -> None:
        pass

    def status(self) -> OverlayConnectionStatus:
        return OverlayConnectionStatus(datapath="none", state="established")

    def stop(self) -> None:
        pass


class NullOverlay:
    """No data plane: connections are established as soon as the handshake completes."""

    def features(self) -> dict[str, Any]:
        return {}

    def prepare_connection(self, params: OverlayConnectionParams) -> OverlayConnection:
        return _NullConnection(params)

    def routes_changed(self, routes: RoutesView) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"datapath": "none"}
