"""Mesh gossip at scale, on the real MeshCores in the seeded in-memory network.

    python -m bench.gossip --peers 100,300,1000 [--json] [--degree 3] [--seed 1]
                           [--full-mesh 100]

For each size n:

* build: n peers start at once; peer i is launched with ``--degree`` random earlier peers as its
  targets and discovery off (mean degree about 2*degree, the shape of a mesh whose hosts were each
  given a few known peers); run until every peer holds the identical topology.
* steady state: 30 s with nothing changing; topology bytes sent per peer per second.
* join: one more peer (``--degree`` targets); simulated time and gossip hops until every peer
  knows it, and until all topologies are identical again; bytes sent during that time.
* partition heal: split in two halves (each connected on its own) for 20 s, so each half
  garbage-collects the other; heal; time from the heal (includes the connection maker's
  backoff) and from the first re-established cross link (the gossip part) until every peer
  knows everyone again; bytes sent.
* memory: the topology's records as held by one router (deep size of the record objects).

"hops" counts the longest causal chain of messages (the memnet's depth) from the event to the
last peer learning it. A relayed record travels as announce -> request -> record, so one gossip
round is up to three messages; periodic anti-entropy messages also extend chains, so the heal
figure (several seconds) overstates the rounds a lot.

Measured on this 2-core machine (seed 1, degree 3, load ~2): join known by all in 0.24 / 0.30 /
0.36 s for 100 / 300 / 1000 peers, identical topologies in 1.2 / 2.2 / 2.3 s, join traffic
0.28 / 1.0 / 4.1 MB (about 410 B per n*log2(n)); steady state 8.4-8.9 B/s per peer; heal known
by all 1.2-1.3 s after the first cross link, 5 / 45 / 511 MB (a heal is Omega(n^2): every peer
must learn the other half); topology 0.2 / 0.6 / 2.0 MiB per router; 1,000 peers take ~4 min of
wall time. A discovery full mesh of 100 builds in 3.7 s, 0.54 MB per peer, records 2.7 KB.
Link latency is 1-10 ms per link.
``--full-mesh N`` adds a discovery-driven full mesh of N peers from one seed (Weave's normal
shape; each record then lists N-1 connections).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from typing import Any

from weft.gossip.memnet import MemNet, SimPeer
from weft.gossip.mesh import MeshConfig
from weft.gossip.topology import Topology

STEP = 0.02  # simulated seconds between convergence checks


def deep_size(topology: Topology) -> int:
    """Bytes one router spends on its topology records (objects it would own alone)."""
    total = sys.getsizeof(topology.records)
    seen_str: set[int] = set()
    for rec in topology.records.values():
        total += sys.getsizeof(rec) + sys.getsizeof(rec.blob) + sys.getsizeof(rec.connections)
        total += sys.getsizeof(rec.conn_names) + sys.getsizeof(rec.name)
        if id(rec.nickname) not in seen_str:
            seen_str.add(id(rec.nickname))
            total += sys.getsizeof(rec.nickname)
        for c in rec.connections:
            total += sys.getsizeof(c) + sys.getsizeof(c.name)
            if id(c.address) not in seen_str:
                seen_str.add(id(c.address))
                total += sys.getsizeof(c.address)
    return total


def _knows_all(net: MemNet, peers: list[SimPeer], names: set[Any]) -> bool:
    return all(names <= p.core.topology.records.keys() for p in peers)


def measure(n: int, degree: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    wall0 = time.monotonic()
    net = MemNet(seed=seed, config=MeshConfig(discovery=False))
    peers: list[SimPeer] = []
    half = n // 2
    for i in range(n):
        targets = rng.sample(peers, min(degree, i))
        if i > half and not any(t.index >= half for t in targets):
            # keep the second half connected on its own too (see the partition below)
            targets[0] = rng.choice(peers[half:])
        peers.append(net.add_peer([p.address for p in targets]))
    build = net.run_until_true(net.converged, 300.0, step=0.1)
    build_bytes = net.bytes_sent
    mean_degree = sum(len(p.conns) for p in peers) / n

    # steady state
    net.run_for(5.0)
    b0 = net.bytes_sent
    m0 = net.messages_sent
    net.run_for(30.0)
    steady_bps = (net.bytes_sent - b0) / n / 30.0
    steady_mps = (net.messages_sent - m0) / n / 30.0

    # join
    net.reset_depths()
    b0 = net.bytes_sent
    joiner_targets = rng.sample(peers, degree)
    joiner = net.add_peer([p.address for p in joiner_targets])
    t0 = net.now
    everyone = [*peers, joiner]
    learnt_depth: dict[int, int] = {}
    while net.now - t0 < 60.0:
        for p in everyone:
            if p.index not in learnt_depth and joiner.name in p.core.topology:
                learnt_depth[p.index] = p.depth
        if len(learnt_depth) == len(everyone):
            break
        net.run_for(STEP)
    join_known = net.now - t0
    join_hops = max(learnt_depth.values()) if learnt_depth else None
    conv = net.run_until_true(net.converged, 60.0, step=STEP)
    join_converged = None if conv is None else net.now - t0
    join_bytes = net.bytes_sent - b0

    # partition into two halves (each connected on its own), heal
    left, right = peers[:half], peers[half:]
    (left if joiner_targets[0].index < half else right).append(joiner)
    left_set = {p.index for p in left}
    net.partition(left, right)
    net.run_for(20.0)
    split_ok = net.converged(left) and net.converged(right)
    all_names = {p.name for p in everyone}
    b0 = net.bytes_sent
    net.heal()
    t_heal = net.now
    t_link: float | None = None
    while net.now - t_heal < 600.0:
        if t_link is None and any(
            (p.index in left_set) != (r.index in left_set)
            for p in everyone
            for (r, _) in p.conns.values()
        ):
            t_link = net.now
            net.reset_depths()
        if t_link is not None and _knows_all(net, everyone, all_names):
            break
        net.run_for(STEP)
    heal_known = net.now - t_heal
    heal_after_link = None if t_link is None else net.now - t_link
    heal_hops = max(p.depth for p in everyone)
    conv = net.run_until_true(net.converged, 120.0, step=STEP)
    heal_converged = None if conv is None else net.now - t_heal
    heal_bytes = net.bytes_sent - b0

    mem = deep_size(peers[0].core.topology)
    return {
        "peers": n,
        "mean_degree": round(mean_degree, 2),
        "build_s": build,
        "build_bytes_per_peer": round(build_bytes / n),
        "steady_bytes_per_peer_per_s": round(steady_bps, 1),
        "steady_messages_per_peer_per_s": round(steady_mps, 3),
        "join_known_s": round(join_known, 3),
        "join_hops": join_hops,
        "join_converged_s": None if join_converged is None else round(join_converged, 3),
        "join_bytes_total": join_bytes,
        "join_bytes_per_n_log2_n": round(join_bytes / (n * math.log2(n)), 1),
        "halves_converged_apart": split_ok,
        "heal_known_s": round(heal_known, 3),
        "heal_known_after_link_s": None if heal_after_link is None else round(heal_after_link, 3),
        "heal_hops": heal_hops,
        "heal_converged_s": None if heal_converged is None else round(heal_converged, 3),
        "heal_bytes_total": heal_bytes,
        "heal_bytes_per_n_log2_n": round(heal_bytes / (n * math.log2(n)), 1),
        "topology_memory_kib": round(mem / 1024, 1),
        "record_bytes_mean": round(
            sum(len(r.blob) for r in peers[0].core.topology.records.values()) / (n + 1)
        ),
        "wall_s": round(time.monotonic() - wall0, 1),
    }


def measure_full_mesh(n: int, seed: int) -> dict[str, Any]:
    wall0 = time.monotonic()
    net = MemNet(seed=seed)
    first = net.add_peer()
    for _ in range(n - 1):
        net.add_peer([first.address])
    build = net.run_until_true(
        lambda: net.converged() and all(len(p.conns) == n - 1 for p in net.peers), 120.0, 0.1
    )
    build_bytes = net.bytes_sent
    net.run_for(5.0)
    b0 = net.bytes_sent
    net.run_for(30.0)
    return {
        "peers": n,
        "full_mesh_build_s": build,
        "build_bytes_per_peer": round(build_bytes / n),
        "steady_bytes_per_peer_per_s": round((net.bytes_sent - b0) / n / 30.0, 1),
        "record_bytes_mean": round(
            sum(len(r.blob) for r in first.core.topology.records.values()) / n
        ),
        "topology_memory_kib": round(deep_size(first.core.topology) / 1024, 1),
        "wall_s": round(time.monotonic() - wall0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gossip", description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="100,300,1000", help="comma-separated mesh sizes")
    ap.add_argument("--degree", type=int, default=3, help="targets per launched peer")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--full-mesh", type=int, default=0, help="also a discovery full mesh of N")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.peers.split(",") if x.strip()]
    except ValueError:
        print("bench.gossip: --peers wants integers like 100,300,1000", file=sys.stderr)
        return 2
    if any(s < 2 for s in sizes) or args.degree < 1:
        print("bench.gossip: need at least 2 peers and --degree >= 1", file=sys.stderr)
        return 2
    results = []
    for n in sizes:
        r = measure(n, args.degree, args.seed)
        results.append(r)
        if not args.json:
            print(
                f"n={r['peers']:5d} degree~{r['mean_degree']:.1f}  "
                f"join: all know in {r['join_known_s']:.3f}s ({r['join_hops']} hops), "
                f"identical in {r['join_converged_s']}s, {r['join_bytes_total'] / 1e6:.2f} MB  |  "
                f"heal: {r['heal_known_s']:.2f}s after heal, "
                f"{r['heal_known_after_link_s']}s after first link "
                f"({r['heal_hops']} hops), {r['heal_bytes_total'] / 1e6:.1f} MB  |  "
                f"steady {r['steady_bytes_per_peer_per_s']:.1f} B/s/peer  |  "
                f"topology {r['topology_memory_kib']:.0f} KiB/router  "
                f"[wall {r['wall_s']}s]",
                flush=True,
            )
    out: dict[str, Any] = {"sparse": results}
    if args.full_mesh:
        fm = measure_full_mesh(args.full_mesh, args.seed)
        out["full_mesh"] = fm
        if not args.json:
            print(
                f"full mesh n={fm['peers']}: built in {fm['full_mesh_build_s']}s, "
                f"{fm['build_bytes_per_peer'] / 1e6:.2f} MB/peer to build, steady "
                f"{fm['steady_bytes_per_peer_per_s']:.1f} B/s/peer, record "
                f"{fm['record_bytes_mean']} B, topology {fm['topology_memory_kib']:.0f} KiB "
                f"[wall {fm['wall_s']}s]"
            )
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
