"""The sleeve overlay: the asyncio pump around :class:`~weft.sleeve.core.SleeveCore`.

One UDP socket (port 6783 by default) and the router's TAP on the ``weft`` bridge, both read with
``loop.add_reader`` in drain loops (until ``EAGAIN``, with a budget so neither starves the
control connections), and one timer. Everything that decides anything lives in the core; this
module moves bytes and counts syscalls:

* TAP reads return super-frames (IFF_VNET_HDR + TSO offloads, see :mod:`weft.sleeve.tap`), so one
  read moves up to ~64 KB;
* a fragmented super-frame leaves in one ``sendmsg`` with UDP GSO (``UDP_SEGMENT`` cmsg) and
  arrives, coalesced by UDP GRO, in one ``recvmsg`` whose cmsg gives the segment size;
* small frames read in one drain are batched per next hop into one datagram;
* socket buffers are raised with ``SO_RCVBUFFORCE``/``SO_SNDBUFFORCE`` (root), falling back to
  the unprivileged options.

The per-frame path (``WEFT_SLEEVE_MODE=per-frame``, or automatically towards a peer that does not
advertise super-frames) carries one frame per datagram, no fragments. Where the local kernel
allows, three local offloads batch syscalls without changing the wire: equal-size datagrams for
one peer leave in one UDP GSO ``sendmsg`` (:func:`~weft.sleeve.core.gso_batches`), which
the kernel cuts back into the same separate datagrams; UDP GRO-coalesced arrivals are split again
by the core; and the TAP, opened with a virtio_net_hdr but no offloads (reads stay plain frames),
takes in-order TCP segments merged into one GSO write (:mod:`weft.sleeve.gro`). A peer
sees the same datagrams with or without them. ``WEFT_SLEEVE_LOCAL_OFFLOADS=off`` turns all three
off (the strict path of a kernel without them: one frame per syscall). Each peer advertises
``sleeve_version``, ``sleeve_port``, ``sleeve_superframes`` and ``sleeve_cipher`` in its hello
features; when any connected peer lacks super-frames the TAP's offloads are switched off, so the
kernel segments and checksums before the sleeve sees a frame.

Integration: ``make_overlay(config)`` (what ``weft.router.daemon`` calls) returns a
:class:`SleeveOverlay`; ``overlay.setup_routes(app)`` adds the bridge API
(:mod:`weft.host.bridge_api`); ``overlay.close()`` releases the socket and TAP.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import select
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Generic, TypeVar

from aiohttp import web

from weft.errors import ConfigError, LocalError, WeftError
from weft.gossip.peer import PeerName
from weft.overlay import (
    OverlayConnection,
    OverlayConnectionParams,
    OverlayConnectionStatus,
    RoutesView,
)
from weft.sleeve.core import (
    VERSION as SLEEVE_VERSION,
)
from weft.sleeve.core import (
    VNET_HDR_SIZE,
    LinkEstablished,
    LinkStatusChanged,
    SleeveConfig,
    SleeveCore,
    TapFrame,
    Transmit,
    features_of,
    gso_batches,
    remote_sleeve,
    strip_vnet,
)
from weft.sleeve.gro import VNET_ZERO, coalesce
from weft.sleeve.gro import Frame as TapWriteFrame

__all__ = ["SleeveConnection", "SleeveOverlay", "make_overlay"]

log = logging.getLogger("weft.sleeve")

SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
IP_MTU_DISCOVER: Final = 10
IP_PMTUDISC_PROBE: Final = 3  # DF set, the path-MTU cache ignored: our probes find the path
IP_MTU: Final = 14
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33
_RECV_SIZE: Final = 65536
_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_DRAIN_BUDGET: Final = 256  # reads per readiness callback before yielding to the loop
_SEGMENT = struct.Struct("=H")
_INT = struct.Struct("=i")
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)  # a plain int: the IntFlag's & costs an enum per datagram
DEFAULT_TAP: Final = "weft-tap"
# The per-frame TAP's tx ring: a container's TCP burst (its GSO packets cut to MTU size at the
# TAP) waits here while the pump works; 1000 overflowed under iperf3 (drops, retransmits).
PER_FRAME_TXQUEUELEN: Final = 4096


T = TypeVar("T")


class _Worker(Generic[T]):
    """A thread that performs blocking syscalls (UDP sends, TAP writes) off the event loop.

    Why: the kernel work behind one 64 KB GSO send or TAP write (segmentation, the veth and bridge
    hops, the receiver's softirq) is most of the sleeve's CPU time; done here it runs in parallel
    with the loop's Python (the GIL is released during the syscall) and, on a busy machine, is
    scheduled as its own thread instead of queueing behind the loop. Batches keep their order.
    At most ``limit`` batches wait; beyond that new ones are dropped and counted, like a full
    socket buffer would.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        drops: Counter[str],
        limit: int = 4096,
    ) -> None:
        self._queue: queue.SimpleQueue[list[T] | None] = queue.SimpleQueue()
        self._handle = handle
        self._drops = drops
        self._limit = limit
        self._name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, batch: list[T]) -> None:
        if self._queue.qsize() >= self._limit:
            self._drops[f"{self._name}_queue_full"] += len(batch)
            return
        self._queue.put(batch)

    def _run(self) -> None:
        get = self._queue.get
        handle = self._handle
        while True:
            batch = get()
            if batch is None:
                return
            try:
                handle(batch)
            except Exception:  # never let the thread die silently
                log.exception("%s failed", self._name)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)


