"""Session framing (FrameCodec) and data-plane sealing (DataSealer / DataOpener)."""

from __future__ import annotations

import itertools
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError, LocalError, RemoteProtocolError
from weft.gossip.crypto import (
    DATA_CIPHERS,
    DATA_OVERHEAD,
    DEFAULT_REPLAY_WINDOW,
    DataCipher,
    DataOpener,
    DataPacketError,
    DataSealer,
    PacketReplayed,
    PacketTampered,
    PacketTooOld,
    PacketTruncated,
    derive_password_key,
    derive_session_keys,
)
from weft.gossip.session import (
    MAX_FRAME,
    FrameCodec,
    FrameTooLarge,
    MessageAuthenticationFailed,
    SessionClosed,
)

K1 = bytes(range(32))
K2 = bytes(range(1, 33))


def codecs(encrypted: bool) -> tuple[FrameCodec, FrameCodec]:
    if encrypted:
        return FrameCodec(K1, K2), FrameCodec(K2, K1)
    return FrameCodec(), FrameCodec()


# ---------------------------------------------------------------------------- FrameCodec


@pytest.mark.parametrize("encrypted", [False, True])
def test_roundtrip_and_overhead(encrypted: bool) -> None:
    a, b = codecs(encrypted)
    msgs = [b"", b"\x00", b"\x04" + os.urandom(1000), os.urandom(300_000)]
    wire = b"".join(a.encode(m) for m in msgs)
    assert len(wire) == sum(len(m) for m in msgs) + len(msgs) * a.overhead
    assert a.overhead == (20 if encrypted else 4)
    assert b.feed(wire) == msgs
    assert b.buffered == 0
    # and the other direction
    assert a.feed(b.encode_many([b"back", b"again"])) == [b"back", b"again"]


@pytest.mark.parametrize("encrypted", [False, True])
def test_plaintext_is_not_on_the_wire_when_encrypted(encrypted: bool) -> None:
    a, _ = codecs(encrypted)
    marker = b"MARKER-" * 10
    assert (marker in a.encode(marker)) is (not encrypted)


@settings(max_examples=60, deadline=None)
@given(
    msgs=st.lists(st.binary(max_size=3000), max_size=12),
    cuts=st.lists(st.integers(0, 40000), max_size=12),
    encrypted=st.booleans(),
)
def test_reassembly_any_split(msgs: list[bytes], cuts: list[int], encrypted: bool) -> None:
    a, b = codecs(encrypted)
    wire = a.encode_many(msgs)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    got: list[bytes] = []
    for lo, hi in itertools.pairwise(points):
        got += b.feed(wire[lo:hi])
    assert got == msgs
    assert b.buffered == 0


def test_feed_accepts_bytearray_and_memoryview() -> None:
    a, b = codecs(True)
    wire = bytearray(a.encode(b"one") + a.encode(b"two"))
    assert b.feed(memoryview(wire)[:10]) == []
    assert b.feed(wire[10:]) == [b"one", b"two"]


def test_large_frame_in_small_reads() -> None:
    a, b = codecs(True)
    msg = os.urandom(MAX_FRAME - 16)
    wire = a.encode(msg)
    out: list[bytes] = []
    for i in range(0, len(wire), 65536):
        out += b.feed(wire[i : i + 65536])
    assert out == [msg]


@pytest.mark.parametrize("encrypted", [False, True])
def test_frame_too_large(encrypted: bool) -> None:
    _, b = codecs(encrypted)
    with pytest.raises(FrameTooLarge) as info:
        b.feed(struct.pack(">I", MAX_FRAME + 1))  # refused on the length alone
    assert str(info.value) == f"frame too large: {MAX_FRAME + 1} bytes (max {MAX_FRAME})"
    with pytest.raises(SessionClosed):
        b.feed(b"")


def test_max_frame_accepted_plaintext() -> None:
    a, b = codecs(False)
    msg = bytes(MAX_FRAME)
    assert b.feed(a.encode(msg)) == [msg]
    with pytest.raises(LocalError):
        a.encode(bytes(MAX_FRAME + 1))
    e, _ = codecs(True)
    with pytest.raises(LocalError):
        e.encode(bytes(MAX_FRAME - 15))


def test_tampered_frame() -> None:
    a, b = codecs(True)
    good = a.encode(b"first")
    bad = bytearray(a.encode(b"second"))
    bad[7] ^= 0x40
    with pytest.raises(MessageAuthenticationFailed) as info:
        b.feed(good + bytes(bad))
    assert str(info.value).startswith("message authentication failed")
    assert isinstance(info.value, RemoteProtocolError)
    with pytest.raises(SessionClosed):
        b.feed(a.encode(b"third"))


def test_tampered_length_fails_authentication() -> None:
    a, b = codecs(True)
    frame = bytearray(a.encode(b"x" * 100))
    # Shorten the announced length by one: the AEAD sees another AAD and a shorter body.
    frame[3] -= 1
    with pytest.raises(MessageAuthenticationFailed):
        b.feed(bytes(frame))


