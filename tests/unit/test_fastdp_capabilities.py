"""Capability reporting and the NETLINK_XFRM messages of the ESP probe (offline, fake socket)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from weft.fastdp.capabilities import (
    XFRM_MSG_DELSA,
    XFRM_MSG_NEWSA,
    XFRM_USERSA_INFO_SIZE,
    Capabilities,
    Feature,
    encode_delsa,
    encode_newsa,
    probe_esp,
)

LOOP = socket.inet_aton("127.0.0.1")


def test_newsa_layout() -> None:
    key = bytes(range(20))
    msg = encode_newsa(0xC0FFEE01, LOOP, key)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (len(msg), XFRM_MSG_NEWSA, 1, 0)
    assert flags == 0x01 | 0x04 | 0x400 | 0x200  # REQUEST | ACK | CREATE | EXCL
    info = msg[16 : 16 + XFRM_USERSA_INFO_SIZE]
    assert info[56:60] == LOOP and info[72:76] == bytes.fromhex("c0ffee01")
    assert info[76] == 50  # ESP
    assert struct.unpack_from("=H", info, 212)[0] == socket.AF_INET
    attr_len, attr_type = struct.unpack_from("=HH", msg, 16 + XFRM_USERSA_INFO_SIZE)
    assert attr_type == 18 and attr_len == 4 + 64 + 8 + 20
    aead = msg[16 + XFRM_USERSA_INFO_SIZE + 4 :]
    assert aead[:17] == b"rfc4106(gcm(aes))" and aead[17:64] == bytes(47)
    assert struct.unpack_from("=II", aead, 64) == (160, 128)
    assert aead[72:92] == key and len(msg) % 4 == 0


def test_delsa_layout() -> None:
    msg = encode_delsa(0xC0FFEE01, LOOP)
    length, kind = struct.unpack_from("=IH", msg)
    assert (length, kind) == (16 + 24, XFRM_MSG_DELSA)
    assert msg[16:20] == LOOP and msg[32:36] == bytes.fromhex("c0ffee01")
    assert struct.unpack_from("=HB", msg, 36) == (socket.AF_INET, 50)


class FakeXfrm:
    """Answers each request with an NLMSG_ERROR carrying the next scripted errno."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.sent: list[bytes] = []

    def __enter__(self) -> FakeXfrm:
        return self

    def __exit__(self, *args: object) -> None:
        pass

    def settimeout(self, t: float) -> None:
        pass

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        code = self.codes.pop(0)
        return struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -code) + bytes(16)


def test_probe_esp_reports_success_and_the_kernels_refusal() -> None:
    ok = FakeXfrm([0, 0])
    feature = probe_esp(lambda: ok)  # type: ignore[arg-type, return-value]
    assert feature.available and len(ok.sent) == 2
    # The SA deleted is the one added.
    assert ok.sent[1][32:36] == ok.sent[0][16 + 72 : 16 + 76]
    missing = probe_esp(lambda: FakeXfrm([93]))  # type: ignore[arg-type, return-value]
    assert not missing.available
    assert "add an ESP SA with rfc4106(gcm(aes))" in missing.detail
    assert "EPROTONOSUPPORT" in missing.detail


def test_capabilities_status() -> None:
    caps = Capabilities(
        openvswitch=Feature(False, "no ovs_datapath"),
        vxlan=Feature(True, "ok"),
        esp=Feature(False, "no esp4"),
    )
    assert caps.fast_datapaths() == ["vxlan"]
    status = caps.status()
    assert status["openvswitch"] == {"available": False, "detail": "no ovs_datapath"}
    assert status["fast_datapaths"] == ["vxlan"]


def test_net_dev_counters_parse_and_a_missing_device_is_none(tmp_path: Path) -> None:
    from weft.fastdp.netdev_stats import device_traffic, parse_net_dev

    text = (
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes packets ...\n"
        "    lo:  100  2 0 0 0 0 0 0  100  2 0 0 0 0 0 0\n"
        "vxlan-weft: 9000 10 0 0 0 0 0 0 4500 5 0 0 0 0 0 0\n"
        "broken: x y\n"
    )
    assert parse_net_dev(text)["vxlan-weft"] == {
        "bytes_in": 9000,
        "frames_in": 10,
        "bytes_out": 4500,
        "frames_out": 5,
    }
    assert "broken" not in parse_net_dev(text)
    path = tmp_path / "dev"
    path.write_text(text)
    assert device_traffic("lo", str(path)) == {
        "bytes_in": 100,
        "frames_in": 2,
        "bytes_out": 100,
        "frames_out": 2,
    }
    assert device_traffic("nope", str(path)) is None
    assert device_traffic("lo", str(tmp_path / "missing")) is None
    assert device_traffic("lo") is not None  # this namespace's own loopback
