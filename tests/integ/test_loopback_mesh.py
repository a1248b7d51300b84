"""Real routers, real sockets, one event loop: meshes on 127.0.0.1 with random free ports.

Covers issue 2's "real sockets on loopback": at least 10 routers converge to a full mesh from a
chain of initial peers; a wrong password and an encryption mismatch are named on both sides; and
malformed input from a peer (tampered, oversized, unknown tag, garbage gossip) closes only that
connection while the router keeps serving. Every router's /status tells what carries every link,
its own or not (issue #17 item 2: the records gossip each connection's datapath).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integ.hosts import wait_until
from weft.gossip.crypto import PasswordKeys
from weft.gossip.handshake import Handshake, Hello
from weft.gossip.peer import PeerIdentity, PeerName
from weft.gossip.session import FrameCodec
from weft.overlay import Overlay
from weft.router.config import MESH_SALT_FILE, RouterConfig
from weft.router.router import Router
from weft.sleeve.core import SleeveConfig
from weft.sleeve.pump import SleeveOverlay

TIMEOUT = 60.0  # generous: the machine is shared by many workers


def make_router(
    tmp: Path, i: int, *peers: str, password: bytes | None = None, overlay: Overlay | None = None
) -> Router:
    config = RouterConfig(
        nickname=f"r{i}",
        data_dir=tmp / f"r{i}",
        port=0,
        listen_host="127.0.0.1",
        http_addr="127.0.0.1:0",
        api_socket=None,
        password=password,
        peers=peers,
        datapath="none",
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
    )
    return Router(config, overlay, rng=random.Random(1000 + i))


def rows(router: Router, state: str | None = None) -> list[dict[str, Any]]:
    conns: list[dict[str, Any]] = router.status()["router"]["connections"]
    return [c for c in conns if state is None or c["state"] == state]


def established_peers(router: Router) -> set[str]:
    return {str(c["peer"]) for c in rows(router, "established")}


def addr(router: Router) -> str:
    return f"127.0.0.1:{router.port}"


@pytest.fixture
async def started() -> AsyncIterator[list[Router]]:
    routers: list[Router] = []
    yield routers
    await asyncio.gather(*(r.stop() for r in routers), return_exceptions=True)


async def test_ten_routers_converge_to_full_mesh_from_a_chain(
    tmp_path: Path, started: list[Router]
) -> None:
    n = 10
    for i in range(n):
        peers = (addr(started[-1]),) if started else ()
        router = make_router(tmp_path, i, *peers)
        await router.start()
        started.append(router)
    names = {str(r.identity.name) for r in started}

    def full_mesh() -> bool:
        return all(established_peers(r) == names - {str(r.identity.name)} for r in started)

    await wait_until(full_mesh, "a full mesh of 10 routers")

    def same_topology() -> bool:
        views = []
        for r in started:
            peers = r.status()["router"]["peers"]
            views.append(
                {(p["name"], frozenset(c["name"] for c in p["connections"])) for p in peers}
            )
        return all(v == views[0] for v in views) and len(views[0]) == n

    await wait_until(same_topology, "every router to hold the same 10-peer topology")
    for r in started:
        doc = r.status()
        assert doc["router"]["encryption"] is False
        # no router keeps dialling itself: self-addresses are recognised and dropped
        assert not [c for c in rows(r) if c["state"] == "connecting" and not c["peer"]]


async def test_star_on_one_host_discovers_a_full_mesh(
    tmp_path: Path, started: list[Router]
) -> None:
    """Routers on one IP with different ports, all given only the first: the others must find
    each other at the listen ports their hellos announced (not at our own port)."""
    hub = make_router(tmp_path, 0)
    await hub.start()
    started.append(hub)
    for i in (1, 2, 3):
        router = make_router(tmp_path, i, addr(hub))
        await router.start()
        started.append(router)
    names = {str(r.identity.name) for r in started}
    await wait_until(
        lambda: all(established_peers(r) == names - {str(r.identity.name)} for r in started),
        "a full mesh of 4 routers discovered through the first",
    )


async def test_encrypted_pair_and_wrong_password_named_on_both_sides(
    tmp_path: Path, started: list[Router]
) -> None:
    a = make_router(tmp_path, 0, password=b"right")
    await a.start()
    started.append(a)
    b = make_router(tmp_path, 1, addr(a), password=b"right")
    await b.start()
    started.append(b)
    await wait_until(lambda: established_peers(a) == {str(b.identity.name)}, "a-b established")
    assert all(c["encrypted"] for c in rows(a, "established") + rows(b, "established"))
    # b's first messages may still be in flight when a calls the link established.
    await wait_until(
        lambda: all(
            c["stats"]["messages_in"] > 0 and c["stats"]["bytes_out"] > 0
            for c in rows(a, "established")
        ),
        "messages both ways on a-b",
    )
    assert a.status()["router"]["encryption"] is True
    # Both settled on one mesh salt and keep it in their data dirs (the second start reuses it).
    assert a.password_keys is not None and b.password_keys is not None
    assert a.password_keys.salt == b.password_keys.salt
    assert a.password_keys.settled and b.password_keys.settled
    stored = {(tmp_path / f"r{i}" / MESH_SALT_FILE).read_text().strip() for i in (0, 1)}
    assert stored == {a.password_keys.salt.hex()}

    intruder = make_router(tmp_path, 2, addr(a), password=b"wrong")
    await intruder.start()
    started.append(intruder)

    def names_password(router: Router) -> bool:
        return any(
            c["state"] in ("failed", "retrying") and "wrong password" in c["info"]
            for c in rows(router)
        )

    await wait_until(lambda: names_password(a), "the accepting router to name the password")
    await wait_until(lambda: names_password(intruder), "the dialling router to name the password")
    assert str(intruder.identity.name) not in established_peers(a)
    assert established_peers(a) == {str(b.identity.name)}  # the good link is untouched
    # counted by reason for the metrics (weft_handshake_failures_total), on both sides
    for router in (a, intruder):
        assert router.status()["router"]["failures"]["handshake"].get("wrong_password", 0) >= 1

    plain = make_router(tmp_path, 3, addr(a))
    await plain.start()
    started.append(plain)

    def names_mismatch(router: Router) -> bool:
        return any("encryption mismatch" in c["info"] for c in rows(router))

    await wait_until(lambda: names_mismatch(plain), "plaintext side names the mismatch")
    await wait_until(lambda: names_mismatch(a), "encrypted side names the mismatch")
    assert plain.status()["router"]["failures"]["handshake"].get("encryption_mismatch", 0) >= 1


async def test_dial_failures_are_counted_by_reason(tmp_path: Path, started: list[Router]) -> None:
    (port,) = free_ports(1)  # nothing listens there: the kernel refuses the connection
    a = make_router(tmp_path, 0, f"127.0.0.1:{port}")
    await a.start()
    started.append(a)

    def refused() -> bool:
        return bool(a.status()["router"]["failures"]["dial"].get("connection_refused", 0) >= 1)

    await wait_until(refused, "the refused dial to be counted")
    assert a.status()["router"]["failures"]["handshake"] == {}


class RawPeer:
    """A hand-driven peer: real handshake, then whatever bytes a test wants to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.codec: FrameCodec | None = None
        self.name: PeerName | None = None

    @classmethod
    async def connect(cls, router: Router, password: bytes | None, seed: int) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        peer = cls(reader, writer)
        rng = random.Random(seed)
        peer.name = PeerName(rng.getrandbits(47) | (2 << 40))
        identity = PeerIdentity(peer.name, f"raw{seed}", rng.getrandbits(64) | 1, seed & 0xFFF)
        loop = asyncio.get_running_loop()
        key = PasswordKeys(password) if password else None  # a fresh router's provisional salt
        hs = Handshake(True, Hello.from_identity(identity, rng.getrandbits(64)), key, loop.time())
        writer.write(hs.data_to_send())
        while not hs.done:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            assert data, "router closed during the handshake"
            hs.receive(data, loop.time())
            writer.write(hs.data_to_send())
        peer.codec = hs.result.control
        return peer

    def send_message(self, tag: int, payload: bytes) -> None:
        assert self.codec is not None
        self.writer.write(self.codec.encode(bytes((tag,)) + payload))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed_by_router(self) -> bool:
        """True once the router has closed the stream (EOF)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
                if not data:
                    return True
        except (ConnectionError, TimeoutError):
            return True

    def close(self) -> None:
        self.writer.close()


def _tampered(peer: RawPeer) -> None:
    assert peer.codec is not None
    frame = bytearray(peer.codec.encode(b"\x04" + b"x" * 40))
    frame[-1] ^= 0x01
    peer.send_raw(bytes(frame))


def _oversized(peer: RawPeer) -> None:
    peer.send_raw(struct.pack(">I", 64 * 1024 * 1024) + b"\0" * 16)


def _unknown_tag(peer: RawPeer) -> None:
    peer.send_message(99, b"hello")


def _garbage_gossip(peer: RawPeer) -> None:
    peer.send_message(4, os.urandom(64))


@pytest.mark.parametrize(
    ("attack", "reason", "label"),
    [
        (_tampered, "authentication failed", "authentication_failed"),
        (_oversized, "too large", "frame_too_large"),
        (_unknown_tag, "unknown message tag 99", "protocol_error"),
        (_garbage_gossip, "malformed", "protocol_error"),
    ],
    ids=["tampered", "oversized", "unknown-tag", "garbage-gossip"],
)
async def test_bad_message_closes_only_that_connection(
    tmp_path: Path,
    started: list[Router],
    attack: Callable[[RawPeer], None],
    reason: str,
    label: str,
) -> None:
    a = make_router(tmp_path, 0, password=b"pw")
    await a.start()
    started.append(a)
    b = make_router(tmp_path, 1, addr(a), password=b"pw")
    await b.start()
    started.append(b)
    await wait_until(lambda: established_peers(a) == {str(b.identity.name)}, "a-b established")
    good = a.connection_to(b.identity.name)
    assert good is not None

    raw = await RawPeer.connect(a, b"pw", seed=7)
    assert raw.name is not None
    await wait_until(lambda: str(raw.name) in {str(c["peer"]) for c in rows(a)}, "raw accepted")
    failed_before = a.counters["connection_failed"]
    label_before = a.counters[f"closed_{label}"]
    closed: list[tuple[str, str]] = []
    a.on_connection_closed(lambda lab, why: closed.append((lab, why)))
    attack(raw)
    assert await raw.closed_by_router()
    raw.close()
    await wait_until(
        lambda: a.counters["connection_failed"] == failed_before + 1, "the failure counted"
    )
    failures = [c for c in rows(a, "failed") if c["peer"] == str(raw.name)]
    assert len(failures) == 1 and reason in failures[0]["info"], failures
    assert a.counters[f"closed_{label}"] == label_before + 1
    assert a.status()["router"]["counters"][f"closed_{label}"] == label_before + 1
    assert closed == [(label, failures[0]["info"])]
    # Only that connection went: the real one is the same object, still established.
    assert a.connection_to(b.identity.name) is good
    assert established_peers(a) == {str(b.identity.name)}
    assert a.status()["router"]["name"] == str(a.identity.name)  # still serving


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def with_port(router_config: RouterConfig, port: int, *peers: str) -> RouterConfig:
    from dataclasses import replace

    return replace(router_config, port=port, peers=peers)


async def test_simultaneous_dials_keep_exactly_one_connection(
    tmp_path: Path, started: list[Router]
) -> None:
    pa, pb = free_ports(2)
    a = Router(with_port(make_router(tmp_path, 0).config, pa, f"127.0.0.1:{pb}"))
    b = Router(with_port(make_router(tmp_path, 1).config, pb, f"127.0.0.1:{pa}"))
    started.extend([a, b])
    await asyncio.gather(a.start(), b.start())
    await wait_until(
        lambda: (
            established_peers(a) == {str(b.identity.name)}
            and established_peers(b) == {str(a.identity.name)}
        ),
        "a and b connected",
    )

    def settled(r: Router) -> bool:  # no second connection still dialling or handshaking
        return all(c.state == "established" for c in r.connections()) and not rows(r, "connecting")

    await wait_until(lambda: settled(a) and settled(b), "no connection left handshaking")
    # The loser of the tie-break must not keep retrying its target: every retry would be
    # another duplicate, and half of them would replace the working connection.
    for r in (a, b):
        assert [t["state"] for t in r.status()["router"]["targets"]] == ["connected"]
    ca, cb = a.connection_to(b.identity.name), b.connection_to(a.identity.name)
    assert ca is not None and cb is not None
    # both ends kept the same TCP connection (the tie-break agrees on both sides)
    assert ca.writer.get_extra_info("sockname") == cb.writer.get_extra_info("peername")
    assert len([c for c in a.connections() if c.state == "established"]) == 1
    assert len([c for c in b.connections() if c.state == "established"]) == 1


async def test_connect_to_self_and_name_collision(tmp_path: Path, started: list[Router]) -> None:
    (pa,) = free_ports(1)
    a = Router(with_port(make_router(tmp_path, 0).config, pa, f"127.0.0.1:{pa}"))
    started.append(a)
    await a.start()

    def self_target_given_up() -> bool:
        targets = a.status()["router"]["targets"]
        return any(
            t["address"] == f"127.0.0.1:{pa}" and t["state"] == "failed" and t["next_try"] is None
            for t in targets
        )

    await wait_until(self_target_given_up, "the self target to be given up (never retried)")
    assert established_peers(a) == set()
    assert a.counters["closed_self"] >= 1

    from dataclasses import replace

    twin = Router(replace(make_router(tmp_path, 1).config, name=a.identity.name, peers=(addr(a),)))
    started.append(twin)
    await twin.start()

    def names_collision(router: Router) -> bool:
        return any("peer name collision" in c["info"] for c in rows(router))

    await wait_until(lambda: names_collision(a), "a names the collision")
    await wait_until(lambda: names_collision(twin), "the twin names the collision")
    assert established_peers(a) == set()


async def test_an_impostor_under_a_peers_name_cannot_displace_it(
    tmp_path: Path, started: list[Router]
) -> None:
    """A password holder starts a router under b's peer name but with its own identity key and
    dials a. Before protocol v3 a took it for b restarted (a new uid) and dropped b's
    connection for it. Now the handshake proves the impostor's key, a's binding of b's name to
    b's key refuses it, both ends log why, and b stays connected."""
    from dataclasses import replace

    a = make_router(tmp_path, 0, password=b"shared")
    started.append(a)
    await a.start()
    b = make_router(tmp_path, 1, addr(a), password=b"shared")
    started.append(b)
    await b.start()
    await wait_until(lambda: established_peers(a) == {str(b.identity.name)}, "a and b connect")
    impostor = Router(
        replace(make_router(tmp_path, 2, addr(a), password=b"shared").config, name=b.identity.name)
    )
    started.append(impostor)
    await impostor.start()

    def refused(router: Router) -> bool:
        return any("identity key mismatch" in c["info"] for c in rows(router))

    await wait_until(lambda: refused(a), "a names the identity key mismatch")
    assert established_peers(a) == {str(b.identity.name)}
    assert established_peers(b) == {str(a.identity.name)}
    assert [c for c in b.connections() if c.state == "established"]