def test_replayed_frame() -> None:
    a, b = codecs(True)
    f1 = a.encode(b"pay 1")
    assert b.feed(f1) == [b"pay 1"]
    with pytest.raises(MessageAuthenticationFailed):
        b.feed(f1)


def test_reordered_and_dropped_frames() -> None:
    a, b = codecs(True)
    f1, f2, f3 = a.encode(b"1"), a.encode(b"2"), a.encode(b"3")
    with pytest.raises(MessageAuthenticationFailed):
        b.feed(f2 + f1)
    _, c = codecs(True)
    assert c.feed(f1) == [b"1"]
    with pytest.raises(MessageAuthenticationFailed):
        c.feed(f3)  # f2 was dropped


def test_frame_shorter_than_tag() -> None:
    _, b = codecs(True)
    with pytest.raises(MessageAuthenticationFailed, match="shorter than the tag"):
        b.feed(struct.pack(">I", 3) + b"abc")


def test_wrong_direction_key() -> None:
    a, _ = codecs(True)
    loop = FrameCodec(K1, K1)  # as if a's own frames were reflected back to it
    with pytest.raises(MessageAuthenticationFailed):
        FrameCodec(K2, K2).feed(a.encode(b"x"))
    assert loop.feed(FrameCodec(K1, K1).encode(b"x")) == [b"x"]


def test_codec_needs_both_keys() -> None:
    with pytest.raises(LocalError):
        FrameCodec(K1, None)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=80), max_size=8), encrypted=st.booleans())
def test_fuzz_codec_only_remote_errors(chunks: list[bytes], encrypted: bool) -> None:
    _, b = codecs(encrypted)
    try:
        for chunk in chunks:
            b.feed(chunk)
    except RemoteProtocolError:
        pass


# ---------------------------------------------------------------------------- key schedule


def test_password_key_is_scrypt_and_deterministic() -> None:
    salt = bytes(range(16))
    k = derive_password_key(b"secret", salt)
    assert len(k) == 32 and k == derive_password_key(b"secret", salt)
    assert k != derive_password_key(b"secret2", salt)
    # the mesh salt matters: the same password gives another key in another mesh
    assert k != derive_password_key(b"secret", bytes(16))
    import hashlib

    assert k == hashlib.scrypt(b"secret", salt=salt, n=2**14, r=8, p=1, dklen=32)
    with pytest.raises(ConfigError):
        derive_password_key(b"", salt)
    with pytest.raises(LocalError):
        derive_password_key(b"secret", b"short")


def test_session_keys_mirror_and_are_distinct() -> None:
    shared, pk, transcript = os.urandom(32), os.urandom(32), b"t" * 100
    out = derive_session_keys(shared, pk, transcript, outbound=True)
    inb = derive_session_keys(shared, pk, transcript, outbound=False)
    assert out.control_send == inb.control_recv and out.control_recv == inb.control_send
    assert out.data_send == inb.data_recv and out.data_recv == inb.data_send
    assert len({out.control_send, out.control_recv, out.data_send, out.data_recv}) == 4
    assert derive_session_keys(shared, pk, transcript + b"x", True) != out
    assert derive_session_keys(shared, os.urandom(32), transcript, True) != out
    assert "hidden" in repr(out) and out.data_send.hex() not in repr(out)


# ---------------------------------------------------------------------------- data plane


def data_pair(
    cipher: DataCipher = "aes-256-gcm", window: int = DEFAULT_REPLAY_WINDOW
) -> tuple[DataSealer, DataOpener]:
    return DataSealer(K1, cipher), DataOpener(K1, cipher, window)


@pytest.mark.parametrize("cipher", DATA_CIPHERS)
def test_data_roundtrip(cipher: DataCipher) -> None:
    s, o = data_pair(cipher)
    for size in (0, 1, 1400, 65000):
        payload = os.urandom(size)
        packet = s.seal(payload, aad=b"hdr")
        assert len(packet) == size + DATA_OVERHEAD
        assert o.open(packet, aad=b"hdr") == payload
    assert s.next_counter == 4 and o.highest == 3


def test_data_counter_is_carried_big_endian() -> None:
    s, _ = data_pair()
    s.seal(b"a")
    assert s.seal(b"b")[:8] == (1).to_bytes(8, "big")


def test_data_tampered_payload_counter_and_aad() -> None:
    s, o = data_pair()
    packet = bytearray(s.seal(b"payload", aad=b"hdr"))
    for index in (0, 7, 8, len(packet) - 1):  # counter bytes, ciphertext, tag
        bad = bytearray(packet)
        bad[index] ^= 1
        with pytest.raises(PacketTampered) as info:
            o.open(bytes(bad), aad=b"hdr")
        assert info.value.reason == "tampered"
    with pytest.raises(PacketTampered):
        o.open(bytes(packet), aad=b"other")
    # nothing above moved the window: the genuine packet still opens
    assert o.open(bytes(packet), aad=b"hdr") == b"payload"


