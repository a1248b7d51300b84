"""Handshake state machine: two real sides talking through in-memory helpers (no sockets)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import random
import struct
from collections.abc import Callable

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spake2 import SPAKE2_A

from weft.errors import LocalError, RemoteProtocolError
from weft.gossip.crypto import (
    SALT_SIZE,
    PasswordKeys,
    SaltDerivationRefused,
    choose_salt,
    derive_session_keys,
)
from weft.gossip.handshake import (
    HANDSHAKE_TIMEOUT,
    HEADER_SIZE,
    MAX_HELLO,
    PAKE_MESSAGE_SIZE,
    PROTOCOL_VERSIONS,
    EncryptionMismatch,
    Handshake,
    HandshakeClosed,
    HandshakeError,
    HandshakeResult,
    HandshakeState,
    HandshakeTimeout,
    Hello,
    IdentityNotProven,
    MalformedHandshake,
    MalformedHello,
    NotAWeftPeer,
    SaltBusy,
    VersionMismatch,
    WrongPassword,
    decode_hello,
    encode_hello,
)
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.session import MessageAuthenticationFailed

NOW = 1000.0
MESH_SALT = bytes(range(16))
PEER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PEER_KEY_PUBLIC = PEER_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@functools.cache
def pw(password: bytes) -> PasswordKeys:
    """scrypt is slow on purpose: once per password per test run (both sides share the object:
    one mesh salt, settled)."""
    return PasswordKeys(password, MESH_SALT, settled=True)


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def hello(n: int, **features: object) -> Hello:
    return Hello(
        name=PeerName(0x02_00_00_00_00_00 + n),
        nickname=f"host{n}",
        uid=1000 + n,
        conn_id=50 + n,
        short_id=n,
        features=features,  # type: ignore[arg-type]
    )


def pair(
    pw_a: PasswordKeys | None = None,
    pw_b: PasswordKeys | None = None,
    versions_a: tuple[int, int] = PROTOCOL_VERSIONS,
    versions_b: tuple[int, int] = PROTOCOL_VERSIONS,
) -> tuple[Handshake, Handshake]:
    a = Handshake(True, hello(1, udp_port=6783), pw_a, NOW, versions_a, urandom=seeded(1))
    b = Handshake(False, hello(2, gso=True), pw_b, NOW, versions_b, urandom=seeded(2))
    return a, b


def transfer(sender: Handshake, receiver: Handshake, now: float = NOW) -> int:
    """Move whatever ``sender`` has queued to ``receiver``; return the byte count."""
    data = sender.data_to_send()
    if data:
        receiver.receive(data, now)
    return len(data)


def roundtrip_until_done(a: Handshake, b: Handshake, max_rounds: int = 10) -> int:
    """Alternate transfers until both are done; return the number of rounds (each one way)."""
    for rounds in range(1, max_rounds + 1):
        moved = transfer(a, b) + transfer(b, a)
        if a.done and b.done:
            return rounds
        assert moved, "stalled"
    raise AssertionError("handshake did not finish")


def capture_errors(
    a: Handshake, b: Handshake
) -> tuple[HandshakeError | None, HandshakeError | None]:
    """Run both sides until they stop; deliver queued bytes even after a failure (as the router
    must, best effort) and return each side's error."""
    for _ in range(10):
        moved = 0
        for s, r in ((a, b), (b, a)):
            data = s.data_to_send()
            moved += len(data)
            if data and r.state not in (HandshakeState.FAILED, HandshakeState.DONE):
                with contextlib.suppress(HandshakeError):
                    r.receive(data, NOW)
        if not moved:
            break
    return a.error, b.error


def check_session(ra: HandshakeResult, rb: HandshakeResult) -> None:
    for src, dst in ((ra, rb), (rb, ra)):
        msgs = [b"\x04gossip", b"", b"x" * 70000]
        wire = src.control.encode_many(msgs)
        assert dst.control.feed(wire) == msgs


# ---------------------------------------------------------------------------- happy paths


def test_plaintext_handshake() -> None:
    a, b = pair()
    assert a.get_timer() == NOW + HANDSHAKE_TIMEOUT
    rounds = roundtrip_until_done(a, b)
    assert rounds == 2  # a->b header, b->a header+hello, a->b hello+proof, b->a proof
    ra, rb = a.result, b.result
    assert ra.version == rb.version == PROTOCOL_VERSIONS[1] == 3
    assert ra.remote == b.local_hello and rb.remote == a.local_hello
    assert ra.remote.features == {"gso": True}
    assert rb.remote.features == {"udp_port": 6783}
    assert not ra.encrypted and ra.data_send_key is None and ra.data_recv_key is None
    assert not ra.control.encrypted
    assert ra.leftover == rb.leftover == b""
    assert a.get_timer() is None and b.get_timer() is None
    check_session(ra, rb)


def test_encrypted_handshake() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    rounds = roundtrip_until_done(a, b)
    # a->b header, b->a header+hello, a->b hello+pake, b->a pake+confirm, a->b confirm
    assert rounds == 3
    ra, rb = a.result, b.result
    assert ra.encrypted and rb.encrypted and ra.control.encrypted
    assert ra.remote.encrypted and ra.remote.ephemeral is not None
    assert ra.data_send_key == rb.data_recv_key and ra.data_recv_key == rb.data_send_key
    keys = {ra.data_send_key, ra.data_recv_key}
    assert len(keys) == 2
    check_session(ra, rb)
    # A control frame from a never opens as data or vice versa: distinct keys all round.
    assert ra.data_send_key != rb.data_send_key


def test_session_keys_differ_per_connection() -> None:
    a1, b1 = pair(pw(b"secret"), pw(b"secret"))
    roundtrip_until_done(a1, b1)
    a2 = Handshake(True, hello(1), pw(b"secret"), NOW, urandom=seeded(3))
    b2 = Handshake(False, hello(2), pw(b"secret"), NOW, urandom=seeded(4))
    roundtrip_until_done(a2, b2)
    assert a1.result.data_send_key != a2.result.data_send_key
    wire = a1.result.control.encode(b"hello")
    with pytest.raises(MessageAuthenticationFailed):
        b2.result.control.feed(wire)