async def test_connection_limit_refuses_and_keeps_serving(
    tmp_path: Path, started: list[Router]
) -> None:
    from dataclasses import replace

    a = Router(replace(make_router(tmp_path, 0, password=b"pw").config, conn_limit=2))
    started.append(a)
    await a.start()
    peers = [await RawPeer.connect(a, b"pw", seed=s) for s in (1, 2)]
    await wait_until(lambda: len(a.connections()) == 2, "two accepted")
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    assert await reader.read(100) == b""  # closed at once, before any handshake byte
    writer.close()
    await wait_until(
        lambda: any("connection limit reached (2)" in c["info"] for c in rows(a, "failed")),
        "the refusal to be shown",
    )
    assert a.counters["refused_conn_limit"] == 1
    for p in peers:
        p.close()
    await wait_until(lambda: not a.connections(), "the raw peers gone")
    third = await RawPeer.connect(a, b"pw", seed=3)  # room again
    await wait_until(lambda: len(a.connections()) == 1, "a new peer accepted")
    third.close()


async def test_version_mismatch_named_on_both_sides(tmp_path: Path, started: list[Router]) -> None:
    from weft.gossip.handshake import VersionMismatch

    a = make_router(tmp_path, 0)
    started.append(a)
    await a.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    loop = asyncio.get_running_loop()
    ident = PeerIdentity(PeerName(0x020000000077), "future", 77, 77)
    hs = Handshake(True, Hello.from_identity(ident, 1), None, loop.time(), versions=(7, 9))
    writer.write(hs.data_to_send())
    with pytest.raises(VersionMismatch, match=r"ours 7\.\.9, theirs 3\.\.3"):
        while True:
            data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            if not data:
                hs.receive_eof()
            hs.receive(data, loop.time())
    writer.close()
    await wait_until(
        lambda: any(
            "protocol version mismatch (ours 3..3, theirs 7..9)" in c["info"]
            for c in rows(a, "failed")
        ),
        "the router to name the version mismatch",
    )
    assert a.counters["closed_version_mismatch"] == 1


