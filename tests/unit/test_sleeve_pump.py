"""The asyncio pump: two SleeveOverlays on loopback UDP (no TAP), wired as the router does."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.host.bridge import Attachment
from weft.host.bridge_api import setup_routes
from weft.overlay import OverlayConnection, OverlayConnectionParams
from weft.router.api import _errors  # the API's own error boundary
from weft.sleeve.core import VERSION, SleeveConfig
from weft.sleeve.pump import SleeveOverlay

A, B = PeerName(0x020000000001), PeerName(0x020000000002)


def _params(
    local: PeerName,
    remote: PeerName,
    features: dict[str, Any],
    keys: tuple[bytes, bytes] | None,
    send: Callable[[bytes], None],
    established: asyncio.Event,
) -> OverlayConnectionParams:
    return OverlayConnectionParams(
        local_name=local,
        remote_name=remote,
        remote_short_id=1,
        remote_ip="127.0.0.1",
        outbound=local < remote,
        data_send_key=keys[0] if keys else None,
        data_recv_key=keys[1] if keys else None,
        remote_features=features,
        send_control=send,
        on_established=established.set,
    )


@pytest.mark.parametrize("encrypted", [True, False])
async def test_two_overlays_establish_over_loopback(encrypted: bool) -> None:
    cfg = SleeveConfig(port=0, tap_vnet_hdr=False)
    ov_a = SleeveOverlay(cfg, host="127.0.0.1", tap_name=None, bridge=None)
    ov_b = SleeveOverlay(cfg, host="127.0.0.1", tap_name=None, bridge=None)
    try:
        assert ov_a.features()["sleeve_port"] != ov_b.features()["sleeve_port"]
        k1, k2 = os.urandom(32), os.urandom(32)
        conns: dict[str, OverlayConnection] = {}
        est_a, est_b = asyncio.Event(), asyncio.Event()
        conns["a"] = ov_a.prepare_connection(
            _params(A, B, ov_b.features(), (k1, k2) if encrypted else None,
                    lambda m: conns["b"].control_received(m), est_a)
        )  # fmt: skip
        conns["b"] = ov_b.prepare_connection(
            _params(B, A, ov_a.features(), (k2, k1) if encrypted else None,
                    lambda m: conns["a"].control_received(m), est_b)
        )  # fmt: skip
        await asyncio.wait_for(asyncio.gather(est_a.wait(), est_b.wait()), timeout=10)
        st = conns["a"].status()
        assert st.datapath == "sleeve" and st.state == "established"
        assert st.encrypted is encrypted
        # The PMTU search continues after establishment (loopback: up to a 65507-byte datagram).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while "probing" in conns["a"].status().info and loop.time() < deadline:
            await asyncio.sleep(0.05)
        st = conns["a"].status()
        assert "probing" not in st.info and st.mtu is not None and st.mtu > 60000, st
        status = ov_a.status()
        assert status["mode"] == "per-frame" and status["links"][str(B)]["state"] == "established"
        conns["a"].stop()
        assert conns["a"].status().state == "failed"
    finally:
        ov_a.close()
        ov_b.close()


async def test_peer_without_sleeve_is_reported_not_established() -> None:
    ov = SleeveOverlay(SleeveConfig(port=0), host="127.0.0.1", tap_name=None, bridge=None)
    try:
        conn = ov.prepare_connection(_params(A, B, {}, None, lambda m: None, asyncio.Event()))
        st = conn.status()
        assert st.state == "failed" and "no compatible sleeve" in st.info
        # a sleeve v1 peer (fragment headers unauthenticated) is refused naming the versions
        v1 = {"sleeve_version": 1, "sleeve_port": 6783, "sleeve_superframes": True}
        conn = ov.prepare_connection(_params(A, B, v1, None, lambda m: None, asyncio.Event()))
        st = conn.status()
        assert st.state == "failed" and "ours 2, theirs 1" in st.info
    finally:
        ov.close()


class FakeBridge:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def expose(self, cidr: str | None) -> list[str]:
        if cidr is None:
            raise ConfigError("a CIDR is required")
        self.calls.append(("expose", cidr))
        return [cidr]

    def hide(self, cidr: str) -> list[str]:
        return []

    def attach(self, netns: str, ips: list[str], ifname: str, mtu: int | None) -> Attachment:
        self.calls.append(("attach", netns, ips, ifname, mtu))
        return Attachment(netns, f"/run/netns/{netns}", ifname, "vwe0", "02:00:00:00:00:01", ips)

    def detach(self, netns: str) -> bool:
        return netns == "c1"

    def ps(self) -> list[dict[str, Any]]:
        return [{"netns": "c1"}]


async def test_bridge_api_shapes() -> None:
    fake = FakeBridge()
    app = web.Application(middlewares=[_errors])
    setup_routes(app, fake)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/attach", json={"netns": "c1", "ip": ["10.32.0.2/12"]})
        assert r.status == 200
        assert await r.json() == {
            "netns": "c1", "ifname": "ethwe", "host_ifname": "vwe0",
            "mac": "02:00:00:00:00:01", "addresses": ["10.32.0.2/12"],
        }  # fmt: skip
        assert fake.calls[-1] == ("attach", "c1", ["10.32.0.2/12"], "ethwe", None)
        r = await client.post("/attach", json={"netns": "c1", "ip": "10.32.0.2/12", "mtu": "x"})
        assert r.status == 400
        r = await client.post("/expose", json={"cidr": None})
        assert r.status == 400 and "CIDR" in (await r.json())["error"]
        r = await client.post("/expose", json={"cidr": "10.32.0.1/12"})
        assert await r.json() == {"addresses": ["10.32.0.1/12"]}
        assert (await client.post("/detach", json={"netns": "c1"})).status == 200
        assert (await client.post("/detach", json={"netns": "zz"})).status == 400
        assert await (await client.get("/ps")).json() == [{"netns": "c1"}]
        assert (await client.post("/attach", data=b"[1]")).status == 400


async def test_bridge_api_asks_the_allocator_when_no_address_is_given() -> None:
    fake = FakeBridge()
    asked: list[str] = []
    released: list[str] = []

    async def allocate(ident: str) -> list[str]:
        asked.append(ident)
        return ["10.40.0.7/12"]

    async def release(ident: str) -> None:
        released.append(ident)

    app = web.Application(middlewares=[_errors])
    setup_routes(app, fake, allocate, release)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/attach", json={"netns": "c1"})
        assert (await r.json())["addresses"] == ["10.40.0.7/12"]
        r = await client.post("/expose", json={"cidr": None})
        assert await r.json() == {"addresses": ["10.40.0.7/12"]}
        assert (await client.post("/detach", json={"netns": "c1"})).status == 200
    assert asked == ["netns:c1", "weft:expose"] and released == ["netns:c1"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("WEFT_SLEEVE_LOCAL_OFFLOADS", "maybe"), ("WEFT_SLEEVE_MODE", "jumbo")],
)
def test_make_overlay_refuses_unknown_knob_values(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from weft.sleeve.pump import make_overlay

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        make_overlay(object())


async def test_local_offloads_off_means_none_and_status_says_so() -> None:
    cfg = SleeveConfig(port=0, tap_vnet_hdr=False)
    strict = SleeveOverlay(
        cfg, host="127.0.0.1", tap_name=None, bridge=None, gso=False, gro=False, tap_gro=False
    )
    auto = SleeveOverlay(cfg, host="127.0.0.1", tap_name=None, bridge=None)
    try:
        st = strict.status()
        assert (st["gso"], st["gro"], st["tap_gro"]) == (False, False, False)
        st = auto.status()
        assert st["tap_gro"] is True and st["mode"] == "per-frame"
    finally:
        strict.close()
        auto.close()


async def test_refused_gso_send_falls_back_to_single_datagrams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno as errno_mod

    from weft.sleeve.core import Transmit

    ov = SleeveOverlay(SleeveConfig(port=0, tap_vnet_hdr=False), host="127.0.0.1",
                       tap_name=None, bridge=None, gso=True)  # fmt: skip
    sent: list[bytes] = []

    class Sock:
        def sendmsg(self, pieces: Any, anc: Any, flags: int, addr: Any) -> int:
            if anc:
                raise OSError(errno_mod.EIO, "no GSO here")
            sent.append(b"".join(pieces))
            return len(sent[-1])

        def sendto(self, data: Any, addr: Any) -> int:
            sent.append(bytes(data))
            return len(data)

        def fileno(self) -> int:
            return -1

    real = ov.sock
    try:
        monkeypatch.setattr(ov, "sock", Sock())
        t = Transmit(B, ("127.0.0.1", 9), (b"a" * 100, b"b" * 100, b"c" * 50), 100)
        ov._send(t)
        assert sent == [b"a" * 100, b"b" * 100, b"c" * 50]
        assert ov.gso is False and ov.drops["udp_gso_refused"] == 1
    finally:
        monkeypatch.setattr(ov, "sock", real)
        ov.close()


async def test_refused_merged_tap_write_falls_back_to_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno as errno_mod

    from tests.unit.test_sleeve_gro import stream
    from weft.sleeve.gro import VNET_ZERO

    ov = SleeveOverlay(SleeveConfig(port=0, tap_vnet_hdr=False), host="127.0.0.1",
                       tap_name=None, bridge=None)  # fmt: skip
    written: list[bytes] = []

    def writev(fd: int, pieces: Any) -> int:
        if bytes(pieces[0]) != VNET_ZERO:
            raise OSError(errno_mod.EINVAL, "no GSO writes")
        written.append(b"".join(bytes(p) for p in pieces))
        return len(written[-1])

    class FakeTap:
        fd = 99

    try:
        monkeypatch.setattr(os, "writev", writev)
        ov.tap = FakeTap()  # type: ignore[assignment]
        assert ov.tap_gro
        segs, _ = stream(5)
        ov._write_frames(list(segs))
        assert written == [VNET_ZERO + s for s in segs]
        assert ov.drops["tap_gro_refused"] == 1 and not ov.drops["tap_write_error"]
        written.clear()
        ov._write_frames(list(segs))  # merging stays off
        assert written == [VNET_ZERO + s for s in segs]
    finally:
        ov.tap = None
        ov.close()


class _Nat:
    """A port-rebinding NAT on loopback: what A sends to ``inside`` leaves from the current
    outside socket towards B; what B sends to an outside socket goes back to A."""

    def __init__(self, a_port: int, b_port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.a = ("127.0.0.1", a_port)
        self.b = ("127.0.0.1", b_port)
        self.inside = self._socket(self._from_a)
        self.outside: list[socket.socket] = []
        self.rebind()

    def _socket(self, handler: Callable[[socket.socket], None]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        self.loop.add_reader(sock.fileno(), handler, sock)
        return sock

    def rebind(self) -> int:
        """A's mapping moves to a new outside port (the old one keeps forwarding back)."""
        self.outside.append(self._socket(self._from_b))
        return int(self.outside[-1].getsockname()[1])

    def _from_a(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            self.outside[-1].sendto(data, self.b)

    def _from_b(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            self.inside.sendto(data, self.a)

    def close(self) -> None:
        for sock in (self.inside, *self.outside):
            self.loop.remove_reader(sock.fileno())
            sock.close()


async def _until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_plain_link_ignores_spoofed_datagrams_and_follows_a_nat_rebinding() -> None:
    """#14 item 3 on real sockets: B's link to A stays put under spoofed datagrams from another
    port, and follows A when A's NAT mapping moves (A's heartbeat carries B's token)."""
    cfg = SleeveConfig(port=0, tap_vnet_hdr=False, heartbeat_interval=0.5)
    ov_a = SleeveOverlay(cfg, host="127.0.0.1", tap_name=None, bridge=None)
    ov_b = SleeveOverlay(cfg, host="127.0.0.1", tap_name=None, bridge=None)
    nat = _Nat(ov_a.config.port, ov_b.config.port)
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    try:
        conns: dict[str, OverlayConnection] = {}
        est_a, est_b = asyncio.Event(), asyncio.Event()
        behind_nat = {**ov_b.features(), "sleeve_port": nat.inside.getsockname()[1]}
        # B cannot reach A directly: what it first takes for A's address is a dead port.
        unreachable = {**ov_a.features(), "sleeve_port": dead.getsockname()[1]}
        conns["b"] = ov_b.prepare_connection(
            _params(B, A, unreachable, None, lambda m: conns["a"].control_received(m), est_b)
        )
        conns["a"] = ov_a.prepare_connection(
            _params(A, B, behind_nat, None, lambda m: conns["b"].control_received(m), est_a)
        )
        await asyncio.wait_for(asyncio.gather(est_a.wait(), est_b.wait()), timeout=20)

        def b_sees_a_at() -> str:
            link = ov_b.link_status(A)
            assert link is not None
            return str(link["addr"])

        first = f"127.0.0.1:{nat.outside[0].getsockname()[1]}"
        await _until(lambda: b_sees_a_at() == first, "B to follow A behind the NAT")
        # Spoofed: A's name from another port, a data record and a full heartbeat.
        a_bytes = A.to_bytes(6, "big")
        frame = bytes(6) + bytes(6) + b"\x08\x00" + b"spoofed"
        rec = struct.pack(">6s6sBI", a_bytes, B.to_bytes(6, "big"), 0, len(frame)) + frame
        data = struct.pack(">B6sQIIHH", VERSION << 4 | 1, a_bytes, 1, len(rec), 0, 0, 1) + rec
        hb = struct.pack(">B6sQIIHH", VERSION << 4 | 2, a_bytes, 2, 1000, 0, 0, 1) + bytes(1000)
        assert ov_b.core is not None
        for payload in (data, hb):
            spoofer.sendto(payload, ("127.0.0.1", ov_b.config.port))
        await _until(
            lambda: (
                ov_b.core is not None
                and ov_b.core.drops["wrong_source"] >= 1
                and ov_b.core.drops["heartbeat_token"] >= 1
            ),
            "the spoofed datagrams to be refused",
        )
        assert b_sees_a_at() == first
        # The NAT rebinds A to a new port: B follows on A's next heartbeat.
        second = f"127.0.0.1:{nat.rebind()}"
        await _until(lambda: b_sees_a_at() == second, "B to follow the rebinding")
        acked = ov_a.link_status(B)
        assert acked is not None and acked["state"] == "established"
    finally:
        spoofer.close()
        dead.close()
        nat.close()
        ov_a.close()
        ov_b.close()
