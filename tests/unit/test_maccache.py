"""MacCache: learning, moves, expiry and the capacity bound, with the clock stepped by hand."""

from __future__ import annotations

import pytest

from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.sleeve.maccache import MacCache, MacCacheConfig, format_mac

P1, P2 = PeerName(0x020000000001), PeerName(0x020000000002)


def test_learn_lookup_and_move() -> None:
    cache = MacCache()
    assert cache.lookup(0xAA, 0.0) is None
    assert cache.learn(0xAA, P1, 0.0) is False
    assert cache.lookup(0xAA, 1.0) == P1
    assert cache.learn(0xAA, P1, 2.0) is False  # refresh, not a move
    assert cache.learn(0xAA, P2, 3.0) is True
    assert cache.lookup(0xAA, 3.0) == P2
    assert cache.moves == 1


def test_entries_expire_unless_refreshed() -> None:
    cache = MacCache(MacCacheConfig(expiry=10.0))
    cache.learn(1, P1, 0.0)
    cache.learn(2, P1, 0.0)
    cache.learn(2, P1, 8.0)  # refreshed
    assert cache.lookup(1, 10.5) is None
    assert cache.lookup(2, 10.5) == P1
    assert cache.expire(30.0) == 1
    assert len(cache) == 0


def test_bulk_expiry_keeps_fresh_entries() -> None:
    cache = MacCache(MacCacheConfig(expiry=10.0))
    for mac in range(100):
        cache.learn(mac, P1, float(mac) / 10)
    assert cache.expire(15.0) == 50  # learned before t=5.0
    assert len(cache) == 50
    assert cache.expire(15.5) == 0  # amortised: no second sweep this soon


def test_capacity_evicts_the_oldest() -> None:
    cache = MacCache(MacCacheConfig(capacity=3))
    for mac in range(5):
        cache.learn(mac, P1, float(mac))
    assert len(cache) == 3
    assert cache.lookup(0, 5.0) is None and cache.lookup(4, 5.0) == P1


def test_forget_peer_and_snapshot() -> None:
    cache = MacCache()
    cache.learn(0x0242AC110002, P1, 0.0)
    cache.learn(0x0242AC110003, P2, 0.0)
    assert cache.forget_peer(P1) == 1
    assert cache.snapshot(1.0) == [{"mac": "02:42:ac:11:00:03", "peer": str(P2), "age": 1.0}]
    assert format_mac(0x0242AC110002) == "02:42:ac:11:00:02"


def test_config_validated() -> None:
    with pytest.raises(ConfigError):
        MacCacheConfig(expiry=0)
    with pytest.raises(ConfigError):
        MacCacheConfig(capacity=0)