async def test_accept_rate_is_bounded_by_a_token_bucket(
    tmp_path: Path, started: list[Router]
) -> None:
    from dataclasses import replace

    # A token every minute: the third connection must wait, whatever the load.
    a = Router(replace(make_router(tmp_path, 0).config, accept_burst=2, accept_interval=60.0))
    started.append(a)
    await a.start()
    streams = []
    for _ in range(2):  # the burst of 2 is served at once
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        streams.append(writer)
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"weft"  # its header
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    streams.append(writer)
    await wait_until(lambda: a.counters["accept_delayed"] == 1, "the third to wait for a token")
    # its header is a token (a minute) away, so nothing has come yet
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 1.0)
    for w in streams:
        w.close()


async def test_a_stranger_on_the_control_port_is_refused(
    tmp_path: Path, started: list[Router]
) -> None:
    a = make_router(tmp_path, 0)
    started.append(a)
    await a.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), TIMEOUT)  # our header, then the close
    assert data.startswith(b"weft")
    writer.close()
    await wait_until(
        lambda: any("not a weft peer" in c["info"] for c in rows(a, "failed")), "the refusal row"
    )
    assert a.counters["closed_bad_magic"] == 1
    assert a.status()["router"]["name"] == str(a.identity.name)


class Notes:
    """A tiny GossipData: a set of byte strings (merge = union)."""

    def __init__(self, items: set[bytes]) -> None:
        self.items = set(items)

    def encode(self) -> list[bytes]:
        return [b"\n".join(sorted(self.items))]

    def merge(self, other: Any) -> Notes:
        self.items |= other.items
        return self


