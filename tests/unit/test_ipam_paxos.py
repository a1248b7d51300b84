"""Paxos over gossip: whatever the proposers and message orders, at most one value is chosen."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.errors import RemoteProtocolError
from weft.gossip.peer import PeerName
from weft.ipam.paxos import NO_PROPOSAL, Claim, Paxos

NAMES = [PeerName(0x020000000000 + i) for i in range(5)]


def deliver(src: Paxos, dst: Paxos, values: bool, lost_claims: frozenset[int]) -> None:
    """``dst`` hears some of what ``src`` knows (claims may be lost, values may lag)."""
    claims = {n: c for n, c in src.claims.items() if int(n) % 7 not in lost_claims}
    dst.merge(claims)
    if values:
        dst.merge_values(src.values)
    dst.think()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("propose"), st.integers(0, 4), st.integers(0, 4), st.booleans(),
                  st.frozensets(st.integers(0, 6), max_size=2)),
        st.tuples(st.just("deliver"), st.integers(0, 4), st.integers(0, 4), st.booleans(),
                  st.frozensets(st.integers(0, 6), max_size=2)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_at_most_one_value_is_ever_chosen(
    script: list[tuple[str, int, int, bool, frozenset[int]]],
) -> None:
    peers = [Paxos(n, quorum=3) for n in NAMES]
    # participants know of each other (announcements), so proposals carry different values
    chosen: set[tuple[PeerName, ...]] = set()
    for kind, i, j, flag, lost in script:
        if kind == "propose":
            peers[i].propose(tuple(NAMES[: 2 + (i + j) % 4]) if flag else ())
        else:
            deliver(peers[i], peers[j], flag, lost)
        for p in peers:
            value = p.chosen()
            if value is not None:
                chosen.add(value)
        assert len(chosen) <= 1, chosen
    # and with everything delivered everywhere, everyone who learns, learns the same
    for _ in range(6):
        for a in peers:
            for b in peers:
                if a is not b:
                    deliver(a, b, True, frozenset())
    learnt = {p.chosen() for p in peers} - {None}
    assert len(learnt) <= 1


def test_one_proposer_gets_its_value_chosen() -> None:
    peers = [Paxos(n, quorum=3) for n in NAMES]
    for a in peers:
        for b in peers:
            b.merge(a.claims)  # announcements
    peers[0].propose()
    for _ in range(3):
        for a in peers:
            for b in peers:
                if a is not b:
                    deliver(a, b, True, frozenset())
    assert all(p.chosen() == tuple(NAMES) for p in peers)


def test_learn_trusts_the_proposer() -> None:
    p = Paxos(NAMES[1], quorum=3)
    p.merge_values({(1, int(NAMES[0])): (NAMES[0], NAMES[1])})
    assert p.chosen() is None
    p.learn((1, int(NAMES[0])))
    assert p.chosen() == (NAMES[0], NAMES[1])


def test_wire_roundtrip_and_bad_input() -> None:
    claims = {NAMES[0]: Claim((2, 5), (1, 5)), NAMES[1]: Claim()}
    assert Paxos.from_wire(Paxos.to_wire(claims)) == claims
    values = {(2, 5): (NAMES[0], NAMES[2])}
    assert Paxos.values_from_wire(Paxos.values_to_wire(values)) == values
    for bad in ([[1, 2, 3]], [[1 << 48, 0, 0, 0, 0]], [["x", 0, 0, 0, 0]], {"a": 1}):
        with pytest.raises(RemoteProtocolError):
            Paxos.from_wire(bad)
    for bad in ([[1, 2, []]], [[1, 2, ["x"]]], [[1, 1 << 48, [1]]]):
        with pytest.raises(RemoteProtocolError):
            Paxos.values_from_wire(bad)
    assert Paxos(NAMES[0], 1).mine == Claim(NO_PROPOSAL, NO_PROPOSAL)


def test_a_later_proposer_must_keep_the_chosen_value() -> None:
    p = [Paxos(n, quorum=3) for n in NAMES]
    v0 = (NAMES[0], NAMES[1])
    v4 = (NAMES[3], NAMES[4])

    def send(i: int, j: int) -> None:
        deliver(p[i], p[j], True, frozenset())

    p[0].propose(v0)
    for j in (1, 2):
        send(0, j)
        send(j, 0)
    assert p[0].mine.accepted == p[0].mine.promise  # quorum of promises: accepted its value
    for j in (1, 2):
        send(0, j)
        send(j, 0)
    assert p[0].chosen() == v0
    # a later proposer reaches a quorum (2, 3, 4) that includes peer 2, which accepted v0
    p[4].propose(v4)
    for j in (2, 3):
        send(4, j)
        send(j, 4)
    for j in (2, 3):
        send(4, j)
        send(j, 4)
    assert p[4].chosen() == v0
