"""IPAM benchmark: consensus time at 3/10/100 peers, allocations per second over HTTP.

    python -m bench.ipam [--peers 3,10,100] [--allocs 2000] [--json]

Consensus runs the real allocator cores on the in-memory gossip network (weft/ipam/sim.py,
latency 2-10 ms per message, fanout 2*log2(n)); every peer starts at t=0 in ``consensus=N`` and
the figure is the simulated time until *every* peer has the ring (and the wall time to simulate
it). Then the same over the real mesh cores (weft/gossip/memnet.py: peers join a star at t=0,
discovery builds the mesh, IPAM rides the "ipam" channel), stepped every 10 ms.
Target: under 5 s simulated at 100 peers (Weave took 15-20 minutes beyond 100 nodes).

Allocations per second go through the real HTTP routes (aiohttp test server on loopback) into
an IpamService with its SQLite store in a temporary directory (WAL, synchronous=FULL, one commit
per allocation), first one request at a time, then 16 in flight; also the bare core's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from weft.gossip.peer import PeerName
from weft.ipam.allocator import AllocationSucceeded, Allocator, InitMode, IpamConfig
from weft.ipam.service import IpamService, setup_routes
from weft.ipam.sim import SimNet


def consensus(n: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    names = sorted({PeerName(0x020000000000 | rng.getrandbits(40)) for _ in range(n)})
    cfg = IpamConfig(init=InitMode("consensus", n))
    t0 = time.perf_counter()
    net = SimNet(seed=seed)
    for name in names:
        net.add_peer(name, cfg)

    def ready() -> bool:
        return all(p.allocator.ready for p in net.peers.values())

    net.run_until(60.0, ready)
    wall = time.perf_counter() - t0
    rings = {tuple(sorted(p.allocator.ring.entries().items())) for p in net.peers.values()}
    return {
        "peers": n,
        "simulated_s": round(net.now, 4),
        "wall_s": round(wall, 3),
        "all_ready": ready(),
        "identical_rings": len(rings) == 1,
        "messages": net.messages,
        "bytes": net.bytes,
    }


def consensus_mesh(n: int, seed: int = 1, step: float = 0.01) -> dict[str, Any]:
    """Consensus over the real mesh cores (memnet): peers join a star, discovery meshes them,
    IPAM agrees; the time includes forming the mesh."""
    from weft.gossip.memnet import MemNet
    from weft.gossip.memnet import SimPeer as MeshPeer
    from weft.ipam.node import IpamNode, MemoryStore

    cfg = IpamConfig(init=InitMode("consensus", n))
    nodes: dict[int, IpamNode] = {}
    net: MemNet

    def on_core(peer: MeshPeer) -> None:
        alloc = Allocator(peer.name, cfg, net.now, random.Random(int(peer.name)))
        node = IpamNode(alloc, MemoryStore(), lambda: net.now)
        node.attach(peer.core.register_channel("ipam", node))
        nodes[peer.index] = node

    t0 = time.perf_counter()
    net = MemNet(seed=seed, on_core=on_core)
    first = net.add_peer()
    for _ in range(n - 1):
        net.add_peer([first.address])
    while not all(nd.allocator.ready for nd in nodes.values()) and net.now < 60.0:
        net.run_for(step)
        for peer in net.alive():
            node = nodes[peer.index]
            node.allocator.peers_changed(peer.core.routes_all.unicast_table(), net.now)
            t = node.allocator.get_timer()
            if t is not None and t <= net.now:
                node.handle_timer()
            else:
                node.pump()
            net._pump(peer)  # what the router's pumping sender does after a send
    return {
        "peers": n,
        "simulated_s": round(net.now, 3),
        "wall_s": round(time.perf_counter() - t0, 2),
        "all_ready": all(nd.allocator.ready for nd in nodes.values()),
        "mesh_messages": net.messages_sent,
    }


async def http_rate(count: int, in_flight: int, data_dir: Path) -> float:
    service = IpamService(PeerName(0x020000000001), IpamConfig(), data_dir)
    app = web.Application()
    setup_routes(app, service)
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
    await client.start_server()
    try:
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with sem:
                r = await client.post(f"/ip/bench-{in_flight}-{i}")
                assert r.status == 200, await r.text()
                await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return count / (time.perf_counter() - t0)
    finally:
        await client.close()
        service.close()


def core_rate(count: int) -> float:
    a = Allocator(PeerName(0x020000000001), IpamConfig(), 0.0)
    while a.next_event() is not None:  # ConsensusReached (a ring of one)
        pass
    t0 = time.perf_counter()
    for i in range(count):
        a.allocate(f"c{i}", None, 0.0)
        ev = a.next_event()
        assert isinstance(ev, AllocationSucceeded)
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="3,10,100")
    ap.add_argument("--allocs", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"consensus": [], "consensus_over_mesh": [], "allocations": {}}
    for n in (int(x) for x in args.peers.split(",")):
        r = consensus(n)
        out["consensus"].append(r)
        if not args.json:
            print(
                f"consensus {n:4d} peers: {r['simulated_s'] * 1000:8.1f} ms simulated, "
                f"{r['wall_s']:6.2f} s wall, {r['messages']} messages, "
                f"ready={r['all_ready']} identical={r['identical_rings']}"
            )
    for n in (int(x) for x in args.peers.split(",")):
        r = consensus_mesh(n)
        out["consensus_over_mesh"].append(r)
        if not args.json:
            print(
                f"consensus over real mesh cores, {n:4d} peers joining at once: "
                f"{r['simulated_s'] * 1000:8.1f} ms simulated (mesh forming included), "
                f"{r['wall_s']:6.2f} s wall, {r['mesh_messages']} mesh messages"
            )
    with tempfile.TemporaryDirectory() as tmp:
        seq = asyncio.run(http_rate(args.allocs, 1, Path(tmp) / "seq"))
        par = asyncio.run(http_rate(args.allocs, 16, Path(tmp) / "par"))
    core = core_rate(args.allocs)
    out["allocations"] = {
        "http_sequential_per_s": round(seq, 1),
        "http_16_in_flight_per_s": round(par, 1),
        "core_only_per_s": round(core, 1),
        "count": args.allocs,
        "store": "sqlite WAL synchronous=FULL, one commit per allocation",
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"allocations over HTTP: {seq:.0f}/s one at a time, {par:.0f}/s 16 in flight "
            f"(core alone {core:.0f}/s), {args.allocs} each"
        )


if __name__ == "__main__":
    main()