class NotesChannel:
    """Records what arrives; relays gossip deltas like a real channel."""

    def __init__(self) -> None:
        self.notes: set[bytes] = set()
        self.unicasts: list[tuple[PeerName, bytes]] = []

    def on_unicast(self, src: PeerName, payload: bytes) -> None:
        self.unicasts.append((src, payload))

    def on_broadcast(self, src: PeerName, payload: bytes) -> Notes | None:
        return self.on_gossip(payload)

    def on_gossip(self, payload: bytes) -> Notes | None:
        new = {n for n in payload.split(b"\n") if n} - self.notes
        self.notes |= new
        return Notes(new) if new else None

    def snapshot(self) -> Notes:
        return Notes(self.notes)


async def test_application_channel_sends_outside_callbacks_are_delivered(
    tmp_path: Path, started: list[Router]
) -> None:
    routers: list[Router] = []
    for i in range(3):
        r = make_router(tmp_path, i, *([addr(routers[-1])] if routers else []))
        routers.append(r)
    channels = [NotesChannel() for _ in routers]
    senders = [r.register_channel("notes", ch) for r, ch in zip(routers, channels, strict=True)]
    for r in routers:
        await r.start()
        started.append(r)
    names = {str(r.identity.name) for r in routers}
    await wait_until(
        lambda: all(established_peers(r) == names - {str(r.identity.name)} for r in routers),
        "a full mesh of 3",
    )
    # sent from plain test code (no mesh callback on the stack): the router must still flush it,
    # on the next loop iteration (not at its next timer)
    out_before = sum(c.stats.messages_out for c in routers[0].connections())
    senders[0].broadcast(Notes({b"hello"}))
    await asyncio.sleep(0)
    assert sum(c.stats.messages_out for c in routers[0].connections()) > out_before
    await wait_until(lambda: all(b"hello" in ch.notes for ch in channels[1:]), "the broadcast")
    senders[2].gossip(Notes({b"gossip"}))
    await wait_until(lambda: all(b"gossip" in ch.notes for ch in channels[:2]), "the gossip")
    senders[1].unicast(routers[0].identity.name, b"direct")
    await wait_until(lambda: channels[0].unicasts == [(routers[1].identity.name, b"direct")], "uni")