@pytest.mark.parametrize("encrypted", [False, True])
def test_all_at_once_and_leftover(encrypted: bool) -> None:
    """A side gets the peer's remaining handshake messages and session frames in one chunk
    before it sent anything beyond what it could; trailing frames come out as leftover."""
    key = pw(b"secret") if encrypted else None
    a, b = pair(key, key)
    # b's header reaches a first, so a can send everything it has in one go.
    a.receive(b.data_to_send(), NOW)
    burst = a.data_to_send()
    b.receive(burst, NOW)
    # b now has a's header+hello: it queued its hello (and its PAKE message).
    a.receive(b.data_to_send(), NOW)
    if encrypted:
        # a has b's hello and PAKE message: it queued its PAKE message and confirm.
        assert not a.done and not b.done
        b.receive(a.data_to_send(), NOW)
        assert b.done
        # b is done; its confirm is still queued, and session frames go right behind it.
        tail = b.data_to_send()
        assert len(tail) == 4 + len(b"weft confirm v3") + 64 + 16
        assert b.result.control.frames_sent == 1
        frames = b.result.control.encode(b"\x04first") + b.result.control.encode(b"\x05second")
        a.receive(tail + frames, NOW)
        assert a.done and b.done
        ra = a.result
        assert ra.leftover != b""
        assert ra.control.feed(ra.leftover) == [b"\x04first", b"\x05second"]
    else:
        # a has b's hello and proof: it is done, with its own proof queued.
        assert a.done and not b.done
        frames = a.result.control.encode(b"\x04first")
        b.receive(a.data_to_send() + frames, NOW)
        assert b.done
        assert b.result.control.feed(b.result.leftover) == [b"\x04first"]


def test_leftover_plaintext_after_proof() -> None:
    a, b = pair()
    b.receive(a.data_to_send(), NOW)  # header
    a.receive(b.data_to_send(), NOW)  # header + hello: a answers with its hello and proof
    b.receive(a.data_to_send(), NOW)
    assert b.done and not a.done  # b's proof is queued
    extra = b.result.control.encode(b"\x00") + b"\x00\x00"  # one frame and a partial length
    a.receive(b.data_to_send() + extra, NOW)
    assert a.done
    assert a.result.leftover == extra
    assert a.result.control.feed(a.result.leftover) == [b"\x00"]
    assert a.result.control.buffered == 2


def test_byte_by_byte() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    for _ in range(6):
        for s, r in ((a, b), (b, a)):
            for i in s.data_to_send():
                r.receive(bytes([i]), NOW)
    assert a.done and b.done
    check_session(a.result, b.result)


# ---------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("va", "vb", "expected"),
    [
        ((1, 1), (1, 1), 1),
        ((1, 3), (2, 5), 3),
        ((2, 5), (1, 3), 3),
        ((1, 9), (4, 4), 4),
        ((7, 7), (1, 200), 7),
        ((1, 255), (1, 255), 255),
    ],
)
def test_version_overlap(va: tuple[int, int], vb: tuple[int, int], expected: int) -> None:
    for key in (None, pw(b"secret")):
        a, b = pair(key, key, va, vb)
        roundtrip_until_done(a, b)
        assert a.result.version == b.result.version == expected


@pytest.mark.parametrize(("va", "vb"), [((1, 1), (2, 2)), ((3, 4), (1, 2)), ((1, 2), (5, 9))])
def test_version_disjoint(va: tuple[int, int], vb: tuple[int, int]) -> None:
    a, b = pair(None, None, va, vb)
    ea, eb = capture_errors(a, b)
    assert isinstance(ea, VersionMismatch) and isinstance(eb, VersionMismatch)
    assert str(ea) == (
        f"protocol version mismatch (ours {va[0]}..{va[1]}, theirs {vb[0]}..{vb[1]})"
    )
    assert str(eb) == (
        f"protocol version mismatch (ours {vb[0]}..{vb[1]}, theirs {va[0]}..{va[1]})"
    )
    assert ea.reason == "version_mismatch"
    assert a.get_timer() is None


def test_invalid_local_versions() -> None:
    for versions in ((0, 1), (2, 1), (1, 256)):
        with pytest.raises(LocalError):
            Handshake(True, hello(1), None, NOW, versions)


# ---------------------------------------------------------------------------- passwords


def test_wrong_password_both_sides() -> None:
    a, b = pair(pw(b"secret"), pw(b"other"))
    ea, eb = capture_errors(a, b)
    assert isinstance(ea, WrongPassword) and isinstance(eb, WrongPassword)
    assert str(ea).startswith("wrong password")
    assert ea.reason == "wrong_password"
    assert not a.done and not b.done


def test_wrong_password_when_all_arrives_in_one_chunk() -> None:
    """Even when the failing side gets PAKE message and confirm together, it has queued its own
    confirm, so the peer learns the reason too (if the router flushes before closing)."""
    a, b = pair(pw(b"secret"), pw(b"other"))
    b.receive(a.data_to_send(), NOW)  # a's header
    a.receive(b.data_to_send(), NOW)  # b's header + hello -> a sends hello + PAKE message
    b.receive(a.data_to_send(), NOW)  # -> b sends its PAKE message + confirm
    with pytest.raises(WrongPassword):
        a.receive(b.data_to_send(), NOW)  # PAKE message + confirm in one chunk
    flushed = a.data_to_send()
    assert flushed  # a's confirm
    with pytest.raises(WrongPassword):
        b.receive(flushed, NOW)


