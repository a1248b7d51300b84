"""The IPAM ring CRDT: creation, merge properties, donations, conflicts, rmpeer."""

from __future__ import annotations

import copy
import itertools
from ipaddress import IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import ConfigError, RemoteProtocolError
from weft.gossip.peer import PeerName
from weft.ipam.ring import (
    TRANSFER_VERSION_BUMP,
    Entry,
    Ring,
    RingConflictError,
    RingData,
    allocatable,
)

NET = IPv4Network("10.32.0.0/24")
START = int(NET.network_address)
END = START + NET.num_addresses
A, B, C, D = (PeerName(0x020000000000 + i) for i in (1, 2, 3, 4))
OBSERVER = PeerName(0x020000000099)


def ring(local: PeerName, seeds: tuple[PeerName, ...] = (A, B, C)) -> Ring:
    r = Ring(START, END, local)
    r.create(seeds)
    return r


def whole(lo: int, hi: int) -> int:
    return allocatable(lo, hi, START, END)


def test_create_splits_evenly_and_identically() -> None:
    ra, rb = ring(A), ring(B)
    assert ra.entries() == rb.entries()
    spans = list(ra.spans())
    assert [s.owner for s in spans] == [A, B, C]
    assert [s.start for s in spans] == [START, START + 85, START + 170]
    assert sum(s.size for s in spans) == 256
    # network and broadcast of the range are not counted as free
    assert spans[0].free == 84 and spans[2].free == 85
    ra.check_invariants()


def test_create_needs_seeds_and_room() -> None:
    with pytest.raises(ConfigError):
        Ring(START, END, A).create([])
    with pytest.raises(ConfigError):
        Ring(START, START + 2, A).create([A, B, C])


def test_owner_lookup() -> None:
    r = ring(A)
    assert r.owner(START) == A
    assert r.owner(START + 85) == B
    assert r.owner(END - 1) == C
    assert r.owner(END) is None
    assert Ring(START, END, A).owner(START) is None


def test_donation_splits_and_merges_at_recipient() -> None:
    ra, rb = ring(A), ring(B)
    touched = ra.give(START + 40, START + 60, B, whole)
    ra.check_invariants()
    assert ra.owner(START + 39) == A
    assert ra.owner(START + 40) == B
    assert ra.owner(START + 59) == B
    assert ra.owner(START + 60) == A
    delta = rb.merge(ra.data(touched))
    assert delta is not None
    assert rb.entries() == ra.entries()
    assert rb.owned_ranges(B) == [
        (START + 40, START + 60),
        (START + 85, START + 170),
    ]
    # the donor's remaining spans advertise their true free counts
    assert ra.span_of(START).free == whole(START, START + 40)
    assert ra.span_of(START + 60).free == whole(START + 60, START + 85)


def test_donation_delta_says_where_the_span_ends() -> None:
    # A gives the top of its span to B, then the part below it to C. C hears only of the
    # second gift: it must still know that its span ends where B's begins.
    ra, rc = ring(A), ring(C)
    ra.give(START + 60, START + 85, B, whole)
    second = ra.give(START + 40, START + 60, C, whole)
    assert START + 60 in second
    rc.merge(ra.data(second))
    assert rc.owned_ranges(C)[0] == (START + 40, START + 60)


def test_donation_of_space_not_ours_is_refused() -> None:
    ra = ring(A)
    with pytest.raises(ConfigError):
        ra.give(START + 80, START + 90, C, whole)  # crosses into B's span
    assert ra.entries() == ring(A).entries()


def test_merge_is_idempotent_and_returns_only_news() -> None:
    ra, rb = ring(A), ring(B)
    ra.give(START + 10, START + 20, C, whole)
    assert rb.merge(ra.data()) is not None
    assert rb.merge(ra.data()) is None
    assert ra.merge(rb.data()) is None


def test_different_seeds_conflict_and_nothing_changes() -> None:
    ra = ring(A)
    other = ring(D, seeds=(D,))
    before = ra.entries()
    with pytest.raises(RingConflictError, match="different address spaces"):
        ra.merge(other.data())
    assert ra.entries() == before


def test_range_mismatch_conflicts() -> None:
    r = ring(A)
    other = Ring(START, END + 256, B)
    other.create([A, B, C])
    with pytest.raises(RingConflictError, match="range conflict"):
        r.merge(other.data())


def test_equal_version_different_owner_conflicts() -> None:
    ra, rb, rc = ring(A), ring(B), ring(C)
    # A believes "rmpeer" happened on two peers at once: both B and C took A's span.
    rb.transfer(A)
    rc.transfer(A)
    ra_view = ring(D)
    ra_view.merge(rb.data())
    with pytest.raises(RingConflictError, match="rmpeer run on two peers"):
        ra_view.merge(rc.data())
    del ra


def test_nobody_else_may_change_our_span() -> None:
    ra, rb = ring(A), ring(B)
    rb.transfer(A)  # B removed A while A is in fact alive
    with pytest.raises(RingConflictError, match="removed with rmpeer"):
        ra.merge(rb.data())
    assert ra.owner(START) == A


def test_nobody_else_may_cut_our_span() -> None:
    ra = ring(A)
    forged = RingData(START, END, (A, B, C), {START + 5: Entry(B, 0, 1)})
    with pytest.raises(RingConflictError, match="cut our span"):
        ra.merge(forged)
    assert START + 5 not in ra.entries()


