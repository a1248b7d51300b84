"""weft.policy.nflog's parser on hand-built nfnetlink_log datagrams (the kernel's side is
tests/integ/test_policy_nflog.py)."""

from __future__ import annotations

import ipaddress
import struct
from contextlib import suppress

import pytest

from weft.policy.nflog import (
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    DeniedPacket,
    NflogParseError,
    config_message,
    parse_datagram,
    parse_packet_message,
    parse_payload,
)

PACKET_TYPE = (4 << 8) | 0
NLMSG_DONE = 3
NLMSG_ERROR = 2


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def message(kind: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 0, 0) + body


def packet_message(prefix: bytes | None, payload: bytes | None, family: int = 2) -> bytes:
    body = struct.pack("!BBH", family, 0, 4783)
    body += attr(1, struct.pack("!HBx", 0x0800, 2))  # NFULA_PACKET_HDR, ignored
    if prefix is not None:
        body += attr(NFULA_PREFIX, prefix + b"\0")
    if payload is not None:
        body += attr(NFULA_PAYLOAD, payload)
    return message(PACKET_TYPE, body)


def ipv4(
    src: str, dst: str, protocol: int, l4: bytes, options: bytes = b"", frag: int = 0
) -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(options) + len(l4),
        1,
        frag,
        64,
        protocol,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + l4