@pytest.mark.parametrize("a_has_password", [True, False])
def test_encryption_mismatch(a_has_password: bool) -> None:
    key = pw(b"secret")
    a, b = pair(key, None) if a_has_password else pair(None, key)
    ea, eb = capture_errors(a, b)
    assert isinstance(ea, EncryptionMismatch) and isinstance(eb, EncryptionMismatch)
    with_pw, without = (ea, eb) if a_has_password else (eb, ea)
    assert str(with_pw) == "encryption mismatch: peer has no password (we have one)"
    assert str(without) == "encryption mismatch: peer has a password (we have none)"
    assert ea.reason == "encryption_mismatch"


def test_password_key_must_be_derived() -> None:
    with pytest.raises(LocalError):
        Handshake(True, hello(1), b"short", NOW)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- timer and eof


def test_timeout_with_stepped_clock() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)  # b got a's header, a got nothing yet
    deadline = a.get_timer()
    assert deadline == NOW + 10.0
    a.handle_timer(NOW + 5.0)
    a.handle_timer(deadline - 0.001)
    assert a.state is HandshakeState.AWAIT_HEADER
    with pytest.raises(HandshakeTimeout) as info:
        a.handle_timer(deadline)
    assert str(info.value) == "handshake timed out after 10 s (waiting for the peer's header)"
    assert info.value.reason == "timeout"
    assert a.get_timer() is None
    with pytest.raises(LocalError):
        a.receive(b.data_to_send(), deadline)
    # b is waiting for a's hello now.
    with pytest.raises(HandshakeTimeout, match="waiting for the peer's hello"):
        b.handle_timer(NOW + 11)


def test_timer_after_done_is_harmless() -> None:
    a, b = pair()
    roundtrip_until_done(a, b)
    a.handle_timer(NOW + 1e6)
    assert a.done


def test_custom_timeout() -> None:
    a = Handshake(True, hello(1), None, NOW, timeout=2.5)
    assert a.get_timer() == NOW + 2.5
    with pytest.raises(HandshakeTimeout, match=r"after 2\.5 s"):
        a.handle_timer(NOW + 2.5)


def test_eof_during_handshake() -> None:
    a, b = pair()
    transfer(a, b)
    with pytest.raises(HandshakeClosed, match="waiting for the peer's hello"):
        b.receive_eof()
    assert b.error is not None and b.error.reason == "closed"


# ---------------------------------------------------------------------------- malformed input


def header(low: int = PROTOCOL_VERSIONS[0], high: int = PROTOCOL_VERSIONS[1]) -> bytes:
    return b"weft" + bytes((low, high))


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def fresh(password: bytes | None = None) -> Handshake:
    return Handshake(False, hello(2), pw(password) if password else None, NOW, urandom=seeded(9))


def good_hello_map() -> dict[str, object]:
    return {
        "name": 0x0200_0000_0001,
        "nickname": "a",
        "uid": 1,
        "conn_id": 2,
        "short_id": 3,
        "features": {},
        "encrypted": False,
        "ephemeral": None,
        "identity_key": PEER_KEY_PUBLIC,
    }


def feed_hello(body: bytes) -> Handshake:
    hs = fresh()
    hs.receive(header() + frame(body), NOW)
    return hs


def test_bad_magic_fails_on_first_bytes() -> None:
    hs = fresh()
    with pytest.raises(NotAWeftPeer, match="not a weft peer") as info:
        hs.receive(b"GE", NOW)
    assert info.value.reason == "bad_magic"
    assert hs.data_to_send() == header()  # only our header went out


def test_weave_peer_is_not_a_weft_peer() -> None:
    with pytest.raises(NotAWeftPeer):
        fresh().receive(b"weave\x01\x02", NOW)


def test_partial_header_waits() -> None:
    hs = fresh()
    hs.receive(b"we", NOW)
    hs.receive(b"ft" + bytes(PROTOCOL_VERSIONS[:1]), NOW)
    assert hs.state is HandshakeState.AWAIT_HEADER
    hs.receive(bytes(PROTOCOL_VERSIONS[1:]), NOW)
    assert hs.state.name == "AWAIT_HELLO"


@pytest.mark.parametrize("versions", [(0, 1), (2, 1), (0, 0)])
def test_malformed_header(versions: tuple[int, int]) -> None:
    with pytest.raises(MalformedHandshake, match="malformed header"):
        fresh().receive(header(*versions), NOW)


def test_oversized_hello_refused_before_buffering() -> None:
    hs = fresh()
    with pytest.raises(MalformedHello, match=f"malformed hello: {MAX_HELLO + 1} bytes"):
        hs.receive(header() + struct.pack(">I", MAX_HELLO + 1), NOW)
    with pytest.raises(MalformedHello):
        fresh().receive(header() + b"\xff\xff\xff\xff", NOW)


