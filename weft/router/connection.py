"""One control connection's asyncio pump: handshake, framed messages, heartbeats, read timeout.

A :class:`Connection` owns one TCP stream. It drives the sans-I/O
:class:`~weft.gossip.handshake.Handshake`, then the session's
:class:`~weft.gossip.session.FrameCodec`, and hands every decision to its host (the router):
whether a finished handshake is accepted (self, collision, duplicate), what a gossip/unicast/
broadcast message means, and what a closed connection changes. It handles alone only what is
local to the stream: heartbeats (tag 0), overlay control (tag 7, to its OverlayConnection) and
the read timeout.

Every problem with the peer's bytes is a :class:`~weft.errors.RemoteProtocolError`; it ends this
connection only, with ``str(err)`` as the reason that is logged, counted and shown in
``weft status connections``. Unexpected exceptions in the handling of one message (a bug) are
logged with a traceback and end only this connection too: the router keeps serving.

Message body = 1 tag byte + payload (docs/ARCHITECTURE.md, "Control connection" step 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.errors import LocalError, RemoteProtocolError
from weft.gossip.crypto import PasswordKeys
from weft.gossip.handshake import (
    Handshake,
    HandshakeError,
    HandshakeResult,
    Hello,
)
from weft.gossip.session import FrameCodec, FrameTooLarge, MessageAuthenticationFailed
from weft.overlay import OverlayConnection

__all__ = [
    "TAG_BROADCAST",
    "TAG_GOSSIP",
    "TAG_HEARTBEAT",
    "TAG_OVERLAY",
    "TAG_UNICAST",
    "Connection",
    "ConnectionHost",
    "ConnectionRefused",
    "ConnectionStats",
    "conn_uid",
    "error_label",
]

log = logging.getLogger("weft.router")

TAG_HEARTBEAT: Final = 0
TAG_GOSSIP: Final = 4
TAG_UNICAST: Final = 5
TAG_BROADCAST: Final = 6
TAG_OVERLAY: Final = 7
MESH_TAGS: Final = frozenset({TAG_GOSSIP, TAG_UNICAST, TAG_BROADCAST})
READ_SIZE: Final = 256 * 1024
# A peer that does not read what we send is cut off instead of growing our memory without bound.
MAX_SEND_BUFFER: Final = 32 * 1024 * 1024
CLOSE_GRACE: Final = 1.0  # seconds to flush a last message (e.g. our confirm) before closing


class ConnectionRefused(Exception):
    """Raised by the host's ``handshake_completed`` to refuse a connection with a reason.

    ``record``: show it in the failed rows of ``weft status connections`` (not for duplicates,
    which are normal). ``self_connection``: we dialled ourselves (the target is one of our own
    addresses).
    """

    def __init__(
        self,
        reason: str,
        *,
        record: bool = True,
        self_connection: bool = False,
        label: str = "refused",
    ):
        super().__init__(reason)
        self.record = record
        self.self_connection = self_connection
        self.label = label


class ConnectionHost(Protocol):
    """What a connection needs from its router. All calls happen on the event loop."""

    def hello_for(self, conn: Connection) -> tuple[Hello, PasswordKeys | None]:
        """Our hello for this connection and the mesh password's keys (None: plaintext)."""
        ...

    @property
    def identity_key(self) -> Ed25519PrivateKey:
        """The router's identity key, which the handshake proves to the peer."""
        ...

    def handshake_completed(self, conn: Connection) -> None:
        """Accept the connection (register it) or raise :class:`ConnectionRefused`."""
        ...

    def mesh_message(self, conn: Connection, tag: int, payload: bytes) -> None:
        """A gossip, unicast or broadcast message; may raise RemoteProtocolError."""
        ...

    def connection_closed(self, conn: Connection, reason: str, record: bool) -> None:
        """The connection is gone (called exactly once, also when it never completed)."""
        ...


@dataclass
class ConnectionStats:
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    heartbeats_in: int = 0
    by_tag_in: dict[int, int] = field(default_factory=dict)


def conn_uid(local_conn_id: int, remote_conn_id: int) -> int:
    """Both ends compute the same id for a connection (as Weave: xor); the lower one wins."""
    return local_conn_id ^ remote_conn_id


