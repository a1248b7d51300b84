"""Routes on known graphs: unicast next hops, broadcast trees, data vs all variants."""

from __future__ import annotations

import random
from collections import deque

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.gossip.peer import PeerName
from weft.gossip.routes import Routes
from weft.gossip.topology import ConnectionSummary, PeerRecord, make_record

N = [PeerName(0x020000000000 + i) for i in range(12)]


def graph(
    edges: list[tuple[int, int]],
    *,
    not_established: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset(),
    one_sided: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset(),
) -> dict[PeerName, PeerRecord]:
    """Records for an undirected graph; ``one_sided`` (a, b): only a lists b;
    ``not_established`` (a, b): a's summary of b is not established."""
    conns: dict[int, list[ConnectionSummary]] = {}
    nodes = {x for e in edges for x in e}
    for a, b in edges:
        for x, y in ((a, b), (b, a)):
            if (y, x) in one_sided:
                continue  # only y lists x
            conns.setdefault(x, []).append(
                ConnectionSummary(N[y], f"h{y}:6783", x < y, (x, y) not in not_established)
            )
    return {N[i]: make_record(N[i], f"n{i}", 1, 1, i, conns.get(i, []), _KEY) for i in nodes}


_KEY = Ed25519PrivateKey.generate()  # routes only read records; whose key signs is irrelevant


def test_line_unicast_next_hops() -> None:
    recs = graph([(0, 1), (1, 2), (2, 3)])
    r = Routes(N[0], recs, data=True)
    assert r.unicast_next_hop(N[1]) == N[1]
    assert r.unicast_next_hop(N[3]) == N[1]
    assert r.unicast_next_hop(N[0]) is None
    assert r.unicast_next_hop(N[9]) is None
    r2 = Routes(N[2], recs, data=True)
    assert r2.unicast_next_hop(N[0]) == N[1] and r2.unicast_next_hop(N[3]) == N[3]


def test_bfs_breaks_ties_by_name() -> None:
    # square 0-1-3, 0-2-3: both are shortest to 3; the lower-named neighbour wins
    recs = graph([(0, 2), (0, 1), (1, 3), (2, 3)])
    assert Routes(N[0], recs, data=True).unicast_next_hop(N[3]) == N[1]


def test_data_routes_need_established_and_symmetric() -> None:
    recs = graph([(0, 1), (1, 2), (0, 3), (3, 2)], not_established={(1, 2)}, one_sided={(0, 3)})
    data = Routes(N[0], recs, data=True)
    assert data.unicast_next_hop(N[1]) == N[1]
    assert data.unicast_next_hop(N[2]) is None  # 1->2 not established, 0->3 not symmetric
    assert data.unicast_next_hop(N[3]) is None
    every = Routes(N[0], recs, data=False)
    assert every.unicast_next_hop(N[2]) == N[1]
    assert every.unicast_next_hop(N[3]) == N[3]


def _flood_counts(
    recs: dict[PeerName, PeerRecord], src: PeerName, data: bool
) -> dict[PeerName, int]:
    routes = {n: Routes(n, recs, data=data) for n in recs}
    got = {n: 0 for n in recs}
    queue = deque([src])
    while queue:
        here = queue.popleft()
        for nxt in routes[here].broadcast_next_hops(src):
            got[nxt] += 1
            queue.append(nxt)
    return got


def test_broadcast_tree_reaches_everyone_exactly_once_on_random_graphs() -> None:
    rng = random.Random(5)
    for _ in range(30):
        n = rng.randrange(2, 12)
        edges = {(rng.randrange(i), i) for i in range(1, n)}  # a spanning tree: connected
        for _ in range(rng.randrange(n * 2)):
            a, b = sorted(rng.sample(range(n), 2))
            edges.add((a, b))
        recs = graph(sorted(edges))
        for src in recs:
            counts = _flood_counts(recs, src, data=True)
            assert counts[src] == 0
            assert all(c == 1 for name, c in counts.items() if name != src), counts


def test_broadcast_from_ourselves_goes_to_every_neighbour() -> None:
    recs = graph([(0, 1), (0, 2), (2, 3)])
    assert Routes(N[0], recs, data=True).broadcast_next_hops(N[0]) == [N[1], N[2]]
    assert Routes(N[2], recs, data=True).broadcast_next_hops(N[0]) == [N[3]]
    assert Routes(N[1], recs, data=True).broadcast_next_hops(N[0]) == []
    assert Routes(N[1], recs, data=True).broadcast_next_hops(N[9]) == []


def test_unreachable_partition_has_no_routes() -> None:
    recs = graph([(0, 1), (2, 3)])
    r = Routes(N[0], recs, data=False)
    assert r.reachable() == {N[1]}
    assert r.broadcast_next_hops(N[2]) == []


def test_may_relay_only_along_shortest_paths_from_the_source() -> None:
    # 0 - 1 - 2 - 3 and 0 - 4 - 3 (3 -> 4 -> 0 is the shortest from 3), 5 a leaf on 0
    recs = graph([(0, 1), (1, 2), (2, 3), (0, 4), (4, 3), (0, 5)])
    r = Routes(N[0], recs, data=True)
    assert r.may_relay(N[1], N[1]) and r.may_relay(N[5], N[5])  # a neighbour speaks for itself
    assert r.may_relay(N[2], N[1])  # 2 -> 1 -> 0
    assert r.may_relay(N[3], N[4])  # 3 -> 4 -> 0, the shortest
    assert not r.may_relay(N[3], N[1])  # 3 -> 2 -> 1 -> 0 is longer: 1 is no relay for 3
    assert not r.may_relay(N[2], N[5])  # 5 is a leaf: it relays for nobody
    assert not r.may_relay(N[1], N[5]) and not r.may_relay(N[0], N[1])  # nor for us
    assert not r.may_relay(N[9], N[1])  # an unknown source
    assert not r.may_relay(N[2], N[3])  # 3 is not our neighbour
    # ties: 0 - 1 - 3 and 0 - 2 - 3 are both shortest, either neighbour may relay for 3
    tie = Routes(N[0], graph([(0, 1), (1, 3), (0, 2), (2, 3)]), data=True)
    assert tie.may_relay(N[3], N[1]) and tie.may_relay(N[3], N[2])