def test_truncated_hello_waits_then_eof() -> None:
    body = msgpack.packb(good_hello_map())
    hs = fresh()
    hs.receive(header() + frame(body)[:-3], NOW)
    assert hs.state is HandshakeState.AWAIT_HELLO
    with pytest.raises(HandshakeClosed):
        hs.receive_eof()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.pop("uid"), "missing uid"),
        (lambda m: m.update(name=1 << 48), "name 281474976710656 out of range"),
        (lambda m: m.update(name=-1), "name -1 out of range"),
        (lambda m: m.update(name="aa:bb"), "name must be an integer"),
        (lambda m: m.update(uid=True), "uid must be an integer, got bool"),
        (lambda m: m.update(uid=1 << 64), "not msgpack"),  # msgpack cannot even encode... see below
        (lambda m: m.update(conn_id=-5), "conn_id -5 out of range"),
        (lambda m: m.update(short_id=4096), "short_id 4096 out of range 0..4095"),
        (lambda m: m.update(nickname=b"bytes"), "nickname must be a string"),
        (lambda m: m.update(nickname="n" * 256), "nickname must be a string of at most 255"),
        (lambda m: m.update(features=[1]), "features must be a map"),
        (lambda m: m.update(features={"k": {"nested": 1}}), "unsupported type dict"),
        (lambda m: m.update(features={"k": [[1]]}), "unsupported type list"),
        (lambda m: m.update(features={"k": list(range(17))}), "17 items"),
        (lambda m: m.update(features={"k": "v" * 257}), "longer than 256"),
        (lambda m: m.update(features={"": 1}), "feature key ''"),
        (lambda m: m.update(features={f"k{i}": i for i in range(33)}), "33 features"),
        (lambda m: m.update(features={"k": float("nan")}), "not a finite number"),
        (lambda m: m.update(encrypted=1), "encrypted must be a boolean"),
        (lambda m: m.update(encrypted=True), "ephemeral key must be 32 bytes"),
        (lambda m: m.update(encrypted=True, ephemeral=b"x" * 31), "ephemeral key must be 32"),
        (lambda m: m.update(ephemeral=b"x" * 32), "ephemeral key present"),
        (
            lambda m: m.update(encrypted=True, ephemeral=b"x" * 32),
            "mesh salt must be 16 bytes when encrypted",
        ),
        (
            lambda m: m.update(encrypted=True, ephemeral=b"x" * 32, salt=b"s" * 15),
            "mesh salt must be 16 bytes",
        ),
        (
            lambda m: m.update(encrypted=True, ephemeral=b"x" * 32, salt="s" * 16),
            "mesh salt must be 16 bytes",
        ),
        (lambda m: m.update(salt=b"s" * 16), "mesh salt present although not encrypted"),
        (lambda m: m.update(salt_settled=True), "mesh salt present although not encrypted"),
        (lambda m: m.update(salt_settled=1), "salt_settled must be a boolean"),
        (lambda m: m.pop("identity_key"), "missing identity_key"),
        (lambda m: m.update(identity_key=None), "no identity key"),
        (lambda m: m.update(identity_key=b"k" * 31), "identity key must be 32 bytes"),
        (lambda m: m.update(identity_key="k" * 32), "identity key must be 32 bytes"),
    ],
)
def test_malformed_hello_fields(mutate: Callable[[dict[str, object]], object], reason: str) -> None:
    m = good_hello_map()
    mutate(m)
    try:
        body = msgpack.packb(m)
    except OverflowError:
        body = msgpack.packb({**m, "uid": 0}) + b"\xcf"  # trailing junk: malformed anyway
    with pytest.raises(MalformedHello, match="malformed hello: ") as info:
        feed_hello(body)
    assert reason in str(info.value)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2, 3]),
        msgpack.packb("hello"),
        msgpack.packb({1: 2}),
        msgpack.packb(good_hello_map()) + b"\x00",  # trailing data
        msgpack.packb(good_hello_map())[:-1],  # truncated inside
        msgpack.packb({"name": msgpack.ExtType(5, b"xx")}),
        b"\xdf\xff\xff\xff\xff",  # map header claiming 4G entries
        b"\x91" * 2000,  # deep nesting
    ],
)
def test_garbage_hello(body: bytes) -> None:
    with pytest.raises(MalformedHello):
        feed_hello(body)


def test_unknown_hello_keys_are_ignored() -> None:
    hs = feed_hello(msgpack.packb({**good_hello_map(), "future": [1, 2]}))
    assert hs.state is HandshakeState.AWAIT_PROOF
    assert hs.remote_hello is not None and hs.remote_hello.nickname == "a"


def test_invalid_ephemeral_key_refused() -> None:
    hs = fresh(b"secret")
    m = {**good_hello_map(), "encrypted": True, "ephemeral": bytes(32), "salt": MESH_SALT}
    # (an all-zero X25519 key is a low-order point)
    with pytest.raises(MalformedHello, match="invalid ephemeral key"):
        hs.receive(header() + frame(msgpack.packb(m)), NOW)


def test_malformed_confirm() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)  # header
    transfer(b, a)  # header + hello
    transfer(a, b)  # hello + PAKE message: b waits for a's confirm now
    assert b.state is HandshakeState.AWAIT_CONFIRM
    with pytest.raises(MalformedHandshake, match="malformed confirm: 5 bytes"):
        b.receive(frame(b"short"), NOW)


def test_tampered_confirm_is_wrong_password() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)
    transfer(b, a)
    transfer(a, b)
    transfer(b, a)  # b's PAKE message + confirm: a is done and queued its confirm
    data = bytearray(a.data_to_send())
    data[-1] ^= 1
    with pytest.raises(WrongPassword):
        b.receive(bytes(data), NOW)


def test_tampered_hello_breaks_the_transcript() -> None:
    """Changing a byte of a's hello in flight (here its nickname) changes b's transcript hash,
    so the confirms cannot open on either side."""
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)
    transfer(b, a)
    data = a.data_to_send().replace(b"host1", b"hostX")
    b.receive(data, NOW)  # nothing to check yet: b answers with its PAKE message and confirm
    with pytest.raises(WrongPassword):
        a.receive(b.data_to_send(), NOW)
    with pytest.raises(WrongPassword):
        b.receive(a.data_to_send(), NOW)


def test_receive_after_done_is_local_error() -> None:
    a, b = pair()
    roundtrip_until_done(a, b)
    with pytest.raises(LocalError):
        a.receive(b"x", NOW)
    with pytest.raises(LocalError):
        Handshake(True, hello(1), None, NOW).result  # noqa: B018


# ---------------------------------------------------------------------------- hello type


def test_hello_roundtrip_and_identity() -> None:
    ident = PeerIdentity(PeerName.parse("02:aa:bb:cc:dd:ee"), "node", 77, 12)
    h = Hello.from_identity(ident, conn_id=9, features={"udp_port": 6783, "dp": ["sleeve", "x"]})
    assert h.identity == ident
    assert h.features["dp"] == ("sleeve", "x")
    with pytest.raises(TypeError):
        h.features["new"] = 1  # type: ignore[index]
    with pytest.raises(MalformedHello, match="no identity key"):
        decode_hello(encode_hello(h))  # the handshake fills it in
    h = dataclasses.replace(h, identity_key=PEER_KEY_PUBLIC)
    assert decode_hello(encode_hello(h)) == h


