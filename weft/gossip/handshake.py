"""The control connection's handshake, one side of it, without I/O (docs/ARCHITECTURE.md).

Driven like aioquic's connection: the caller feeds received bytes with :meth:`Handshake.receive`,
writes out :meth:`Handshake.data_to_send`, arms one timer from :meth:`Handshake.get_timer` and calls
:meth:`Handshake.handle_timer` when it fires. Every failure caused by the peer (or its absence) is a
:class:`HandshakeError` (a :class:`~weft.errors.RemoteProtocolError`) whose ``str`` is the reason to
log and show, and whose ``reason`` is a short label for counters. Misuse by the caller raises
:class:`~weft.errors.LocalError`.

Wire exchange, the same on both sides (nothing waits for the other side's role)::

    header  = b"weft" || min version (1 byte) || max version (1 byte)    sent at once
    hello   = uint32 BE length || msgpack map                           after the peer's header
    pake    = uint32 BE length || SPAKE2 message (33 bytes)             after the peer's hello
              (encrypted only)
    confirm = uint32 BE length || ChaCha20-Poly1305(b"weft confirm v3" || proof)
              after the peer's pake (encrypted only; the control codec's first frame, counter 0)
    proof   = uint32 BE length || proof (64 bytes)                      after the peer's hello
              (plaintext only)

States (everything that moves the machine is in this table; ``receive`` loops over it)::

    AWAIT_HEADER  --peer header, versions overlap-->       AWAIT_HELLO   (queue our hello)
    AWAIT_HELLO   --peer hello, both plaintext-->          AWAIT_PROOF   (queue our proof)
    AWAIT_PROOF   --peer proof verifies-->                 DONE
    AWAIT_HELLO   --peer hello, both encrypted-->          AWAIT_PAKE    (queue our pake)
    AWAIT_PAKE    --peer pake valid-->                     AWAIT_CONFIRM (queue our confirm)
    AWAIT_CONFIRM --peer confirm opens-->                  DONE
    any but DONE  --bad input / timer / eof-->             FAILED (the error is kept in ``error``)

Our header, hello and pake are sent without waiting for the peer beyond its previous message, so a
peer that sends everything in one write is fine: everything after the last handshake byte is
returned untouched as :attr:`HandshakeResult.leftover` for the session codec.

On failure, still write out :meth:`data_to_send` (best effort) before closing: it may hold our
hello, pake or confirm, which is what lets the *peer* name the reason (encryption mismatch, wrong
password) instead of seeing a bare close.

Password (protocol v2; v1 sent a confirm sealed under password-derived keys to anyone who sent
a hello, so one recorded connection allowed an offline dictionary attack): the password enters
only through a balanced PAKE, SPAKE2 over Ed25519 (the ``spake2`` package), outbound side "A",
inbound side "B". Nothing a side sends before the peer's pake depends on the password, and the
confirm it sends after the peer's pake opens only for someone who ran SPAKE2 with the right
password in *that* message: one connection is at most one online guess.

The SPAKE2 password is the scrypt key of the mesh password under the *mesh salt*
(:class:`~weft.gossip.crypto.PasswordKeys`). Each encrypted hello carries its router's salt and
whether it is settled; both sides pick the same one with
:func:`~weft.gossip.crypto.choose_salt`, and the hellos are in the transcript, so a tampered salt
fails the confirm. :attr:`HandshakeResult.salt` is the salt used; the router settles on it.

Identity (protocol v3; v2 let anyone who knew the password connect under another peer's name
and displace its connections): every hello carries its router's Ed25519 identity key (the key
that signs its topology records, :mod:`weft.gossip.topology`), and each side proves it holds the
private half by signing the transcript so far — the *proof*, ``Ed25519(b"weft identity proof
v3" || role || SHA-256(transcript))`` with role ``A`` (outbound) or ``B`` (inbound). The
transcript holds the verifier's own random ``conn_id``, so a proof cannot be replayed into
another connection, and the role byte stops a proof being reflected. :attr:`Hello.identity_key`
of the remote hello is proven once :attr:`done`; the mesh then checks it against the key bound
to that name (:meth:`~weft.gossip.mesh.MeshCore.admission`).

Keys: session secret = HKDF-SHA256(X25519(ephemerals) || SPAKE2 key, info=SHA-256(transcript));
the transcript is outbound header || inbound header || outbound hello frame || inbound hello
frame || outbound pake frame || inbound pake frame, exactly as sent. Per-direction control and
data keys by label (:func:`~weft.gossip.crypto.derive_session_keys`).
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spake2 import SPAKE2_A, SPAKE2_B

from weft.errors import LocalError, RemoteProtocolError
from weft.gossip.crypto import (
    KEY_SIZE,
    SALT_SIZE,
    PasswordKeys,
    SaltDerivationRefused,
    choose_salt,
    derive_session_keys,
)
from weft.gossip.peer import SHORT_ID_BITS, PeerIdentity, PeerName
from weft.gossip.session import LENGTH_SIZE, TAG_SIZE, FrameCodec, MessageAuthenticationFailed

__all__ = [
    "CONFIRM_MESSAGE",
    "HANDSHAKE_TIMEOUT",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_HELLO",
    "PAKE_MESSAGE_SIZE",
    "PROTOCOL_VERSIONS",
    "EncryptionMismatch",
    "FeatureValue",
    "Handshake",
    "HandshakeClosed",
    "HandshakeError",
    "HandshakeResult",
    "HandshakeState",
    "HandshakeTimeout",
    "Hello",
    "IdentityNotProven",
    "MalformedHandshake",
    "MalformedHello",
    "NotAWeftPeer",
    "SaltBusy",
    "VersionMismatch",
    "WrongPassword",
    "decode_hello",
    "encode_hello",
]

MAGIC: Final = b"weft"
HEADER_SIZE: Final = len(MAGIC) + 2
# The range this build speaks. v2: SPAKE2 and the mesh salt; v3: identity keys proven in the
# handshake (older peers are refused by version).
PROTOCOL_VERSIONS: Final = (3, 3)
HANDSHAKE_TIMEOUT: Final = 10.0  # seconds, as Weave
MAX_HELLO: Final = 4096  # bytes of msgpack; a real hello is ~200 bytes plus features
CONFIRM_MESSAGE: Final = b"weft confirm v3"
IDENTITY_KEY_SIZE: Final = 32  # Ed25519 public key
PROOF_SIZE: Final = 64  # Ed25519 signature
_PROOF_CONTEXT: Final = b"weft identity proof v3"
_CONFIRM_FRAME_SIZE: Final = LENGTH_SIZE + len(CONFIRM_MESSAGE) + PROOF_SIZE + TAG_SIZE
PAKE_MESSAGE_SIZE: Final = 33  # spake2: side byte + Ed25519 element
_PAKE_ID_A: Final = b"weft v2 outbound"
_PAKE_ID_B: Final = b"weft v2 inbound"

# Bounds on the hello's fields (checked for our own hello too, so we never send what we'd refuse).
MAX_NICKNAME: Final = 255  # characters
MAX_FEATURES: Final = 32  # entries
MAX_FEATURE_KEY: Final = 64  # characters
MAX_FEATURE_TEXT: Final = 256  # characters (str) or bytes (bin)
MAX_FEATURE_LIST: Final = 16  # items, scalars only
_U64: Final = 1 << 64
_I64_MIN: Final = -(1 << 63)

FeatureScalar = None | bool | int | float | str | bytes
FeatureValue = FeatureScalar | tuple[FeatureScalar, ...]


# ---------------------------------------------------------------------------------------- errors


class HandshakeError(RemoteProtocolError):
    """The handshake failed because of the peer; ``str(err)`` is the reason to log and show."""

    reason: str = "handshake_failed"


class NotAWeftPeer(HandshakeError):
    """The first bytes were not ``b"weft"``."""

    reason = "bad_magic"


class VersionMismatch(HandshakeError):
    """No protocol version in common: "protocol version mismatch (ours a..b, theirs c..d)"."""

    reason = "version_mismatch"


class MalformedHandshake(HandshakeError):
    """Header or confirm frame that breaks the format."""

    reason = "malformed"


class MalformedHello(MalformedHandshake):
    """A hello that is too large, not msgpack, or has a field of the wrong type or range."""


class EncryptionMismatch(HandshakeError):
    """One side has a password and the other not: "encryption mismatch: peer has (no) password"."""

    reason = "encryption_mismatch"


class WrongPassword(HandshakeError):
    """The peer's confirm did not open: its password differs from ours."""

    reason = "wrong_password"


