"""Key material shared by the control connection and the data plane (sleeve).

Three things live here, all without I/O:

* :func:`derive_password_key` — the slow scrypt of the mesh password under a mesh salt, and
  :class:`PasswordKeys`, which holds this router's mesh salt and caches those keys by salt.
* :func:`derive_session_keys` — the key schedule of one connection: HKDF-SHA256 over the X25519
  shared secret and the SPAKE2 key (which is where the password comes in), bound to the SHA-256
  of the handshake transcript, then one key per label (control and data, each direction).
* :class:`DataSealer` / :class:`DataOpener` — sealing of data-plane units (sleeve UDP packets or
  super-frames) with an explicit 64-bit counter carried in the packet and a sliding replay window.

Data-plane packet layout (``DATA_OVERHEAD`` = 24 bytes)::

    counter (8 bytes, big endian) || AEAD ciphertext || tag (16 bytes)

The AEAD nonce is 4 zero bytes + the counter; the associated data is the 8 counter bytes followed
by whatever the caller passes as ``aad`` (the sleeve binds its own outer header that way). Data keys
come from their own HKDF labels, per direction, so a data nonce never meets a control nonce under
the same key.

Replay window: the opener remembers the highest counter it authenticated and a bitmap of the
``window`` counters below it (default 8192, accepted 1024..65536; a power of two is not required).
A counter above the highest slides the window; one inside it is accepted once; one at or beyond
``window`` behind is "too old". The window only moves after a packet authenticates, so forged
packets cannot push it. The bitmap is a ring of 64-bit words (RFC 6479 / WireGuard), so the cost
per packet does not depend on the window size. 8192 covers the reordering of a whole GSO burst
(45 datagrams per 64 KB) many times over; Weave used 2**20 and paid for it in memory.

Cipher choice, measured on this machine kind with ``python -m bench.crypto`` (2 shared cores with
AES-NI, VAES, VPCLMULQDQ; cryptography 48 / OpenSSL 3; one core; Gbit/s; the range of three runs'
medians, the box being busy with other work)::

                            ChaCha20-Poly1305          AES-256-GCM
    bare AEAD     1.5 KB    seal 3.4-6.6               seal 4.8-9.5
                  64 KB     seal 12-16                 seal 16-29
    DataSealer/   1.5 KB    seal 4.2-4.9, open 2.2-3.3 seal 3.1-6.0, open 2.1-3.9
    DataOpener    64 KB     seal 11-14,   open 12-14   seal 11-21,   open 18-21

AES-256-GCM wins for super-frames (the sleeve's main path: one seal per ~64 KB unit) by about
1.5x and is level or ahead at MTU size, where the per-call overhead of the Python binding
dominates. The data plane therefore defaults to ``"aes-256-gcm"`` (:data:`DEFAULT_DATA_CIPHER`);
ChaCha20-Poly1305 stays available for CPUs without AES instructions. Both ends must use the same
cipher (routers should advertise it in the hello's ``features``); a mismatch can only fail
authentication, never deliver garbage. The control connection always uses ChaCha20-Poly1305 (the
contract in docs/ARCHITECTURE.md); control traffic is small next to data traffic.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from weft.errors import ConfigError, LocalError, RemoteProtocolError

__all__ = [
    "DATA_CIPHERS",
    "DATA_OVERHEAD",
    "DEFAULT_DATA_CIPHER",
    "DEFAULT_REPLAY_WINDOW",
    "KEY_SIZE",
    "SALT_SIZE",
    "DataCipher",
    "DataOpener",
    "DataPacketError",
    "DataSealer",
    "PacketReplayed",
    "PacketTampered",
    "PacketTooOld",
    "PacketTruncated",
    "PasswordKeys",
    "SaltDerivationRefused",
    "SessionKeys",
    "choose_salt",
    "derive_password_key",
    "derive_session_keys",
]

KEY_SIZE: Final = 32
SALT_SIZE: Final = 16  # the mesh salt (see PasswordKeys)
# scrypt cost: n=2**14, r=8, p=1 is 16 MiB and ~50 ms; done once per router and mesh salt.
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1

DataCipher = Literal["aes-256-gcm", "chacha20-poly1305"]
DATA_CIPHERS: Final[tuple[DataCipher, ...]] = ("aes-256-gcm", "chacha20-poly1305")
DEFAULT_DATA_CIPHER: Final[DataCipher] = "aes-256-gcm"
DEFAULT_REPLAY_WINDOW: Final = 8192
_MIN_WINDOW: Final = 1024
_MAX_WINDOW: Final = 65536
_TAG_SIZE: Final = 16
_COUNTER_SIZE: Final = 8
DATA_OVERHEAD: Final = _COUNTER_SIZE + _TAG_SIZE
_MAX_COUNTER: Final = (1 << 64) - 1

# HKDF labels: one key per purpose and direction. "o2i" = sent by the outbound (dialling) side.
_LABEL_SESSION: Final = b"weft v2 session"
_LABEL_CONTROL_O2I: Final = b"weft v2 control outbound->inbound"
_LABEL_CONTROL_I2O: Final = b"weft v2 control inbound->outbound"
_LABEL_DATA_O2I: Final = b"weft v2 data outbound->inbound"
_LABEL_DATA_I2O: Final = b"weft v2 data inbound->outbound"
# Password keys for salts other than ours are derived only this often (a token bucket): an
# unauthenticated peer can name any salt, and each costs a 16 MiB, ~50 ms scrypt.
_FOREIGN_BURST: Final = 3
_FOREIGN_INTERVAL: Final = 10.0  # seconds per token
_CACHED_KEYS: Final = 4  # foreign salts' keys kept (ours is always kept)

_NONCE_PAD: Final = b"\x00\x00\x00\x00"
_pack_counter = struct.Struct(">Q").pack
_unpack_counter = struct.Struct(">Q").unpack_from


def derive_password_key(password: bytes, salt: bytes) -> bytes:
    """The 32-byte password key: scrypt(password, salt=mesh salt, n=2**14, r=8, p=1).

    Slow on purpose (tens of milliseconds, 16 MiB): :class:`PasswordKeys` calls it once per
    salt and keeps the result.
    """
    if not password:
        raise ConfigError("the password is empty; leave it unset to run without encryption")
    if len(salt) != SALT_SIZE:
        raise LocalError(f"mesh salt must be {SALT_SIZE} bytes, got {len(salt)}")
    kdf = Scrypt(salt=salt, length=KEY_SIZE, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return kdf.derive(password)


def _salt_rank(salt: bytes, settled: bool) -> tuple[bool, bytes]:
    return (not settled, salt)


def choose_salt(ours: bytes, ours_settled: bool, theirs: bytes, theirs_settled: bool) -> bytes:
    """The mesh salt one connection uses; both sides compute the same one from the two hellos.

    A settled salt (one its router has already authenticated a peer under, kept in its data dir)
    beats a provisional one (a fresh router's random pick); between two of the same kind the
    lower bytes win. So a new router adopts the mesh's salt, and two meshes with the same
    password that meet converge on one salt.
    """
    return min((ours, ours_settled), (theirs, theirs_settled), key=lambda s: _salt_rank(*s))[0]


class SaltDerivationRefused(RemoteProtocolError):
    """The peer's mesh salt would need a fresh scrypt and the budget for those is spent."""


class PasswordKeys:
    """The mesh password, this router's mesh salt, and the scrypt keys by salt (no I/O).

    ``salt``/``settled`` come from the router's data dir (``settled``: the file existed) or, on a
    first start, are a random provisional salt. :meth:`key_for` gives the password key for the
    salt one connection agreed on (:func:`choose_salt`); keys for other salts than ours cost a
    scrypt each and are rate-limited (:data:`_FOREIGN_BURST`, one more per
    :data:`_FOREIGN_INTERVAL` s), so a stranger naming salt after salt cannot burn our CPU.
    After a handshake succeeded the router calls :meth:`settle` with the salt it used and
    persists it when that returns True.
    """

    def __init__(self, password: bytes, salt: bytes | None = None, settled: bool = False) -> None:
        if salt is None:
            salt, settled = os.urandom(SALT_SIZE), False
        self._password = password
        self._keys: dict[bytes, bytes] = {salt: derive_password_key(password, salt)}
        self._salt = salt
        self._settled = settled
        self._tokens = float(_FOREIGN_BURST)
        self._tokens_at: float | None = None
        self.derivations = 1  # scrypt runs so far (for tests and metrics)

    def __repr__(self) -> str:
        return f"PasswordKeys(salt={self._salt.hex()}, settled={self._settled})"

    @property
    def salt(self) -> bytes:
        return self._salt

    @property
    def settled(self) -> bool:
        return self._settled

    def key_for(self, salt: bytes, now: float) -> bytes:
        """The password key under ``salt``; raises :class:`SaltDerivationRefused` when a new
        scrypt is due but the budget is spent (the peer retries later)."""
        if len(salt) != SALT_SIZE:
            raise LocalError(f"mesh salt must be {SALT_SIZE} bytes, got {len(salt)}")
        key = self._keys.get(salt)
        if key is not None:
            return key
        if self._tokens_at is not None:
            elapsed = max(0.0, now - self._tokens_at)
            self._tokens = min(float(_FOREIGN_BURST), self._tokens + elapsed / _FOREIGN_INTERVAL)
        self._tokens_at = now
        if self._tokens < 1.0:
            raise SaltDerivationRefused(
                f"mesh salt {salt.hex()} is new to us and too many new salts were offered lately"
                f" (at most {_FOREIGN_BURST}, then one per {_FOREIGN_INTERVAL:g} s): retry later"
            )
        self._tokens -= 1.0
        key = derive_password_key(self._password, salt)
        self.derivations += 1
        foreign = [s for s in self._keys if s != self._salt]
        if len(foreign) >= _CACHED_KEYS:
            del self._keys[foreign[0]]  # oldest first (dicts keep insertion order)
        self._keys[salt] = key
        return key

    def settle(self, salt: bytes) -> bool:
        """A handshake authenticated under ``salt``: make it ours (settled) if it ranks at least
        as high as ours. True when our salt or its settled state changed (persist it then)."""
        if salt not in self._keys:
            raise LocalError("settle() with a salt no handshake used")
        if _salt_rank(salt, True) > _salt_rank(self._salt, self._settled):
            return False
        changed = salt != self._salt or not self._settled
        self._salt, self._settled = salt, True
        return changed


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The four keys of one connection, seen from one side (``repr`` hides them)."""

    control_send: bytes
    control_recv: bytes
    data_send: bytes
    data_recv: bytes

    def __repr__(self) -> str:
        return "SessionKeys(<hidden>)"


def derive_session_keys(
    shared_secret: bytes, pake_key: bytes, transcript: bytes, outbound: bool
) -> SessionKeys:
    """Derive the session's keys.

    secret = HKDF-SHA256(ikm=shared_secret || pake_key, salt=b"weft v2 session",
    info=SHA-256(transcript)), then HKDF-Expand(secret, info=label) per label. ``pake_key`` is the
    SPAKE2 key, the only input that depends on the password. Both sides compute the same four
    keys and pick send/receive by their role, so a side's send key is the other's receive key.
    """
    if len(pake_key) != KEY_SIZE:
        raise LocalError(f"PAKE key must be {KEY_SIZE} bytes, got {len(pake_key)}")
    digest = hashlib.sha256(transcript).digest()
    secret = HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=_LABEL_SESSION, info=digest
    ).derive(shared_secret + pake_key)

    def expand(label: bytes) -> bytes:
        return HKDFExpand(algorithm=hashes.SHA256(), length=KEY_SIZE, info=label).derive(secret)

    c_o2i, c_i2o = expand(_LABEL_CONTROL_O2I), expand(_LABEL_CONTROL_I2O)
    d_o2i, d_i2o = expand(_LABEL_DATA_O2I), expand(_LABEL_DATA_I2O)
    if outbound:
        return SessionKeys(control_send=c_o2i, control_recv=c_i2o, data_send=d_o2i, data_recv=d_i2o)
    return SessionKeys(control_send=c_i2o, control_recv=c_o2i, data_send=d_i2o, data_recv=d_o2i)


def _make_aead(key: bytes, cipher: DataCipher) -> AESGCM | ChaCha20Poly1305:
    if len(key) != KEY_SIZE:
        raise LocalError(f"data key must be {KEY_SIZE} bytes, got {len(key)}")
    if cipher == "aes-256-gcm":
        return AESGCM(key)
    if cipher == "chacha20-poly1305":
        return ChaCha20Poly1305(key)
    raise ConfigError(f"unknown data cipher {cipher!r}; expected one of {', '.join(DATA_CIPHERS)}")


class DataPacketError(RemoteProtocolError):
    """A data-plane packet was refused. ``reason`` is a short label for drop counters."""

    reason: str = "invalid"


class PacketTruncated(DataPacketError):
    """Shorter than counter + tag."""

    reason = "truncated"


class PacketTampered(DataPacketError):
    """Did not authenticate: modified, foreign (other key), or sealed with another cipher."""

    reason = "tampered"


class PacketReplayed(DataPacketError):
    """The counter was already accepted."""

    reason = "replayed"


class PacketTooOld(DataPacketError):
    """The counter is below the replay window, so whether it is a replay cannot be known."""

    reason = "too_old"


class DataSealer:
    """Seals data-plane units for one direction of one connection; assigns the counters.

    Not thread-safe; one instance per direction, used from the event loop only.
    """

    __slots__ = ("_aead", "_counter", "cipher")

    def __init__(self, key: bytes, cipher: DataCipher = DEFAULT_DATA_CIPHER) -> None:
        self._aead = _make_aead(key, cipher)
        self.cipher: DataCipher = cipher
        self._counter = 0

    @property
    def next_counter(self) -> int:
        """The counter the next :meth:`seal` will use."""
        return self._counter

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes = b"") -> bytes:
        """Return ``counter || ciphertext || tag``; ``aad`` must be given again to open it."""
        counter = self._counter
        if counter > _MAX_COUNTER:
            raise LocalError("data counter exhausted: the connection must be re-keyed")
        self._counter = counter + 1
        header = _pack_counter(counter)
        return header + self._aead.encrypt(_NONCE_PAD + header, plaintext, header + aad)


class DataOpener:
    """Opens data-plane units for one direction; keeps the sliding replay window.

    ``window`` is the number of counters below the highest accepted one that are still tracked
    (1024..65536, default :data:`DEFAULT_REPLAY_WINDOW`).

    The window is a ring of 64-bit words (WireGuard's layout, RFC 6479): counter ``c`` lives in
    bit ``c % 64`` of word ``(c // 64) % len(ring)``. Moving the window forward clears only the
    words it passes over, so the cost per packet does not grow with the window.
    """

    __slots__ = ("_aead", "_highest", "_ring", "_words", "cipher", "window")

    def __init__(
        self,
        key: bytes,
        cipher: DataCipher = DEFAULT_DATA_CIPHER,
        window: int = DEFAULT_REPLAY_WINDOW,
    ) -> None:
        if not _MIN_WINDOW <= window <= _MAX_WINDOW:
            raise ConfigError(
                f"replay window {window} out of range: must be {_MIN_WINDOW}..{_MAX_WINDOW}"
            )
        self._aead = _make_aead(key, cipher)
        self.cipher: DataCipher = cipher
        self.window = window
        # Counters in (highest - window, highest] span at most ceil(window/64) + 1 words; one
        # word per block keeps every live block in its own slot.
        self._words = -(-window // 64) + 1
        self._ring = [0] * self._words
        self._highest = -1  # highest authenticated counter; -1: none yet

    @property
    def highest(self) -> int:
        """Highest counter accepted so far (-1 before the first packet)."""
        return self._highest

    def check(self, counter: int) -> None:
        """Raise if ``counter`` would be refused by the window (without changing it)."""
        highest = self._highest
        if counter > highest:
            return
        if highest - counter >= self.window:
            raise PacketTooOld(
                f"data packet too old: counter {counter} is {highest - counter} behind"
                f" {highest} (window {self.window})"
            )
        if (self._ring[(counter >> 6) % self._words] >> (counter & 63)) & 1:
            raise PacketReplayed(f"data packet replayed: counter {counter}")

    def open(self, packet: bytes | bytearray | memoryview, aad: bytes = b"") -> bytes:
        """Authenticate and decrypt one packet; raise a :class:`DataPacketError` subclass.

        The window moves only after the packet authenticated.
        """
        if len(packet) < DATA_OVERHEAD:
            raise PacketTruncated(f"data packet truncated: {len(packet)} bytes < {DATA_OVERHEAD}")
        (counter,) = _unpack_counter(packet)
        highest = self._highest
        if counter <= highest:
            self.check(counter)
        # Copies of slices: the binding takes bytes faster than memoryviews at these sizes.
        header = bytes(packet[:_COUNTER_SIZE])
        body = bytes(packet[_COUNTER_SIZE:])
        try:
            plaintext = self._aead.decrypt(_NONCE_PAD + header, body, header + aad)
        except InvalidTag:
            raise PacketTampered("data packet authentication failed") from None
        ring = self._ring
        words = self._words
        block = counter >> 6
        if counter > highest:
            # Clear the words of the blocks the window moves past (at most the whole ring).
            old = highest >> 6 if highest >= 0 else block - words
            for b in range(block, max(old, block - words), -1):
                ring[b % words] = 0
            self._highest = counter
        ring[block % words] |= 1 << (counter & 63)
        return plaintext