def test_local_hello_validated() -> None:
    with pytest.raises(LocalError, match="short_id"):
        Hello(PeerName(1), "n", 1, 1, 4096)
    with pytest.raises(LocalError, match="feature"):
        Hello(PeerName(1), "n", 1, 1, 1, features={"k": object()})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=6),
    encrypted=st.booleans(),
    prefix=st.sampled_from([b"", header(), header() + struct.pack(">I", 40)]),
)
def test_fuzz_only_remote_protocol_errors(
    chunks: list[bytes], encrypted: bool, prefix: bytes
) -> None:
    hs = fresh(b"secret" if encrypted else None)
    try:
        hs.receive(prefix, NOW)
        for chunk in chunks:
            if hs.done:
                hs.result.control.feed(chunk)
            else:
                hs.receive(chunk, NOW)
    except RemoteProtocolError:
        assert hs.done or hs.state is HandshakeState.FAILED


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300)
    | st.builds(
        msgpack.packb,
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=5)
            | st.binary(max_size=40)
            | st.floats(),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=9), inner, max_size=9)
            ),
            max_leaves=20,
        ),
    )
)
def test_fuzz_hello_bodies(body: bytes) -> None:
    with contextlib.suppress(MalformedHello):
        decode_hello(body)


@settings(max_examples=100, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {
            "name": st.integers(0, 2**48 - 1),
            "nickname": st.text(max_size=30),
            "uid": st.integers(0, 2**64 - 1),
            "conn_id": st.integers(0, 2**64 - 1),
            "short_id": st.integers(0, 4095),
            "identity_key": st.binary(min_size=32, max_size=32),
            "features": st.dictionaries(
                st.text(min_size=1, max_size=10),
                st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=9),
                max_size=8,
            ),
        }
    ),
    mutate_at=st.integers(0, 400),
    xor=st.integers(1, 255),
)
def test_fuzz_bitflipped_hello(fields: dict[str, object], mutate_at: int, xor: int) -> None:
    h = Hello(
        name=PeerName(fields["name"]),  # type: ignore[arg-type]
        nickname=fields["nickname"],  # type: ignore[arg-type]
        uid=fields["uid"],  # type: ignore[arg-type]
        conn_id=fields["conn_id"],  # type: ignore[arg-type]
        short_id=fields["short_id"],  # type: ignore[arg-type]
        features=fields["features"],  # type: ignore[arg-type]
        identity_key=fields["identity_key"],  # type: ignore[arg-type]
    )
    body = bytearray(encode_hello(h))
    assert decode_hello(bytes(body)) == h
    body[mutate_at % len(body)] ^= xor
    with contextlib.suppress(MalformedHello):
        decode_hello(bytes(body))


def test_header_size_constant() -> None:
    assert HEADER_SIZE == 6


def recorded_stream(encrypted: bool) -> bytes:
    """Everything an outbound side sends in a good handshake, plus two session frames."""
    key = pw(b"secret") if encrypted else None
    a, b = pair(key, key)
    sent = bytearray()
    for _ in range(4):
        data = a.data_to_send()
        sent += data
        if data and not b.done:
            b.receive(data, NOW)
        back = b.data_to_send()
        if back and not a.done:
            a.receive(back, NOW)
    assert a.done and b.done
    sent += a.data_to_send()
    sent += a.result.control.encode_many([b"\x04one", b"\x05two"])
    return bytes(sent)


STREAMS = {flag: recorded_stream(flag) for flag in (False, True)}


@settings(max_examples=400, deadline=None)
@given(
    encrypted=st.booleans(),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]),
            st.integers(0, 10_000),
            st.binary(min_size=1, max_size=8),
        ),
        max_size=3,
    ),
    chunk=st.integers(1, 200),
)
def test_fuzz_mutated_handshake_stream(
    encrypted: bool, edits: list[tuple[str, int, bytes]], chunk: int
) -> None:
    """A real stream with flipped, cut or inserted bytes, delivered in chunks: the receiver ends
    done (and its session decodes or refuses) or fails with a HandshakeError, nothing else."""
    stream = bytearray(STREAMS[encrypted])
    for op, at, blob in edits:
        at %= len(stream) + 1
        if op == "flip" and at < len(stream):
            stream[at] ^= blob[0]
        elif op == "cut":
            del stream[at:]
        else:
            stream[at:at] = blob
    # Same seed as in pair(): b's ephemeral and hello match the recorded stream.
    b = Handshake(
        False, hello(2, gso=True), pw(b"secret") if encrypted else None, NOW, urandom=seeded(2)
    )
    data = bytes(stream)
    try:
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            if b.done:
                b.result.control.feed(piece)
            else:
                b.receive(piece, NOW)
                if b.done and b.result.leftover:
                    b.result.control.feed(b.result.leftover)
    except HandshakeError as err:
        assert b.state is HandshakeState.FAILED and b.error is err
        assert err.reason in {
            "bad_magic",
            "version_mismatch",
            "malformed",
            "encryption_mismatch",
            "wrong_password",
            "identity_not_proven",  # a flipped identity key or proof
            "salt_busy",  # a flipped salt asks for new scrypts; the budget is shared here
        }
    except RemoteProtocolError:
        assert b.done
    if not edits:
        assert b.done


def test_recorded_stream_completes() -> None:
    for encrypted, stream in STREAMS.items():
        b = Handshake(
            False, hello(2, gso=True), pw(b"secret") if encrypted else None, NOW, urandom=seeded(2)
        )
        b.receive(stream, NOW)
        assert b.done
        assert b.result.control.feed(b.result.leftover) == [b"\x04one", b"\x05two"]


def test_reflected_stream_is_refused() -> None:
    """Everything we send echoed back (a TCP reflector): refused, never a session with ourselves."""
    a = Handshake(True, hello(1), pw(b"secret"), NOW, urandom=seeded(1))
    with pytest.raises(MalformedHello, match="echoed our own ephemeral key"):
        for _ in range(3):
            a.receive(a.data_to_send(), NOW)