class _Closing(Exception):
    """Internal: end the pump with this reason (``label``: short, for counters)."""

    def __init__(self, reason: str, record: bool, label: str = "local"):
        super().__init__(reason)
        self.record = record
        self.label = label


def error_label(err: BaseException) -> str:
    """A short, stable label for counters: the handshake's own labels, else by error kind."""
    if isinstance(err, HandshakeError):
        return err.reason
    if isinstance(err, FrameTooLarge):
        return "frame_too_large"
    if isinstance(err, MessageAuthenticationFailed):
        return "authentication_failed"
    if isinstance(err, RemoteProtocolError):
        return "protocol_error"
    if isinstance(err, OSError):
        return "io_error"
    return "internal_error"


class Connection:
    """One control connection, inbound or outbound.

    ``address`` is what status shows: the dialled target for outbound connections, the remote
    ``ip:port`` for inbound ones. ``state`` goes connecting (handshake) -> pending (accepted,
    data path not yet proven by the overlay) -> established; a closed connection is removed.
    """

    def __init__(
        self,
        host: ConnectionHost,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        local_id: int,
        outbound: bool,
        address: str,
        target: str | None,
        handshake_timeout: float,
        heartbeat_interval: float,
        heartbeat_timeout: float,
    ) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer
        self.local_id = local_id
        self.outbound = outbound
        self.address = address
        self.target = target
        peer = writer.get_extra_info("peername")
        self.remote_ip: str = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.remote_port: int = int(peer[1]) if isinstance(peer, tuple) and len(peer) > 1 else 0
        self.conn_id = secrets.randbits(64)
        self.handshake_timeout = handshake_timeout
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.state = "connecting"
        self.result: HandshakeResult | None = None
        self.remote_hello: Hello | None = None  # known from the peer's hello on, even if it fails
        self.overlay: OverlayConnection | None = None
        self.accepted = False  # registered with the mesh (set by the host)
        self.mesh_told = False  # the mesh has seen this connection (accepted or rejected)
        self.started = time.monotonic()
        self.stats = ConnectionStats()
        self._codec: FrameCodec | None = None
        self._pending: list[bytes] = []  # messages that arrived together with the handshake
        self._close: _Closing | None = None
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self.close_label = ""  # why it ended, short (set before the host hears of the close)

    # -- queries ---------------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.result is not None and self.result.encrypted

    @property
    def uid(self) -> int:
        """The connection's tie-break id (only after the handshake)."""
        if self.result is None:
            raise LocalError("connection uid is only known after the handshake")
        return conn_uid(self.result.local.conn_id, self.result.remote.conn_id)

    def describe(self) -> str:
        """``-> 192.168.1.2:6783 aa:bb:..(nick)`` for log lines."""
        arrow = "->" if self.outbound else "<-"
        hello = self.remote_hello
        who = f" {hello.name}({hello.nickname})" if hello is not None else ""
        return f"{arrow} {self.address}{who}"

    # -- control from the host ---------------------------------------------------------------------

    def close(self, reason: str, *, record: bool = False, label: str = "local") -> None:
        """Ask the pump to end with ``reason``; safe to call more than once and from callbacks."""
        if self._close is None:
            self._close = _Closing(reason, record, label)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def send(self, tag: int, payload: bytes) -> None:
        self.send_many([bytes((tag,)) + payload])

    def send_many(self, messages: Iterable[bytes]) -> None:
        """Queue whole messages (tag byte included) for the peer; never blocks."""
        codec = self._codec
        if codec is None or self._closed or self._close is not None:
            return
        msgs = list(messages)
        if not msgs:
            return
        data = codec.encode_many(msgs)
        self.stats.messages_out += len(msgs)
        self.stats.bytes_out += len(data)
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError) as err:
            self.close(f"write failed: {err}", record=True, label="io_error")
            return
        if self.writer.transport.get_write_buffer_size() > MAX_SEND_BUFFER:
            self.close(
                f"peer is not reading: more than {MAX_SEND_BUFFER >> 20} MiB queued for it",
                record=True,
                label="peer_not_reading",
            )

    @property
    def send_backlog(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        if self._closed:
            return 0
        return int(self.writer.transport.get_write_buffer_size())

    # -- the pump ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the connection to its end; reports to the host exactly once. Never raises
        (except CancelledError when the whole router task is cancelled)."""
        self._task = asyncio.current_task()
        reason, record, label = "closed", False, "local"
        try:
            if self._close is not None:
                raise self._close
            await self._handshake()
            self.host.handshake_completed(self)
            self._heartbeat = asyncio.create_task(self._heartbeats())
            await self._read_loop()
        except _Closing as err:
            reason, record, label = str(err), err.record, err.label
        except ConnectionRefused as err:
            reason, record, label = str(err), err.record, err.label
        except RemoteProtocolError as err:
            reason, record, label = str(err), True, error_label(err)
        except asyncio.CancelledError:
            if self._close is None:
                self._close = _Closing("router stopping", False, "stopping")
                self.close_label = "stopping"
                self._finish(str(self._close), False)
                raise
            reason, record, label = str(self._close), self._close.record, self._close.label
        except (ConnectionError, OSError) as err:
            reason, record, label = f"connection error: {err.strerror or err}", True, "io_error"
        except Exception as err:  # a bug in handling one message must not stop the router
            log.exception("internal error on connection %s", self.describe())
            reason, record = f"internal error: {type(err).__name__}: {err}", True
            label = "internal_error"
        self.close_label = label
        self._finish(reason, record)
        await self._close_stream()

    def _finish(self, reason: str, record: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.writer.close()
        self.host.connection_closed(self, reason, record)

    async def _close_stream(self) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_GRACE)

    async def _flush(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.drain(), CLOSE_GRACE)

    async def _handshake(self) -> None:
        loop = asyncio.get_running_loop()
        hello, password = self.host.hello_for(self)
        hs = Handshake(
            self.outbound,
            hello,
            password,
            loop.time(),
            timeout=self.handshake_timeout,
            identity=self.host.identity_key,
        )
        self.writer.write(hs.data_to_send())
        try:
            while not hs.done:
                deadline = hs.get_timer()
                assert deadline is not None
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self.reader.read(READ_SIZE)
                except TimeoutError:
                    hs.handle_timer(max(loop.time(), deadline))
                    continue
                if not data:
                    hs.receive_eof()
                self.stats.bytes_in += len(data)
                try:
                    hs.receive(data, loop.time())
                finally:
                    self.remote_hello = hs.remote_hello
                out = hs.data_to_send()
                if out:
                    self.writer.write(out)
        except HandshakeError:
            # Our hello or confirm may still be queued: it is what lets the peer name the reason.
            out = hs.data_to_send()
            if out:
                self.writer.write(out)
            await self._flush()
            raise
        result = hs.result
        self.result = result
        self._codec = result.control
        self._pending = result.control.feed(result.leftover) if result.leftover else []

    async def _read_loop(self) -> None:
        codec = self._codec
        assert codec is not None
        self._dispatch(self._pending)
        self._pending = []
        reader = self.reader
        timeout = self.heartbeat_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                raise _Closing(
                    f"no message from the peer for {timeout:g}s (heartbeat timeout)",
                    True,
                    "heartbeat_timeout",
                ) from None
            if not data:
                raise _Closing("connection closed by the peer", True, "closed_by_peer")
            self.stats.bytes_in += len(data)
            self._dispatch(codec.feed(data))

    def _dispatch(self, messages: list[bytes]) -> None:
        stats = self.stats
        for message in messages:
            if self._close is not None:
                raise self._close
            if not message:
                raise RemoteProtocolError("empty message (no tag byte)")
            tag = message[0]
            stats.messages_in += 1
            stats.by_tag_in[tag] = stats.by_tag_in.get(tag, 0) + 1
            if tag == TAG_HEARTBEAT:
                stats.heartbeats_in += 1
            elif tag in MESH_TAGS:
                self.host.mesh_message(self, tag, message[1:])
            elif tag == TAG_OVERLAY:
                if self.overlay is None:
                    raise RemoteProtocolError("overlay control message before the overlay started")
                self.overlay.control_received(message[1:])
            else:
                raise RemoteProtocolError(f"unknown message tag {tag}")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.send(TAG_HEARTBEAT, b"")
