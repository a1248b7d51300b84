"""Connection-maker policy with a stepped clock: backoff, reset, targets, discovery, status."""

from __future__ import annotations

import random

import pytest

from weft.errors import ConfigError
from weft.gossip.connection_maker import (
    BackoffConfig,
    ConnectionMaker,
    host_of,
    normalise_address,
)
from weft.gossip.peer import PeerName

A = "10.0.0.1:6783"
B = "10.0.0.2:6783"
X = PeerName(0x020000000001)
ME = PeerName(0x020000000000)


def maker(seed: int = 1, **kw: float) -> ConnectionMaker:
    return ConnectionMaker(BackoffConfig(**kw), random.Random(seed), 6783, ourself=ME)


def test_new_direct_target_is_dialed_at_once() -> None:
    cm = maker()
    cm.add_direct(["10.0.0.1"], now=0.0)
    assert cm.poll(0.0) == [A]
    assert cm.poll(0.0) == []  # already connecting
    assert cm.status()[0]["state"] == "connecting"


def test_backoff_grows_by_1_5_with_jitter_and_caps_at_6_minutes() -> None:
    cm = maker()
    cm.add_direct([A], now=0.0)
    now = 0.0
    interval = 2.0
    waits = []
    for attempt in range(1, 20):
        assert cm.poll(now) == [A]
        cm.dial_failed(A, now, "connection refused")
        t = cm.targets[A]
        assert t.attempts == attempt and t.last_error == "connection refused"
        assert t.interval == pytest.approx(interval)
        assert t.next_try is not None
        wait = t.next_try - now
        assert 0.5 * interval <= wait < 1.5 * interval
        waits.append(wait)
        # nothing before next_try, then exactly one dial
        assert cm.poll(t.next_try - 1e-6) == []
        now = t.next_try
        interval = min(360.0, interval * 1.5)
    assert cm.targets[A].interval == 360.0
    assert cm.status()[0]["state"] == "failed"  # at the cap
    assert max(waits) < 540.0


def test_long_lived_connection_resets_backoff_short_one_does_not() -> None:
    cm = maker()
    cm.add_direct([A], now=0.0)
    for now in (0.0, 10.0, 20.0):
        cm.poll(now)
        cm.dial_failed(A, now, "refused")
    grown = cm.targets[A].interval
    assert grown == pytest.approx(4.5)
    cm.poll(100.0)
    cm.connection_succeeded(A, X, 100.0)
    assert cm.status()[0]["state"] == "connected" and cm.poll(100.0) == []
    cm.connection_lost(A, 110.0, "eof")  # lived 10 s: backoff keeps growing
    assert cm.targets[A].interval == pytest.approx(grown * 1.5)
    cm.poll(500.0)
    cm.connection_succeeded(A, X, 500.0)
    cm.connection_lost(A, 560.0, "eof")  # lived 60 s: reset
    t = cm.targets[A]
    assert t.interval == pytest.approx(2.0) and t.attempts == 0
    assert t.next_try is not None and 561.0 <= t.next_try < 563.0


def test_replace_and_forget() -> None:
    cm = maker()
    cm.add_direct([A, B], now=0.0)
    cm.add_direct(["10.0.0.3"], now=0.0, replace=True)
    assert cm.direct_targets() == ["10.0.0.3:6783"]
    cm.add_direct([A], now=0.0)
    cm.forget([A, "10.0.0.9"])
    assert cm.direct_targets() == ["10.0.0.3:6783"]


def test_connected_addresses_and_self_are_not_dialed() -> None:
    cm = maker()
    cm.set_connected([A], [])
    cm.add_direct([A, B], now=0.0)
    assert cm.poll(0.0) == [B]
    cm.dialed_self(B)
    assert cm.poll(1000.0) == []
    rows = {r["address"]: r for r in cm.status()}
    assert rows[A]["state"] == "connected" and rows[B]["last_error"] == "connection to self"
    cm.set_discovered(X, [B], now=0.0)  # own address never becomes a discovered target
    assert cm.poll(2000.0) == []


def test_discovered_targets_follow_the_topology() -> None:
    cm = maker()
    lower = PeerName(0x010000000000)  # below ME: it dials us first, we wait
    cm.set_discovered(X, [A], now=0.0)
    cm.set_discovered(lower, [B], now=0.0)
    assert cm.poll(0.0) == [A]
    t = cm.targets[B].next_try
    assert t is not None and 1.0 <= t < 3.0
    cm.set_discovered(lower, [], now=0.5)  # it connected to us meanwhile
    assert B not in cm.targets
    cm.dial_failed(A, 0.1, "refused")
    cm.set_discovered(X, [], now=0.2)
    assert A not in cm.targets


def test_peer_alive_again_retries_at_once() -> None:
    cm = maker()
    cm.add_direct([A], now=0.0)
    cm.poll(0.0)
    cm.connection_succeeded(A, X, 0.0)
    cm.connection_lost(A, 1.0, "eof")
    for now in (5.0, 20.0, 60.0):
        cm.poll(now)
        cm.dial_failed(A, now, "refused")
    later = cm.targets[A].next_try
    assert later is not None and later > 61.0
    cm.peer_alive(X, 61.0)
    assert cm.poll(61.0) == [A]


def test_config_validation_and_address_helpers() -> None:
    with pytest.raises(ConfigError):
        BackoffConfig(initial=0)
    with pytest.raises(ConfigError):
        BackoffConfig(factor=0.5)
    assert normalise_address("h", 6783) == "h:6783"
    assert normalise_address("::1", 6783) == "[::1]:6783"
    assert normalise_address("[::1]:7", 6783) == "[::1]:7"
    assert host_of("[fe80::1]:6783") == "fe80::1" and host_of("1.2.3.4:5") == "1.2.3.4"