def test_data_foreign_key_and_other_cipher() -> None:
    s, _ = data_pair()
    packet = s.seal(b"x")
    with pytest.raises(PacketTampered):
        DataOpener(K2).open(packet)
    with pytest.raises(PacketTampered):
        DataOpener(K1, "chacha20-poly1305").open(packet)


def test_data_truncated() -> None:
    s, o = data_pair()
    packet = s.seal(b"")
    with pytest.raises(PacketTruncated) as info:
        o.open(packet[:-1])
    assert info.value.reason == "truncated"
    assert o.open(packet) == b""


def test_data_replayed() -> None:
    s, o = data_pair()
    p0, p1 = s.seal(b"0"), s.seal(b"1")
    o.open(p1)
    o.open(p0)  # reordered but new: accepted
    for p in (p0, p1):
        with pytest.raises(PacketReplayed) as info:
            o.open(p)
        assert info.value.reason == "replayed"


def test_data_window_edges() -> None:
    window = 1024
    s, o = data_pair(window=window)
    packets = [s.seal(str(i).encode()) for i in range(window + 2)]
    o.open(packets[window])  # highest = 1024
    o.open(packets[1])  # exactly window-1 behind: still tracked
    with pytest.raises(PacketTooOld) as info:
        o.open(packets[0])  # window behind: too old
    assert info.value.reason == "too_old"
    o.open(packets[window + 1])  # slides by one: counter 1 is now too old
    with pytest.raises(PacketTooOld):
        o.open(packets[1])
    with pytest.raises(PacketReplayed):
        o.open(packets[window])
    assert o.open(packets[500]) == b"500"


def test_data_big_jump_resets_bitmap() -> None:
    s, o = data_pair(window=1024)
    first = s.seal(b"a")
    o.open(first)
    for _ in range(5000):
        s.seal(b"")
    o.open(s.seal(b"far"))
    with pytest.raises(PacketTooOld):
        o.open(first)


def test_data_window_bounds() -> None:
    with pytest.raises(ConfigError):
        DataOpener(K1, window=1023)
    with pytest.raises(ConfigError):
        DataOpener(K1, window=65537)
    DataOpener(K1, window=65536)
    with pytest.raises(ConfigError):
        DataSealer(K1, "rot13")  # type: ignore[arg-type]
    with pytest.raises(LocalError):
        DataSealer(b"short")


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), window=st.sampled_from([1024, 1500, 2048, 8192]))
def test_data_window_matches_a_model(seed: int, window: int) -> None:
    """Random arrival orders with duplicates and old packets: the opener accepts exactly what a
    set-based model of the window accepts, and never a counter twice."""
    rng = random.Random(seed)
    _, o = data_pair(window=window)
    aead = AESGCM(K1)
    limit = 6 * window

    def packet(counter: int) -> bytes:  # what DataSealer makes (test_data_wire_format)
        header = counter.to_bytes(8, "big")
        return header + aead.encrypt(bytes(4) + header, counter.to_bytes(4, "big"), header)

    seen: set[int] = set()
    highest = -1
    for _ in range(2000):
        # mostly near the front, sometimes far behind, sometimes a duplicate
        base = max(highest, 0)
        jump = rng.randint(-window - 50, 40) if rng.random() < 0.98 else rng.randint(0, window)
        counter = min(limit, max(0, base + jump))
        try:
            plaintext = o.open(packet(counter))
        except PacketReplayed:
            assert counter in seen
            continue
        except PacketTooOld:
            assert counter <= highest - window
            continue
        assert int.from_bytes(plaintext, "big") == counter
        assert counter not in seen
        assert counter > highest - window
        seen.add(counter)
        highest = max(highest, counter)


@settings(max_examples=300, deadline=None)
@given(packet=st.binary(max_size=100))
def test_fuzz_data_only_packet_errors(packet: bytes) -> None:
    _, o = data_pair()
    try:
        o.open(packet)
    except DataPacketError as err:
        assert err.reason in {"truncated", "tampered", "replayed", "too_old"}


def test_data_forged_far_counter_does_not_move_the_window() -> None:
    s, o = data_pair(window=1024)
    genuine = s.seal(b"real")
    forged = (10**9).to_bytes(8, "big") + os.urandom(40)
    with pytest.raises(PacketTampered):
        o.open(forged)
    assert o.highest == -1
    assert o.open(genuine) == b"real"


def test_control_wire_format_matches_the_contract() -> None:
    """ARCHITECTURE.md: uint32 BE length || ChaCha20-Poly1305(nonce = 4 zero bytes || counter,
    aad = the 4 length bytes); counters from 0 per direction."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    a, _ = codecs(True)
    a.encode(b"zero")
    wire = a.encode(b"one")
    prefix = struct.pack(">I", 3 + 16)
    nonce = bytes(4) + (1).to_bytes(8, "big")
    assert wire == prefix + ChaCha20Poly1305(K1).encrypt(nonce, b"one", prefix)


def test_data_wire_format() -> None:
    s, _ = data_pair()
    packet = s.seal(b"frame", aad=b"outer")
    header = (0).to_bytes(8, "big")
    assert packet == header + AESGCM(K1).encrypt(bytes(4) + header, b"frame", header + b"outer")