def test_reflected_confirm_does_not_open() -> None:
    """Control keys differ per direction: our own confirm sent back to us does not open."""
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)
    transfer(b, a)  # b's header + hello
    transfer(a, b)  # a's hello + PAKE message: b queues its PAKE message + confirm
    a.receive(b.data_to_send()[: 4 + PAKE_MESSAGE_SIZE], NOW)  # b's PAKE message only
    assert a.state is HandshakeState.AWAIT_CONFIRM
    own_confirm = a.data_to_send()
    with pytest.raises(WrongPassword):
        a.receive(own_confirm, NOW)


def test_reflected_pake_message_is_refused() -> None:
    """Our own PAKE message sent back (with the peer's real header and hello): refused by name,
    before any key is derived from it."""
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)
    transfer(b, a)
    out = a.data_to_send()
    own_pake = out[-(4 + PAKE_MESSAGE_SIZE) :]
    with pytest.raises(MalformedHandshake, match="echoed our own"):
        a.receive(own_pake, NOW)


# ---------------------------------------------------------------------------- offline guessing
# Issue #14 item 7: on protocol v1 one unauthenticated connection was enough to test passwords
# offline: the router sent a confirm sealed under keys derived from X25519 (whose private half
# the dialer knows) and the password key, right after the dialer's hello.

DICTIONARY = (b"123456", b"password", b"letmein", b"secret", b"hunter2")


def _parse_frames(data: bytes) -> list[bytes]:
    """Length-prefixed frames (each with its 4-byte prefix); the rest must be empty."""
    frames = []
    while data:
        assert len(data) >= 4, "trailing bytes"
        end = 4 + struct.unpack(">I", data[:4])[0]
        assert len(data) >= end, "truncated frame"
        frames.append(data[:end])
        data = data[end:]
    return frames


def _v1_guess_opens(
    guess: bytes, salt: bytes, shared: bytes, transcript: bytes, frame_: bytes
) -> bool:
    """The v1 attack: derive the router's control key for ``guess`` and try to open a frame."""
    key = hashlib.scrypt(guess, salt=salt, n=2**14, r=8, p=1, dklen=32)
    secret = HKDF(hashes.SHA256(), 32, salt=key, info=hashlib.sha256(transcript).digest()).derive(
        shared
    )
    for label in (b"weft v1 control inbound->outbound", b"weft v2 control inbound->outbound"):
        control = HKDFExpand(hashes.SHA256(), 32, info=label).derive(secret)
        try:
            ChaCha20Poly1305(control).decrypt(bytes(12), frame_[4:], frame_[:4])
            return True
        except InvalidTag:
            pass
    return False


def _dialer_hello(ephemeral: bytes) -> bytes:
    body = msgpack.packb(
        {
            **good_hello_map(),
            "encrypted": True,
            "ephemeral": ephemeral,
            "salt": bytes(SALT_SIZE),
            "salt_settled": False,
        }
    )
    return frame(body)


def test_one_connection_allows_no_offline_guess() -> None:
    """An unauthenticated dialer sends header and hello and records all the router answers
    (v1: header, hello and a sealed confirm, 310 bytes in the issue's capture). The old attack
    tries each dictionary word offline against it: on v1 the right one opened the confirm; now
    the router sends nothing sealed before the dialer commits to a guess, so no word verifies."""
    router = Handshake(False, hello(2), pw(b"secret"), NOW, urandom=seeded(5))
    attacker = X25519PrivateKey.from_private_bytes(seeded(6)(32))
    ephemeral = attacker.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sent = header() + _dialer_hello(ephemeral)
    recorded = router.data_to_send()
    router.receive(sent, NOW)
    recorded += router.data_to_send()
    assert router.state is HandshakeState.AWAIT_PAKE  # waiting for our guess, sealed nothing
    router_header, rest = recorded[:HEADER_SIZE], recorded[HEADER_SIZE:]
    frames = _parse_frames(rest)
    assert len(frames) == 2  # its hello and its PAKE message, nothing else
    router_hello, router_pake = frames
    assert len(router_pake) == 4 + PAKE_MESSAGE_SIZE
    remote = decode_hello(router_hello[4:])
    assert remote.ephemeral is not None and remote.salt is not None
    shared = attacker.exchange(X25519PublicKey.from_public_bytes(remote.ephemeral))
    transcript = sent[:HEADER_SIZE] + router_header + sent[HEADER_SIZE:] + router_hello
    for guess in DICTIONARY:
        for salt in (b"weft-password-v1", remote.salt):
            for candidate in frames:
                assert not _v1_guess_opens(guess, salt, shared, transcript, candidate)