class IdentityNotProven(HandshakeError):
    """The peer's proof did not verify under the identity key its hello carries."""

    reason = "identity_not_proven"


class SaltBusy(HandshakeError):
    """The peer's mesh salt needs a new scrypt and too many were asked for lately."""

    reason = "salt_busy"


class HandshakeTimeout(HandshakeError):
    """The handshake did not finish within its timeout (10 s)."""

    reason = "timeout"


class HandshakeClosed(HandshakeError):
    """The peer closed the connection before the handshake finished."""

    reason = "closed"


# ----------------------------------------------------------------------------------------- hello


def _feature_problem(key: object, value: object) -> str | None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_FEATURE_KEY:
        return f"feature key {key!r:.80} is not a string of 1..{MAX_FEATURE_KEY} characters"
    if isinstance(value, list | tuple):
        if len(value) > MAX_FEATURE_LIST:
            return f"feature {key!r} has {len(value)} items (max {MAX_FEATURE_LIST})"
        for item in value:
            problem = _scalar_problem(key, item)
            if problem is not None:
                return problem
        return None
    return _scalar_problem(key, value)


def _scalar_problem(key: str, value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if _I64_MIN <= value < _U64 else f"feature {key!r} integer out of range"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"feature {key!r} is not a finite number"
    if isinstance(value, str | bytes):
        if len(value) > MAX_FEATURE_TEXT:
            return f"feature {key!r} is longer than {MAX_FEATURE_TEXT}"
        return None
    return f"feature {key!r} has unsupported type {type(value).__name__}"


def _uint_problem(name: str, value: object, limit: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an integer, got {type(value).__name__}"
    if not 0 <= value < limit:
        return f"{name} {value} out of range 0..{limit - 1}"
    return None


@dataclass(frozen=True)
class Hello:
    """What a side says about itself. ``encrypted``, ``ephemeral``, ``salt``,
    ``salt_settled`` and ``identity_key`` are filled in by the handshake.

    ``features`` holds overlay capabilities (sleeve UDP port, GSO support, data cipher, ...):
    at most 32 entries, string keys, values None/bool/int/float/str/bytes (strings and bytes up to
    256) or tuples of those up to 16 items. Stored read-only; lists become tuples.
    """

    name: PeerName
    nickname: str
    uid: int
    conn_id: int
    short_id: int
    features: Mapping[str, FeatureValue] = field(default_factory=dict, hash=False)
    encrypted: bool = False
    ephemeral: bytes | None = None  # X25519 public key (32 bytes) when encrypted
    salt: bytes | None = None  # the sender's mesh salt (16 bytes) when encrypted
    salt_settled: bool = False  # its router has authenticated a peer under that salt
    identity_key: bytes | None = None  # Ed25519 public key (32 bytes); proven once done

    def __post_init__(self) -> None:
        problem = _hello_problem(self)
        if problem is not None:
            raise LocalError(f"invalid hello: {problem}")
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in self.features.items()}
        object.__setattr__(self, "features", MappingProxyType(frozen))

    @classmethod
    def from_identity(
        cls,
        identity: PeerIdentity,
        conn_id: int,
        features: Mapping[str, FeatureValue | list[FeatureScalar]] | None = None,
    ) -> Hello:
        """Our hello for one connection."""
        return cls(
            name=identity.name,
            nickname=identity.nickname,
            uid=identity.uid,
            conn_id=conn_id,
            short_id=identity.short_id,
            features={
                k: tuple(v) if isinstance(v, list) else v for k, v in (features or {}).items()
            },
        )

    @property
    def identity(self) -> PeerIdentity:
        """The peer this hello describes, for MeshCore.connection_added."""
        return PeerIdentity(
            name=self.name, nickname=self.nickname, uid=self.uid, short_id=self.short_id
        )


def _hello_problem(hello: Hello) -> str | None:
    """Why this hello is out of bounds, or None. Shared by our own hellos and the peer's."""
    if not isinstance(hello.name, PeerName):
        return "name is not a PeerName"
    if not isinstance(hello.nickname, str) or len(hello.nickname) > MAX_NICKNAME:
        return f"nickname must be a string of at most {MAX_NICKNAME} characters"
    for fname, value, limit in (
        ("uid", hello.uid, _U64),
        ("conn_id", hello.conn_id, _U64),
        ("short_id", hello.short_id, 1 << SHORT_ID_BITS),
    ):
        problem = _uint_problem(fname, value, limit)
        if problem is not None:
            return problem
    if not isinstance(hello.features, Mapping):
        return "features must be a map"
    if len(hello.features) > MAX_FEATURES:
        return f"{len(hello.features)} features (max {MAX_FEATURES})"
    for key, feature in hello.features.items():
        problem = _feature_problem(key, feature)
        if problem is not None:
            return problem
    if not isinstance(hello.encrypted, bool):
        return "encrypted must be a boolean"
    if not isinstance(hello.salt_settled, bool):
        return "salt_settled must be a boolean"
    if hello.identity_key is not None and (
        not isinstance(hello.identity_key, bytes) or len(hello.identity_key) != IDENTITY_KEY_SIZE
    ):
        return f"identity key must be {IDENTITY_KEY_SIZE} bytes"
    if hello.encrypted:
        if not isinstance(hello.ephemeral, bytes) or len(hello.ephemeral) != KEY_SIZE:
            return f"ephemeral key must be {KEY_SIZE} bytes when encrypted"
        if not isinstance(hello.salt, bytes) or len(hello.salt) != SALT_SIZE:
            return f"mesh salt must be {SALT_SIZE} bytes when encrypted"
    elif hello.ephemeral is not None:
        return "ephemeral key present although not encrypted"
    elif hello.salt is not None or hello.salt_settled:
        return "mesh salt present although not encrypted"
    return None


def encode_hello(hello: Hello) -> bytes:
    """The hello's msgpack body (no length prefix)."""
    body: bytes = msgpack.packb(
        {
            "name": int(hello.name),
            "nickname": hello.nickname,
            "uid": hello.uid,
            "conn_id": hello.conn_id,
            "short_id": hello.short_id,
            "features": dict(hello.features),
            "encrypted": hello.encrypted,
            "ephemeral": hello.ephemeral,
            "salt": hello.salt,
            "salt_settled": hello.salt_settled,
            "identity_key": hello.identity_key,
        },
        use_bin_type=True,
    )
    return body


_HELLO_KEYS: Final = (
    "name",
    "nickname",
    "uid",
    "conn_id",
    "short_id",
    "features",
    "encrypted",
    "identity_key",
)


def decode_hello(body: bytes) -> Hello:
    """Parse and check a peer's hello body; any problem raises :class:`MalformedHello`.

    Unknown top-level keys are ignored (a later version may add some); missing ones are errors.
    """
    if len(body) > MAX_HELLO:
        raise MalformedHello(f"malformed hello: {len(body)} bytes (max {MAX_HELLO})")
    try:
        # unpackb bounds every length by len(body), so nothing here can allocate much.
        raw: Any = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as err:  # msgpack raises many types (ExtraData, FormatError, ValueError...)
        raise MalformedHello(f"malformed hello: not msgpack ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise MalformedHello(f"malformed hello: expected a map, got {type(raw).__name__}")
    missing = [k for k in _HELLO_KEYS if k not in raw]
    if missing:
        raise MalformedHello(f"malformed hello: missing {', '.join(missing)}")
    name = raw["name"]
    problem = _uint_problem("name", name, 1 << 48)
    if problem is not None:
        raise MalformedHello(f"malformed hello: {problem}")
    features = raw["features"]
    if not isinstance(features, dict):
        raise MalformedHello("malformed hello: features must be a map")
    if raw["identity_key"] is None:
        raise MalformedHello("malformed hello: no identity key")
    try:
        return Hello(
            name=PeerName(name),
            nickname=raw["nickname"],
            uid=raw["uid"],
            conn_id=raw["conn_id"],
            short_id=raw["short_id"],
            features=features,
            encrypted=raw["encrypted"],
            ephemeral=raw.get("ephemeral"),
            salt=raw.get("salt"),
            salt_settled=raw.get("salt_settled", False),
            identity_key=raw["identity_key"],
        )
    except LocalError as err:
        reason = str(err).removeprefix("invalid hello: ")
        raise MalformedHello(f"malformed hello: {reason}") from None


# ------------------------------------------------------------------------------------ handshake


class HandshakeState(enum.Enum):
    AWAIT_HEADER = "waiting for the peer's header"
    AWAIT_HELLO = "waiting for the peer's hello"
    AWAIT_PROOF = "waiting for the peer's identity proof"
    AWAIT_PAKE = "waiting for the peer's PAKE message"
    AWAIT_CONFIRM = "waiting for the peer's confirm"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, repr=False)
class HandshakeResult:
    """What a finished handshake hands to the connection.

    ``control`` is the session codec (its counters already past the confirm frames): feed it
    ``leftover`` first, then every later received byte. ``data_send_key``/``data_recv_key`` are the
    sleeve's keys (None in plaintext mode), for :class:`~weft.gossip.crypto.DataSealer` and
    :class:`~weft.gossip.crypto.DataOpener`. ``salt``: the mesh salt this connection
    authenticated under (None in plaintext mode); pass it to
    :meth:`~weft.gossip.crypto.PasswordKeys.settle`.
    """

    version: int
    local: Hello
    remote: Hello
    control: FrameCodec
    data_send_key: bytes | None
    data_recv_key: bytes | None
    leftover: bytes
    salt: bytes | None = None

    @property
    def encrypted(self) -> bool:
        return self.data_send_key is not None

    def __repr__(self) -> str:
        return (
            f"HandshakeResult(version={self.version}, remote={self.remote.name}"
            f" ({self.remote.nickname}), encrypted={self.encrypted},"
            f" leftover={len(self.leftover)} bytes)"
        )


class Handshake:
    """One side of the handshake of one control connection.

    ``outbound``: we dialled. ``hello``: ours (``encrypted``, ``ephemeral``, the salt fields
    and ``identity_key`` are overwritten). ``password``: the router's
    :class:`~weft.gossip.crypto.PasswordKeys`, or None for plaintext. ``versions``: (min, max)
    protocol versions we speak, 1..255. ``identity``: the router's Ed25519 identity key, which the
    handshake proves to the peer; None makes a throwaway one from ``urandom`` (tests, benchmarks:
    a router always passes its own). ``urandom`` supplies the ephemeral key's 32 bytes and the
    SPAKE2 scalar (injected for reproducible tests).

    Our header is queued at construction: call :meth:`data_to_send` right away.
    """

    def __init__(
        self,
        outbound: bool,
        hello: Hello,
        password: PasswordKeys | None,
        now: float,
        versions: tuple[int, int] = PROTOCOL_VERSIONS,
        timeout: float = HANDSHAKE_TIMEOUT,
        urandom: Callable[[int], bytes] = os.urandom,
        identity: Ed25519PrivateKey | None = None,
    ) -> None:
        low, high = versions
        if not 1 <= low <= high <= 255:
            raise LocalError(f"invalid version range {low}..{high}: need 1 <= min <= max <= 255")
        if password is not None and not isinstance(password, PasswordKeys):
            raise LocalError("password must be a PasswordKeys (the mesh password and salt)")
        self.outbound = outbound
        self.versions = (low, high)
        self.deadline = now + timeout
        self.timeout = timeout
        self._now = now
        self._password = password
        self._urandom = urandom
        self._private: X25519PrivateKey | None = None
        self._shared: bytes | None = None  # X25519 result, once the peer's hello is in
        self._spake: Any = None  # SPAKE2_A / SPAKE2_B (the package is untyped)
        self._salt: bytes | None = None  # the salt this connection uses
        if identity is None:
            identity = Ed25519PrivateKey.from_private_bytes(urandom(32))
        self._identity: Ed25519PrivateKey | None = identity
        identity_key = identity.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        hello = replace(hello, identity_key=identity_key)
        if password is not None:
            self._private = X25519PrivateKey.from_private_bytes(urandom(KEY_SIZE))
            public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            hello = replace(
                hello,
                encrypted=True,
                ephemeral=public,
                salt=password.salt,
                salt_settled=password.settled,
            )
        else:
            hello = replace(hello, encrypted=False, ephemeral=None, salt=None, salt_settled=False)
        self.local_hello = hello
        self.state = HandshakeState.AWAIT_HEADER
        self.error: HandshakeError | None = None
        self.version: int | None = None
        self.remote_hello: Hello | None = None
        self._result: HandshakeResult | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._header = MAGIC + bytes((low, high))
        self._peer_header = b""
        self._hello_frame = b""
        self._peer_hello_frame = b""
        self._pake_frame = b""
        self._peer_pake_frame = b""
        self._codec: FrameCodec | None = None  # encrypted: made when the keys are known
        self._data_keys: tuple[bytes, bytes] | None = None
        self._out += self._header

    # -- queries ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state is HandshakeState.DONE

    @property
    def result(self) -> HandshakeResult:
        """The outcome; only once :attr:`done`."""
        if self._result is None:
            raise LocalError(f"handshake not finished ({self.state.value})")
        return self._result

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (also after a failure: see the module docstring)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """The deadline to call :meth:`handle_timer` at, or None once done or failed."""
        if self.state in (HandshakeState.DONE, HandshakeState.FAILED):
            return None
        return self.deadline

    # -- inputs -------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Raise :class:`HandshakeTimeout` if the deadline has passed and we are not done."""
        if self.get_timer() is None or now < self.deadline:
            return
        self._fail(
            HandshakeTimeout(f"handshake timed out after {self.timeout:g} s ({self.state.value})")
        )

    def receive_eof(self) -> None:
        """The peer closed its side: raise :class:`HandshakeClosed` unless already done."""
        if self.state is HandshakeState.DONE:
            return
        self._check_usable()
        self._fail(
            HandshakeClosed(f"connection closed by peer during handshake ({self.state.value})")
        )

    def receive(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed received bytes. Raises a :class:`HandshakeError` on any problem with them.

        After :attr:`done`, bytes beyond the handshake are in ``result.leftover``; feeding more
        here is a LocalError (feed the session codec instead).
        """
        # The deadline is enforced through handle_timer only, like every other timer; ``now``
        # paces the derivation of password keys for foreign salts.
        self._now = now
        self._check_usable()
        if self.state is HandshakeState.DONE:
            raise LocalError("handshake already done: feed the session codec instead")
        self._buf += data
        try:
            self._advance()
        except HandshakeError as err:
            self._fail(err)

    # -- the machine ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.state is HandshakeState.FAILED:
            raise LocalError(f"handshake already failed: {self.error}")

    def _fail(self, err: HandshakeError) -> None:
        self.state = HandshakeState.FAILED
        self.error = err
        self._buf.clear()
        self._private = None
        self._spake = None
        self._identity = None
        raise err

    def _advance(self) -> None:
        while True:
            state = self.state
            if state is HandshakeState.AWAIT_HEADER:
                if not self._on_header():
                    return
            elif state is HandshakeState.AWAIT_HELLO:
                if not self._on_hello():
                    return
            elif state is HandshakeState.AWAIT_PROOF:
                if not self._on_proof():
                    return
            elif state is HandshakeState.AWAIT_PAKE:
                if not self._on_pake():
                    return
            elif state is HandshakeState.AWAIT_CONFIRM:
                if not self._on_confirm():
                    return
            else:
                return

    def _on_header(self) -> bool:
        buf = self._buf
        # Refuse a stranger (an HTTP client, a Weave router) on its first bytes.
        prefix = bytes(buf[: len(MAGIC)])
        if not MAGIC.startswith(prefix):
            raise NotAWeftPeer(f"not a weft peer: header starts with {prefix!r}")
        if len(buf) < HEADER_SIZE:
            return False
        header = bytes(buf[:HEADER_SIZE])
        del buf[:HEADER_SIZE]
        low, high = header[4], header[5]
        if not 1 <= low <= high:
            raise MalformedHandshake(f"malformed header: version range {low}..{high}")
        ours_low, ours_high = self.versions
        version = min(high, ours_high)
        if version < max(low, ours_low):
            raise VersionMismatch(
                f"protocol version mismatch (ours {ours_low}..{ours_high}, theirs {low}..{high})"
            )
        self.version = version
        self._peer_header = header
        body = encode_hello(self.local_hello)
        if len(body) > MAX_HELLO:
            raise LocalError(f"our hello is {len(body)} bytes (max {MAX_HELLO}): too many features")
        self._hello_frame = len(body).to_bytes(LENGTH_SIZE, "big") + body
        self._out += self._hello_frame
        self.state = HandshakeState.AWAIT_HELLO
        return True

    def _on_hello(self) -> bool:
        buf = self._buf
        if len(buf) < LENGTH_SIZE:
            return False
        length = int.from_bytes(buf[:LENGTH_SIZE], "big")
        if length > MAX_HELLO:
            raise MalformedHello(f"malformed hello: {length} bytes (max {MAX_HELLO})")
        end = LENGTH_SIZE + length
        if len(buf) < end:
            return False
        frame = bytes(buf[:end])
        del buf[:end]
        remote = decode_hello(frame[LENGTH_SIZE:])
        self._peer_hello_frame = frame
        self.remote_hello = remote
        ours = self.local_hello.encrypted
        if remote.encrypted != ours:
            if ours:
                raise EncryptionMismatch("encryption mismatch: peer has no password (we have one)")
            raise EncryptionMismatch("encryption mismatch: peer has a password (we have none)")
        if not ours:
            proof = self._prove()
            self._out += len(proof).to_bytes(LENGTH_SIZE, "big") + proof
            self.state = HandshakeState.AWAIT_PROOF
            return True
        assert self._private is not None and self._password is not None
        assert remote.ephemeral is not None and remote.salt is not None
        if remote.ephemeral == self.local_hello.ephemeral:
            # A reflector (or a bug) echoing our own bytes: say so rather than "wrong password".
            raise MalformedHello("malformed hello: the peer echoed our own ephemeral key")
        try:
            self._shared = self._private.exchange(
                X25519PublicKey.from_public_bytes(remote.ephemeral)
            )
        except ValueError:  # a low-order point gives an all-zero secret: refused by OpenSSL
            raise MalformedHello("malformed hello: invalid ephemeral key") from None
        mine = self.local_hello
        assert mine.salt is not None
        salt = choose_salt(mine.salt, mine.salt_settled, remote.salt, remote.salt_settled)
        try:
            key = self._password.key_for(salt, self._now)
        except SaltDerivationRefused as err:
            raise SaltBusy(str(err)) from None
        self._salt = salt
        side = SPAKE2_A if self.outbound else SPAKE2_B
        self._spake = side(key, idA=_PAKE_ID_A, idB=_PAKE_ID_B, entropy_f=self._urandom)
        message: bytes = self._spake.start()
        self._pake_frame = len(message).to_bytes(LENGTH_SIZE, "big") + message
        self._out += self._pake_frame
        self.state = HandshakeState.AWAIT_PAKE
        return True

    def _take_frame(self, size: int, what: str) -> bytes | None:
        """The next length-prefixed frame (prefix included) whose body must be ``size`` bytes,
        or None until it is all in; another length is "malformed WHAT: N bytes (expected M)"."""
        buf = self._buf
        if len(buf) < LENGTH_SIZE:
            return None
        length = int.from_bytes(buf[:LENGTH_SIZE], "big")
        if length != size:
            raise MalformedHandshake(f"malformed {what}: {length} bytes (expected {size})")
        end = LENGTH_SIZE + size
        if len(buf) < end:
            return None
        frame = bytes(buf[:end])
        del buf[:end]
        return frame

    def _on_pake(self) -> bool:
        frame = self._take_frame(PAKE_MESSAGE_SIZE, "PAKE message")
        if frame is None:
            return False
        if frame == self._pake_frame:
            raise MalformedHandshake("malformed PAKE message: the peer echoed our own")
        try:
            pake_key: bytes = self._spake.finish(frame[LENGTH_SIZE:])
        except Exception as err:  # spake2 raises ValueError, its own errors, even AssertionError
            raise MalformedHandshake(
                f"malformed PAKE message: {type(err).__name__}: {err}"[:200]
            ) from None
        self._spake = None
        self._peer_pake_frame = frame
        assert self._shared is not None
        keys = derive_session_keys(self._shared, pake_key, self._transcript(), self.outbound)
        self._shared = None
        self._data_keys = (keys.data_send, keys.data_recv)
        # The confirm is the codec's first frame each way (counter 0), so the session continues
        # the same nonce sequence and a confirm can never be replayed as a session frame.
        self._codec = FrameCodec(keys.control_send, keys.control_recv)
        self._out += self._codec.encode(CONFIRM_MESSAGE + self._prove())
        self.state = HandshakeState.AWAIT_CONFIRM
        return True

    def _on_confirm(self) -> bool:
        frame = self._take_frame(_CONFIRM_FRAME_SIZE - LENGTH_SIZE, "confirm")
        if frame is None:
            return False
        codec = self._codec
        assert codec is not None
        try:
            # Exactly one whole frame of the checked size: feed returns exactly one message.
            (message,) = codec.feed(frame)
        except MessageAuthenticationFailed:
            raise WrongPassword(
                "wrong password: the peer's confirm did not authenticate"
                " (its password differs from ours)"
            ) from None
        if message[: len(CONFIRM_MESSAGE)] != CONFIRM_MESSAGE:
            raise MalformedHandshake("malformed confirm: unexpected content")
        self._check_proof(message[len(CONFIRM_MESSAGE) :])
        assert self._data_keys is not None
        send, recv = self._data_keys
        self._finish(codec, send, recv)
        return False

    def _on_proof(self) -> bool:
        frame = self._take_frame(PROOF_SIZE, "identity proof")
        if frame is None:
            return False
        self._check_proof(frame[LENGTH_SIZE:])
        self._finish(FrameCodec(), None, None)
        return False

    def _transcript(self) -> bytes:
        """Every handshake byte so far, the outbound side's first in each pair, as sent."""
        pairs = (
            (self._header, self._peer_header),
            (self._hello_frame, self._peer_hello_frame),
            (self._pake_frame, self._peer_pake_frame),
        )
        return b"".join(a + b if self.outbound else b + a for a, b in pairs)

    def _proof_message(self, outbound_signer: bool) -> bytes:
        role = b"A" if outbound_signer else b"B"
        return _PROOF_CONTEXT + role + hashlib.sha256(self._transcript()).digest()

    def _prove(self) -> bytes:
        assert self._identity is not None
        proof = self._identity.sign(self._proof_message(self.outbound))
        self._identity = None
        return proof

    def _check_proof(self, proof: bytes) -> None:
        remote = self.remote_hello
        assert remote is not None and remote.identity_key is not None
        try:
            key = Ed25519PublicKey.from_public_bytes(remote.identity_key)
            key.verify(proof, self._proof_message(not self.outbound))
        except (InvalidSignature, ValueError):
            raise IdentityNotProven(
                f"identity not proven: the proof of peer {remote.name} ({remote.nickname:.64})"
                " does not verify under the identity key its hello carries"
            ) from None

    def _finish(self, codec: FrameCodec, data_send: bytes | None, data_recv: bytes | None) -> None:
        assert self.version is not None and self.remote_hello is not None
        self._result = HandshakeResult(
            version=self.version,
            local=self.local_hello,
            remote=self.remote_hello,
            control=codec,
            data_send_key=data_send,
            data_recv_key=data_recv,
            leftover=bytes(self._buf),
            salt=self._salt,
        )
        self._buf.clear()
        self._private = None
        self.state = HandshakeState.DONE
