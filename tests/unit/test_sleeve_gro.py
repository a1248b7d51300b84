"""TCP coalescing before the TAP write (``weft.sleeve.gro``): what merges and what not."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import pytest

from weft.sleeve.core import complete_checksum
from weft.sleeve.gro import VNET_ZERO, Frame, coalesce

SRC_MAC, DST_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
SRC_IP, DST_IP = bytes([10, 32, 0, 1]), bytes([10, 32, 0, 2])
TS = bytes.fromhex("0101080a0000000100000002")  # NOP NOP timestamps


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def segment(
    seq: int,
    payload: bytes,
    *,
    flags: int = 0x10,
    ack: int = 777,
    window: int = 500,
    options: bytes = TS,
    sport: int = 40000,
    ip_id: int = 1,
    ttl: int = 64,
    ihl_options: bytes = b"",
    frag: int = 0x4000,
) -> bytes:
    doff = (20 + len(options)) // 4
    tcp = bytearray(
        struct.pack(">HHIIBBHHH", sport, 5201, seq, ack, doff << 4, flags, window, 0, 0)
        + options
        + payload
    )
    pseudo = SRC_IP + DST_IP + struct.pack(">BBH", 0, 6, len(tcp))
    tcp[16:18] = csum(pseudo + bytes(tcp)).to_bytes(2, "big")
    ihl = 5 + len(ihl_options) // 4
    ip = bytearray(
        struct.pack(">BBHHHBBH", 0x40 | ihl, 0, ihl * 4 + len(tcp), ip_id, frag, ttl, 6, 0)
        + SRC_IP
        + DST_IP
        + ihl_options
    )
    ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
    return DST_MAC + SRC_MAC + b"\x08\x00" + bytes(ip) + bytes(tcp)


def stream(n: int, mss: int = 1000, seq: int = 5000) -> tuple[list[bytes], bytes]:
    data = os.urandom(n * mss)
    return [segment(seq + i * mss, data[i * mss : (i + 1) * mss], ip_id=i) for i in range(n)], data


def check_merged(write: tuple[object, ...], data: bytes, mss: int, psh: bool = False) -> None:
    """A merged write is a valid GSO TCPv4 super-frame carrying ``data``."""
    raw = b"".join(bytes(p) for p in write)  # type: ignore[call-overload]
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack_from("<BBHHHH", raw)
    assert (flags, gso_type, gso_size, start, offset) == (1, 1, mss, 34, 16)
    frame = raw[10:]
    hl = 34 + (frame[46] >> 4) * 4
    assert hdr_len == hl
    assert frame[hl:] == data
    assert int.from_bytes(frame[16:18], "big") == len(frame) - 14
    assert csum(frame[14:34]) == 0  # IP header checksum valid
    assert bool(frame[47] & 0x08) is psh
    done = complete_checksum(frame, start, offset)
    assert done is not None
    pseudo = SRC_IP + DST_IP + struct.pack(">BBH", 0, 6, len(frame) - 34)
    assert csum(pseudo + done[34:]) == 0  # the completed TCP checksum verifies


def test_in_order_segments_become_one_gso_write() -> None:
    segs, data = stream(10)
    writes = coalesce(segs)
    assert len(writes) == 1
    check_merged(writes[0], data, 1000)


def test_short_last_segment_and_psh_end_the_super_frame() -> None:
    segs, data = stream(4)
    short = segment(9000, b"x" * 300)
    after = segment(9300, b"y" * 1000)
    writes = coalesce([*segs, short, after])
    assert len(writes) == 2
    check_merged(writes[0], data + b"x" * 300, 1000)
    assert writes[1] == (VNET_ZERO, after)
    segs, data = stream(3)
    pushed = segment(8000, b"z" * 1000, flags=0x18)
    writes = coalesce([*segs, pushed, segment(9000, b"w" * 1000)])
    assert len(writes) == 2
    check_merged(writes[0], data + b"z" * 1000, 1000, psh=True)


@pytest.mark.parametrize(
    "odd",
    [
        {"seq": 9999},  # a gap
        {"ack": 778},
        {"window": 501},
        {"options": bytes.fromhex("0101080a0000000200000002")},  # another timestamp
        {"sport": 40001},  # another flow
        {"ttl": 63},
        {"flags": 0x11},  # FIN
        {"flags": 0x12},  # SYN
        {"flags": 0x14},  # RST
        {"flags": 0x90},  # CWR
        {"ihl_options": b"\x01\x01\x01\x00"},  # IP options
        {"frag": 0x2000},  # more fragments
    ],
)
def test_segments_that_differ_are_not_merged(odd: dict[str, object]) -> None:
    segs, data = stream(3)
    other = segment(**{"seq": 8000, "payload": b"q" * 1000, **odd})  # type: ignore[arg-type]
    writes = coalesce([*segs, other])
    check_merged(writes[0], data, 1000)
    assert writes[1:] == [(VNET_ZERO, other)]


def test_other_frames_pass_unchanged_in_order() -> None:
    arp = DST_MAC + SRC_MAC + b"\x08\x06" + bytes(28)
    ipv6 = DST_MAC + SRC_MAC + b"\x86\xdd" + bytes(60)
    pure_ack = segment(100, b"")
    udp = bytearray(segment(100, b"u" * 50))
    udp[23] = 17
    segs, data = stream(2)
    frames = [arp, *segs, ipv6, pure_ack, bytes(udp), segs[0]]
    writes = coalesce(frames)
    assert writes[0] == (VNET_ZERO, arp)
    check_merged(writes[1], data, 1000)
    assert writes[2:] == [(VNET_ZERO, f) for f in (ipv6, pure_ack, bytes(udp), segs[0])]
    assert coalesce([segs[1], segs[0]]) == [(VNET_ZERO, segs[1]), (VNET_ZERO, segs[0])]


def test_a_larger_segment_starts_a_new_super_frame_and_the_size_is_bounded() -> None:
    small = segment(1000, b"a" * 500)
    big = segment(1500, b"b" * 1000)
    assert coalesce([small, big]) == [(VNET_ZERO, small), (VNET_ZERO, big)]
    segs, data = stream(100, mss=1400)
    writes = coalesce(segs)
    assert len(writes) == 3  # 46 + 46 + 8 segments: each under 64 KiB of IP packet
    total = b""
    for w in writes:
        raw = b"".join(bytes(p) for p in w)
        assert int.from_bytes(raw[26:28], "big") <= 65535
        total += raw[10 + 34 + 32 :]
    assert total == data


def test_padded_frames_are_not_merged() -> None:
    segs, _ = stream(2)
    padded = [s + b"\0\0" for s in segs]
    assert coalesce(padded) == [(VNET_ZERO, p) for p in padded]


def test_memoryview_frames() -> None:
    segs, data = stream(5)
    writes = coalesce([memoryview(s) for s in segs])
    assert len(writes) == 1
    check_merged(writes[0], data, 1000)


def test_sources_name_the_frames_of_each_write() -> None:
    segs, _ = stream(3)
    arp = DST_MAC + SRC_MAC + b"\x08\x06" + bytes(28)
    sources: list[Sequence[Frame]] = []
    writes = coalesce([*segs, arp, segs[0]], sources)
    assert len(writes) == len(sources) == 3
    assert [list(s) for s in sources] == [segs, [arp], [segs[0]]]
