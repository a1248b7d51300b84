"""Framing of a control connection after the handshake (sans-I/O).

Wire format of every frame (docs/ARCHITECTURE.md, "Control connection" step 4)::

    length (uint32 big endian) || body            body = message          (plaintext mode)
                                                  body = AEAD(message)+tag (encrypted mode)

Encrypted bodies are ChaCha20-Poly1305 with one key per direction and the 96-bit nonce
``4 zero bytes || 64-bit counter``; the counter starts at 0 for the handshake's confirm frame and
grows by one per frame. It is never sent: both sides count, so a replayed, dropped or reordered
frame is opened with the wrong nonce and fails authentication. The 4 length bytes are the associated
data, so a tampered length fails too (rather than silently re-framing the stream).

The body is at most :data:`MAX_FRAME` (10 MiB, as Weave). A peer announcing more is refused before
anything is buffered.

:class:`FrameCodec` is the only public piece: ``encode(message) -> bytes`` and
``feed(data) -> list[bytes]`` (stream reassembly). After any error raised by :meth:`FrameCodec.feed`
the stream is unusable and the connection must be closed with ``str(err)`` as reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from weft.errors import LocalError, RemoteProtocolError

__all__ = [
    "LENGTH_SIZE",
    "MAX_FRAME",
    "TAG_SIZE",
    "FrameCodec",
    "FrameTooLarge",
    "MessageAuthenticationFailed",
    "SessionClosed",
]

MAX_FRAME: Final = 10 * 1024 * 1024
LENGTH_SIZE: Final = 4
TAG_SIZE: Final = 16
_MAX_COUNTER: Final = (1 << 64) - 1
_len = struct.Struct(">I")
_pack_len = _len.pack
_unpack_len = _len.unpack_from
_pack_nonce = struct.Struct(">4xQ").pack  # 4 zero bytes || 64-bit counter


class FrameTooLarge(RemoteProtocolError):
    """The peer announced a frame body above :data:`MAX_FRAME`."""


class MessageAuthenticationFailed(RemoteProtocolError):
    """An encrypted frame did not open: tampered, replayed, reordered or under another key."""


class SessionClosed(LocalError):
    """The codec was used after it failed (the connection should already be closing)."""


class _Sealer:
    """One direction's sealing: key + implicit counter."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.counter = 0

    def seal(self, prefix: bytes, message: bytes | bytearray | memoryview) -> bytes:
        counter = self.counter
        if counter > _MAX_COUNTER:
            raise LocalError("control counter exhausted: the connection must be re-established")
        self.counter = counter + 1
        return self._aead.encrypt(_pack_nonce(counter), message, prefix)


class _Opener:
    """One direction's opening: key + implicit counter."""

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self.counter = 0

    def open(self, prefix: bytes, body: bytes | bytearray | memoryview) -> bytes:
        counter = self.counter
        try:
            plaintext = self._aead.decrypt(_pack_nonce(counter), body, prefix)
        except InvalidTag:
            raise MessageAuthenticationFailed(
                f"message authentication failed (frame {counter})"
            ) from None
        self.counter = counter + 1
        return plaintext


def _too_large(length: int) -> FrameTooLarge:
    return FrameTooLarge(f"frame too large: {length} bytes (max {MAX_FRAME})")


