"""IPsec ESP for the fast datapaths: per-connection transport-mode SAs and policies over
NETLINK_XFRM (our own message encoding; pyroute2 has none for xfrm).

What is protected: only weft's tunnel traffic, UDP to port 6784 between the two hosts' underlay
addresses (policy selectors ``src/32 -> dst/32, udp dport 6784``). Both the Linux vxlan device
and the OVS vxlan vport route their outer packets through ``xfrm_lookup``, so the policy applies.

Order per connection (each side):

1. ``in_spi = client.alloc_spi(local_ip, remote_ip)``: the kernel picks our inbound SPI (a larval
   SA); send it to the peer over the control connection.
2. On the peer's SPI: ``client.install(EspPair(...), send_key, recv_key)``: the outbound policy
   first (so no plaintext tunnel packet can leave from here on: without its SA the kernel drops
   rather than sends in the clear), then the inbound SA (filling the larval one), the outbound
   SA, and the inbound policy.
3. ``client.remove(pair)`` when the connection goes; ``client.remove_stale()`` at start deletes
   every SA and policy a crashed router left (SAs carry reqid :data:`WEFT_REQID`, policies
   priority :data:`WEFT_POLICY_PRIORITY`).

Inbound caveat: the kernel checks "in" policies after a UDP tunnel socket has taken the packet,
so they do not stop plaintext VXLAN from being accepted; a firewall rule must
(``udp dport 6784 meta secpath missing drop`` in nftables). See docs/FASTDP.md.

Keys: ``esp_key(data_key)`` = HKDF-SHA256(data_key, info "weft-esp-v1"), 36 bytes
(AES-256 + 4-byte salt) for ``rfc4106(gcm(aes))`` with a 128-bit ICV. The handshake's per-direction
data keys make A's outbound key B's inbound one.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
import struct
from dataclasses import dataclass

from weft.fastdp.errors import DatapathError, wrap_os_error

__all__ = [
    "ESP_OVERHEAD",
    "WEFT_POLICY_PRIORITY",
    "WEFT_REQID",
    "EspPair",
    "InboundGuard",
    "XfrmClient",
    "encode_allocspi",
    "encode_delpolicy",
    "encode_delsa",
    "encode_newpolicy",
    "encode_sa",
    "esp_key",
]

NETLINK_XFRM = 6
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_UPDSA = 0x1A
XFRMA_TMPL = 5
XFRMA_ALG_AEAD = 18
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_ALLOW = 0
XFRM_MODE_TRANSPORT = 0
XFRM_INF = 0xFFFFFFFFFFFFFFFF
IPPROTO_ESP = 50
IPPROTO_UDP = 17
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLM_F_EXCL = 0x200
NLMSGHDR = struct.Struct("=IHHII")

AEAD_NAME = "rfc4106(gcm(aes))"
ICV_BITS = 128
KEY_BYTES = 36  # AES-256 key + 4-byte salt
WEFT_REQID = 0x77EF0001
WEFT_POLICY_PRIORITY = 0x77EF
VXLAN_PORT = 6784
# ESP in transport mode with AES-GCM: SPI+seq 8, IV 8, pad 0..3 + pad length + next header 2,
# ICV 16 = at most 37; reserve 40 off the overlay MTU.
ESP_OVERHEAD = 40

SELECTOR_SIZE = 56
USERSA_INFO_SIZE = 224
USERPOLICY_INFO_SIZE = 168
USER_TMPL_SIZE = 64


def esp_key(data_key: bytes) -> bytes:
    """The ESP key for one direction from the handshake's data key for that direction."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=b"weft-esp-v1").derive(data_key)


@dataclass(frozen=True)
class EspPair:
    """One connection's ESP: our inbound SPI (chosen by our kernel) and the peer's."""

    local_ip: str
    remote_ip: str
    in_spi: int
    out_spi: int
    port: int = VXLAN_PORT


