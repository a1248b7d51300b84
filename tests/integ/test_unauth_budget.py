"""Strangers parked in the handshake cannot lock out peers or our own dials (issue #14 item 6).

Real routers on loopback. The attacker opens TCP connections from several loopback source
addresses (127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to lo), sends the 6-byte header
and nothing else, and keeps them open. The routers' handshake timeout is long, so these
connections would hold their slots for the whole test; nothing here waits for a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from tests.integ.hosts import wait_until
from tests.integ.test_loopback_mesh import (
    TIMEOUT,
    RawPeer,
    addr,
    established_peers,
    make_router,
    rows,
    started,
)
from weft.gossip.admission import Admission
from weft.gossip.handshake import PROTOCOL_VERSIONS
from weft.router.router import Router

__all__ = ["started"]  # the fixture, shared with test_loopback_mesh

HEADER = b"weft" + bytes(PROTOCOL_VERSIONS)  # magic + the versions we speak: then silence


class Stranger:
    """One attacker socket: header sent, then idle."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, router: Router, source: str) -> Stranger:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", router.port, local_addr=(source, 0)
        )
        writer.write(HEADER)
        return cls(reader, writer)

    async def answered(self) -> bool:
        """True: the router answered with its own header (the handshake goes on); False: it
        closed the connection without a byte (refused before any handshake work)."""
        try:
            data = await asyncio.wait_for(self.reader.read(6), TIMEOUT)
        except ConnectionResetError:  # closed with our header unread: an RST
            return False
        return bool(data)

    def close(self) -> None:
        self.writer.close()


def parked_router(tmp: Path, i: int, *, conn_limit: int = 200) -> Router:
    """A router whose handshakes take up to 10 minutes, so parked strangers stay parked."""
    base = make_router(tmp, i, password=b"pw")
    router = Router(replace(base.config, conn_limit=conn_limit, handshake_timeout=600.0))
    # one log interval for the whole test, so "one line per interval" is exact whatever the load
    router.admission = Admission(replace(router.admission.config, log_interval=3600.0))
    return router


async def test_forty_four_parked_strangers_lock_out_neither_a_peer_nor_our_dials(
    tmp_path: Path, started: list[Router], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weft.router")
    # conn_limit 40 stands for the default 200: before the budget, 40 strangers held every slot
    a = parked_router(tmp_path, 0, conn_limit=40)
    b = parked_router(tmp_path, 1)
    c = parked_router(tmp_path, 2)
    for r in (a, b, c):
        started.append(r)
        await r.start()
    strangers = [await Stranger.open(a, f"127.0.0.{2 + i // 4}") for i in range(44)]  # 11 x 4
    answers = [await s.answered() for s in strangers]  # each one handled by the router
    unauth = a.status()["router"]["unauthenticated"]
    assert unauth["inbound"] <= unauth["limit"] - unauth["outbound_reserve"] == 24
    assert a.admission.inbound <= 24 and len(a.connections()) <= 24
    refused = a.counters["refused_unauth_limit"] + a.counters["refused_unauth_per_source"]
    assert refused + a.counters["unauth_evicted"] == 44 - a.admission.inbound
    assert answers.count(False) >= refused  # a refused one sees no byte (nor one evicted early)

    # A peer dials in: from a source with no parked connection it takes a parked one's place.
    b.connect([addr(a)])
    # And we dial out: the reserve is ours.
    a.connect([addr(c)])
    names = {str(b.identity.name), str(c.identity.name)}
    await wait_until(lambda: established_peers(a) == names, "a to reach b and c while flooded")
    assert a.counters.get("refused_conn_limit", 0) == 0

    # Refusals are counted (metrics: weft_connection_events{event="refused_unauth_..."}) and
    # logged aggregated: at most log_burst lines in the interval, not one per connection.
    lines = [  # about a stranger: from 127.0.0.2 and up (the peers come from 127.0.0.1)
        r.getMessage()
        for r in caplog.records
        if r.name == "weft.router" and r.levelno >= logging.INFO
        if "<- 127.0.0." in r.getMessage() and "<- 127.0.0.1:" not in r.getMessage()
    ]
    assert refused + a.counters["unauth_evicted"] >= 20
    assert len(lines) <= a.admission.config.log_burst, lines
    summary = a.admission.handle_timer(a.now() + 3600.0)
    assert summary is not None and summary.total == refused + a.counters["unauth_evicted"]
    assert summary.by_source[0][0].startswith("127.0.0.")
    for s in strangers:
        s.close()


async def test_a_fifth_parked_connection_from_one_source_is_refused(
    tmp_path: Path, started: list[Router]
) -> None:
    a = parked_router(tmp_path, 0)
    started.append(a)
    await a.start()
    four = [await Stranger.open(a, "127.0.0.2") for _ in range(4)]
    assert [await s.answered() for s in four] == [True] * 4
    fifth = await Stranger.open(a, "127.0.0.2")
    assert await fifth.answered() is False  # closed before any handshake byte
    assert a.counters["refused_unauth_per_source"] == 1
    await wait_until(
        lambda: any(
            "4 connections from 127.0.0.2 are already authenticating (per-source limit 4)"
            in row["info"]
            for row in rows(a, "failed")
        ),
        "the refusal row naming the source and the limit",
    )
    other = await Stranger.open(a, "127.0.0.3")  # another source is not affected
    assert await other.answered() is True
    peer = await RawPeer.connect(a, b"pw", seed=5)  # nor is a real peer
    await wait_until(lambda: len(established_or_pending(a)) == 1, "the raw peer accepted")
    # one of the four goes away: its slot is free again
    four[0].close()
    await wait_until(lambda: a.admission.source_count("127.0.0.2") == 3, "the slot released")
    again = await Stranger.open(a, "127.0.0.2")
    assert await again.answered() is True
    for s in (*four, fifth, other, again):
        s.close()
    peer.close()


def established_or_pending(router: Router) -> list[str]:
    return [str(c["peer"]) for c in rows(router) if c["state"] in ("pending", "established")]
