"""Handshake state machine: two real sides talking through in-memory helpers (no sockets)."""

from __future__ import annotations

import contextlib
import functools
import random
import struct
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.errors import LocalError, RemoteProtocolError
from weft.gossip.crypto import derive_password_key
from weft.gossip.handshake import (
    HANDSHAKE_TIMEOUT,
    HEADER_SIZE,
    MAX_HELLO,
    EncryptionMismatch,
    Handshake,
    HandshakeClosed,
    HandshakeError,
    HandshakeResult,
    HandshakeState,
    HandshakeTimeout,
    Hello,
    MalformedHandshake,
    MalformedHello,
    NotAWeftPeer,
    VersionMismatch,
    WrongPassword,
    decode_hello,
    encode_hello,
)
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.session import MessageAuthenticationFailed

NOW = 1000.0


@functools.cache
def pw(password: bytes) -> bytes:
    """scrypt is slow on purpose: once per password per test run."""
    return derive_password_key(password)


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
    pw_a: bytes | None = None,
    pw_b: bytes | None = None,
    versions_a: tuple[int, int] = (1, 1),
    versions_b: tuple[int, int] = (1, 1),
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
    assert rounds == 2  # header, then hello
    ra, rb = a.result, b.result
    assert ra.version == rb.version == 1
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
    assert rounds == 2  # a->b, b->a (header+hello), a->b (hello+confirm), b->a (confirm)
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
    """The inbound side gets header, hello (and confirm) and frames in one chunk before it sent
    anything beyond its header; trailing frames come out as leftover."""
    key = pw(b"secret") if encrypted else None
    a, b = pair(key, key)
    # b's header reaches a first, so a can send everything it has in one go.
    a.receive(b.data_to_send(), NOW)
    burst = a.data_to_send()
    b.receive(burst, NOW)
    # b now has a's header+hello: it queued its hello (and confirm).
    a.receive(b.data_to_send(), NOW)
    if encrypted:
        assert not b.done
        assert a.done
        # a is done; its confirm is still queued, and session frames go right behind it.
        tail = a.data_to_send()
        assert len(tail) == 4 + len(b"weft confirm v1") + 16
        assert a.result.control.frames_sent == 1
        frames = a.result.control.encode(b"\x04first") + a.result.control.encode(b"\x05second")
        b.receive(tail + frames, NOW)
    assert a.done and b.done
    rb = b.result
    if encrypted:
        assert rb.leftover != b""
        assert rb.control.feed(rb.leftover) == [b"\x04first", b"\x05second"]
    else:
        frames = a.result.control.encode(b"\x04first")
        assert b.result.control.feed(frames) == [b"\x04first"]


def test_leftover_plaintext_after_hello() -> None:
    a, b = pair()
    b.receive(a.data_to_send(), NOW)  # header
    a.receive(b.data_to_send(), NOW)  # header + hello
    assert a.done
    extra = a.result.control.encode(b"\x00") + b"\x00\x00"  # one frame and a partial length
    b.receive(a.data_to_send() + extra, NOW)
    assert b.done
    assert b.result.leftover == extra
    assert b.result.control.feed(b.result.leftover) == [b"\x00"]
    assert b.result.control.buffered == 2


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
    """Even when the failing side gets hello and confirm together, it has queued its own
    confirm, so the peer learns the reason too (if the router flushes before closing)."""
    a, b = pair(pw(b"secret"), pw(b"other"))
    b.receive(a.data_to_send(), NOW)  # a's header
    a.receive(b.data_to_send(), NOW)  # b's header + hello -> a sends hello + confirm
    with pytest.raises(WrongPassword):
        b.receive(a.data_to_send(), NOW)  # hello + confirm in one chunk
    flushed = b.data_to_send()
    assert flushed  # b's hello + confirm
    with pytest.raises(WrongPassword):
        a.receive(flushed, NOW)


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
        Handshake(True, hello(1), b"short", NOW)


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


def header(low: int = 1, high: int = 1) -> bytes:
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
    hs.receive(b"ft\x01", NOW)
    assert hs.state is HandshakeState.AWAIT_HEADER
    hs.receive(b"\x01", NOW)
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
    ],
)
def test_malformed_hello_fields(mutate: Callable[[dict[str, object]], object], reason: str) -> None:
    m = good_hello_map()
    mutate(m)
    try:
        body = msgpack.packb(m)
    except OverflowError:
        body = msgpack.packb({**m, "uid": 0})[:-1] + b"\xcf"  # cut: malformed anyway
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
    assert hs.done and hs.result.remote.nickname == "a"


def test_invalid_ephemeral_key_refused() -> None:
    hs = fresh(b"secret")
    m = {**good_hello_map(), "encrypted": True, "ephemeral": bytes(32)}  # low-order point
    with pytest.raises(MalformedHello, match="invalid ephemeral key"):
        hs.receive(header() + frame(msgpack.packb(m)), NOW)


def test_malformed_confirm() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)
    transfer(b, a)
    data = a.data_to_send()  # hello + confirm
    hello_len = struct.unpack(">I", data[:4])[0]
    hello_part = data[: 4 + hello_len]
    with pytest.raises(MalformedHandshake, match="malformed confirm: 5 bytes"):
        b.receive(hello_part + frame(b"short"), NOW)


def test_tampered_confirm_is_wrong_password() -> None:
    a, b = pair(pw(b"secret"), pw(b"secret"))
    transfer(a, b)
    transfer(b, a)
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
    with pytest.raises(WrongPassword):
        b.receive(data, NOW)
    with pytest.raises(WrongPassword):
        a.receive(b.data_to_send(), NOW)


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
    transfer(b, a)  # b's header + hello: a queues hello + confirm
    out = a.data_to_send()
    hello_len = struct.unpack(">I", out[:4])[0]
    own_confirm = out[4 + hello_len :]
    with pytest.raises(WrongPassword):
        a.receive(own_confirm, NOW)