def _wait_writable(fd: int, timeout_ms: int = 100) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout_ms))


class SleeveConnection:
    """The sleeve side of one control connection (implements ``OverlayConnection``)."""

    def __init__(self, overlay: SleeveOverlay, params: OverlayConnectionParams, problem: str):
        self.overlay = overlay
        self.params = params
        self.problem = problem  # non-empty: this connection can never carry sleeve traffic
        self.stopped = False

    def control_received(self, payload: bytes) -> None:
        if not self.problem and not self.stopped:
            self.overlay.control_received(self, payload)

    def status(self) -> OverlayConnectionStatus:
        encrypted = self.params.data_send_key is not None
        if self.problem:
            return OverlayConnectionStatus("sleeve", "failed", None, self.problem, encrypted)
        link = self.overlay.link_status(self.params.remote_name)
        if link is None:
            return OverlayConnectionStatus("sleeve", "failed", None, "stopped", encrypted)
        last_ack = link.get("last_ack")
        heard = max(0.0, self.overlay.loop.time() - last_ack) if last_ack is not None else None
        return OverlayConnectionStatus(
            "sleeve",
            link["state"],
            link["mtu"],
            link["info"],
            link["encrypted"],
            heard=heard,
            rtt=link.get("rtt"),
        )

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.overlay.connection_stopped(self)