class FrameCodec:
    """Length-prefixed framing, sealed per direction when keys are given.

    ``FrameCodec()`` is plaintext mode; ``FrameCodec(send_key, recv_key)`` is encrypted. The
    handshake builds the codec (its confirm frames use counter 0) and hands it over in
    :class:`~weft.gossip.handshake.HandshakeResult`; nobody else needs the constructor except tests.

    Not thread-safe; one instance per connection on the event loop.
    """

    __slots__ = ("_buf", "_failed", "_need", "_opener", "_sealer")

    def __init__(self, send_key: bytes | None = None, recv_key: bytes | None = None) -> None:
        if (send_key is None) != (recv_key is None):
            raise LocalError("FrameCodec needs both keys or neither")
        self._sealer = _Sealer(send_key) if send_key is not None else None
        self._opener = _Opener(recv_key) if recv_key is not None else None
        self._buf = bytearray()
        self._need = LENGTH_SIZE  # bytes buffered before parsing is worth trying
        self._failed: RemoteProtocolError | None = None

    @property
    def encrypted(self) -> bool:
        return self._sealer is not None

    @property
    def overhead(self) -> int:
        """Bytes added to each message on the wire."""
        return LENGTH_SIZE + (TAG_SIZE if self._sealer is not None else 0)

    @property
    def frames_sent(self) -> int:
        """Encrypted mode: the send counter (includes the handshake's confirm)."""
        return self._sealer.counter if self._sealer is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet forming a whole frame."""
        return len(self._buf)

    def encode(self, message: bytes | bytearray | memoryview) -> bytes:
        """One frame ready for the wire. Raises LocalError if the message is above the bound."""
        sealer = self._sealer
        if sealer is None:
            size = len(message)
            if size > MAX_FRAME:
                raise LocalError(f"message of {size} bytes exceeds the frame limit {MAX_FRAME}")
            return _pack_len(size) + message
        size = len(message) + TAG_SIZE
        if size > MAX_FRAME:
            raise LocalError(f"message of {len(message)} bytes exceeds the frame limit {MAX_FRAME}")
        prefix = _pack_len(size)
        return prefix + sealer.seal(prefix, message)

    def encode_many(self, messages: Iterable[bytes | bytearray | memoryview]) -> bytes:
        """Several frames joined, for one write."""
        return b"".join([self.encode(m) for m in messages])

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return every complete message, in order.

        Raises :class:`FrameTooLarge` or :class:`MessageAuthenticationFailed`; the codec then
        refuses further input with :class:`SessionClosed`. Messages completed before the bad frame
        in the same call are lost with it: the connection is going away anyway.
        """
        if self._failed is not None:
            raise SessionClosed(f"session already failed: {self._failed}")
        # Bytes are accumulated in a bytearray only while a frame is incomplete, and parsed only
        # once ``_need`` bytes are there: a 10 MiB frame arriving in 64 KiB reads costs one copy,
        # not one per read.
        chunk: bytes | bytearray | memoryview
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            # Take the buffer over instead of copying it: it is never resized again, so the
            # memoryview slices handed to the AEAD below cannot pin a buffer we resize.
            chunk = self._buf
            self._buf = bytearray()
        else:
            # A caller's bytearray or memoryview is copied: no view of it may outlive this call
            # (an exception's traceback would keep one alive and block the caller's resizes).
            chunk = data if type(data) is bytes else bytes(data)
        size = len(chunk)
        out: list[bytes] = []
        opener = self._opener
        pos = 0
        view = memoryview(chunk)
        small = type(chunk) is bytes  # then slicing gives bytes directly (cheapest for small)
        try:
            while True:
                if size - pos < LENGTH_SIZE:
                    self._need = LENGTH_SIZE
                    break
                (length,) = _unpack_len(chunk, pos)
                if length > MAX_FRAME:
                    raise _too_large(length)
                start = pos + LENGTH_SIZE
                end = start + length
                if end > size:
                    self._need = LENGTH_SIZE + length
                    break
                if opener is None:
                    out.append(
                        chunk[start:end] if isinstance(chunk, bytes) else bytes(view[start:end])
                    )
                else:
                    if length < TAG_SIZE:
                        raise MessageAuthenticationFailed(
                            f"message authentication failed (frame of {length} bytes is shorter"
                            " than the tag)"
                        )
                    # Small bodies: a bytes slice is cheaper for the binding than a memoryview.
                    body = chunk[start:end] if small and length <= 4096 else view[start:end]
                    out.append(opener.open(bytes(view[pos:start]), body))
                pos = end
        except RemoteProtocolError as err:
            self._failed = err
            raise
        if pos < size:
            self._buf = bytearray(view[pos:])
        return out
