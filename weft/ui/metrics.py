"""Prometheus metrics of one router, in its own registry (never prometheus-client's global one).

Two kinds of series:

* **Gauges read from the status model at scrape time** (so ``/metrics`` can never disagree with
  ``/status``): connections by state, datapath and encryption; peers, unreachable peers and
  partitions; IPAM addresses allocated, free and owned by unreachable peers; fast-datapath flows.
* **Counters the router's parts increment** through the named methods of :class:`Metrics`:
  connection terminations by reason, gossip messages and bytes by channel and direction, sleeve
  packets and bytes by direction and drops by reason, datapath fallbacks.

Label values that come from the network or from error texts (reasons, channel names) are
normalised to short ``snake_case`` tokens and capped in number per metric, so a misbehaving peer
cannot blow up the series count; pass short reason codes ("decrypt", "replay", "oversize").

Status fields read (see docs/ARCHITECTURE.md, "The status model"); every one may be absent::

    router.connections[]     {state, datapath, encrypted}
    router.peers[]           {name, connections[{name}]}          -> reachability, partitions
    ipam                     {entries[{peer, owned, free, reachable}]}   (address counts)
    overlay                  {flows}                               (fast-datapath flow count)
"""

from __future__ import annotations

import re
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "CONNECTION_STATES",
    "SLEEVE_DROP_REASONS",
    "Metrics",
    "connection_counts",
    "ipam_counts",
    "label_token",
    "partitions",
]

GetStatus = Callable[[], Mapping[str, Any]]

CONNECTION_STATES = ("established", "pending", "connecting", "retrying", "failed")
SLEEVE_DROP_REASONS = ("decrypt", "replay", "oversize", "malformed")
# Every name and label here is a classic Prometheus name, so the text is valid 0.0.4 exposition,
# which every Prometheus version scrapes (newer prometheus-client labels it 1.0.0 by default).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_LABEL_VALUES = 32  # distinct values per free-text label before the rest become "other"
_TOKEN_RE = re.compile(r"[^a-z0-9]+")


def label_token(text: object, max_len: int = 40) -> str:
    """A free-text reason as a short label value: ``"Wrong password: x"`` -> ``"wrong_password"``.

    Keeps the part before the first ``:``, ``(`` or ``;`` (the detail after it varies per event),
    lowercases it, joins words with ``_``, drops digits-only words and truncates.
    """
    head = re.split(r"[:(;]", str(text), maxsplit=1)[0].lower()
    words = [w for w in _TOKEN_RE.split(head) if w and not w.isdigit()]
    token = "_".join(words)[:max_len].strip("_")
    return token or "unknown"


class _BoundedLabel:
    """Remembers the label values used so far and maps any beyond the cap to ``other``."""

    def __init__(self, cap: int = _MAX_LABEL_VALUES, preset: Iterable[str] = ()) -> None:
        self._cap = cap
        self._seen: set[str] = set(preset)
        self._lock = threading.Lock()  # prometheus-client is thread-safe; stay so

    def __call__(self, text: object) -> str:
        token = label_token(text)
        if token in self._seen:
            return token
        with self._lock:
            if len(self._seen) < self._cap:
                self._seen.add(token)
                return token
        return "other"


# ---------------------------------------------------------------------------------------------
# Pure readers of the status model (also used by tests and the CLI)


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [x for x in value if isinstance(x, Mapping)] if isinstance(value, list) else []


def _router(status: Mapping[str, Any]) -> Mapping[str, Any]:
    router = status.get("router")
    return router if isinstance(router, Mapping) else {}


def _yes_no(value: object) -> str:
    return "yes" if value is True else "no"


def connection_counts(status: Mapping[str, Any]) -> dict[tuple[str, str, str], int]:
    """(state, datapath, encryption "yes"/"no") -> number of the router's own connections."""
    tally: Tally[tuple[str, str, str]] = Tally()
    for conn in _dicts(_router(status).get("connections")):
        state = conn.get("state")
        datapath = conn.get("datapath")
        tally[
            (
                state if isinstance(state, str) and state else "unknown",
                datapath if isinstance(datapath, str) and datapath else "none",
                _yes_no(conn.get("encrypted")),
            )
        ] += 1
    return dict(tally)