def test_rmpeer_transfers_with_version_bump() -> None:
    rb = ring(B)
    tokens, taken = rb.transfer(C)
    assert taken == 256 - 170
    assert tokens == [START + 170]
    e = rb.entry(START + 170)
    assert e is not None and e.owner == B and e.version == TRANSFER_VERSION_BUMP
    # the takeover wins everywhere, including over a late update from the dead peer
    rc = ring(C)
    rc.set_free(START + 170, 3)
    observer = ring(OBSERVER)
    observer.merge(rc.data())
    observer.merge(rb.data())
    assert observer.owner(START + 200) == B
    with pytest.raises(ConfigError):
        rb.transfer(B)


def test_give_all_for_reset() -> None:
    ra, rb = ring(A), ring(B)
    ra.give(START + 10, START + 20, C, whole)
    rb.merge(ra.data())
    touched = ra.give_all(B)
    assert not ra.owned_ranges(A)
    assert rb.merge(ra.data(touched)) is not None
    assert rb.owner(START) == B and rb.owner(START + 25) == B and rb.owner(START + 15) == C
    assert rb.entries() == ra.entries()


def test_wire_roundtrip_and_bad_input() -> None:
    r = ring(A)
    r.give(START + 3, START + 9, B, whole)
    data = r.data()
    again = RingData.from_wire(copy.deepcopy(data.to_wire()))
    assert again.entries == data.entries and again.seeds == data.seeds
    bads: list[object] = [
        [],
        {"r": [START, START], "s": [], "e": []},
        {"r": [START, END], "s": ["x"], "e": []},
        {"r": [START, END], "s": [1], "e": [[END, 1, 0, 0]]},
        {"r": [START, END], "s": [1], "e": [[START, 1, -1, 0]]},
        {"r": [START, END], "s": [1], "e": [[START, 1 << 48, 0, 0]]},
        {"r": [START, END], "s": [1], "e": [[START, 1, 0]]},
    ]
    for bad in bads:
        with pytest.raises(RemoteProtocolError):
            RingData.from_wire(bad)


def test_fragment_of_unknown_ring_is_ignored_until_a_full_ring_arrives() -> None:
    ra = ring(A)
    touched = ra.give(START + 10, START + 20, B, whole)
    fresh = Ring(START, END, OBSERVER)
    assert fresh.merge(ra.data([t for t in touched if t != START])) is None
    assert not fresh.ready
    assert fresh.merge(ra.data()) is not None
    fresh.check_invariants()


# ----- property tests: random histories of three owners and an observer ------------------

PEERS = (A, B, C)

op = st.one_of(
    st.tuples(st.just("give"), st.sampled_from(PEERS), st.sampled_from((*PEERS, D)),
              st.integers(0, 255), st.integers(1, 40)),
    st.tuples(st.just("free"), st.sampled_from(PEERS), st.integers(0, 10), st.just(0),
              st.just(0)),
    st.tuples(st.just("sync"), st.sampled_from((*PEERS, D)), st.sampled_from((*PEERS, D)),
              st.just(0), st.just(0)),
)


def run_history(ops: list[tuple[str, PeerName, object, int, int]]) -> dict[PeerName, Ring]:
    views = {p: ring(p) for p in (*PEERS, D)}
    for kind, who, arg, x, n in ops:
        r = views[who]
        if kind == "give":
            assert isinstance(arg, PeerName)
            mine = r.owned_ranges(who)
            if not mine or arg == who:
                continue
            s_start, s_end = mine[x % len(mine)]
            lo = s_start + x % (s_end - s_start)
            hi = min(s_end, lo + n)
            r.give(lo, hi, arg, whole)
        elif kind == "free":
            spans = [sp for sp in r.spans() if sp.owner == who]
            if spans:
                sp = spans[int(arg) % len(spans)] if isinstance(arg, int) else spans[0]
                r.set_free(sp.start, max(0, sp.free - 1))
        else:
            assert isinstance(arg, PeerName)
            views[arg].merge(r.data())
        r.check_invariants()
        assert_exclusive(views)
    return views


def assert_exclusive(views: dict[PeerName, Ring]) -> None:
    """Safety: the spans each peer believes it owns never overlap another's beliefs."""
    owned = []
    for p, r in views.items():
        owned += [(a, b, p) for a, b in r.owned_ranges(p)]
    owned.sort()
    for (_, end1, p1), (start2, _, p2) in itertools.pairwise(owned):
        assert end1 <= start2, f"{p1} and {p2} both own {start2}"


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_property_ownership_stays_exclusive_and_views_converge(
    ops: list[tuple[str, PeerName, object, int, int]],
) -> None:
    views = run_history(ops)
    # full exchange in both directions, twice: every view converges to the same ring
    for _ in range(2):
        for p in views:
            for q in views:
                if p != q:
                    views[q].merge(views[p].data())
    entries = {p: r.entries() for p, r in views.items()}
    assert all(e == entries[A] for e in entries.values())
    assert_exclusive(views)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=30), st.lists(op, max_size=30))
def test_property_merge_commutative_and_idempotent(
    ops1: list[tuple[str, PeerName, object, int, int]],
    ops2: list[tuple[str, PeerName, object, int, int]],
) -> None:
    v1 = run_history(ops1)
    v2 = run_history(ops2)
    # Two different views of ``A``'s ring, seen by a bystander in two orders.
    x, y = v1[A].data(), v2[B].data()
    o1, o2 = ring(OBSERVER), ring(OBSERVER)
    try:
        o1.merge(x)
        o1.merge(y)
    except RingConflictError:
        # independent histories may conflict (same token/version, other content); then the
        # other order must conflict too and neither side may have half-merged
        with pytest.raises(RingConflictError):
            o2.merge(y)
            o2.merge(x)
        return
    o2.merge(y)
    o2.merge(x)
    assert o1.entries() == o2.entries()
    assert o1.merge(x) is None and o1.merge(y) is None
    o1.check_invariants()
