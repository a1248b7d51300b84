"""TCP segment coalescing before the TAP write: local GRO for the per-frame path.

On the per-frame path every frame arrives in its own datagram and, written to the TAP one by one,
crosses the bridge, the container's veth and its TCP stack one MTU-sized segment at a time: on
the receiving router that write is most of the time per frame. When the local TAP was opened
with ``IFF_VNET_HDR`` the pump can do what the kernel's GRO does for a NIC: consecutive in-order
segments of one TCP/IPv4 flow written in one go become one super-frame with a virtio_net_hdr
(``GSO_TCPV4``, ``gso_size`` = the segments' payload size, ``NEEDS_CSUM``), which the kernel
delivers as one GSO packet (and would cut back into the same segments if it had to forward it).
Nothing changes on the wire; the peer neither knows nor cares.

Segments are merged only under the kernel's own rules (``tcp_gro_receive``): IPv4 without
options or fragmentation, identical Ethernet header, TOS, TTL, DF, addresses, ports, ACK
number, window and TCP options; flags ACK (PSH allowed, it ends the super-frame); contiguous
sequence numbers; every payload of the first one's size except a shorter last. Everything else
is passed through unchanged behind a zero header. The merged frame's TCP checksum field holds the
pseudo-header sum (``NEEDS_CSUM``): the receiver trusts it like any locally built GSO packet; the
original segments' checksums are not re-verified (the datagrams carrying them were checked by
UDP or authenticated by the AEAD).

Sans-I/O: :func:`coalesce` maps frames to TAP writes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

__all__ = ["VNET_ZERO", "Frame", "TapWrite", "coalesce"]

VNET_ZERO: Final = bytes(10)  # a virtio_net_hdr that says nothing: a complete, ordinary frame
_VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, offset
_NEEDS_CSUM: Final = 1
_GSO_TCPV4: Final = 1
_ETH: Final = 14
_IP: Final = 20
_ACK: Final = 0x10
_PSH: Final = 0x08
_MAX_IP: Final = 65535  # the merged IP packet's total length field
_MAX_SEGMENTS: Final = 64

Frame = bytes | bytearray | memoryview
TapWrite = tuple[Frame, ...]


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ip_checksum(header: bytes | bytearray) -> int:
    total = 0
    for (word,) in struct.iter_unpack(">H", header):
        total += word
    return (~_fold(total)) & 0xFFFF


# Ethernet .. TCP urgent pointer of an option-less IPv4 header: Ethernet header, TOS, total
# length, (flags, fragment offset, TTL, protocol), (addresses, ports), sequence, (ACK number,
# data offset), TCP flags, window, urgent pointer; skipped: version/IHL, id and both checksums.
_HEADERS = struct.Struct(">14sxBH2x4s2x12sI5sB2s2x2s")
_FlowKey = tuple[bytes, int, bytes, bytes, bytes, bytes, bytes, bytes]


def _tcp_info(f: Frame) -> tuple[_FlowKey, int, int, int, int] | None:
    """(flow key, header length, payload length, sequence, flags) of a mergeable TCP/IPv4
    segment; None when the frame must go on its own."""
    n = len(f)
    if n < _ETH + _IP + 20 or f[12] != 8 or f[13] != 0 or f[14] != 0x45 or f[23] != 6:
        return None
    eth, tos, total, fragttl, flow, seq, ackdoff, flags, window, urg = _HEADERS.unpack_from(f, 0)
    if total != n - _ETH or fragttl[0] & 0x3F or fragttl[1]:  # padding, MF, fragment offset
        return None
    hl = _ETH + _IP + (ackdoff[4] >> 4) * 4
    if hl < _ETH + _IP + 20 or hl >= n or flags & ~(_ACK | _PSH) or not flags & _ACK:
        return None
    # Everything that must match, without the lengths, IP id, checksums, sequence and PSH.
    key = (eth, tos, fragttl, flow, ackdoff, window, urg, bytes(f[_ETH + _IP + 20 : hl]))
    return key, hl, n - hl, seq, flags


def _merged(segs: list[Frame], hl: int, mss: int, payload: int, psh: int) -> TapWrite:
    first = segs[0]
    ip = bytearray(first[_ETH : _ETH + _IP])
    total = _IP + (hl - _ETH - _IP) + payload
    ip[2:4] = total.to_bytes(2, "big")
    ip[10:12] = b"\0\0"
    ip[10:12] = _ip_checksum(ip).to_bytes(2, "big")
    tcp = bytearray(first[_ETH + _IP : hl])
    tcp[13] |= psh
    tcp_len = total - _IP
    # NEEDS_CSUM: the field holds the pseudo-header sum, the kernel adds the rest.
    pseudo = _fold(
        int.from_bytes(ip[12:14], "big")
        + int.from_bytes(ip[14:16], "big")
        + int.from_bytes(ip[16:18], "big")
        + int.from_bytes(ip[18:20], "big")
        + 6
        + tcp_len
    )
    tcp[16:18] = pseudo.to_bytes(2, "big")
    vnet = _VNET_HDR.pack(_NEEDS_CSUM, _GSO_TCPV4, hl, mss, _ETH + _IP, 16)
    out: list[Frame] = [vnet, first[:_ETH], ip, tcp]
    for seg in segs:
        out.append(memoryview(seg)[hl:] if not isinstance(seg, memoryview) else seg[hl:])
    return tuple(out)


def coalesce(
    frames: Sequence[Frame], sources: list[Sequence[Frame]] | None = None
) -> list[TapWrite]:
    """The TAP writes (each a tuple for ``writev``, starting with a virtio_net_hdr) for
    ``frames`` in order; runs of mergeable TCP segments become one super-frame each. With
    ``sources``, the frames each write was made of are appended there (in parallel), so that a
    kernel refusing a merged write can still be given the segments one by one."""
    out: list[TapWrite] = []
    run: list[Frame] = []
    key: _FlowKey | None = None
    hl = mss = payload = next_seq = 0
    closed = False

    def flush() -> None:
        nonlocal run
        if len(run) == 1:
            out.append((VNET_ZERO, run[0]))
        elif run:
            out.append(_merged(run, hl, mss, payload, psh))
        else:
            return
        if sources is not None:
            sources.append(run)
            run = []
        else:
            run.clear()

    psh = 0
    for f in frames:
        info = _tcp_info(f)
        if info is None:
            flush()
            out.append((VNET_ZERO, f))
            if sources is not None:
                sources.append((f,))
            continue
        k, h, size, seq, flags = info
        if (
            run
            and not closed
            and k == key
            and seq == next_seq
            and size <= mss
            and len(run) < _MAX_SEGMENTS
            and _IP + (h - _ETH - _IP) + payload + size <= _MAX_IP
        ):
            run.append(f)
            payload += size
            next_seq = (seq + size) & 0xFFFFFFFF
            psh |= flags & _PSH
            closed = size < mss or bool(flags & _PSH)
            continue
        flush()
        run.append(f)
        key, hl, mss, payload = k, h, size, size
        next_seq = (seq + size) & 0xFFFFFFFF
        psh = flags & _PSH
        closed = bool(psh)
    flush()
    return out
