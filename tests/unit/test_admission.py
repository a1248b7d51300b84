"""The budget of unauthenticated connections (weft.gossip.admission; issue #14 item 6).

Pure: keys, addresses and ``now`` in, verdicts out; time is stepped by hand.
"""

from __future__ import annotations

import random

import pytest

from weft.errors import ConfigError, LocalError
from weft.gossip.admission import (
    Admission,
    AdmissionConfig,
    Admitted,
    Refused,
    source_of,
)


def admitted(verdict: Admitted | Refused) -> Admitted:
    assert isinstance(verdict, Admitted), verdict
    return verdict


def refused(verdict: Admitted | Refused) -> Refused:
    assert isinstance(verdict, Refused), verdict
    return verdict


def test_per_source_cap_refuses_the_fifth_from_one_address_only() -> None:
    adm = Admission(AdmissionConfig())
    for key in range(4):
        assert admitted(adm.admit_inbound(key, "10.0.0.1", 0.0)).evict is None
    r = refused(adm.admit_inbound(4, "10.0.0.1", 0.0))
    assert r.label == "unauth_per_source"
    assert r.reason == "4 connections from 10.0.0.1 are already authenticating (per-source limit 4)"
    admitted(adm.admit_inbound(5, "10.0.0.2", 0.0))  # another source is not affected
    adm.release(2)  # one authenticated (or closed): room for that source again
    admitted(adm.admit_inbound(6, "10.0.0.1", 0.0))
    assert adm.counters["unauth_per_source"] == 1
    assert (adm.inbound, adm.source_count("10.0.0.1")) == (5, 4)


def test_ipv6_sources_are_counted_per_64_and_mapped_v4_as_v4() -> None:
    assert source_of("2001:db8:1:2::5") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::5") == "2001:db8:1:3::/64"
    assert source_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    adm = Admission(AdmissionConfig(per_source=2))
    admitted(adm.admit_inbound(1, "2001:db8::1", 0.0))
    admitted(adm.admit_inbound(2, "2001:db8::2", 0.0))
    assert refused(adm.admit_inbound(3, "2001:db8::3", 0.0)).label == "unauth_per_source"


def test_inbound_never_takes_the_outbound_reserve() -> None:
    adm = Admission(AdmissionConfig(limit=32, outbound_reserve=8, per_source=1))
    for key in range(24):
        admitted(adm.admit_inbound(key, f"10.0.1.{key}", 0.0))
    r = refused(adm.admit_inbound(100, "10.0.2.1", 0.0))  # all sources hold 1: nobody to evict
    assert r.label == "unauth_limit"
    assert "24 connections are authenticating (limit 32, 8 kept for our own dials)" in r.reason
    for key in range(200, 208):  # our dials still have 8
        admitted(adm.admit_outbound(key, 0.0))
    assert refused(adm.admit_outbound(208, 0.0)).label == "unauth_outbound_limit"
    assert (adm.inbound, adm.outbound) == (24, 8)
    adm.release(200)
    admitted(adm.admit_outbound(209, 0.0))


def test_our_dials_may_use_the_inbound_part_when_it_is_free() -> None:
    adm = Admission(AdmissionConfig(limit=8, outbound_reserve=2))
    for key in range(8):
        admitted(adm.admit_outbound(key, 0.0))
    refused(adm.admit_outbound(8, 0.0))
    # and then inbound has no room (32 in total is the real bound), whatever the source
    assert refused(adm.admit_inbound(9, "10.0.0.1", 0.0)).label == "unauth_limit"


def test_a_newcomer_takes_the_place_of_the_busiest_sources_oldest() -> None:
    adm = Admission(AdmissionConfig(limit=10, outbound_reserve=2, per_source=4))
    keys = iter(range(1000))
    first = [next(keys) for _ in range(4)]
    for key in first:
        admitted(adm.admit_inbound(key, "10.9.9.9", 0.0))
    for key in (next(keys) for _ in range(4)):
        admitted(adm.admit_inbound(key, f"10.0.0.{key}", 0.0))
    assert adm.inbound == 8  # full
    v = admitted(adm.admit_inbound(500, "192.0.2.1", 0.0))
    assert v.evict == first[0]
    assert v.evict_reason == (
        "closed to make room for 192.0.2.1: the budget of unauthenticated connections is full"
        " and 10.9.9.9 held 4 of them"
    )
    assert adm.inbound == 8 and adm.source_count("10.9.9.9") == 3
    adm.release(first[0])  # the pump closes it and releases it again: harmless
    assert adm.source_count("10.9.9.9") == 3
    # one more from 192.0.2.1 (has 1): the busiest has 3 >= 1 + 2, so again
    assert admitted(adm.admit_inbound(501, "192.0.2.1", 0.0)).evict == first[1]
    # now 10.9.9.9 has 2 and 192.0.2.1 has 2: no source holds two more than another
    assert refused(adm.admit_inbound(502, "192.0.2.1", 0.0)).label == "unauth_limit"
    assert adm.counters["unauth_evicted"] == 2