class SleeveOverlay:
    """The userspace data plane of one router (implements ``Overlay``).

    Construct it inside the running event loop. ``tap_name=None`` runs without a TAP (UDP only,
    for tests of the control/heartbeat path); ``bridge=None`` leaves the bridge alone.
    """

    def __init__(
        self,
        config: SleeveConfig | None = None,
        *,
        host: str = "0.0.0.0",
        tap_name: str | None = DEFAULT_TAP,
        bridge: str | None = "weft",
        mtu: int | None = None,
        gso: bool | None = None,
        gro: bool | None = None,
        tap_gro: bool | None = None,
        buffer_bytes: int = 16 << 20,
        threads: bool = False,
    ) -> None:
        from weft.host.bridge import DEFAULT_MTU, Bridge

        cfg = config or SleeveConfig()
        self.loop = asyncio.get_running_loop()
        self.drops: Counter[str] = Counter()
        # syscall counts (plain ints: they are bumped for every packet)
        self.n_tap_read = self.n_tap_write = self.n_udp_send = self.n_udp_recv = 0
        self._conns: dict[PeerName, SleeveConnection] = {}
        self._routes: RoutesView | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.core: SleeveCore | None = None
        self.bridge = Bridge(bridge or "weft", mtu or DEFAULT_MTU)
        superframes = cfg.tap_vnet_hdr
        # UDP GSO/GRO are local syscall batching (the wire is the same datagrams either way), so
        # both paths use them when the kernel has them; False forces them off (the strict
        # per-frame path, what a kernel without them gets).
        self.gso = True if gso is None else gso
        self.gro = True if gro is None else gro
        # Per-frame path: the TAP still gets a virtio_net_hdr (offloads off, so reads stay plain
        # frames) and TCP segments are merged before the write (weft.sleeve.gro); False:
        # one frame per write, a TAP without the header.
        self.tap_gro = (not superframes) if tap_gro is None else (tap_gro and not superframes)
        self._tap_merge = self.tap_gro  # False once the kernel refused a merged write
        self.sock = self._open_socket(host, cfg.port, buffer_bytes)
        port = self.sock.getsockname()[1]
        if port != cfg.port:
            cfg = SleeveConfig(**{**cfg.__dict__, "port": port})
        self.config = cfg
        self.tap = None
        try:
            if tap_name is not None:
                from weft.sleeve.tap import Tap

                self.tap = Tap(tap_name, vnet_hdr=superframes or self.tap_gro, offload=superframes)
                if bridge is not None:
                    from weft.host.bridge import ensure_bridge

                    # pyroute2's synchronous API refuses to run on a thread with a running
                    # loop; a one-off worker thread does it (once, at start).
                    with ThreadPoolExecutor(1) as pool:
                        job = pool.submit(ensure_bridge, bridge, tap_name, mtu or DEFAULT_MTU)
                        try:
                            job.result()
                        except (OSError, WeftError):
                            raise
                        except Exception as err:  # pyroute2's NetlinkError is no OSError
                            raise LocalError(f"cannot set up bridge {bridge}: {err}") from err
                if not superframes and self.tap.txqueuelen < PER_FRAME_TXQUEUELEN:
                    self.tap.set_txqueuelen(PER_FRAME_TXQUEUELEN)
                    log.info("TAP %s txqueuelen %d", tap_name, self.tap.txqueuelen)
        except BaseException:
            self.sock.close()
            if self.tap is not None:
                self.tap.close()
            raise
        # TAP frames read between two sends: a GSO send's worth (44 full frames on a 1500-byte
        # underlay: one sendmsg) when the datagrams can leave together, else a few.
        self._gso_every = 44 if self.gso and not superframes else 8
        self._sender: _Worker[Transmit] | None = None
        self._writer: _Worker[TapFrame] | None = None
        if threads:
            self._sender = _Worker("weft-sleeve-udp", self._send_batch, self.drops)
            if self.tap is not None:
                self._writer = _Worker("weft-sleeve-tap", self._write_frames, self.drops)
        self.loop.add_reader(self.sock.fileno(), self._on_udp)
        if self.tap is not None:
            self.loop.add_reader(self.tap.fd, self._on_tap)
        log.info(
            "sleeve on udp %s:%d, %s, gso %s, gro %s, tap gro %s, writer threads %s",
            host,
            port,
            "super-frames" if superframes else "per-frame",
            self.gso,
            self.gro,
            self.tap_gro,
            threads,
        )

    def _open_socket(self, host: str, port: int, size: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for force, plain in (
                (SO_RCVBUFFORCE, socket.SO_RCVBUF),
                (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            ):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, size)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
            if self.gro:
                try:
                    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                except OSError:
                    self.gro = False
            if self.gso:
                try:
                    sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
                except OSError:
                    self.gso = False
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise ConfigError(f"sleeve cannot use UDP port {port}: {err}") from err
        return sock

    # ----------------------------------------------------------------- Overlay protocol

    def features(self) -> dict[str, Any]:
        return features_of(self.config)

    def prepare_connection(self, params: OverlayConnectionParams) -> OverlayConnection:
        now = self.loop.time()
        if self.core is None:
            self.core = SleeveCore(params.local_name, self.config)
            if self._routes is not None:
                self.core.routes_changed(self._routes)
        remote = remote_sleeve(params.remote_features)
        problem = ""
        if remote is None:
            theirs = params.remote_features.get("sleeve_version")
            problem = "the peer has no compatible sleeve"
            if theirs is not None and theirs != SLEEVE_VERSION:
                problem += f" (sleeve wire version: ours {SLEEVE_VERSION}, theirs {theirs!r})"
        elif params.data_send_key is not None and remote["cipher"] != self.config.cipher:
            problem = f"data cipher mismatch: ours {self.config.cipher}, theirs {remote['cipher']}"
        conn = SleeveConnection(self, params, problem)
        if problem or remote is None:
            log.warning("sleeve to %s unusable: %s", params.remote_name, problem)
            return conn
        old = self._conns.get(params.remote_name)
        if old is not None:
            old.stopped = True
        self._conns[params.remote_name] = conn
        self.core.add_link(
            params.remote_name,
            (params.remote_ip, remote["port"]),
            now,
            send_key=params.data_send_key,
            recv_key=params.data_recv_key,
            superframes=remote["superframes"],
            underlay_mtu=_underlay_mtu(params.remote_ip, remote["port"]),
        )
        self._offload_check()
        self._process()
        return conn

    def routes_changed(self, routes: RoutesView) -> None:
        self._routes = routes
        if self.core is not None:
            self.core.routes_changed(routes)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "datapath": "sleeve",
            "port": self.config.port,
            "mode": "super-frames" if self.config.tap_vnet_hdr else "per-frame",
            "gso": self.gso,
            "gro": self.gro,
            "tap_gro": self.tap_gro,
            "tap": self.tap.name if self.tap is not None else None,
            "tap_offload": bool(self.tap and self.tap.offload),
            "bridge": self.bridge.name,
        }
        if self.core is not None:
            core = self.core.status(self.loop.time())
            core["drops"] = dict(Counter(core["drops"]) + self.drops)
            out.update(core)
        else:
            out["drops"] = dict(self.drops)
        out["syscalls"] = {
            "tap_read": self.n_tap_read,
            "tap_write": self.n_tap_write,
            "udp_send": self.n_udp_send,
            "udp_recv": self.n_udp_recv,
        }
        return out

    def setup_routes(self, app: web.Application, allocate: Any = None, release: Any = None) -> None:
        """Add the bridge API (/expose, /attach, /detach, /ps) to the router's app; ``allocate``
        and ``release`` as in :func:`weft.host.bridge_api.setup_routes` (IPAM hooks)."""
        from weft.host.bridge_api import setup_routes

        setup_routes(app, self.bridge, allocate, release)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.stopped = True
        self._conns.clear()
        for worker in (self._sender, self._writer):
            if worker is not None:
                worker.stop()
        self._sender = self._writer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if self.tap is not None and self.tap.fd >= 0:
            self.loop.remove_reader(self.tap.fd)
            self.tap.close()

    # ----------------------------------------------------------------- per connection

    def link_status(self, peer: PeerName) -> dict[str, Any] | None:
        return self.core.link_status(peer) if self.core is not None else None

    def control_received(self, conn: SleeveConnection, payload: bytes) -> None:
        if self.core is None or self._conns.get(conn.params.remote_name) is not conn:
            return
        self.core.control_received(conn.params.remote_name, payload, self.loop.time())
        self._process()

    def connection_stopped(self, conn: SleeveConnection) -> None:
        peer = conn.params.remote_name
        if self._conns.get(peer) is conn:
            del self._conns[peer]
            if self.core is not None:
                self.core.remove_link(peer)
            self._offload_check()

    def _offload_check(self) -> None:
        tap = self.tap
        if tap is None or not self.config.tap_vnet_hdr or self.core is None:
            return  # (a per-frame TAP with a header for TAP GRO never asks for super-frames)
        want = self.core.superframes_everywhere
        if want != tap.offload:
            tap.set_offload(want)
            log.info("TAP offloads %s", "on (super-frames)" if want else "off (a per-frame peer)")

    # ----------------------------------------------------------------- pumps

    def _on_tap(self) -> None:
        self._pump(tap_first=True)

    def _on_udp(self) -> None:
        self._pump(tap_first=False)

    def _pump(self, tap_first: bool) -> None:
        """Drain the ready side, then look at the other one too: under bidirectional traffic (a
        TCP stream and its ACKs) one failing read costs less than another loop iteration."""
        now = self.loop.time()
        drains = (
            (self._drain_tap, self._drain_udp) if tap_first else (self._drain_udp, self._drain_tap)
        )
        for _ in range(4):
            moved = drains[0](now) + drains[1](now)
            if not moved:
                break
        self._process()

    def _drain_tap(self, now: float) -> int:
        """Read frames until EAGAIN (or the budget); return how many were read."""
        tap = self.tap
        if tap is None:
            return 0
        core = self.core
        fd = tap.fd
        # With UDP GSO up to a send's worth of per-frame datagrams wait to leave together.
        every = self._gso_every
        strip = self.tap_gro
        batch: list[bytes | memoryview] = []
        n = 0
        while n < _DRAIN_BUDGET:
            try:
                frame = os.read(fd, 65600)
            except BlockingIOError:
                break
            except OSError as err:
                self.drops["tap_read_error"] += 1
                log.warning("TAP read failed: %s", err)
                break
            n += 1
            if core is None:
                self.drops["no_peers"] += 1
                continue
            if strip:  # the per-frame TAP's header (for TAP GRO writes): all zero on reads
                if frame[0] & 1 or frame[1]:
                    plain = strip_vnet(frame)
                    if plain is None:
                        self.drops["needs_offload"] += 1
                        continue
                    batch.append(plain)
                else:
                    batch.append(memoryview(frame)[VNET_HDR_SIZE:])
            else:
                batch.append(frame)
            if n % every == 0:
                core.frames_from_tap(batch, now)
                batch.clear()
                self._send_transmits(core)
        if batch and core is not None:
            core.frames_from_tap(batch, now)
        self.n_tap_read += n + 1
        return n

    def _drain_udp(self, now: float) -> int:
        """Receive datagrams (GRO-coalesced when enabled) until EAGAIN; return how many."""
        core = self.core
        sock = self.sock
        gro = self.gro
        per_frame = not self.config.tap_vnet_hdr
        every = 8
        n = 0
        while n < _DRAIN_BUDGET:
            try:
                data, anc, flags, addr = sock.recvmsg(_RECV_SIZE, _CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as err:  # e.g. a queued ICMP error; keep draining
                self.drops["udp_recv_error"] += 1
                log.debug("UDP receive error: %s", err)
                n += 1
                continue
            n += 1
            if core is None:
                self.drops["no_peers"] += 1
                continue
            if flags & _MSG_TRUNC:
                self.drops["truncated"] += 1
                continue
            segment = 0
            if gro and anc:
                for level, kind, value in anc:
                    if level == SOL_UDP and kind == UDP_GRO:
                        segment = _INT.unpack_from(value.ljust(4, b"\0"))[0]
            core.datagrams_received(data, addr, now, segment)
            if n % every == 0 or (segment and per_frame):  # a GRO buffer: many frames
                self._process(rearm=False)
        self.n_udp_recv += n + 1
        return n

    def _send_transmits(self, core: SleeveCore) -> None:
        transmits = core.take_transmits()
        if transmits:
            if self.gso and len(transmits) > 1:
                cfg = self.config
                transmits = gso_batches(transmits, cfg.max_gso_segments, cfg.max_gso_bytes)
            sender = self._sender
            if sender is not None:
                sender.submit(transmits)
                return
            sock = self.sock
            sent = 0
            for t in transmits:
                if not t.segment:  # the per-frame hot path: one datagram, nothing to decide
                    try:
                        sock.sendmsg(t.pieces, (), 0, t.addr)
                        sent += 1
                        continue
                    except OSError:
                        pass  # _send retries once and handles the error
                self._send(t)
            self.n_udp_send += sent

    def _send(self, t: Transmit, blocking: bool = False) -> None:
        """One transmission (runs on the loop, or on the sender thread with ``blocking``)."""
        sock = self.sock
        try:
            if not t.segment:
                sock.sendmsg(t.pieces, (), 0, t.addr)
                self.n_udp_send += 1
            elif self.gso:
                sock.sendmsg(
                    t.pieces, [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(t.segment))], 0, t.addr
                )
                self.n_udp_send += 1
            else:
                view = memoryview(t.buffer)
                seg = t.segment
                for start in range(0, len(view), seg):
                    sock.sendto(view[start : start + seg], t.addr)
                    self.n_udp_send += 1
        except BlockingIOError:
            if blocking and _wait_writable(sock.fileno()):
                self._send(t)  # once more, after the socket buffer drained a little
                return
            self.drops["udp_send_blocked"] += 1
        except OSError as err:
            if err.errno == errno.EMSGSIZE:
                size = t.segment or sum(len(p) for p in t.pieces)
                if blocking:
                    self.loop.call_soon_threadsafe(self._too_big, t.peer, size)
                else:
                    self._too_big(t.peer, size)
                self.drops["udp_too_big"] += 1
            elif t.segment and self.gso and err.errno in (errno.EINVAL, errno.EIO, errno.ENOTSUP):
                # The kernel (or the route's device) refuses UDP GSO: datagram by datagram from
                # now on (the wire is the same).
                log.warning("UDP GSO refused (%s): sending datagram by datagram", err)
                self.gso = False
                self.drops["udp_gso_refused"] += 1
                self._send(t, blocking)
            else:
                self.drops["udp_send_error"] += 1
                log.debug("UDP send to %s failed: %s", t.addr, err)

    def _write_frames(self, frames: list[TapFrame]) -> None:
        tap = self.tap
        if tap is None:
            return
        fd = tap.fd
        if self.tap_gro:
            flat = [b"".join(f) if isinstance(f, tuple) else f for f in frames]
            if not self._tap_merge:
                for f in flat:
                    try:
                        os.writev(fd, (VNET_ZERO, f))
                    except OSError:
                        self.drops["tap_write_error"] += 1
                self.n_tap_write += len(flat)
                return
            sources: list[Sequence[TapWriteFrame]] = []
            writes = coalesce(flat, sources)
            for w, src in zip(writes, sources, strict=True):
                try:
                    os.writev(fd, w)
                except OSError as err:
                    if len(src) > 1 and self._tap_merge:
                        # A kernel that refuses GSO writes: the segments one by one from now on.
                        log.warning("TAP refused a merged TCP write (%s): TAP GRO off", err)
                        self._tap_merge = False
                        self.drops["tap_gro_refused"] += 1
                    if len(src) > 1:
                        for f in src:
                            try:
                                os.writev(fd, (VNET_ZERO, f))
                            except OSError:
                                self.drops["tap_write_error"] += 1
                    else:
                        self.drops["tap_write_error"] += 1
            self.n_tap_write += len(writes)
            return
        for frame in frames:
            try:
                if type(frame) is tuple:
                    os.writev(fd, frame)  # a super-frame still in its fragments
                else:
                    os.write(fd, frame)  # type: ignore[arg-type]
            except OSError:
                self.drops["tap_write_error"] += 1
        self.n_tap_write += len(frames)

    def _send_batch(self, transmits: list[Transmit]) -> None:
        for t in transmits:
            self._send(t, blocking=True)

    def _too_big(self, peer: PeerName, size: int) -> None:
        if self.core is not None:
            self.core.send_too_big(peer, size, self.loop.time())
            self._process()

    def _process(self, rearm: bool = True) -> None:
        core = self.core
        if core is None:
            return
        core.flush()
        self._send_transmits(core)
        frames = core.take_tap_frames()
        if frames:
            if self.tap is None:
                self.drops["no_tap"] += len(frames)
            elif self._writer is not None:
                self._writer.submit(frames)
            else:
                self._write_frames(frames)
        for peer, message in core.take_control():
            conn = self._conns.get(peer)
            if conn is not None:
                try:
                    conn.params.send_control(message)
                except Exception:  # the connection is going away; its stop() follows
                    log.debug("overlay control to %s failed", peer, exc_info=True)
        while (event := core.next_event()) is not None:
            conn = self._conns.get(event.peer)
            if conn is None:
                continue
            try:
                if isinstance(event, LinkEstablished):
                    conn.params.on_established()
                if isinstance(event, LinkEstablished | LinkStatusChanged):
                    conn.params.on_status_changed()
            except Exception:
                log.exception("overlay callback failed for %s", event.peer)
        if rearm:
            self._arm()

    def _arm(self) -> None:
        core = self.core
        deadline = core.get_timer() if core is not None else None
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.core is not None:
            self.core.handle_timer(self.loop.time())
        self._process()


