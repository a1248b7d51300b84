"""Synthetic status models for the page's tests, the demo of the page and the 1,000-peer benchmark.

The documents follow docs/ARCHITECTURE.md ("The status model") plus the optional ``ipam`` and
``containers`` sections, so the page and the metrics read them exactly as a router's ``/status``.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["peer_name", "synthetic_status"]

_DATAPATHS = ("ovs", "vxlan", "sleeve")


def peer_name(i: int) -> str:
    """A deterministic 48-bit peer name shown like a MAC: ``ce:00:00:00:00:01``."""
    raw = (0xCE << 40) | i
    return ":".join(f"{(raw >> s) & 0xFF:02x}" for s in range(40, -8, -8))


def synthetic_status(
    n_peers: int,
    *,
    degree: int = 4,
    seed: int = 0,
    encrypted: bool = True,
    partitions: int = 1,
    datapaths: tuple[str, ...] = _DATAPATHS,
    ipam: bool = True,
    containers: int = 2,
    link_attributes: bool = True,
    zones: int = 0,
) -> dict[str, Any]:
    """A consistent status as seen from peer 0 of a mesh of ``n_peers``.

    Peers form ``partitions`` groups (peer 0 in the first); inside a group each peer links to its
    ring neighbour plus random others until about ``degree`` links on average. Every link appears
    in both peers' records (established), peer 0's links also in ``router.connections`` with a
    datapath cycling through ``datapaths``; peers outside peer 0's group are unreachable.
    Records carry each link's datapath, encryption, MTU and data state as routers gossip them
    (issue #17); ``link_attributes=False`` leaves them out, as peers from before that did.
    With ``zones`` every record carries ``labels: {"zone": "zone-<i mod zones>"}`` (as a router
    given a Kubernetes zone label would), and links prefer peers of the same zone.
    """
    if n_peers < 1:
        raise ValueError("n_peers must be at least 1")
    rng = random.Random(seed)
    names = [peer_name(i + 1) for i in range(n_peers)]
    groups: list[list[int]] = [list(range(g, n_peers, partitions)) for g in range(partitions)]
    links: set[tuple[int, int]] = set()
    for members in groups:
        m = len(members)
        if m >= 2:
            before = len(links)
            for k in range(m if m > 2 else 1):
                a, b = members[k], members[(k + 1) % m]
                links.add((min(a, b), max(a, b)))
            extra = max(0, (degree * m) // 2 - (len(links) - before))
            for _ in range(extra * (15 if zones else 3)):
                if extra <= 0:
                    break
                a, b = rng.sample(members, 2)
                if zones and a % zones != b % zones and rng.random() < 0.8:
                    continue
                key = (min(a, b), max(a, b))
                if key not in links:
                    links.add(key)
                    extra -= 1
    neighbours: dict[int, list[int]] = {i: [] for i in range(n_peers)}
    for a, b in sorted(links):
        neighbours[a].append(b)
        neighbours[b].append(a)

    def address(i: int) -> str:
        return f"192.168.{(i >> 8) & 0xFF}.{i & 0xFF or 1}:6783"

    def datapath(a: int, b: int) -> str:
        """Peer 0's links cycle through ``datapaths`` in neighbour order; others by the pair."""
        if 0 in (a, b):
            return datapaths[neighbours[0].index(a + b) % len(datapaths)]
        return datapaths[(a * 31 + b * 17) % len(datapaths)]

    def mtu(dp: str) -> int:
        return 1414 if dp == "sleeve" else 1376

    def entry(i: int, j: int) -> dict[str, Any]:
        e: dict[str, Any] = {
            "name": names[j],
            "address": address(j),
            "outbound": i < j,
            "established": True,
        }
        if link_attributes:
            dp = datapath(min(i, j), max(i, j))
            e.update(datapath=dp, encrypted=encrypted, mtu=mtu(dp), data_state="established")
        return e

    peers = [
        {
            "name": names[i],
            "nickname": f"host-{i + 1:04d}",
            "uid": rng.getrandbits(63),
            "version": rng.randint(1, 50),
            "short_id": (i + 1) & 0xFFF,
            "connections": [entry(i, j) for j in neighbours[i]],
        }
        for i in range(n_peers)
    ]
    if zones:
        for i, p in enumerate(peers):
            p["labels"] = {"zone": f"zone-{i % zones}"}
    connections = [
        {
            "peer": names[j],
            "nickname": f"host-{j + 1:04d}",
            "address": address(j),
            "outbound": j > 0,
            "state": "established",
            "info": "fast datapath healthy" if datapaths[k % len(datapaths)] != "sleeve"
            else "peer has no fast datapath; using sleeve",
            "encrypted": encrypted,
            "datapath": datapaths[k % len(datapaths)],
            "mtu": mtu(datapaths[k % len(datapaths)]),
        }
        for k, j in enumerate(neighbours[0])
    ]
    status: dict[str, Any] = {
        "router": {
            "name": names[0],
            "nickname": "host-0001",
            "uid": peers[0]["uid"],
            "version": peers[0]["version"],
            "encryption": encrypted,
            "port": 6783,
            "peers": peers,
            "connections": connections,
            "targets": [
                {"address": address(j), "state": "connected", "attempts": 0,
                 "next_try": None, "last_error": ""}
                for j in neighbours[0]
            ],
        }
    }
    if ipam:
        reachable = set(groups[0])
        share = (1 << 20) // n_peers
        status["ipam"] = {
            "range": "10.32.0.0/12",
            "entries": [
                {
                    "peer": names[i],
                    "nickname": f"host-{i + 1:04d}",
                    "ranges": [f"10.32.0.0+{i * share}/{share}"],
                    "owned": share,
                    "free": share - (i % 7),
                    "reachable": i in reachable,
                }
                for i in range(n_peers)
            ],
        }
    if containers:
        status["containers"] = [
            {
                "name": f"c{k + 1}",
                "netns": f"/var/run/netns/c{k + 1}",
                "mac": f"aa:bb:cc:00:00:{k + 1:02x}",
                "addresses": [f"10.32.0.{k + 2}/12"],
            }
            for k in range(containers)
        ]
    return status
