"""OVS generic netlink encoding, offline: exact bytes against openvswitch.h layouts, round trips."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weft.errors import ConfigError
from weft.fastdp.errors import DatapathError
from weft.fastdp.ovs import (
    Action,
    DatapathInfo,
    Families,
    FlowInfo,
    FlowKey,
    GenlMessage,
    OutputAction,
    SetTunnelAction,
    TunnelKey,
    UnknownAction,
    Upcall,
    VportInfo,
    VportType,
    decode_actions,
    dp_new,
    encode_actions,
    exact_mask,
    flow_new,
    nla,
    packet_execute,
    pair_vni,
    parse_attrs,
    split_messages,
    vport_new,
)

FAM = Families(datapath=0x20, vport=0x21, flow=0x22, packet=0x23)


def test_nla_padding_and_parse() -> None:
    assert nla(3, b"ab") == b"\x06\x00\x03\x00ab\x00\x00"
    assert nla(0, b"") == b"\x04\x00\x00\x00"
    data = nla(1, b"x") + nla(0x8000 | 2, b"abcd")  # NLA_F_NESTED is masked off
    assert parse_attrs(data) == [(1, b"x"), (2, b"abcd")]
    with pytest.raises(DatapathError, match="bad attribute length"):
        parse_attrs(b"\x40\x00\x01\x00abcd")


def test_genl_message_header_layout_and_round_trip() -> None:
    msg = GenlMessage(FAM.flow, cmd=1, dp_ifindex=7, attrs=nla(1, b"k"), version=1, seq=9)
    wire = msg.encode()
    assert struct.unpack_from("=IHHII", wire) == (len(wire), 0x22, 0x01, 9, 0)
    assert wire[16:24] == bytes([1, 1, 0, 0]) + struct.pack("=i", 7)
    assert GenlMessage.decode(wire) == msg
    with pytest.raises(DatapathError):
        GenlMessage.decode(wire[:10])


def test_datapath_new_bytes() -> None:
    wire = dp_new(FAM, "weft-dp", upcall_pid=0x1234).encode()
    attrs = wire[24:]
    assert attrs == (
        b"\x0c\x00\x01\x00weft-dp\x00"  # OVS_DP_ATTR_NAME, NUL-terminated
        + b"\x08\x00\x02\x00"
        + struct.pack("=I", 0x1234)  # UPCALL_PID
        + b"\x08\x00\x05\x00"
        + struct.pack("=I", 3)  # USER_FEATURES: UNALIGNED|VPORT_PIDS
    )
    assert wire[16:18] == bytes([1, 2])  # OVS_DP_CMD_NEW, OVS_DATAPATH_VERSION 2


def test_vxlan_vport_new_bytes() -> None:
    wire = vport_new(FAM, 5, VportType.VXLAN, "vxlan-6784", 77, dst_port=6784).encode()
    assert struct.unpack_from("=i", wire, 20)[0] == 5  # ovs_header.dp_ifindex
    attrs = dict(parse_attrs(wire[24:]))
    assert attrs[2] == struct.pack("=I", 4)  # TYPE vxlan
    assert attrs[3] == b"vxlan-6784\x00"
    assert attrs[5] == struct.pack("=I", 77)
    assert attrs[4] == b"\x06\x00\x01\x00" + struct.pack("=H", 6784) + b"\x00\x00"
    with pytest.raises(ConfigError):
        vport_new(FAM, 5, VportType.VXLAN, "v", 1)
    with pytest.raises(ConfigError):
        vport_new(FAM, 5, VportType.INTERNAL, "v", 1, dst_port=1)


def test_flow_key_bytes_with_tunnel() -> None:
    key = FlowKey(
        in_port=2,
        eth_src="02:00:00:00:00:01",
        eth_dst="02:00:00:00:00:02",
        tunnel=TunnelKey(tun_id=0x00ABC, ipv4_src="10.0.0.1", ipv4_dst="10.0.0.2", ttl=64),
    )
    raw = key.encode()
    tunnel = (
        b"\x0c\x00\x00\x00"
        + struct.pack("!Q", 0xABC)  # ID is attribute type 0, be64
        + b"\x08\x00\x01\x00"
        + bytes([10, 0, 0, 1])
        + b"\x08\x00\x02\x00"
        + bytes([10, 0, 0, 2])
        + b"\x05\x00\x04\x00\x40\x00\x00\x00"  # TTL u8, padded
    )
    assert raw == (
        struct.pack("=HH", 4 + len(tunnel), 16)
        + tunnel  # OVS_KEY_ATTR_TUNNEL
        + b"\x08\x00\x03\x00"
        + struct.pack("=I", 2)  # IN_PORT
        + b"\x10\x00\x04\x00"
        + bytes.fromhex("020000000001020000000002")  # ETHERNET
    )
    assert FlowKey.decode(raw) == key


def test_exact_mask() -> None:
    key = FlowKey(
        in_port=1,
        eth_dst="aa:aa:aa:aa:aa:aa",
        tunnel=TunnelKey(tun_id=1, ipv4_dst="1.2.3.4", ttl=64),
    )
    mask = exact_mask(key)
    assert mask.in_port == 0xFFFFFFFF and mask.eth_dst == "ff:ff:ff:ff:ff:ff"
    assert mask.eth_src is None  # encoded as zeros: wildcard
    assert mask.tunnel == TunnelKey(tun_id=2**64 - 1, ipv4_dst="255.255.255.255", ttl=0)
    eth = dict(parse_attrs(mask.encode()))[4]
    assert eth == bytes(6) + b"\xff" * 6


def test_actions_bytes_and_round_trip() -> None:
    tun = TunnelKey(tun_id=pair_vni(1, 2), ipv4_src="10.0.0.1", ipv4_dst="10.0.0.2", ttl=64)
    actions: list[Action] = [SetTunnelAction(tun), OutputAction(3)]
    raw = encode_actions(actions)
    set_attr = nla(3, nla(16, tun.encode()))
    assert raw == set_attr + b"\x08\x00\x01\x00" + struct.pack("=I", 3)
    assert decode_actions(raw) == actions
    assert decode_actions(nla(13, b"\x01\x02\x03\x04")) == [UnknownAction(13, b"\x01\x02\x03\x04")]
    with pytest.raises(ConfigError, match="set-tunnel needs"):
        encode_actions([SetTunnelAction(TunnelKey(tun_id=1))])
    assert pair_vni(1, 2) == 0x2001
    with pytest.raises(ConfigError):
        pair_vni(4096, 0)


def test_flow_new_and_execute_layout() -> None:
    key = FlowKey(in_port=1, eth_dst="02:00:00:00:00:02")
    wire = flow_new(FAM, 9, key, exact_mask(key), [OutputAction(2)]).encode()
    attrs = parse_attrs(wire[24:])
    assert [k for k, _ in attrs] == [1, 7, 2]  # KEY, MASK, ACTIONS
    assert FlowKey.decode(attrs[0][1]) == FlowKey(
        in_port=1, eth_src="00:00:00:00:00:00", eth_dst="02:00:00:00:00:02"
    )
    pkt = bytes(60)
    ex = packet_execute(FAM, 9, pkt, [OutputAction(2)], in_port=0).encode()
    assert struct.unpack_from("=H", ex, 4)[0] == FAM.packet and ex[16] == 3  # EXECUTE
    e = dict(parse_attrs(ex[24:]))
    assert e[1] == pkt and FlowKey.decode(e[2]).in_port == 0


def _kernel_msg(family: int, cmd: int, dp: int, attrs: bytes) -> GenlMessage:
    return GenlMessage.decode(GenlMessage(family, cmd, dp, attrs).encode())


def test_decode_upcall_ignores_unknown_key_attributes() -> None:
    frame = bytes.fromhex("0200000000020200000000010800") + bytes(46)
    key = (
        nla(2, struct.pack("=I", 0))  # PRIORITY
        + nla(3, struct.pack("=I", 4))  # IN_PORT
        + nla(15, struct.pack("=I", 0))  # SKB_MARK
        + nla(4, frame[6:12] + frame[0:6])  # ETHERNET (src, dst)
        + nla(6, b"\x08\x00")  # ETHERTYPE
        + nla(7, bytes(12))  # IPV4: not ours to decode
        + nla(22, struct.pack("=I", 0))  # CT_STATE
    )
    up = Upcall.decode(_kernel_msg(FAM.packet, 1, 3, nla(1, frame) + nla(2, key)))
    assert up.is_miss and up.dp_ifindex == 3 and up.packet == frame
    assert up.key.in_port == 4 and up.key.ethertype == 0x0800
    assert (up.key.eth_src, up.key.eth_dst) == ("02:00:00:00:00:01", "02:00:00:00:00:02")
    with pytest.raises(DatapathError, match="packet or key missing"):
        Upcall.decode(_kernel_msg(FAM.packet, 1, 3, nla(1, frame)))


def test_decode_vport_datapath_and_flow_replies() -> None:
    vp = VportInfo.decode(
        _kernel_msg(
            FAM.vport,
            1,
            5,
            nla(1, struct.pack("=I", 2))
            + nla(2, struct.pack("=I", 4))
            + nla(3, b"vxlan-6784\x00")
            + nla(5, struct.pack("=2I", 7, 8))
            + nla(4, nla(1, struct.pack("=H", 6784)))
            + nla(6, struct.pack("=8Q", 10, 20, 0, 0, 0, 0, 0, 0))
            + nla(8, struct.pack("=I", 42)),
        )
    )
    assert (vp.port_no, vp.type_name, vp.name, vp.upcall_pids) == (2, "vxlan", "vxlan-6784", (7, 8))
    assert (vp.dst_port, vp.ifindex, vp.rx_packets, vp.tx_packets) == (6784, 42, 10, 20)
    dp = DatapathInfo.decode(
        _kernel_msg(
            FAM.datapath,
            1,
            5,
            nla(1, b"weft-dp\x00")
            + nla(3, struct.pack("=4Q", 1, 2, 3, 4))
            + nla(5, struct.pack("=I", 3)),
        )
    )
    assert dp == DatapathInfo("weft-dp", 5, hits=1, missed=2, lost=3, flows=4, user_features=3)
    key = FlowKey(in_port=1, eth_src="02:00:00:00:00:01", eth_dst="02:00:00:00:00:02")
    flow = FlowInfo.decode(
        _kernel_msg(
            FAM.flow,
            1,
            5,
            nla(1, key.encode())
            + nla(7, exact_mask(key).encode())
            + nla(2, encode_actions([OutputAction(2)]))
            + nla(3, struct.pack("=2Q", 5, 500))
            + nla(5, struct.pack("=Q", 123)),
        )
    )
    assert flow.key == key and flow.actions == (OutputAction(2),)
    assert flow.mask is not None and flow.mask.in_port == 0xFFFFFFFF
    assert (flow.packets, flow.bytes, flow.used_ms) == (5, 500, 123)


def test_split_messages() -> None:
    a = GenlMessage(FAM.flow, 1, seq=1).encode()
    ack = struct.pack("=IHHII", 36, 2, 0, 2, 0) + struct.pack("=i", 0) + bytes(16)
    parts = split_messages(a + ack)
    assert [(k, s) for k, _f, s, _ in parts] == [(FAM.flow, 1), (2, 2)]
    with pytest.raises(DatapathError):
        split_messages(struct.pack("=IHHII", 99, 2, 0, 1, 0))


macs = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
ips = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str(n >> s & 255) for s in (24, 16, 8, 0)))
tunnels = st.builds(
    TunnelKey,
    tun_id=st.none() | st.integers(0, 2**64 - 1),
    ipv4_src=st.none() | ips,
    ipv4_dst=st.none() | ips,
    tos=st.none() | st.integers(0, 255),
    ttl=st.none() | st.integers(0, 255),
    dont_fragment=st.booleans(),
    csum=st.booleans(),
    tp_dst=st.none() | st.integers(0, 65535),
)
keys = st.builds(
    FlowKey,
    in_port=st.none() | st.integers(0, 2**32 - 1),
    eth_src=macs,
    eth_dst=macs,
    ethertype=st.none() | st.integers(0x600, 0xFFFF),
    tunnel=st.none() | tunnels,
    priority=st.none() | st.integers(0, 2**32 - 1),
    skb_mark=st.none() | st.integers(0, 2**32 - 1),
)


@given(keys)
def test_flow_key_round_trip(key: FlowKey) -> None:
    assert FlowKey.decode(key.encode()) == key


@given(
    st.lists(
        st.builds(OutputAction, st.integers(0, 2**32 - 1))
        | st.builds(
            SetTunnelAction,
            st.builds(
                TunnelKey, tun_id=st.integers(0, 2**24), ipv4_dst=ips, ttl=st.integers(1, 255)
            ),
        )
    )
)
def test_actions_round_trip(actions: list[OutputAction | SetTunnelAction]) -> None:
    assert decode_actions(encode_actions(actions)) == actions


attr_soup = st.lists(
    st.tuples(st.integers(0, 40), st.binary(max_size=20)).map(lambda t: nla(t[0], t[1]))
).map(b"".join)


@given(st.binary(max_size=200) | attr_soup)
def test_decoders_only_raise_datapath_error(data: bytes) -> None:
    msg = GenlMessage(FAM.vport, 1, 0, data)
    decoders = (
        FlowKey.decode,
        decode_actions,
        TunnelKey.decode,
        lambda d: VportInfo.decode(msg),
        lambda d: DatapathInfo.decode(msg),
        lambda d: FlowInfo.decode(msg),
        lambda d: Upcall.decode(msg),
    )
    for decode in decoders:
        with contextlib.suppress(DatapathError):
            decode(data)