def _ip(text: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed.ljust(16, b"\0")
    except ValueError:
        raise DatapathError("encode xfrm address", f"{text!r} is not IPv4") from None


def _nlattr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _message(kind: int, flags: int, body: bytes, seq: int) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def _selector(src: str, dst: str, dport: int) -> bytes:
    """struct xfrm_selector: UDP from src/32 to dst/32 port ``dport`` (any source port)."""
    sel = bytearray(SELECTOR_SIZE)
    sel[0:16] = _ip(dst)
    sel[16:32] = _ip(src)
    struct.pack_into("!HH", sel, 32, dport, 0xFFFF)
    struct.pack_into("=HBBB", sel, 40, socket.AF_INET, 32, 32, IPPROTO_UDP)
    return bytes(sel)


def _usersa_info(src: str, dst: str, spi: int, sel: bytes) -> bytearray:
    info = bytearray(USERSA_INFO_SIZE)
    info[0:SELECTOR_SIZE] = sel
    info[56:72] = _ip(dst)
    struct.pack_into("!I", info, 72, spi)
    info[76] = IPPROTO_ESP
    info[80:96] = _ip(src)
    struct.pack_into("=8Q", info, 96, XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)
    struct.pack_into("=I", info, 208, WEFT_REQID)
    struct.pack_into("=HBB", info, 212, socket.AF_INET, XFRM_MODE_TRANSPORT, 0)
    return info


def encode_sa(
    kind: int, src: str, dst: str, spi: int, key: bytes, port: int = VXLAN_PORT, seq: int = 0
) -> bytes:
    """XFRM_MSG_NEWSA (or UPDSA to fill an allocated SPI) for ESP ``src -> dst`` with ``key``."""
    if len(key) != KEY_BYTES:
        raise DatapathError("encode ESP SA", f"key must be {KEY_BYTES} bytes")
    info = _usersa_info(src, dst, spi, _selector(src, dst, port))
    aead = AEAD_NAME.encode().ljust(64, b"\0") + struct.pack("=II", len(key) * 8, ICV_BITS) + key
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if kind == XFRM_MSG_NEWSA else 0)
    return _message(kind, flags, bytes(info) + _nlattr(XFRMA_ALG_AEAD, aead), seq)


def encode_allocspi(src: str, dst: str, seq: int = 0) -> bytes:
    """XFRM_MSG_ALLOCSPI (struct xfrm_userspi_info) for an inbound SA ``src -> dst`` (dst=us)."""
    info = _usersa_info(src, dst, 0, bytes(SELECTOR_SIZE))
    body = bytes(info) + struct.pack("=II", 0x100, 0x0FFFFFFF)
    return _message(XFRM_MSG_ALLOCSPI, NLM_F_REQUEST | NLM_F_ACK, body, seq)


def encode_delsa(dst: str, spi: int, seq: int = 0) -> bytes:
    body = _ip(dst) + struct.pack("!I", spi) + struct.pack("=HBx", socket.AF_INET, IPPROTO_ESP)
    return _message(XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK, body, seq)


