"""Routes over the topology: unicast next hops and per-source broadcast trees (no I/O).

Breadth-first search, visiting each layer in name order so every peer with the same topology
computes the same routes (Weave's ``routes.go``). Two variants:

* ``data=True``: only connections the owner marks *established* and that are *symmetric* (the
  remote's record lists the owner too). The overlay forwards container traffic along these.
* ``data=False`` ("all"): every announced connection. Gossip (unicast/broadcast channels) uses it,
  so control traffic flows before data paths are proven.

Broadcast from source ``s`` uses Weave's implicit spanning tree: run the BFS from ``s`` until it
reaches us; our next hops are our neighbours that BFS has not reached yet. With consistent
topologies every peer receives each broadcast exactly once.

Routes are computed lazily: the unicast table on first use, broadcast hops per source on first
use, both cached until the topology changes (a new :class:`Routes` is built).
"""

from __future__ import annotations

from collections.abc import Mapping

from weft.gossip.peer import PeerName
from weft.gossip.topology import PeerRecord

__all__ = ["Routes"]


class Routes:
    """Routes for one peer over one snapshot of records. Implements ``RoutesView``."""

    def __init__(
        self, ourself: PeerName, records: Mapping[PeerName, PeerRecord], *, data: bool
    ) -> None:
        self.ourself = ourself
        self.data = data
        self._records = records
        self._adj: dict[PeerName, list[PeerName]] | None = None
        self._unicast: dict[PeerName, PeerName] | None = None
        self._broadcast: dict[PeerName, list[PeerName]] = {}
        self._distances: dict[PeerName, dict[PeerName, int]] = {}

    def _adjacency(self) -> dict[PeerName, list[PeerName]]:
        if self._adj is None:
            recs = self._records
            adj: dict[PeerName, list[PeerName]] = {}
            for name, rec in recs.items():
                if self.data:
                    nbrs = [
                        c.name
                        for c in rec.connections
                        if c.established
                        and (other := recs.get(c.name)) is not None
                        and name in other.conn_names
                    ]
                else:
                    nbrs = [c.name for c in rec.connections if c.name in recs]
                nbrs.sort()
                adj[name] = nbrs
            self._adj = adj
        return self._adj

    def _bfs(
        self, start: PeerName, stop_at: PeerName | None
    ) -> tuple[bool, dict[PeerName, PeerName | None]]:
        adj = self._adjacency()
        routes: dict[PeerName, PeerName | None] = {start: None}
        worklist = [start]
        while worklist:
            worklist.sort()
            nxt: list[PeerName] = []
            for cur in worklist:
                if cur == stop_at:
                    return True, routes
                via = routes[cur]
                for nb in adj.get(cur, ()):
                    if nb in routes:
                        continue
                    routes[nb] = nb if via is None else via
                    nxt.append(nb)
            worklist = nxt
        return False, routes

    def _unicast_table(self) -> dict[PeerName, PeerName]:
        if self._unicast is None:
            _, routes = self._bfs(self.ourself, None)
            self._unicast = {dst: hop for dst, hop in routes.items() if hop is not None}
        return self._unicast

    # --- RoutesView -------------------------------------------------------------------------

    def unicast_next_hop(self, dst: PeerName) -> PeerName | None:
        """The neighbour to send to for ``dst``; None for ourselves or when unreachable."""
        return self._unicast_table().get(dst)

    def broadcast_next_hops(self, src: PeerName) -> list[PeerName]:
        """Neighbours to forward a broadcast originated by ``src`` to (sorted)."""
        hops = self._broadcast.get(src)
        if hops is None:
            adj = self._adjacency()
            if src == self.ourself:
                hops = list(adj.get(self.ourself, ()))
            elif src not in adj:
                hops = []
            else:
                found, reached = self._bfs(src, self.ourself)
                hops = [n for n in adj.get(self.ourself, ()) if n not in reached] if found else []
            self._broadcast[src] = hops
        return list(hops)

    def may_relay(self, src: PeerName, via: PeerName) -> bool:
        """Whether traffic from ``src`` may come to us from our neighbour ``via``: ``via`` is
        ``src``, or ``via`` is one hop closer to ``src`` than we are, i.e. some shortest path
        from ``src`` to us ends ``via -> us``. Unicast relays forward along shortest paths and a
        broadcast from ``src`` comes down its BFS tree, so with consistent topologies every
        legitimate claim passes; a neighbour naming a source it cannot be relaying for fails."""
        if via == src:
            return True
        if via not in self._adjacency().get(self.ourself, ()):
            return False
        dist = self._distances.get(src)
        if dist is None:
            dist = self._distances[src] = self._bfs_distances(src)
        d_via, d_us = dist.get(via), dist.get(self.ourself)
        return d_via is not None and d_us is not None and d_via + 1 == d_us

    def _bfs_distances(self, start: PeerName) -> dict[PeerName, int]:
        adj = self._adjacency()
        dist = {start: 0}
        layer = [start]
        while layer:
            nxt: list[PeerName] = []
            for cur in layer:
                for nb in adj.get(cur, ()):
                    if nb not in dist:
                        dist[nb] = dist[cur] + 1
                        nxt.append(nb)
            layer = nxt
        return dist

    # --- extras -----------------------------------------------------------------------------

    def reachable(self) -> set[PeerName]:
        """Peers (other than us) we have a route to."""
        return set(self._unicast_table())

    def unicast_table(self) -> dict[PeerName, PeerName]:
        """Copy of dst -> next hop for every reachable peer."""
        return dict(self._unicast_table())
