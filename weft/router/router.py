"""The router: asyncio pumps around the sans-I/O MeshCore, the TCP listener/dialer and the API.

``Router(config, overlay)`` owns one :class:`~weft.gossip.mesh.MeshCore`, the control listener,
every control :class:`~weft.router.connection.Connection`, and one aiohttp ``Application`` served
on the HTTP address and the unix socket (docs/ARCHITECTURE.md, "Router composition").

The pump (aioquic's shape): after every input to the core -- a received message, a connection
added or removed, an API call, the timer -- :meth:`Router.pump` drains ``messages_to_send()`` to the
connections, handles ``next_event()`` (dials, route changes) and re-arms the one timer from
``get_timer()``. Nothing else touches the core.

Connection policy decided here (Weave's):

* connect-to-self: the remote has our name and uid -> "cannot connect to ourself"; the address is
  reported to the mesh so it is never dialled again.
* name collision: our name, another uid -> refused with a reason naming the address.
* duplicates: two connections to one peer -> the one with the lower connection uid (local conn id
  xor remote conn id, the same number on both ends) wins; a peer with a new uid (restarted)
  replaces its old connection at once.
* a connection limit (handshaking ones included) and an accept token bucket (20 tokens, one more
  every 50 ms) bound what strangers can make us do; connections that have not authenticated yet
  have their own small budget (:mod:`weft.gossip.admission`: 32 in all, 4 per source, 8 kept
  for our own dials), decided before we spend anything on them, refusals logged aggregated.

Failures stay visible: a refused or failed connection leaves a row (state ``failed``, or
``retrying`` while the connection maker still dials that address) with the reason, until a
connection to the same address or peer succeeds. Every close is one log line with peer and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from weft import __version__
from weft.atomicfile import write_atomic
from weft.errors import ConfigError, WeftError
from weft.gossip.admission import Admission, Admitted
from weft.gossip.channel import GossipData, GossipHandler, GossipSender
from weft.gossip.crypto import PasswordKeys
from weft.gossip.handshake import PROTOCOL_VERSIONS, Hello
from weft.gossip.mesh import (
    ConnectionRejected,
    DialRequested,
    MeshConfig,
    MeshCore,
    MeshEvent,
    PeerRestarted,
    PeersRemoved,
    RecordsRefused,
    RoutesChanged,
    ShortIdChanged,
)
from weft.gossip.peer import SHORT_ID_BITS, PeerIdentity, PeerName, random_uid
from weft.gossip.topology import DATA_STATES, DATAPATHS, LinkAttributes
from weft.overlay import (
    NullOverlay,
    Overlay,
    OverlayConnectionParams,
    OverlayConnectionStatus,
)
from weft.router.access import AccessPolicy, resolve_group
from weft.router.config import (
    RouterConfig,
    format_hostport,
    load_mesh_salt,
    load_or_create_identity_key,
    load_or_create_name,
    parse_hostport,
    save_mesh_salt,
)
from weft.router.connection import TAG_OVERLAY, Connection, ConnectionRefused

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["FailureRow", "Router", "TokenBucket"]

log = logging.getLogger("weft.router")

TARGETS_FILE: Final = "targets.json"
MAX_FAILURE_ROWS: Final = 100
MAX_FAILURE_CODES: Final = 32  # distinct dial / handshake failure codes kept (then "other")
FAILURE_TTL: Final = 600.0  # seconds a failure row stays without a newer event
SEND_BACKLOG_HIGH: Final = 1 << 20  # bytes queued to a peer before its gossip is held back
FEATURE_PORT: Final = "weft_port"  # our listen port, so inbound connections get a dialable address
FEATURE_HB_TIMEOUT: Final = "weft_hb_timeout"  # our read timeout, so the peer heartbeats in time


class TokenBucket:
    """A token bucket with an injected clock: ``take(now)`` returns how long to wait (0: go).

    Full at ``capacity`` tokens; one token comes back every ``interval`` seconds. Weave bounds
    accepts with 20 tokens / 50 ms; a taker that must wait gets a reserved slot in the future.
    """

    def __init__(self, capacity: int, interval: float, now: float) -> None:
        if capacity < 1 or interval <= 0:
            raise ConfigError("token bucket needs capacity >= 1 and interval > 0")
        self.capacity = capacity
        self.interval = interval
        # Virtual time of the last token handed out; tokens available at ``now`` are
        # (now - last) / interval, at most ``capacity``. Starts full.
        self._last = now - capacity * interval

    def take(self, now: float) -> float:
        start = max(self._last, now - self.capacity * self.interval) + self.interval
        self._last = start
        wait = start - now
        return wait if wait > 1e-9 else 0.0  # not a float rounding error's worth of sleep


class _PumpingSender:
    """A GossipSender that makes the router pump after each send."""

    def __init__(self, sender: GossipSender, schedule_pump: Callable[[], None]) -> None:
        self._sender = sender
        self._schedule_pump = schedule_pump

    def gossip(self, data: GossipData) -> None:
        self._sender.gossip(data)
        self._schedule_pump()

    def broadcast(self, data: GossipData) -> None:
        self._sender.broadcast(data)
        self._schedule_pump()

    def unicast(self, dst: PeerName, payload: bytes) -> None:
        self._sender.unicast(dst, payload)
        self._schedule_pump()


@dataclass
class FailureRow:
    """A failed or refused connection, kept for ``weft status connections``."""

    address: str
    outbound: bool
    info: str
    at: float
    peer: str | None = None
    nickname: str | None = None
    encrypted: bool = False
    count: int = 1


class Router:
    """One weft router. Construct, add routes/providers to :attr:`app`, then ``await start()``.

    ``overlay``: the data plane (:class:`~weft.overlay.NullOverlay` when None). ``rng``:
    randomness for names, uids and the mesh (seed it in tests).
    """

    def __init__(
        self,
        config: RouterConfig,
        overlay: Overlay | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        from weft.router import api

        self.config = config = config.validated()
        self._rng = rng or random.Random()
        name = load_or_create_name(config.data_dir, config.name, self._rng)
        self.identity_key = load_or_create_identity_key(config.data_dir)
        self.identity = PeerIdentity(
            name=name,
            nickname=config.nickname,
            uid=random_uid(self._rng),
            short_id=self._rng.getrandbits(SHORT_ID_BITS),
        )
        self.password_keys: PasswordKeys | None = None
        if config.password:
            salt, settled = load_mesh_salt(config.data_dir)
            self.password_keys = PasswordKeys(config.password, salt, settled)
        self.overlay: Overlay = overlay if overlay is not None else NullOverlay()
        # Port 0 (tests): bind now, so the mesh and the overlay know the real port from the start.
        self._listen_sock: socket.socket | None = None
        self.port = config.port
        if config.port == 0:
            self._listen_sock = _bound_socket(config.listen_host)
            self.port = int(self._listen_sock.getsockname()[1])
        self.mesh = MeshCore(
            self.identity,
            MeshConfig(port=self.port, discovery=config.discovery),
            self._rng,
            now=self.now(),
            key=self.identity_key,
        )
        self.http_port: int | None = None
        self.status_port: int | None = None
        access = self._access_policy()
        self.app: web.Application = api.make_app(self, access)
        # read-only twin of the API for --status-addr (status, report; UI and metrics plug in);
        # the same Host allow-list, its own listen address among the accepted names
        status_host = (
            parse_hostport(config.status_addr, what="--status-addr")[0]
            if config.status_addr
            else access.bound_host
        )
        self.status_app: web.Application = api.make_status_app(
            self, dataclasses.replace(access, bound_host=status_host)
        )
        self.counters: Counter[str] = Counter()
        # Dials that found no connection and connections closed before their handshake ended,
        # by a short reason code (metrics: weft_dial_failures_total, weft_handshake_failures_...)
        self.failures: dict[str, Counter[str]] = {"dial": Counter(), "handshake": Counter()}
        self._refused_log_at = -math.inf
        self._refused_unlogged = 0
        self._conns: dict[int, Connection] = {}
        self._by_peer: dict[PeerName, Connection] = {}
        self._dialing: set[str] = set()
        self._accept_waiting = 0
        self._backlogged: set[int] = set()  # conn ids whose send backlog was high
        self._failures: dict[tuple[bool, str], FailureRow] = {}
        self._next_local_id = 1
        self._status_providers: dict[str, Callable[[], Any]] = {}
        self._status_callbacks: list[Callable[[], None]] = []
        self._closed_callbacks: list[Callable[[str, str], None]] = []
        self._status_scheduled = False
        self._pumping = False
        self._pump_again = False
        self._pump_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._unblock: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._timer_not_before = 0.0
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._status_runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self._bucket = TokenBucket(config.accept_burst, config.accept_interval, self.now())
        # connections not yet authenticated: their budget, and how to close one to evict it
        self.admission = Admission(config.admission_config())
        self._unauth_closers: dict[int, Callable[[str], None]] = {}
        self._admission_timer: asyncio.TimerHandle | None = None

    # -- composition ------------------------------------------------------------------------------

    def add_status_provider(self, key: str, fn: Callable[[], Any]) -> None:
        """Add a top-level key to ``/status``; ``fn`` runs on the loop, must not block."""
        if key == "router" or key in self._status_providers:
            raise ConfigError(f"status key {key!r} is already provided")
        self._status_providers[key] = fn

    def on_status_changed(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (coalesced, on the loop) after anything in ``/status`` changed."""
        self._status_callbacks.append(callback)

    def register_channel(self, name: str, handler: GossipHandler) -> GossipSender:
        """Attach an application gossip channel (IPAM, DNS, ...) to the mesh.

        Prefer this to ``router.mesh.register_channel``: the sender returned here also gets what
        it queues sent out when it is used outside a mesh callback (an HTTP handler, a timer of
        the component's own), by scheduling one pump on the loop.
        """
        return _PumpingSender(self.mesh.register_channel(name, handler), self.schedule_pump)

    def schedule_pump(self) -> None:
        """Pump soon (once, on the next loop iteration), e.g. after queueing gossip."""
        if self._pump_scheduled or self._stopping:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not started yet: start() pumps
        self._pump_scheduled = True
        loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self.pump()

    def on_connection_closed(self, callback: Callable[[str, str], None]) -> None:
        """``callback(label, reason)`` after each control connection ends (e.g. for metrics);
        ``label`` is the short counter label (see ``counters``), ``reason`` the logged text."""
        self._closed_callbacks.append(callback)

    def status_changed(self) -> None:
        """Note that the status changed; callbacks run once on the next loop iteration."""
        if self._status_scheduled or not self._status_callbacks:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._status_scheduled = True
        loop.call_soon(self._run_status_callbacks)

    def _run_status_callbacks(self) -> None:
        self._status_scheduled = False
        for cb in list(self._status_callbacks):
            try:
                cb()
            except Exception:
                log.exception("status callback %r failed", cb)

    def _access_policy(self) -> AccessPolicy:
        """Who may change us over the API, and the names it answers to (weft/router/access)."""
        cfg = self.config
        group = resolve_group(cfg.api_group) if cfg.api_group is not None else os.getegid()
        return AccessPolicy(
            owner_uid=os.geteuid(),
            group=group,
            bound_host=cfg.http_host_port[0],
            allow_hosts=tuple(name.strip() for name in cfg.api_allow_hosts),
            socket_path=str(cfg.api_socket) if cfg.api_socket is not None else None,
        )

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (control port, HTTP API, unix socket), then dial the initial peers.

        Raises ConfigError with a readable reason when an address cannot be bound.
        """
        from aiohttp import web

        cfg = self.config
        try:
            if self._listen_sock is not None:
                self._server = await asyncio.start_server(
                    self._accepted, sock=self._listen_sock, limit=1 << 16
                )
            else:
                self._server = await asyncio.start_server(
                    self._accepted, cfg.listen_host, cfg.port, reuse_address=True, limit=1 << 16
                )
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {format_hostport(cfg.listen_host, cfg.port)}: {_oserror(err)}"
            ) from None
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        host, port = cfg.http_host_port
        try:
            site = web.TCPSite(self._runner, host, port, reuse_address=True)
            await site.start()
            bound = [a for a in self._runner.addresses if isinstance(a, tuple)]
            self.http_port = int(bound[0][1]) if bound else port
        except OSError as err:
            await self._abort_start()
            raise ConfigError(
                f"cannot serve the HTTP API on {cfg.http_addr}: {_oserror(err)}"
            ) from None
        if cfg.api_socket is not None:
            try:
                cfg.api_socket.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    if cfg.api_socket.is_socket():
                        cfg.api_socket.unlink()
                await web.UnixSite(self._runner, str(cfg.api_socket)).start()
                # the API can stop the router and attach containers: owner and group only (the
                # caller is checked again per request, weft/router/access.py)
                if cfg.api_group is not None:
                    os.chown(cfg.api_socket, -1, resolve_group(cfg.api_group))
                cfg.api_socket.chmod(0o660)
            except OSError as err:
                await self._abort_start()
                raise ConfigError(
                    f"cannot serve the API on {cfg.api_socket}: {_oserror(err)}"
                ) from None
        if cfg.status_addr:
            shost, sport = parse_hostport(cfg.status_addr, what="--status-addr")
            self._status_runner = web.AppRunner(
                self.status_app, handle_signals=False, access_log=None, shutdown_timeout=2.0
            )
            await self._status_runner.setup()
            try:
                await web.TCPSite(self._status_runner, shost, sport, reuse_address=True).start()
            except OSError as err:
                await self._abort_start()
                raise ConfigError(
                    f"cannot serve status on {cfg.status_addr}: {_oserror(err)}"
                ) from None
            bound = [a for a in self._status_runner.addresses if isinstance(a, tuple)]
            self.status_port = int(bound[0][1]) if bound else sport
        peers = list(cfg.peers) if cfg.peers else self._load_targets()
        if peers:
            self.mesh.add_targets(peers, self.now())
            self._save_targets()
        log.info(
            "router %s(%s) uid %x listening on %s, API on %s%s%s, encryption %s",
            self.identity.name,
            self.identity.nickname,
            self.identity.uid,
            format_hostport(cfg.listen_host, self.port),
            format_hostport(host, self.http_port),
            f" and {cfg.api_socket}" if cfg.api_socket else "",
            f", status on {cfg.status_addr}" if cfg.status_addr else "",
            "on" if self.password_keys else "off",
        )
        self.pump()

    async def _abort_start(self) -> None:
        if self._server is not None:
            self._server.close()
        for runner in (self._runner, self._status_runner):
            if runner is not None:
                await runner.cleanup()

    async def stop(self) -> None:
        """Close every connection and listener; idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("router %s stopping", self.identity.name)
        for handle in (self._timer, self._unblock, self._admission_timer):
            if handle is not None:
                handle.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.close("router stopping")
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        stop_overlay = getattr(self.overlay, "close", None)
        if callable(stop_overlay):
            with contextlib.suppress(Exception):
                result = stop_overlay()
                if asyncio.iscoroutine(result):
                    await result
        for runner in (self._runner, self._status_runner):
            if runner is not None:
                await runner.cleanup()
        if self._listen_sock is not None:
            self._listen_sock.close()
        if self.config.api_socket is not None:
            with contextlib.suppress(OSError):
                if self.config.api_socket.is_socket():
                    self.config.api_socket.unlink()
        self._stopped.set()

    def request_stop(self) -> None:
        """Stop soon (from an API handler or a signal: the reply goes out first)."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def connections(self) -> list[Connection]:
        """Our current control connections (handshaking ones included), for diagnostics."""
        return list(self._conns.values())

    def connection_to(self, peer: PeerName) -> Connection | None:
        """The accepted connection to ``peer``, if any."""
        return self._by_peer.get(peer)

    # -- targets (API) ----------------------------------------------------------------------------

    def connect(self, peers: Iterable[str], replace: bool = False) -> list[str]:
        from weft.router.config import parse_peer

        addresses = [parse_peer(p, self.config.port or 6783) for p in peers]
        self.mesh.add_targets(addresses, self.now(), replace=replace)
        self._save_targets()
        log.info("connect %s%s", " ".join(addresses) or "-", " (replace)" if replace else "")
        self.pump()
        return addresses

    def forget(self, peers: Iterable[str]) -> list[str]:
        from weft.router.config import parse_peer

        addresses = [parse_peer(p, self.config.port or 6783) for p in peers]
        self.mesh.forget_targets(addresses, self.now())
        self._save_targets()
        log.info("forget %s", " ".join(addresses))
        self.pump()
        return addresses

    def _load_targets(self) -> list[str]:
        path = self.config.data_dir / TARGETS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable %s: %s", path, err)
            return []
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            log.warning("ignoring malformed %s", path)
            return []
        return list(data)

    def _save_targets(self) -> None:
        path: Path = self.config.data_dir / TARGETS_FILE
        try:
            write_atomic(path, json.dumps(self.mesh.direct_targets()))
        except OSError as err:
            log.warning("cannot persist targets in %s: %s", path, err)

    # -- the pump ---------------------------------------------------------------------------------

    def pump(self) -> None:
        """Drain the core: messages, events, timer. Re-entrant calls fold into the running one."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._pump_once()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        self._arm_timer()

    def _pump_once(self) -> None:
        mesh = self.mesh
        # A connection whose writer is backed up keeps its gossip pending (and merged) in the
        # core; a short re-pump retries it once the kernel has taken some of the backlog. Only
        # connections seen backed up after a send are checked (not every connection per pump).
        blocked = {
            cid
            for cid in self._backlogged
            if (c := self._conns.get(cid)) is not None and c.send_backlog > SEND_BACKLOG_HIGH
        }
        self._backlogged = blocked
        if blocked and self._unblock is None and not self._stopping:
            self._unblock = asyncio.get_running_loop().call_later(0.1, self._on_unblock)
        batches: dict[int, list[bytes]] = {}
        for conn_id, tag, payload in mesh.messages_to_send(blocked):
            batches.setdefault(conn_id, []).append(bytes((tag,)) + payload)
        for conn_id, messages in batches.items():
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.send_many(messages)
                if conn.send_backlog > SEND_BACKLOG_HIGH:
                    self._backlogged.add(conn_id)
        changed = False
        while (event := mesh.next_event()) is not None:
            changed = True
            self._handle_event(event)
        if changed:
            self.status_changed()

    def _on_unblock(self) -> None:
        self._unblock = None
        self.pump()

    def _handle_event(self, event: MeshEvent) -> None:
        if isinstance(event, DialRequested):
            if not self._stopping:
                self._spawn(self._dial(event.address))
        elif isinstance(event, ConnectionRejected):
            conn = self._conns.get(event.conn_id)
            if conn is not None and conn.accepted:
                # replaced by a newer connection to the same peer; the core already forgot it
                self._detach(conn, event.reason, tell_mesh=False)
                conn.close(event.reason, label="replaced")
        elif isinstance(event, RoutesChanged):
            try:
                self.overlay.routes_changed(self.mesh.routes)
            except Exception:
                log.exception("overlay.routes_changed failed")
        elif isinstance(event, PeersRemoved):
            log.info("forgot unreachable peers %s", " ".join(str(n) for n in event.names))
        elif isinstance(event, PeerRestarted):
            log.info("peer %s restarted (uid %x -> %x)", event.name, event.old_uid, event.new_uid)
        elif isinstance(event, ShortIdChanged):
            log.info("our short id clashed and is now %d", event.short_id)
        elif isinstance(event, RecordsRefused):
            self._log_refused(event)
        else:
            log.debug("mesh event %r", event)

    def _log_refused(self, event: RecordsRefused) -> None:
        """One WARNING per 10 s at most for refused topology records (a flood must not flood
        the log); the ones in between are counted into the next line."""
        self.counters["records_refused"] += event.count
        now = self.now()
        if now < self._refused_log_at:
            self._refused_unlogged += event.count
            return
        self._refused_log_at = now + 10.0
        more, self._refused_unlogged = self._refused_unlogged, 0
        log.warning(
            "refused %d topology record(s) from %s (first: %s): %s%s",
            event.count,
            event.source,
            event.name,
            event.reason,
            f" ({more} more refused since the last report)" if more else "",
        )

    def _arm_timer(self) -> None:
        if self._stopping:
            return
        deadline = self.mesh.get_timer()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        # MeshCore's clock is time.monotonic(), which is also the loop's default clock.
        at = max(deadline, loop.time(), self._timer_not_before)
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.mesh.handle_timer(self.now())
        except Exception:
            # a bug in the core: log it, and do not spin on a deadline that stays in the past
            log.exception("mesh timer handling failed")
            self._timer_not_before = self.now() + 1.0
        self.pump()

    # -- connections ---------------------------------------------------------------------------

    def _new_local_id(self) -> int:
        local_id = self._next_local_id
        self._next_local_id += 1
        return local_id

    def _make_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        outbound: bool,
        address: str,
        target: str | None,
        local_id: int,
    ) -> Connection:
        cfg = self.config
        conn = Connection(
            self,
            reader,
            writer,
            local_id=local_id,
            outbound=outbound,
            address=address,
            target=target,
            handshake_timeout=cfg.handshake_timeout,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_timeout=cfg.heartbeat_timeout,
        )
        self._conns[conn.local_id] = conn
        self.status_changed()
        return conn

    def _connection_count(self) -> int:
        """Connections counted against ``conn_limit``: live, dialling, waiting for a token."""
        return len(self._conns) + len(self._dialing) + self._accept_waiting

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = format_hostport(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else "?"
        ip = str(peer[0]) if isinstance(peer, tuple) else "?"
        if self._stopping:
            writer.close()
            return
        now = self.now()
        if self._connection_count() >= self.config.conn_limit:
            reason = f"connection limit reached ({self.config.conn_limit})"
            self.counters["refused_conn_limit"] += 1
            self._log_refusal(self.admission.note_refused(ip, "conn_limit", now), address, reason)
            self._record_failure(False, address, reason, None, None, False)
            writer.close()
            return
        # Before anything is spent on it (a token, a task, a handshake): the stranger's budget.
        local_id = self._new_local_id()
        verdict = self.admission.admit_inbound(local_id, ip, now)
        if not isinstance(verdict, Admitted):
            self.counters[f"refused_{verdict.label}"] += 1
            self._log_refusal(verdict.log, address, verdict.reason)
            self._record_failure(False, address, verdict.reason, None, None, False)
            writer.close()
            return
        if verdict.evict is not None:
            self._evict(verdict.evict, verdict.evict_reason)
        try:
            ended = await self._accept_token(local_id)
            if ended is not None:
                writer.close()
                if not self._stopping:
                    self._log_stranger_closed(f"<- {address}", ip, ended)
                return
            self.counters["accepted"] += 1
            conn = self._make_connection(
                reader, writer, outbound=False, address=address, target=None, local_id=local_id
            )
        except BaseException:
            self._release_unauth(local_id)
            raise
        self._unauth_closers[local_id] = lambda why: conn.close(why, record=True, label="evicted")
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await conn.run()

    async def _accept_token(self, local_id: int) -> str | None:
        """Wait for an accept token; the reason when evicted or stopping meanwhile (then the
        connection is released), None to go on."""
        delay = self._bucket.take(self.now())
        if delay <= 0:
            return None
        # Weave's listener waits for a token before accepting; we accepted already, so the
        # wait happens here, counted against the connection limit and the stranger budget.
        self.counters["accept_delayed"] += 1
        self._accept_waiting += 1
        evicted = asyncio.Event()
        why_evicted = ""

        def evict(why: str) -> None:
            nonlocal why_evicted
            why_evicted = why
            evicted.set()

        self._unauth_closers[local_id] = evict
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(evicted.wait(), delay)
        finally:
            self._accept_waiting -= 1
            self._unauth_closers.pop(local_id, None)
        if evicted.is_set() or self._stopping:
            self._release_unauth(local_id)
            return why_evicted or "router stopping"
        return None

    def _evict(self, local_id: int, reason: str) -> None:
        """Close an unauthenticated inbound connection the admission core gave up for another."""
        self.counters["unauth_evicted"] += 1
        closer = self._unauth_closers.pop(local_id, None)
        if closer is not None:
            closer(reason)

    def _release_unauth(self, local_id: int) -> None:
        self.admission.release(local_id)
        self._unauth_closers.pop(local_id, None)

    def _log_refusal(self, individually: bool, address: str, reason: str) -> None:
        """One line for the first refusals of an interval, the rest in its summary line."""
        if individually:
            log.warning(
                "refused <- %s: %s (more refusals are summed up every %gs)",
                address,
                reason,
                self.admission.config.log_interval,
            )
        else:
            log.debug("refused <- %s: %s", address, reason)
        self._arm_admission_timer()

    def _log_stranger_closed(self, who: str, ip: str, reason: str) -> None:
        """An inbound connection ended before authenticating: the interval's first few are
        logged, the rest summed up (a flood must not write a line per connection)."""
        individually = self.admission.note_failed(ip, self.now())
        log.log(
            logging.INFO if individually else logging.DEBUG, "connection %s closed: %s", who, reason
        )
        self._arm_admission_timer()

    def _arm_admission_timer(self) -> None:
        if self._admission_timer is not None or self._stopping:
            return
        at = self.admission.get_timer()
        if at is not None:
            loop = asyncio.get_running_loop()
            self._admission_timer = loop.call_at(max(at, loop.time()), self._on_admission_timer)

    def _on_admission_timer(self) -> None:
        self._admission_timer = None
        summary = self.admission.handle_timer(self.now())
        if summary is not None:
            log.warning("%s", summary.message())
        self._arm_admission_timer()

    async def _dial(self, address: str) -> None:
        if address in self._dialing:
            return
        if self._connection_count() >= self.config.conn_limit:
            self._dial_failed(
                address, f"connection limit reached ({self.config.conn_limit})", "conn_limit"
            )
            return
        self._dialing.add(address)
        self.status_changed()
        try:
            host, port = parse_hostport(address, what="peer", default_port=6783)
            async with asyncio.timeout(self.config.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        except TimeoutError:
            self._dialing.discard(address)
            self._dial_failed(
                address, f"connect timed out after {self.config.connect_timeout:g}s", "timeout"
            )
            return
        except (OSError, WeftError) as err:
            self._dialing.discard(address)
            text = _oserror(err) if isinstance(err, OSError) else str(err)
            self._dial_failed(address, f"cannot connect: {text}", _errno_code(err))
            return
        except asyncio.CancelledError:
            self._dialing.discard(address)
            raise
        self._dialing.discard(address)
        if self._stopping:
            writer.close()
            return
        local_id = self._new_local_id()
        verdict = self.admission.admit_outbound(local_id, self.now())
        if not isinstance(verdict, Admitted):
            # only our own dials can fill the reserve: the connection maker retries later
            self.counters[f"refused_{verdict.label}"] += 1
            writer.close()
            self._dial_failed(address, verdict.reason, f"refused_{verdict.label}")
            return
        conn = self._make_connection(
            reader, writer, outbound=True, address=address, target=address, local_id=local_id
        )
        await conn.run()

    def _count_failure(self, kind: str, code: str) -> None:
        tally = self.failures[kind]
        if code not in tally and len(tally) >= MAX_FAILURE_CODES:
            code = "other"  # codes come from errno names and close labels: few, but bounded
        tally[code] += 1

    def _dial_failed(self, address: str, reason: str, code: str = "other") -> None:
        self.counters["dial_failed"] += 1
        self._count_failure("dial", code)
        log.info("connect -> %s failed: %s", address, reason)
        self._record_failure(True, address, reason, None, None, False)
        self.mesh.dial_failed(address, self.now(), reason)
        self.pump()
        self.status_changed()

    # ConnectionHost ---------------------------------------------------------------------------

    def hello_for(self, conn: Connection) -> tuple[Hello, PasswordKeys | None]:
        features: dict[str, Any] = dict(self.overlay.features())
        features[FEATURE_PORT] = self.port
        features[FEATURE_HB_TIMEOUT] = self.config.heartbeat_timeout
        # the mesh may have reassigned our short id after a clash (ShortIdChanged)
        identity = dataclasses.replace(self.identity, short_id=self.mesh.short_id)
        return Hello.from_identity(identity, conn.conn_id, features), self.password_keys

    def handshake_completed(self, conn: Connection) -> None:
        result = conn.result
        assert result is not None
        # authenticated (the password proven, or a plaintext mesh's hello): off the budget
        self._release_unauth(conn.local_id)
        keys = self.password_keys
        # The peer proved the password under this salt: it is our mesh's (docs/ARCHITECTURE.md).
        if result.salt is not None and keys is not None and keys.settle(result.salt):
            log.info("mesh salt %s settled (from %s)", result.salt.hex(), conn.describe())
            try:
                save_mesh_salt(self.config.data_dir, result.salt)
            except ConfigError as err:
                log.warning("%s; the next start learns the salt again from a peer", err)
        remote = result.remote
        peer_timeout = remote.features.get(FEATURE_HB_TIMEOUT)
        # Heartbeat often enough for the peer's read timeout too, if it is shorter than ours.
        if (
            isinstance(peer_timeout, int | float)
            and not isinstance(peer_timeout, bool)
            and peer_timeout > 0
        ):
            conn.heartbeat_interval = min(conn.heartbeat_interval, peer_timeout / 3)
        # MeshCore decides (self, name collision, duplicate tie-break, restarted peer); asking
        # first gives us the reason, connection_added then applies the same verdict.
        verdict = self.mesh.admission(remote.identity, conn.uid, remote.identity_key)
        now = self.now()
        added = self.mesh.connection_added(
            conn.local_id,
            remote.identity,
            self._mesh_address(conn),
            conn.outbound,
            now,
            conn_uid=conn.uid,
            identity_key=remote.identity_key,
        )
        if not added:
            conn.mesh_told = True  # the core answered the dial itself (dial_failed / self)
            self.pump()
            reason = verdict.reason or "refused by the mesh"
            if reason == "connection to self":
                raise ConnectionRefused(
                    "cannot connect to ourself", record=False, self_connection=True, label="self"
                )
            if reason.startswith("duplicate"):
                raise ConnectionRefused(
                    f"{reason}; the other one wins", record=False, label="duplicate"
                )
            if reason.startswith("peer name collision"):
                raise ConnectionRefused(f"{reason} (at {conn.address})", label="name_collision")
            if reason.startswith("identity key mismatch"):
                raise ConnectionRefused(f"{reason} (at {conn.address})", label="identity_mismatch")
            raise ConnectionRefused(reason)
        conn.state = "pending"
        conn.accepted = True
        conn.mesh_told = True
        self._by_peer[remote.name] = conn
        self._clear_failures(conn)
        log.info(
            "connection %s accepted (%s, protocol v%d)",
            conn.describe(),
            "encrypted" if result.encrypted else "plaintext",
            result.version,
        )
        me = self.identity
        params = OverlayConnectionParams(
            local_name=me.name,
            remote_name=remote.name,
            remote_short_id=remote.short_id,
            remote_ip=conn.remote_ip,
            outbound=conn.outbound,
            data_send_key=result.data_send_key,
            data_recv_key=result.data_recv_key,
            remote_features=remote.features,
            send_control=lambda payload: conn.send(TAG_OVERLAY, payload),
            on_established=lambda: self._overlay_established(conn),
            on_status_changed=lambda: self._overlay_status_changed(conn),
        )
        try:
            conn.overlay = self.overlay.prepare_connection(params)
        except Exception as err:
            log.exception("overlay could not prepare %s", conn.describe())
            raise ConnectionRefused(
                f"overlay failed: {type(err).__name__}: {err}", label="overlay_error"
            ) from err
        self._overlay_status_changed(conn)  # its first word, before our record is rebuilt
        # the ConnectionRejected events of replaced connections are handled here
        self.pump()
        self.status_changed()

    def _mesh_address(self, conn: Connection) -> str:
        """The address the mesh records for a connection (others may dial it via discovery)."""
        if conn.outbound and conn.target is not None:
            return conn.target
        assert conn.result is not None
        port = conn.result.remote.features.get(FEATURE_PORT)
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            return format_hostport(conn.remote_ip, port)
        return conn.address

    def _overlay_established(self, conn: Connection) -> None:
        if not conn.accepted or self._by_peer.get(self._peer_name(conn)) is not conn:
            return
        if conn.state == "established":
            return
        conn.state = "established"
        log.info("connection %s established", conn.describe())
        self.mesh.connection_established(conn.local_id, self.now())
        self.pump()
        self.status_changed()

    def _overlay_status_changed(self, conn: Connection) -> None:
        """The overlay's view of a connection changed: the mesh gossips what carries it in our
        record (coalesced there, so a status change per heartbeat costs nothing)."""
        if conn.accepted and conn.overlay is not None:
            try:
                attributes = link_attributes(conn.overlay.status(), conn.encrypted)
            except Exception:
                log.exception("overlay status failed for %s", conn.describe())
                attributes = None
            self.mesh.connection_attributes(conn.local_id, attributes, self.now())
            self.schedule_pump()  # the mesh's timer may have moved
        self.status_changed()

    @staticmethod
    def _peer_name(conn: Connection) -> PeerName:
        assert conn.result is not None
        return conn.result.remote.name

    def mesh_message(self, conn: Connection, tag: int, payload: bytes) -> None:
        if not conn.accepted:
            return
        try:
            self.mesh.receive(conn.local_id, tag, payload, self.now())
        finally:
            self.pump()

    def connection_closed(self, conn: Connection, reason: str, record: bool) -> None:
        self._conns.pop(conn.local_id, None)
        self._release_unauth(conn.local_id)
        label = conn.close_label or "unknown"
        self.counters[f"closed_{label}"] += 1
        if conn.result is None and label != "stopping":
            self._count_failure("handshake", label)
        for callback in list(self._closed_callbacks):
            try:
                callback(label, reason)
            except Exception:
                log.exception("connection-closed callback %r failed", callback)
        self._detach(conn, reason)
        hello = conn.remote_hello
        if conn.outbound and not conn.mesh_told and conn.target is not None:
            # the dial ended before the mesh saw a connection: answer its DialRequested
            self.mesh.dial_failed(conn.target, self.now(), reason)
        if record and not self._stopping:
            self.counters["connection_failed"] += 1
            self._record_failure(
                conn.outbound,
                conn.target if conn.outbound and conn.target else conn.address,
                reason,
                str(hello.name) if hello is not None else None,
                hello.nickname if hello is not None else None,
                conn.encrypted,
            )
        if reason == "cannot connect to ourself" and not conn.outbound:
            log.debug("connection %s closed: %s", conn.describe(), reason)
        elif not conn.outbound and conn.result is None and not self._stopping:
            self._log_stranger_closed(conn.describe(), conn.remote_ip, reason)
        else:
            log.info("connection %s closed: %s", conn.describe(), reason)
        self.pump()
        self.status_changed()

    def _detach(self, conn: Connection, reason: str, *, tell_mesh: bool = True) -> None:
        """Take a registered connection out of the mesh and the overlay (idempotent)."""
        if not conn.accepted:
            return
        conn.accepted = False
        assert conn.result is not None
        name = conn.result.remote.name
        if self._by_peer.get(name) is conn:
            del self._by_peer[name]
        if conn.overlay is not None:
            try:
                conn.overlay.stop()
            except Exception:
                log.exception("overlay stop failed for %s", conn.describe())
        if tell_mesh:
            self.mesh.connection_removed(conn.local_id, self.now(), reason)
        self.pump()

    # -- failure rows ---------------------------------------------------------------------------

    def _record_failure(
        self,
        outbound: bool,
        address: str,
        reason: str,
        peer: str | None,
        nickname: str | None,
        encrypted: bool,
    ) -> None:
        key = _failure_key(outbound, address, peer)
        now = self.now()
        row = self._failures.get(key)
        if row is None:
            row = FailureRow(address=address, outbound=outbound, info=reason, at=now)
            self._failures[key] = row
        else:
            row.count += 1
            row.address, row.info, row.at = address, reason, now
        row.peer = peer or row.peer
        row.nickname = nickname or row.nickname
        row.encrypted = encrypted
        self._expire_failures(now)

    def _expire_failures(self, now: float) -> None:
        for key, row in list(self._failures.items()):
            if now - row.at > FAILURE_TTL:
                del self._failures[key]
        if len(self._failures) > MAX_FAILURE_ROWS:
            oldest = sorted(self._failures.items(), key=lambda kv: kv[1].at)
            for key, _ in oldest[: len(self._failures) - MAX_FAILURE_ROWS]:
                del self._failures[key]

    def _clear_failures(self, conn: Connection) -> None:
        name = str(self._peer_name(conn))
        for key, row in list(self._failures.items()):
            if (
                row.peer == name
                or (conn.outbound and key == (True, conn.target))
                or (not conn.outbound and key == (False, conn.remote_ip))
            ):
                del self._failures[key]

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The status model (docs/ARCHITECTURE.md): ``{"router": {...}, "overlay": ..., ...}``."""
        from weft.router.api import jsonable

        now = self.now()
        mesh_status = self.mesh.status()
        targets = [dict(t) for t in mesh_status.get("targets", []) if isinstance(t, dict)]
        for t in targets:
            nt = t.get("next_try")
            if isinstance(nt, int | float):
                t["next_try"] = round(max(0.0, nt - now), 1)  # seconds from now
        retrying = {t["address"] for t in targets if t.get("state") in ("retrying", "failed")}
        doc: dict[str, Any] = {
            "router": {
                "name": str(self.identity.name),
                "nickname": self.identity.nickname,
                "uid": self.identity.uid,
                "short_id": mesh_status.get("short_id", self.identity.short_id),
                "version": mesh_status.get("version"),  # of our topology record
                "software": __version__,
                "pid": os.getpid(),
                "protocol": f"{PROTOCOL_VERSIONS[0]}..{PROTOCOL_VERSIONS[1]}",
                "encryption": self.password_keys is not None,
                "discovery": self.config.discovery,
                "port": self.port,
                "conn_limit": self.config.conn_limit,
                "unauthenticated": self.admission.status(),
                "peers": mesh_status.get("peers", []),
                "connections": self._connection_rows(now, retrying),
                "targets": targets,
                "counters": dict(self.counters),
                "failures": {kind: dict(t) for kind, t in self.failures.items()},
            },
            "overlay": self.overlay.status(),
        }
        for key, fn in self._status_providers.items():
            try:
                doc[key] = fn()
            except Exception as err:
                log.exception("status provider %r failed", key)
                doc[key] = {"error": f"{type(err).__name__}: {err}"}
        return jsonable(doc)  # type: ignore[no-any-return]

    def _connection_rows(self, now: float, retrying: set[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        live_addresses: set[str] = set()
        for conn in sorted(self._conns.values(), key=lambda c: c.address):
            hello = conn.remote_hello
            row: dict[str, Any] = {
                "peer": str(hello.name) if hello is not None else None,
                "nickname": hello.nickname if hello is not None else None,
                "address": conn.address,
                "outbound": conn.outbound,
                "state": conn.state,
                "info": "",
                "encrypted": conn.encrypted,
                "datapath": None,
                "mtu": None,
                "since": round(now - conn.started, 1),
                "stats": {
                    "messages_in": conn.stats.messages_in,
                    "messages_out": conn.stats.messages_out,
                    "bytes_in": conn.stats.bytes_in,
                    "bytes_out": conn.stats.bytes_out,
                },
            }
            if conn.state == "connecting":
                row["info"] = "handshake in progress"
            if conn.overlay is not None:
                try:
                    ov = conn.overlay.status()
                    row["datapath"] = ov.datapath
                    row["mtu"] = ov.mtu
                    row["data_state"] = ov.state
                    if conn.state == "established" and ov.state in ("degraded", "failed"):
                        # The control connection lives but no datapath carries heartbeats:
                        # say so at once (issue #17), not after the control timeout.
                        row["state"] = "degraded"
                    if ov.info:
                        row["info"] = ov.info
                    elif conn.state == "pending":
                        row["info"] = f"waiting for the {ov.datapath} data path ({ov.state})"
                    row["data_encrypted"] = ov.encrypted
                    row["heard"] = None if ov.heard is None else round(ov.heard, 3)
                    row["rtt"] = None if ov.rtt is None else round(ov.rtt, 6)
                except Exception as err:
                    row["info"] = f"overlay status failed: {err}"
            rows.append(row)
            if conn.target:
                live_addresses.add(conn.target)
        for address in sorted(self._dialing):
            rows.append(
                {
                    "peer": None,
                    "nickname": None,
                    "address": address,
                    "outbound": True,
                    "state": "connecting",
                    "info": "dialling",
                    "encrypted": False,
                    "datapath": None,
                    "mtu": None,
                }
            )
            live_addresses.add(address)
        self._expire_failures(now)
        for (outbound, _), f in sorted(self._failures.items(), key=lambda kv: kv[1].address):
            if outbound and f.address in live_addresses:
                continue
            state = "retrying" if outbound and f.address in retrying else "failed"
            rows.append(
                {
                    "peer": f.peer,
                    "nickname": f.nickname,
                    "address": f.address,
                    "outbound": f.outbound,
                    "state": state,
                    "info": f.info + (f" ({f.count} times)" if f.count > 1 else ""),
                    "encrypted": f.encrypted,
                    "datapath": None,
                    "mtu": None,
                    "since": round(now - f.at, 1),
                }
            )
        return rows


def link_attributes(ov: OverlayConnectionStatus, control_encrypted: bool) -> LinkAttributes:
    """What our record says carries a connection. ``encrypted``: all it carries is, i.e. the
    control connection and the data plane if there is one (datapath "none" has none), as the
    UI draws it."""
    datapath = ov.datapath if ov.datapath in DATAPATHS else None
    return LinkAttributes(
        datapath=datapath,
        encrypted=control_encrypted and (datapath == "none" or ov.encrypted),
        mtu=ov.mtu if ov.mtu is not None and 0 < ov.mtu < 65536 else None,
        state=ov.state if ov.state in DATA_STATES else None,
    )


def _errno_code(err: Exception) -> str:
    """``connection_refused``, ``no_route_to_host``, ...: a dial failure's metrics label."""
    import errno as errno_module

    if isinstance(err, socket.gaierror):
        return "name_resolution"
    code = getattr(err, "errno", None)
    if isinstance(code, int) and code in errno_module.errorcode:
        return os.strerror(code).lower().replace(" ", "_")[:40]
    if isinstance(err, OSError):
        return "os_error"  # e.g. a name that does not resolve (gaierror carries no errno)
    return "error"


def _oserror(err: OSError) -> str:
    """``address already in use`` rather than asyncio's long wrapper text."""
    return os.strerror(err.errno).lower() if err.errno else str(err)


def _bound_socket(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a free port (for ``port=0``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot bind a port on {host}: {_oserror(err)}") from None
    return sock


def _failure_key(outbound: bool, address: str, peer: str | None) -> tuple[bool, str]:
    """Outbound rows per target; inbound ones (ephemeral ports) per remote IP and peer name."""
    if outbound:
        return (True, address)
    return (False, f"{_host_part(address)}|{peer or ''}")


def _host_part(address: str) -> str:
    try:
        return parse_hostport(address, default_port=0)[0]
    except ConfigError:
        return address