async def test_every_router_reports_what_carries_every_link(
    tmp_path: Path, started: list[Router]
) -> None:
    """Three encrypted routers with real sleeve overlays (UDP on loopback, no TAP), a chain that
    discovery makes a full mesh: C's /status shows the A - B link's datapath, encryption and
    MTU exactly as A's own connection row does, once A's PMTU search has settled."""
    overlays: list[SleeveOverlay] = []
    try:
        for i in range(3):
            peers = (addr(started[-1]),) if started else ()
            ov = SleeveOverlay(
                SleeveConfig(port=0, tap_vnet_hdr=False), host="127.0.0.1", tap_name=None,
                bridge=None,
            )  # fmt: skip
            overlays.append(ov)
            router = make_router(tmp_path, i, *peers, password=b"attributes", overlay=ov)
            await router.start()
            started.append(router)
        a, b, c = started
        name_a, name_b = str(a.identity.name), str(b.identity.name)

        def a_row_for_b() -> dict[str, Any] | None:
            for row in rows(a, "established"):
                if row["peer"] == name_b and "probing" not in row["info"]:
                    return row
            return None

        def as_c_sees_it() -> dict[str, Any] | None:
            for p in c.status()["router"]["peers"]:
                if p["name"] == name_a:
                    for conn in p["connections"]:
                        if conn["name"] == name_b:
                            found: dict[str, Any] = conn
                            return found
            return None

        def agree() -> bool:
            row, seen = a_row_for_b(), as_c_sees_it()
            return (
                row is not None
                and seen is not None
                and (seen["datapath"], seen["encrypted"], seen["mtu"], seen["data_state"])
                == (row["datapath"], True, row["mtu"], "established")
            )

        await wait_until(agree, "C to hear the datapath and MTU of A - B", timeout=TIMEOUT)
        row, seen = a_row_for_b(), as_c_sees_it()
        assert row is not None and seen is not None
        assert row["datapath"] == "sleeve" and row["data_encrypted"] is True, row
        assert isinstance(seen["mtu"], int) and seen["mtu"] > 1400, seen  # loopback's PMTU
        assert seen["established"] is True
        # Every link in every record is reported, from every router.
        for r in started:
            for p in r.status()["router"]["peers"]:
                for conn in p["connections"]:
                    assert conn["datapath"] == "sleeve" and conn["encrypted"] is True, (p, conn)
    finally:
        await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)
        for ov in overlays:
            ov.close()
