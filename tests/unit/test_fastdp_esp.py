"""ESP key derivation and NETLINK_XFRM message layouts (offline)."""

from __future__ import annotations

import socket
import struct

import pytest

from weft.fastdp.errors import DatapathError
from weft.fastdp.esp import (
    WEFT_POLICY_PRIORITY,
    WEFT_REQID,
    encode_allocspi,
    encode_delpolicy,
    encode_delsa,
    encode_newpolicy,
    encode_sa,
    esp_key,
)

A, B = "192.168.5.1", "192.168.5.2"


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def test_esp_key_is_36_bytes_deterministic_and_separate_from_the_data_key() -> None:
    k = esp_key(b"\x01" * 32)
    assert len(k) == 36 and k == esp_key(b"\x01" * 32)
    assert k != esp_key(b"\x02" * 32) and k[:32] != b"\x01" * 32


def test_sa_layout() -> None:
    key = bytes(range(36))
    msg = encode_sa(0x10, A, B, 0xABCD, key, seq=5)
    length, kind, flags, seq = struct.unpack_from("=IHHI", msg)
    assert (length, kind, seq) == (len(msg), 0x10, 5)
    assert flags == 0x01 | 0x04 | 0x400 | 0x200
    info = msg[16:240]
    # selector: dst, src, dport 6784/0xffff, AF_INET, /32 /32, UDP
    assert info[0:4] == ip(B) and info[16:20] == ip(A)
    assert struct.unpack_from("!HH", info, 32) == (6784, 0xFFFF)
    assert struct.unpack_from("=HBBB", info, 40) == (socket.AF_INET, 32, 32, 17)
    assert info[56:60] == ip(B) and struct.unpack_from("!I", info, 72)[0] == 0xABCD
    assert info[76] == 50 and info[80:84] == ip(A)
    assert struct.unpack_from("=4Q", info, 96) == (2**64 - 1,) * 4  # no byte/packet limits
    assert struct.unpack_from("=IHB", info, 208) == (WEFT_REQID, socket.AF_INET, 0)
    alen, atype = struct.unpack_from("=HH", msg, 240)
    assert atype == 18 and alen == 4 + 64 + 8 + 36
    assert msg[244:261] == b"rfc4106(gcm(aes))"
    assert struct.unpack_from("=II", msg, 244 + 64) == (288, 128) and msg[316:352] == key
    upd = encode_sa(0x1A, A, B, 1, key)
    assert struct.unpack_from("=H", upd, 6)[0] == 0x05  # UPDSA: no CREATE|EXCL
    with pytest.raises(DatapathError, match="36 bytes"):
        encode_sa(0x10, A, B, 1, b"short")
    with pytest.raises(DatapathError, match="not IPv4"):
        encode_sa(0x10, "fe80::1", B, 1, key)


def test_allocspi_delsa_layouts() -> None:
    msg = encode_allocspi(B, A)  # inbound SA: from B to us (A)
    assert struct.unpack_from("=IH", msg) == (16 + 224 + 8, 0x16)
    assert msg[16 + 56 : 16 + 60] == ip(A) and msg[16 + 80 : 16 + 84] == ip(B)
    assert struct.unpack_from("=II", msg, 16 + 224) == (0x100, 0x0FFFFFFF)
    d = encode_delsa(A, 0x1234)
    assert d[16:20] == ip(A) and struct.unpack_from("!I", d, 32)[0] == 0x1234
    assert struct.unpack_from("=HB", d, 36) == (socket.AF_INET, 50)


def test_policy_layouts() -> None:
    msg = encode_newpolicy(1, A, B)
    body = msg[16:]
    assert struct.unpack_from("=H", msg, 4)[0] == 0x13
    assert body[0:4] == ip(B) and body[16:20] == ip(A)
    assert struct.unpack_from("=IIBB", body, 152) == (WEFT_POLICY_PRIORITY, 0, 1, 0)
    tlen, ttype = struct.unpack_from("=HH", body, 168)
    assert (tlen, ttype) == (4 + 64, 5)
    tmpl = body[172:]
    assert tmpl[20] == 50 and struct.unpack_from("=H", tmpl, 24)[0] == socket.AF_INET
    assert struct.unpack_from("=IB", tmpl, 44) == (WEFT_REQID, 0)  # transport mode
    d = encode_delpolicy(0, B, A)
    assert len(d) == 16 + 64 and d[16:20] == ip(A) and d[16 + 60] == 0