def test_a_pake_message_commits_the_dialer_to_one_guess() -> None:
    """A dialer that plays SPAKE2 with one guess gets the router's confirm, and with it an answer
    for that guess only: recomputing the keys for any other word (the right one included) from
    what it holds does not open the confirm, and the router names the failure (wrong password)."""
    router = Handshake(False, hello(2), pw(b"secret"), NOW, urandom=seeded(5))
    entropy = random.Random(8).randbytes(4096)

    def attacker_entropy(offset: int = 0) -> Callable[[int], bytes]:
        stream = iter(entropy[offset:])
        return lambda n: bytes(next(stream) for _ in range(n))

    attacker = X25519PrivateKey.from_private_bytes(entropy[:32])
    ephemeral = attacker.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sent = header() + _dialer_hello(ephemeral)
    recorded = router.data_to_send()
    router.receive(sent, NOW)
    recorded += router.data_to_send()
    router_header = recorded[:HEADER_SIZE]
    router_hello, router_pake = _parse_frames(recorded[HEADER_SIZE:])
    remote = decode_hello(router_hello[4:])
    assert remote.ephemeral is not None and remote.salt is not None
    salt = choose_salt(bytes(SALT_SIZE), False, remote.salt, remote.salt_settled)

    def keys_for(guess: bytes) -> tuple[bytes, bytes]:
        """The attacker's SPAKE2 side for ``guess`` (same randomness every time)."""
        side = SPAKE2_A(
            hashlib.scrypt(guess, salt=salt, n=2**14, r=8, p=1, dklen=32),
            idA=b"weft v2 outbound",
            idB=b"weft v2 inbound",
            entropy_f=attacker_entropy(32),
        )
        message = side.start()
        return message, side.finish(router_pake[4:])

    committed, _ = keys_for(b"letmein")
    pake_frame = frame(committed)
    router.receive(pake_frame, NOW)
    assert router.state is HandshakeState.AWAIT_CONFIRM
    confirm = router.data_to_send()
    assert len(confirm) == 4 + len(b"weft confirm v3") + 64 + 16
    with pytest.raises(WrongPassword):  # the one online guess, seen and named by the router
        router.receive(frame(bytes(len(b"weft confirm v3") + 64 + 16)), NOW)
    shared = attacker.exchange(X25519PublicKey.from_public_bytes(remote.ephemeral))
    transcript = (
        sent[:HEADER_SIZE] + router_header + sent[HEADER_SIZE:] + router_hello + pake_frame
    ) + router_pake
    opened = []
    for guess in DICTIONARY:
        message, pake_key = keys_for(guess)
        for ours in {frame(message), pake_frame}:  # its own message, or the committed one
            t = transcript.replace(pake_frame, ours)
            keys = derive_session_keys(shared, pake_key, t, outbound=True)
            try:
                ChaCha20Poly1305(keys.control_recv).decrypt(bytes(12), confirm[4:], confirm[:4])
                opened.append(guess)
            except InvalidTag:
                pass
    assert opened == []


# ---------------------------------------------------------------------------- mesh salt


@functools.cache
def keys(password: bytes, salt_byte: int, settled: bool) -> PasswordKeys:
    return PasswordKeys(password, bytes([salt_byte]) * SALT_SIZE, settled)


def test_choose_salt_rules() -> None:
    lo, hi = b"\x01" * 16, b"\x09" * 16
    assert choose_salt(lo, False, hi, False) == choose_salt(hi, False, lo, False) == lo
    assert choose_salt(lo, True, hi, True) == lo
    assert choose_salt(lo, False, hi, True) == choose_salt(hi, True, lo, False) == hi
    assert choose_salt(lo, True, lo, False) == lo


def test_new_router_adopts_the_mesh_salt() -> None:
    """A fresh router (provisional salt, lower than the mesh's) meets a settled one: both use
    the settled salt, the fresh one pays one scrypt for it and then settles on it."""
    mesh = keys(b"secret", 9, True)
    fresh_keys = PasswordKeys(b"secret", b"\x01" * 16, settled=False)
    a = Handshake(True, hello(1), fresh_keys, NOW, urandom=seeded(1))
    b = Handshake(False, hello(2), mesh, NOW, urandom=seeded(2))
    roundtrip_until_done(a, b)
    assert a.result.salt == b.result.salt == mesh.salt
    assert fresh_keys.derivations == 2  # its own provisional salt, then the mesh's
    assert mesh.derivations == 1
    assert fresh_keys.settle(mesh.salt) is True
    assert fresh_keys.salt == mesh.salt and fresh_keys.settled
    assert fresh_keys.settle(mesh.salt) is False  # nothing new to persist
    check_session(a.result, b.result)


def test_settle_keeps_the_better_salt() -> None:
    k = PasswordKeys(b"secret", b"\x05" * 16, settled=True)
    assert k.settle(k.salt) is False
    k.key_for(b"\x07" * 16, NOW)
    assert k.settle(b"\x07" * 16) is False  # a higher settled salt never replaces ours
    assert k.salt == b"\x05" * 16
    k.key_for(b"\x02" * 16, NOW)
    assert k.settle(b"\x02" * 16) is True  # two meshes met: the lower one wins
    with pytest.raises(LocalError):
        k.settle(b"\x03" * 16)  # never derived: no handshake used it


def test_two_provisional_routers_agree() -> None:
    a_keys = PasswordKeys(b"secret", b"\x04" * 16, settled=False)
    b_keys = PasswordKeys(b"secret", b"\x03" * 16, settled=False)
    a = Handshake(True, hello(1), a_keys, NOW, urandom=seeded(1))
    b = Handshake(False, hello(2), b_keys, NOW, urandom=seeded(2))
    roundtrip_until_done(a, b)
    assert a.result.salt == b.result.salt == b"\x03" * 16
    assert b_keys.derivations == 1 and a_keys.derivations == 2


def test_wrong_password_across_salts_is_still_wrong_password() -> None:
    a = Handshake(True, hello(1), keys(b"secret", 9, True), NOW, urandom=seeded(1))
    b = Handshake(False, hello(2), keys(b"other", 3, True), NOW, urandom=seeded(2))
    ea, eb = capture_errors(a, b)
    assert isinstance(ea, WrongPassword) and isinstance(eb, WrongPassword)
    assert str(ea) == str(eb) == (
        "wrong password: the peer's confirm did not authenticate (its password differs from ours)"
    )


def test_tampered_salt_fails_the_confirm() -> None:
    """An on-path attacker rewrites the salt in a's hello (so b picks another one): the sides
    use different keys and transcripts, and both name it a wrong password."""
    a = Handshake(True, hello(1), keys(b"secret", 9, True), NOW, urandom=seeded(1))
    b = Handshake(False, hello(2), keys(b"secret", 9, True), NOW, urandom=seeded(2))
    transfer(a, b)
    transfer(b, a)
    data = a.data_to_send()
    tampered = data.replace(b"\x09" * 16, b"\x02" * 16)
    assert tampered != data
    b.receive(tampered, NOW)
    with pytest.raises(WrongPassword):
        a.receive(b.data_to_send(), NOW)
    with pytest.raises(WrongPassword):
        b.receive(a.data_to_send(), NOW)