def _underlay_mtu(ip: str, port: int) -> int:
    """The local interface MTU towards ``ip`` (1500 when it cannot be read)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((ip, port))
            return int(probe.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:
        return 1500


def make_overlay(config: Any) -> SleeveOverlay:
    """The router's data plane from its ``RouterConfig`` (called inside the running loop).

    Sleeve knobs not (yet) in RouterConfig come from the environment:
    ``WEFT_SLEEVE_MODE`` = ``super-frames`` (default) or ``per-frame``; ``WEFT_MTU`` = the
    containers' MTU (default 1376); ``WEFT_BRIDGE`` = the bridge name (default ``weft``);
    ``WEFT_SLEEVE_LOCAL_OFFLOADS`` = ``auto`` (default: UDP GSO/GRO when the local kernel has
    them, in both modes, and TCP coalescing into the TAP on the per-frame path; they batch
    syscalls locally and leave the wire unchanged) or ``off`` (none: what a kernel without them
    gets); ``WEFT_SLEEVE_THREADS=1`` moves UDP sends and TAP writes
    to two threads (measured here: no clear gain and more CPU per byte on a busy 2-core machine,
    so off by default).
    """
    mode = os.environ.get("WEFT_SLEEVE_MODE", "super-frames")
    if mode not in ("super-frames", "per-frame"):
        raise ConfigError(f"WEFT_SLEEVE_MODE={mode!r}: expected super-frames or per-frame")
    mtu_text = os.environ.get("WEFT_MTU", "")
    try:
        mtu = int(mtu_text) if mtu_text else None
    except ValueError:
        raise ConfigError(f"WEFT_MTU={mtu_text!r} is not a number") from None
    port = int(getattr(config, "port", 6783) or 0)
    host = str(getattr(config, "listen_host", "0.0.0.0"))
    sleeve = SleeveConfig(port=port or 6783, tap_vnet_hdr=mode == "super-frames")
    threads = os.environ.get("WEFT_SLEEVE_THREADS", "0") in ("1", "yes", "true")
    offload = os.environ.get("WEFT_SLEEVE_LOCAL_OFFLOADS", "auto")
    if offload not in ("auto", "off"):
        raise ConfigError(f"WEFT_SLEEVE_LOCAL_OFFLOADS={offload!r}: expected auto or off")
    local = None if offload == "auto" else False
    return SleeveOverlay(
        sleeve,
        host=host,
        bridge=os.environ.get("WEFT_BRIDGE", "weft"),
        mtu=mtu,
        gso=local,
        gro=local,
        tap_gro=local,
        threads=threads,
    )