def ipv6(src: str, dst: str, next_header: int, rest: bytes) -> bytes:
    return (
        struct.pack("!IHBB", 0x60000000, len(rest), next_header, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + rest
    )


TCP = struct.pack("!HHII", 40000, 80, 1, 0)  # ports, seq, ack: what a 64-byte copy keeps


def test_ipv4_tcp_with_options() -> None:
    payload = ipv4("10.32.2.1", "10.32.1.1", 6, TCP, options=bytes(8))
    p = parse_packet_message(packet_message(b"weft-deny-in", payload)[16:])
    assert p == DeniedPacket(
        "weft-deny-in",
        4,
        ipaddress.ip_address("10.32.2.1"),
        ipaddress.ip_address("10.32.1.1"),
        6,
        40000,
        80,
    )


def test_protocols_and_ports() -> None:
    udp = parse_payload(ipv4("1.1.1.1", "2.2.2.2", 17, struct.pack("!HHHH", 5353, 53, 8, 0)))
    assert udp[3:] == (17, 5353, 53)
    sctp = parse_payload(ipv4("1.1.1.1", "2.2.2.2", 132, struct.pack("!HHI", 9, 9999, 0)))
    assert sctp[3:] == (132, 9, 9999)
    icmp = parse_payload(ipv4("1.1.1.1", "2.2.2.2", 1, bytes([8, 0, 0, 0, 0, 1, 0, 1])))
    assert icmp[3:] == (1, None, None)
    # a non-first fragment carries no transport header
    frag = parse_payload(ipv4("1.1.1.1", "2.2.2.2", 6, TCP, frag=185))
    assert frag[3:] == (6, None, None)
    # the copy ended inside the transport header: addresses, no ports
    cut = parse_payload(ipv4("1.1.1.1", "2.2.2.2", 6, TCP[:3]))
    assert cut[1:] == (
        ipaddress.ip_address("1.1.1.1"),
        ipaddress.ip_address("2.2.2.2"),
        6,
        None,
        None,
    )


def test_ipv6_udp_behind_extension_headers_and_icmpv6() -> None:
    hop_by_hop = bytes([60, 0]) + bytes(6)  # next: destination options
    dest_opts = bytes([17, 0]) + bytes(6)  # next: UDP
    udp = struct.pack("!HHHH", 1234, 5353, 8, 0)
    family, src, dst, protocol, sport, dport = parse_payload(
        ipv6("fd00::2:1", "fd00::1:1", 0, hop_by_hop + dest_opts + udp)
    )
    assert (family, str(src), str(dst), protocol, sport, dport) == (
        6,
        "fd00::2:1",
        "fd00::1:1",
        17,
        1234,
        5353,
    )
    echo = parse_payload(ipv6("fd00::2", "fd00::1", 58, bytes([128, 0, 0, 0])))
    assert echo[3:] == (58, None, None)
    # first fragment: ports; a later one: none
    first = parse_payload(ipv6("::1", "::2", 44, bytes([6, 0, 0, 0]) + bytes(4) + TCP))
    assert first[3:] == (6, 40000, 80)
    later = parse_payload(ipv6("::1", "::2", 44, bytes([6, 0, 0x05, 0x00]) + bytes(4) + TCP))
    assert later[3:] == (6, None, None)
    # extension headers cut off by the copy range
    assert parse_payload(ipv6("::1", "::2", 0, bytes([6, 0, 0])))[3:] == (0, None, None)


def test_datagram_with_several_messages_skips_only_the_bad_one() -> None:
    good4 = packet_message(b"weft-deny-out", ipv4("10.32.1.1", "10.32.1.2", 6, TCP))
    good6 = packet_message(
        b"weft-deny-in", ipv6("fd00::2", "fd00::1", 17, struct.pack("!HH", 7, 8)), 10
    )
    no_payload = packet_message(b"weft-deny-in", None)
    bad_version = packet_message(b"weft-deny-in", b"\x50" + bytes(40))
    ack = message(NLMSG_ERROR, struct.pack("=i", 0) + bytes(16))
    done = message(NLMSG_DONE, struct.pack("=i", 0))
    parsed = parse_datagram(good4 + no_payload + ack + good6 + bad_version + done)
    assert [(p.prefix, p.family, p.dport) for p in parsed.packets] == [
        ("weft-deny-out", 4, 80),
        ("weft-deny-in", 6, 8),
    ]
    assert parsed.bad == 2
    assert any("NFULA_PAYLOAD" in e for e in parsed.errors)
    assert any("IP version 5" in e for e in parsed.errors)


@pytest.mark.parametrize(
    ("datagram", "why"),
    [
        (b"\x01\x02\x03", "trailing"),  # shorter than a netlink header
        (struct.pack("=IHHII", 8, PACKET_TYPE, 0, 0, 0), "out of bounds"),  # length < header
        (struct.pack("=IHHII", 400, PACKET_TYPE, 0, 0, 0) + bytes(8), "out of bounds"),
        (message(PACKET_TYPE, b"\x02\x00"), "nfgenmsg"),
        (
            message(PACKET_TYPE, struct.pack("!BBH", 2, 0, 1) + struct.pack("=HH", 200, 9)),
            "attribute",
        ),
        (message(PACKET_TYPE, struct.pack("!BBH", 2, 0, 1) + b"\x08\x00"), "attribute header"),
        (packet_message(b"x", b""), "empty payload"),
        (packet_message(b"x", ipv4("1.1.1.1", "2.2.2.2", 6, b"")[:19]), "IPv4 header truncated"),
        (packet_message(b"x", b"\x43" + bytes(30)), "IPv4 header length 12"),
        (packet_message(b"x", ipv6("::1", "::2", 6, b"")[:39]), "IPv6 header truncated"),
        (packet_message(b"\xff\xfe", ipv4("1.1.1.1", "2.2.2.2", 1, b"")), "not ASCII"),
        (message(0x0501, b""), "unexpected message type"),
        (message(NLMSG_ERROR, struct.pack("=i", -1) + bytes(16)), "netlink error 1"),
    ],
)
def test_malformed_input_is_counted_never_raised(datagram: bytes, why: str) -> None:
    parsed = parse_datagram(datagram)
    assert parsed.packets == ()
    assert parsed.bad == 1
    assert why in parsed.errors[0]


def test_every_truncation_of_a_message_is_a_clean_error() -> None:
    whole = packet_message(b"weft-deny-in", ipv4("10.0.0.1", "10.0.0.2", 6, TCP))
    for cut in range(len(whole)):
        parsed = parse_datagram(whole[:cut])
        assert parsed.packets == () and parsed.bad == (1 if cut else 0)
    body = whole[16:]
    for cut in range(len(body)):
        with suppress(NflogParseError):  # a ValueError with a reason, and nothing else
            parse_packet_message(body[:cut])


def test_prefix_absent_is_empty() -> None:
    p = parse_packet_message(packet_message(None, ipv4("10.0.0.1", "10.0.0.2", 1, b""))[16:])
    assert p.prefix == "" and p.protocol == 1


def test_config_message_layout() -> None:
    wire = config_message(4783, 7, [(1, b"\x01"), (2, struct.pack("!IBx", 72, 2))])
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", wire)
    assert (length, kind, flags, seq, pid) == (len(wire), (4 << 8) | 1, 0x05, 7, 0)
    assert struct.unpack_from("!BBH", wire, 16) == (0, 0, 4783)
    assert wire[20:28] == struct.pack("=HH", 5, 1) + b"\x01\x00\x00\x00"  # padded to 4
    assert wire[28:] == struct.pack("=HH", 10, 2) + struct.pack("!IBx", 72, 2) + b"\x00\x00"
