"""What the overlay switch needs from a fast datapath (weft.switch.pump).

A *fast part* is one kernel datapath of one router: the Linux VXLAN device
(:class:`weft.fastdp.vxlan_part.VxlanPart`), the Open vSwitch datapath
(``weft.fastdp.ovs_part``). The switch holds a list of them, best first (``ovs``, ``vxlan``), and
per connection starts a *link* on every part both ends can use; each link proves its own path
with heartbeats and reports ``on_health(healthy, reason)``; the switch tells the part which link
carries (``set_carrying``), and only then may the part send that peer's container frames into
its tunnel.

Contract, for every part:

* ``name`` (``"ovs"``, ``"vxlan"``), ``part_id``: the overlay-control envelope part its links'
  messages travel in (switch_core: 1 vxlan, 3 ovs).
* ``problem``: non-empty when the part cannot run here (why, e.g. ``"vxlan: ..."``); ``mtu``:
  the overlay MTU its links prove (None before start); ``encrypted``: the part runs its links
  over ESP (a router with a password builds parts only with ESP; see weft.fastdp.esp_links);
  ``local_macs``: the MACs on our bridge (what the switch announces to peers) and
  ``on_local_macs``: set by the switch, called when they change.
* ``features()``: hello features it advertises (only while it has no problem);
  ``peer_compatible(remote_features) -> reason``: "" when the remote runs a matching datapath,
  else why not (e.g. ``"vxlan: the peer has no vxlan datapath"``).
* ``ensure_started(local_name, remote_ip) -> bool``: start once (it may need our peer name and
  the underlay address towards the first peer); False with ``problem`` set when it cannot.
* ``start_link(params, send_control, on_health, on_failed) -> handle | None``: start one
  connection's path (``params`` has the peer's name, short id, IP and the data keys, None
  unencrypted). ``send_control(bytes)`` sends one of the part's control messages to the peer's
  link (the switch wraps it in the envelope). ``on_health(healthy, reason)`` on each change;
  ``on_failed(reason)`` once when the path can never carry this connection (e.g. ESP setup
  failed; not retried). None: the part cannot run (``problem`` says why).
* ``control_received(handle, payload)`` (RemoteProtocolError when malformed),
  ``set_carrying(handle, bool)``, ``peer_macs(handle, macs)`` (every MAC on the peer's bridge),
  ``stop_link(handle)`` (idempotent; releases what the link held in the kernel).
* ``status() -> dict`` for ``/status``; ``close()`` removes everything the part created.

A handle exposes ``remote`` (PeerName), ``link`` (its ``weft.fastdp.link.FastPathLink``: the
switch reads ``link.state`` and ``link.reason``) and ``stopped``.

Both parts build on ``weft.fastdp.part_base.FastPartBase``, which implements the per-connection
half of this contract (``start_link`` ... ``stop_link``, heartbeats, ESP events) once; each part
adds its kernel side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from weft.fastdp.link import FastPathLink
from weft.gossip.peer import PeerName
from weft.overlay import OverlayConnectionParams

__all__ = ["FastLinkHandle", "FastPart"]


class FastLinkHandle(Protocol):
    """One connection's path on a fast part, as the switch holds it."""

    @property
    def remote(self) -> PeerName: ...

    @property
    def link(self) -> FastPathLink: ...

    @property
    def stopped(self) -> bool: ...


class FastPart(Protocol):
    """One fast datapath of a router (see the module docstring for the contract)."""

    name: str
    part_id: int
    problem: str
    mtu: int | None
    encrypted: bool
    local_macs: frozenset[str]
    on_local_macs: Callable[[frozenset[str]], None]

    def features(self) -> dict[str, Any]: ...

    def peer_compatible(self, remote_features: Mapping[str, Any]) -> str: ...

    def ensure_started(self, local_name: PeerName, remote_ip: str) -> bool: ...

    def start_link(
        self,
        params: OverlayConnectionParams,
        send_control: Callable[[bytes], None],
        on_health: Callable[[bool, str], None],
        on_failed: Callable[[str], None],
    ) -> FastLinkHandle | None: ...

    def control_received(self, handle: Any, payload: bytes) -> None: ...

    def set_carrying(self, handle: Any, carrying: bool) -> None: ...

    def peer_macs(self, handle: Any, macs: frozenset[str]) -> None: ...

    def stop_link(self, handle: Any) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