def test_a_flood_from_many_sources_never_evicts_a_peer_with_one_connection() -> None:
    """Whatever a stranger does from up to 40 sources, a peer's lone handshake stays."""
    rng = random.Random(7)
    adm = Admission(AdmissionConfig())
    peer_key = 0
    admitted(adm.admit_inbound(peer_key, "198.51.100.7", 0.0))
    live: list[int] = []
    for key in range(1, 20_000):
        if live and rng.random() < 0.3:  # some of the stranger's connections time out
            adm.release(live.pop(rng.randrange(len(live))))
        v = adm.admit_inbound(key, f"203.0.113.{rng.randrange(40)}", 0.0)
        if isinstance(v, Admitted):
            assert v.evict != peer_key
            if v.evict is not None:
                live.remove(v.evict)
            live.append(key)
        assert adm.inbound <= 24 and adm.source_count("198.51.100.7") == 1
        assert all(adm.source_count(f"203.0.113.{i}") <= 4 for i in range(40))


def test_refusals_are_logged_aggregated_once_per_interval() -> None:
    adm = Admission(AdmissionConfig(per_source=1, log_interval=60.0, log_burst=3))
    admitted(adm.admit_inbound(0, "10.0.0.1", 100.0))
    admitted(adm.admit_inbound(1000, "10.0.0.2", 100.0))
    logged = [refused(adm.admit_inbound(k, "10.0.0.1", 100.0 + k / 100)).log for k in range(1, 81)]
    logged.append(refused(adm.admit_inbound(81, "10.0.0.2", 101.0)).log)
    assert adm.note_failed("10.0.0.3", 102.0) is False  # a failed handshake joins the window
    assert logged[:3] == [True, True, True] and not any(logged[3:])
    assert adm.get_timer() == 160.01  # the window opened with the first refusal
    assert adm.handle_timer(160.0) is None  # not yet
    summary = adm.handle_timer(160.01)
    assert summary is not None
    assert summary.total == 82 and summary.logged == 3
    assert summary.by_source[0] == ("10.0.0.1", 80)
    assert dict(summary.by_label) == {"unauth_per_source": 81, "handshake_failed": 1}
    assert summary.message() == (
        "unauthenticated connections in the last 60s: 82 refused or failed (unauth_per_source"
        " 81, handshake_failed 1; 3 logged above); by source: 10.0.0.1 80, 10.0.0.2 1,"
        " 10.0.0.3 1"
    )
    assert adm.get_timer() is None  # nothing pending: no timer
    # a new interval logs its first ones again
    assert refused(adm.admit_inbound(200, "10.0.0.1", 500.0)).log is True
    assert adm.handle_timer(560.0) is None  # everything of that interval was logged


def test_refusals_decided_elsewhere_share_the_log_window() -> None:
    adm = Admission(AdmissionConfig(log_burst=1))
    assert adm.note_refused("10.0.0.1", "conn_limit", 0.0) is True
    assert adm.note_refused("10.0.0.1", "conn_limit", 1.0) is False
    summary = adm.handle_timer(60.0)
    assert summary is not None and dict(summary.by_label) == {"conn_limit": 2}


def test_release_is_idempotent_and_keys_are_unique() -> None:
    adm = Admission(AdmissionConfig())
    admitted(adm.admit_inbound(1, "10.0.0.1", 0.0))
    with pytest.raises(LocalError):
        adm.admit_outbound(1, 0.0)
    adm.release(1)
    adm.release(1)
    adm.release(99)
    assert (adm.inbound, adm.outbound, adm.source_count("10.0.0.1")) == (0, 0, 0)
    assert adm.status()["busiest_sources"] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 1}, "must be at least 2"),
        ({"limit": 8, "outbound_reserve": 8}, "outbound reserve 8: must be 1..7"),
        ({"outbound_reserve": 0}, "outbound reserve 0"),
        ({"per_source": 0}, "per-source limit 0"),
        ({"ipv6_prefix": 129}, "/129"),
        ({"log_interval": 0.0}, "log interval"),
    ],
)
def test_invalid_config_is_refused(kwargs: dict[str, int | float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Admission(AdmissionConfig(**kwargs))  # type: ignore[arg-type]