def test_foreign_salts_are_rate_limited() -> None:
    """A stranger naming salt after salt (each a 16 MiB scrypt for us) is refused by name once
    the budget is spent; the budget refills with time; known salts always work."""
    k = PasswordKeys(b"secret", b"\xf0" * 16, settled=False)

    def stranger(salt_byte: int, now: float) -> Handshake:
        hs = Handshake(False, hello(2), k, now, urandom=seeded(salt_byte))
        m = {
            **good_hello_map(),
            "encrypted": True,
            "ephemeral": X25519PrivateKey.from_private_bytes(bytes([salt_byte]) * 32)
            .public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw),
            "salt": bytes([salt_byte]) * 16,
            "salt_settled": True,
        }
        hs.receive(header() + frame(msgpack.packb(m)), now)
        return hs

    for i in range(3):
        assert stranger(i + 1, NOW).state is HandshakeState.AWAIT_PAKE
    with pytest.raises(SaltBusy, match="retry later") as info:
        stranger(9, NOW + 1)
    assert info.value.reason == "salt_busy"
    assert k.derivations == 4
    assert stranger(1, NOW + 2).state is HandshakeState.AWAIT_PAKE  # cached: free
    assert stranger(9, NOW + 11).state is HandshakeState.AWAIT_PAKE  # refilled
    with pytest.raises(SaltDerivationRefused):
        k.key_for(b"\x0a" * 16, NOW + 12)


@settings(max_examples=150, deadline=None)
@given(message=st.binary(min_size=PAKE_MESSAGE_SIZE, max_size=PAKE_MESSAGE_SIZE))
def test_fuzz_pake_messages(message: bytes) -> None:
    """Any 33 bytes as the peer's PAKE message: refused as malformed, or taken (then the
    confirm decides); never another exception."""
    hs = fresh(b"secret")
    m = {
        **good_hello_map(),
        "encrypted": True,
        "ephemeral": X25519PrivateKey.from_private_bytes(bytes(range(32)))
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw),
        "salt": MESH_SALT,
        "salt_settled": True,
    }
    hs.receive(header() + frame(msgpack.packb(m)), NOW)
    try:
        hs.receive(frame(message), NOW)
    except MalformedHandshake as err:
        assert str(err).startswith("malformed PAKE message")
        assert hs.state is HandshakeState.FAILED
    else:
        assert hs.state is HandshakeState.AWAIT_CONFIRM


@pytest.mark.parametrize("length", [0, 32, 34, 1 << 20])
def test_pake_message_of_wrong_length(length: int) -> None:
    hs = fresh(b"secret")
    m = {
        **good_hello_map(),
        "encrypted": True,
        "ephemeral": X25519PrivateKey.from_private_bytes(bytes(range(32)))
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw),
        "salt": MESH_SALT,
        "salt_settled": True,
    }
    hs.receive(header() + frame(msgpack.packb(m)), NOW)
    with pytest.raises(MalformedHandshake, match=f"malformed PAKE message: {length} bytes"):
        hs.receive(struct.pack(">I", length), NOW)


# ---------------------------------------------------------------------------- identity proof


VICTIM_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
VICTIM_PUBLIC = VICTIM_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.mark.parametrize("encrypted", [False, True])
def test_the_remote_identity_key_is_proven(encrypted: bool) -> None:
    key = pw(b"secret") if encrypted else None
    a = Handshake(True, hello(1), key, NOW, urandom=seeded(1), identity=VICTIM_KEY)
    b = Handshake(False, hello(2), key, NOW, urandom=seeded(2), identity=PEER_KEY)
    roundtrip_until_done(a, b)
    assert b.result.remote.identity_key == VICTIM_PUBLIC
    assert a.result.remote.identity_key == PEER_KEY_PUBLIC


@pytest.mark.parametrize("encrypted", [False, True])
def test_claiming_another_peers_identity_key_is_refused(encrypted: bool) -> None:
    """A password holder (or any member of a plaintext mesh) who claims a victim's identity key —
    it is public, every record carries it — cannot prove it: its proof is signed by its own key.
    Before protocol v3 a hello carried no key at all, so nothing told the two apart."""
    key = pw(b"secret") if encrypted else None
    attacker = Handshake(True, hello(1), key, NOW, urandom=seeded(1))  # a throwaway key of its own
    attacker.local_hello = dataclasses.replace(attacker.local_hello, identity_key=VICTIM_PUBLIC)
    b = Handshake(False, hello(2), key, NOW, urandom=seeded(2))
    _, err_b = capture_errors(attacker, b)
    assert isinstance(err_b, IdentityNotProven)
    assert err_b.reason == "identity_not_proven"
    assert "02:00:00:00:00:01" in str(err_b) and "identity key" in str(err_b)
    assert not b.done


def test_a_recorded_proof_does_not_work_in_another_connection() -> None:
    """The proof signs the transcript, which holds the verifier's random conn_id: replaying the
    victim's proof from one connection into the next fails."""
    a = Handshake(True, hello(1), None, NOW, urandom=seeded(1), identity=VICTIM_KEY)
    b = Handshake(False, hello(2), None, NOW, urandom=seeded(2))
    transfer(a, b)
    transfer(b, a)
    recorded = a.data_to_send()  # a's hello + proof
    b2 = Handshake(
        False, dataclasses.replace(hello(2), conn_id=12345), None, NOW, urandom=seeded(2)
    )
    b2.data_to_send()
    with pytest.raises(IdentityNotProven):
        b2.receive(header() + recorded, NOW)


def test_malformed_proof_frame() -> None:
    a, b = pair()
    transfer(a, b)
    transfer(b, a)
    hello_frame, _proof = _parse_frames(a.data_to_send())
    with pytest.raises(MalformedHandshake, match="malformed identity proof: 5 bytes"):
        b.receive(hello_frame + frame(b"short"), NOW)