def partitions(status: Mapping[str, Any]) -> list[set[str]]:
    """The mesh's connected components, the local peer's first, then by size and name.

    Two peers are joined when each one's gossiped record lists the other (a connection only one
    side still reports is on its way out). Peers named only inside another's connection list
    are included as singletons until their own record arrives.
    """
    router = _router(status)
    listed: dict[str, set[str]] = {}
    for peer in _dicts(router.get("peers")):
        name = peer.get("name")
        if isinstance(name, str):
            listed[name] = {
                c["name"] for c in _dicts(peer.get("connections")) if isinstance(c.get("name"), str)
            }
    parent = {name: name for name in listed}
    for others in listed.values():
        for other in others:
            parent.setdefault(other, other)

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for name, others in listed.items():
        for other in others:
            if name in listed.get(other, ()):
                a, b = find(name), find(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[str, set[str]] = {}
    for name in parent:
        groups.setdefault(find(name), set()).add(name)
    local = router.get("name")
    return sorted(groups.values(), key=lambda g: (local not in g, -len(g), min(g)))


def ipam_counts(status: Mapping[str, Any]) -> dict[str, int] | None:
    """Mesh-wide address counts: allocated, free, unreachable (owned by unreachable peers).

    None when the status has no ``ipam`` section (IPAM not running).
    """
    ipam = status.get("ipam")
    if not isinstance(ipam, Mapping):
        return None
    allocated = free = unreachable = 0
    for entry in _dicts(ipam.get("entries")):
        owned, nfree = entry.get("owned"), entry.get("free")
        owned = owned if isinstance(owned, int) and owned >= 0 else 0
        nfree = nfree if isinstance(nfree, int) and 0 <= nfree <= owned else 0
        if entry.get("reachable", True) is False:
            unreachable += owned
        else:
            allocated += owned - nfree
            free += nfree
    return {"allocated": allocated, "free": free, "unreachable": unreachable}


# ---------------------------------------------------------------------------------------------
# The collector and the counters


class _StatusCollector(Collector):
    """Gauges computed from one ``get_status()`` call per scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # computed per scrape; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        get_status = self._metrics.get_status
        status: Mapping[str, Any] = get_status() if get_status is not None else {}
        if not isinstance(status, Mapping):
            status = {}

        conns = GaugeMetricFamily(
            "weft_connections",
            "The router's connections by state, datapath and encryption.",
            labels=["state", "datapath", "encryption"],
        )
        counts = connection_counts(status)
        # Every known state for each (datapath, encryption) in use, zeros included, so an
        # alert on e.g. state="failed" sees a 0 rather than an absent series.
        for datapath, encryption in sorted({(d, e) for (_, d, e) in counts}):
            for state in CONNECTION_STATES:
                counts.setdefault((state, datapath, encryption), 0)
        for (state, datapath, encryption), n in sorted(counts.items()):
            conns.add_metric([state, datapath, encryption], n)
        yield conns

        groups = partitions(status)
        local = _router(status).get("name")
        reachable = next((len(g) for g in groups if local in g), 0)
        total = sum(len(g) for g in groups)
        yield GaugeMetricFamily("weft_peers", "Peers known from gossip, us included.", total)
        yield GaugeMetricFamily(
            "weft_unreachable_peers",
            "Known peers with no path of mutually reported connections from us.",
            total - reachable,
        )
        yield GaugeMetricFamily(
            "weft_partitions", "Connected components of the mesh as we see it.", len(groups)
        )

        ipam = ipam_counts(status)
        if ipam is not None:
            for key, help_text in (
                ("allocated", "Addresses in use, over all reachable peers' ranges."),
                ("free", "Addresses free, over all reachable peers' ranges."),
                ("unreachable", "Addresses owned by unreachable peers (reclaim with rmpeer)."),
            ):
                yield GaugeMetricFamily(f"weft_ipam_{key}_addresses", help_text, ipam[key])

        flows = self._metrics.fastdp_flow_count(status)
        if flows is not None:
            yield GaugeMetricFamily("weft_fastdp_flows", "Fast-datapath flows installed.", flows)


class Metrics:
    """A router's metrics: its own registry, status-derived gauges and counters to increment.

    Every method is cheap, thread-safe and never raises on odd label text. On hot paths count
    per batch (``sleeve_sent(packets=n, nbytes=b)``), not per packet.
    """

    def __init__(self, get_status: GetStatus | None = None) -> None:
        self.get_status = get_status
        self.registry = CollectorRegistry(auto_describe=False)
        self._flows_source: Callable[[], int] | None = None
        self._reason = _BoundedLabel()
        self._channel = _BoundedLabel(preset=("topology", "ipam", "dns"))
        self._drop_reason = _BoundedLabel(preset=SLEEVE_DROP_REASONS)
        self._datapath = _BoundedLabel(preset=("ovs", "vxlan", "sleeve", "none"))
        reg = self.registry
        self.connection_terminations = Counter(
            "weft_connection_terminations",
            "Connections closed, by reason.",
            ["reason"],
            registry=reg,
        )
        self.gossip_messages = Counter(
            "weft_gossip_messages",
            "Gossip messages by channel and direction (in/out).",
            ["channel", "direction"],
            registry=reg,
        )
        self.gossip_bytes = Counter(
            "weft_gossip_bytes",
            "Gossip payload bytes by channel and direction (in/out).",
            ["channel", "direction"],
            registry=reg,
        )
        self.sleeve_packets = Counter(
            "weft_sleeve_packets",
            "Sleeve UDP packets by direction (in/out).",
            ["direction"],
            registry=reg,
        )
        self.sleeve_bytes = Counter(
            "weft_sleeve_bytes",
            "Sleeve UDP payload bytes by direction (in/out).",
            ["direction"],
            registry=reg,
        )
        self.sleeve_drops = Counter(
            "weft_sleeve_drops",
            "Sleeve packets dropped, by reason (decrypt, replay, oversize, malformed, ...).",
            ["reason"],
            registry=reg,
        )
        self.fallbacks = Counter(
            "weft_datapath_fallbacks",
            "Connections that moved from one datapath to another (e.g. ovs -> sleeve).",
            ["from_datapath", "to_datapath"],
            registry=reg,
        )
        # Cached children for the hot paths, and zero series for the reasons we know.
        self._sleeve_in_packets = self.sleeve_packets.labels("in")
        self._sleeve_out_packets = self.sleeve_packets.labels("out")
        self._sleeve_in_bytes = self.sleeve_bytes.labels("in")
        self._sleeve_out_bytes = self.sleeve_bytes.labels("out")
        for reason in SLEEVE_DROP_REASONS:
            self.sleeve_drops.labels(reason)
        reg.register(_StatusCollector(self))

    # -- status-derived ---------------------------------------------------------------------

    def set_fastdp_flows_source(self, source: Callable[[], int] | None) -> None:
        """Read the fast-datapath flow count from ``source()`` at scrape time.

        Without a source the count comes from the status model's ``overlay.flows`` if present.
        """
        self._flows_source = source

    def fastdp_flow_count(self, status: Mapping[str, Any]) -> int | None:
        if self._flows_source is not None:
            return int(self._flows_source())
        overlay = status.get("overlay")
        flows = overlay.get("flows") if isinstance(overlay, Mapping) else None
        return flows if isinstance(flows, int) and not isinstance(flows, bool) else None

    # -- counters -------------------------------------------------------------------------------

    def connection_terminated(self, reason: str) -> None:
        self.connection_terminations.labels(self._reason(reason)).inc()

    def gossip_sent(self, channel: str, nbytes: int, messages: int = 1) -> None:
        label = self._channel(channel)
        self.gossip_messages.labels(label, "out").inc(messages)
        self.gossip_bytes.labels(label, "out").inc(nbytes)

    def gossip_received(self, channel: str, nbytes: int, messages: int = 1) -> None:
        label = self._channel(channel)
        self.gossip_messages.labels(label, "in").inc(messages)
        self.gossip_bytes.labels(label, "in").inc(nbytes)

    def sleeve_sent(self, packets: int, nbytes: int) -> None:
        self._sleeve_out_packets.inc(packets)
        self._sleeve_out_bytes.inc(nbytes)

    def sleeve_received(self, packets: int, nbytes: int) -> None:
        self._sleeve_in_packets.inc(packets)
        self._sleeve_in_bytes.inc(nbytes)

    def sleeve_dropped(self, reason: str, packets: int = 1) -> None:
        self.sleeve_drops.labels(self._drop_reason(reason)).inc(packets)

    def fallback(self, from_datapath: str, to_datapath: str) -> None:
        self.fallbacks.labels(self._datapath(from_datapath), self._datapath(to_datapath)).inc()

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE
