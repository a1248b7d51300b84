"""The router's TAP device: the sleeve's port on the host's ``weft`` bridge.

Opened with ``IFF_TAP | IFF_NO_PI`` and, for the super-frame path, ``IFF_VNET_HDR`` with a 10-byte
virtio_net_hdr (``TUNSETVNETHDRSZ``) and ``TUNSETOFFLOAD(CSUM | TSO4 | TSO6 | TSO_ECN)``: the
kernel then hands over TCP super-frames of up to ~64 KB with their segmentation and partial
checksum state in the header, and accepts the same back, so one read or write moves what would
otherwise be ~45 packets. Without offloads (``set_offload(False)``) reads are MTU-sized frames
with complete checksums; the header is still present (all zero) when IFF_VNET_HDR is set.

Non-blocking; the pump reads until ``EAGAIN``. Closing the descriptor deletes the device (it is
not persistent), so a crashed router leaves no TAP behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Final

from weft.errors import LocalError

__all__ = ["MAX_FRAME", "Tap"]

TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
SIOCGIFTXQLEN: Final = 0x8942
SIOCSIFTXQLEN: Final = 0x8943
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
OFFLOADS: Final = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
VNET_HDR_SIZE: Final = 10
# virtio_net_hdr + Ethernet/VLAN header + the largest GSO packet the kernel builds (64 KiB).
MAX_FRAME: Final = VNET_HDR_SIZE + 18 + 65536


class Tap:
    """An open TAP device in the calling thread's network namespace."""

    def __init__(self, name: str, *, vnet_hdr: bool = True, offload: bool = True) -> None:
        if not 0 < len(name.encode()) < 16:
            raise LocalError(f"TAP name {name!r} must be 1..15 bytes")
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offload = False
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if vnet_hdr and offload:
            self.set_offload(True)

    def set_offload(self, on: bool) -> None:
        """Ask the kernel for super-frames (True) or plain MTU-sized frames (False)."""
        if on and not self.vnet_hdr:
            raise LocalError("TAP offloads need IFF_VNET_HDR")
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, OFFLOADS if on else 0)
        self.offload = on

    @property
    def txqueuelen(self) -> int:
        """Frames the kernel queues for us to read before it drops (the TAP's tx ring)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            req = struct.pack("16si", self.name.encode(), 0)
            return int(struct.unpack_from("i", fcntl.ioctl(sock, SIOCGIFTXQLEN, req), 16)[0])

    def set_txqueuelen(self, frames: int) -> None:
        """Resize the tx ring (the kernel resizes it in place): on the per-frame path a TCP burst
        arrives as MTU-sized frames, and a full ring drops them (TCP then retransmits)."""
        if frames < 1:
            raise LocalError(f"txqueuelen {frames} must be at least 1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCSIFTXQLEN, struct.pack("16si", self.name.encode(), frames))

    def read(self) -> bytes | None:
        """One frame, or None when nothing is waiting."""
        try:
            return os.read(self.fd, MAX_FRAME)
        except BlockingIOError:
            return None

    def write(self, frame: bytes | bytearray | memoryview) -> bool:
        """Hand one frame to the kernel; False when it was refused (counted by the caller)."""
        try:
            os.write(self.fd, frame)
        except (BlockingIOError, OSError):
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