def encode_newpolicy(
    direction: int, src: str, dst: str, port: int = VXLAN_PORT, seq: int = 0
) -> bytes:
    """XFRM_MSG_NEWPOLICY requiring ESP transport for UDP ``src -> dst:port``."""
    pol = bytearray(USERPOLICY_INFO_SIZE)
    pol[0:SELECTOR_SIZE] = _selector(src, dst, port)
    struct.pack_into("=8Q", pol, 56, XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)
    struct.pack_into(
        "=IIBBBB", pol, 152, WEFT_POLICY_PRIORITY, 0, direction, XFRM_POLICY_ALLOW, 0, 0
    )
    tmpl = bytearray(USER_TMPL_SIZE)
    tmpl[20] = IPPROTO_ESP  # id.proto; id.daddr, id.spi and saddr zero: transport mode
    struct.pack_into("=H", tmpl, 24, socket.AF_INET)
    struct.pack_into("=IBBB", tmpl, 44, WEFT_REQID, XFRM_MODE_TRANSPORT, 0, 0)
    struct.pack_into("=III", tmpl, 52, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return _message(XFRM_MSG_NEWPOLICY, flags, bytes(pol) + _nlattr(XFRMA_TMPL, bytes(tmpl)), seq)


def encode_delpolicy(
    direction: int, src: str, dst: str, port: int = VXLAN_PORT, seq: int = 0
) -> bytes:
    """XFRM_MSG_DELPOLICY (struct xfrm_userpolicy_id) by selector and direction."""
    body = _selector(src, dst, port) + struct.pack("=IBxxx", 0, direction)
    return _message(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, body, seq)


def _delpolicy_by_index(index: int, direction: int, seq: int) -> bytes:
    body = bytes(SELECTOR_SIZE) + struct.pack("=IBxxx", index, direction)
    return _message(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, body, seq)


class XfrmClient:
    """Blocking NETLINK_XFRM requests (one round trip each). Not thread-safe."""

    def __init__(self, timeout: float = 5.0) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
            self._sock.settimeout(timeout)
            self._sock.bind((0, 0))
        except OSError as err:
            raise wrap_os_error("open NETLINK_XFRM socket", err) from err
        self._seq = secrets.randbits(16)

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _transact(self, op: str, wire: bytes, *, dump: bool = False) -> list[tuple[int, bytes]]:
        """Send; return ``(type, body)`` of the replies until the ack (or DONE for dumps)."""
        (seq,) = struct.unpack_from("=I", wire, 8)
        replies: list[tuple[int, bytes]] = []
        try:
            self._sock.send(wire)
            while True:
                data = self._sock.recv(1 << 20)
                pos = 0
                while pos + NLMSGHDR.size <= len(data):
                    length, kind, _flags, rseq, _pid = NLMSGHDR.unpack_from(data, pos)
                    if length < NLMSGHDR.size:
                        raise DatapathError(op, "malformed netlink reply")
                    body = data[pos + NLMSGHDR.size : pos + length]
                    pos += (length + 3) & ~3
                    if rseq != seq:
                        continue
                    if kind == NLMSG_DONE:
                        return replies
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", body)
                        if code:
                            raise wrap_os_error(op, OSError(-code, ""))
                        if not dump:
                            return replies
                        continue
                    replies.append((kind, bytes(body)))
        except DatapathError:
            raise
        except OSError as err:
            raise wrap_os_error(op, err) from err

    def alloc_spi(self, local_ip: str, remote_ip: str) -> int:
        """Our inbound SPI for ESP from ``remote_ip`` (the kernel chooses; a larval SA)."""
        op = f"allocate an ESP SPI for {remote_ip} -> {local_ip}"
        replies = self._transact(op, encode_allocspi(remote_ip, local_ip, self._next_seq()))
        for kind, body in replies:
            if kind == XFRM_MSG_NEWSA and len(body) >= USERSA_INFO_SIZE:
                return int(struct.unpack_from("!I", body, 72)[0])
        raise DatapathError(op, "the kernel sent no SA")

    def install(self, pair: EspPair, send_key: bytes, recv_key: bytes) -> None:
        """Outbound policy first (nothing leaves in the clear from here on), then SAs, then
        the inbound policy."""
        local, remote, port = pair.local_ip, pair.remote_ip, pair.port
        self._transact(
            f"add ESP out policy {local} -> {remote}:{port}",
            encode_newpolicy(XFRM_POLICY_OUT, local, remote, port, self._next_seq()),
        )
        self._transact(
            f"add inbound ESP SA {remote} -> {local} spi {pair.in_spi:#x}",
            encode_sa(XFRM_MSG_UPDSA, remote, local, pair.in_spi, recv_key, port, self._next_seq()),
        )
        self._transact(
            f"add outbound ESP SA {local} -> {remote} spi {pair.out_spi:#x}",
            encode_sa(
                XFRM_MSG_NEWSA, local, remote, pair.out_spi, send_key, port, self._next_seq()
            ),
        )
        self._transact(
            f"add ESP in policy {remote} -> {local}:{port}",
            encode_newpolicy(XFRM_POLICY_IN, remote, local, port, self._next_seq()),
        )

    def remove(self, pair: EspPair) -> None:
        """Tear one connection's ESP down; missing pieces are fine. Outbound SA last so that
        the out policy (which blocks plaintext) is the last thing standing until it goes."""
        local, remote, port = pair.local_ip, pair.remote_ip, pair.port
        steps = [
            (f"delete ESP in policy {remote} -> {local}",
             encode_delpolicy(XFRM_POLICY_IN, remote, local, port, self._next_seq())),
            (f"delete inbound ESP SA spi {pair.in_spi:#x}",
             encode_delsa(local, pair.in_spi, self._next_seq())),
            (f"delete ESP out policy {local} -> {remote}",
             encode_delpolicy(XFRM_POLICY_OUT, local, remote, port, self._next_seq())),
            (f"delete outbound ESP SA spi {pair.out_spi:#x}",
             encode_delsa(remote, pair.out_spi, self._next_seq())),
        ]  # fmt: skip
        for op, wire in steps:
            try:
                self._transact(op, wire)
            except DatapathError as err:
                if err.errno not in (errno.ENOENT, errno.ESRCH):
                    raise

    def remove_stale(self) -> tuple[int, int]:
        """Delete every SA with our reqid and every policy with our priority (a crashed
        router's); returns how many of each."""
        sas = self._transact(
            "dump xfrm SAs",
            _message(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, b"", self._next_seq()),
            dump=True,
        )
        n_sa = 0
        for kind, body in sas:
            if kind != XFRM_MSG_NEWSA or len(body) < USERSA_INFO_SIZE:
                continue
            if struct.unpack_from("=I", body, 208)[0] != WEFT_REQID:
                continue
            dst = str(ipaddress.IPv4Address(body[56:60]))
            spi = struct.unpack_from("!I", body, 72)[0]
            self._transact(
                f"delete stale ESP SA spi {spi:#x}", encode_delsa(dst, spi, self._next_seq())
            )
            n_sa += 1
        pols = self._transact(
            "dump xfrm policies",
            _message(XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP, b"", self._next_seq()),
            dump=True,
        )
        n_pol = 0
        for kind, body in pols:
            if kind != XFRM_MSG_NEWPOLICY or len(body) < USERPOLICY_INFO_SIZE:
                continue
            priority, index, direction = struct.unpack_from("=IIB", body, 152)
            if priority != WEFT_POLICY_PRIORITY:
                continue
            self._transact(
                f"delete stale xfrm policy {index}",
                _delpolicy_by_index(index, direction, self._next_seq()),
            )
            n_pol += 1
        return n_sa, n_pol


GUARD_TABLE = "weft-esp"


class InboundGuard:
    """Drop plain (non-ESP) VXLAN from peers whose connection is encrypted.

    The kernel's xfrm "in" policies are not checked for packets a UDP tunnel socket consumes,
    so an nftables rule does it: ``ip saddr @encrypted udp dport 6784 meta secpath missing
    drop`` in table ``inet weft-esp`` (input hook). ESP-decapsulated packets pass the input hook
    again with a secpath and are accepted. One element per encrypted peer.

    ``nft`` is the command prefix (e.g. ``("ip", "netns", "exec", ns, "nft")`` in tests).
    """

    def __init__(self, nft: tuple[str, ...] = ("nft",), port: int = VXLAN_PORT) -> None:
        self.nft = nft
        self.port = port

    def _run(self, op: str, script: str) -> None:
        import subprocess

        try:
            proc = subprocess.run(
                [*self.nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError) as err:
            raise wrap_os_error(op, err) from err
        if proc.returncode != 0:
            raise DatapathError(op, proc.stderr.strip() or f"nft exited {proc.returncode}")

    def start(self) -> None:
        """(Re)create the table empty: a crashed router's elements are dropped with it."""
        self._run(
            f"create nftables table inet {GUARD_TABLE}",
            f"table inet {GUARD_TABLE} {{}}\n"
            f"delete table inet {GUARD_TABLE}\n"
            f"table inet {GUARD_TABLE} {{\n"
            "  set encrypted { type ipv4_addr; }\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            f"    ip saddr @encrypted udp dport {self.port} meta secpath missing counter drop\n"
            "  }\n"
            "}\n",
        )

    def require_esp_from(self, ip: str) -> None:
        address = str(ipaddress.IPv4Address(ip))
        self._run(
            f"require ESP from {address}",
            f"add element inet {GUARD_TABLE} encrypted {{ {address} }}\n",
        )

    def forget(self, ip: str) -> None:
        address = str(ipaddress.IPv4Address(ip))
        try:
            self._run(
                f"stop requiring ESP from {address}",
                f"delete element inet {GUARD_TABLE} encrypted {{ {address} }}\n",
            )
        except DatapathError as err:
            if "No such file or directory" not in err.reason:
                raise

    def stop(self) -> None:
        self._run(
            f"delete nftables table inet {GUARD_TABLE}",
            f"table inet {GUARD_TABLE} {{}}\ndelete table inet {GUARD_TABLE}\n",
        )
