"""Prometheus metrics of one router, in its own registry (never prometheus-client's global one).

Two kinds of series:

* **Gauges read from the status model at scrape time** (so ``/metrics`` can never disagree with
  ``/status``): connections by state, datapath and encryption; peers, unreachable peers and
  partitions; IPAM addresses owned, free and allocated here, and owned by unreachable peers;
  fast-datapath flows.
* **Counters**, each the sum of what the status model's own monotonic counters say at scrape time
  and of what the router's parts add through the named methods of :class:`Metrics`: connection
  terminations by reason (``connection_terminated``, wired by the daemon to the router's
  ``on_connection_closed``), other connection events (``router.counters`` except ``closed_*``),
  sleeve packets, frames, bytes by direction and drops by reason (``overlay.stats`` /
  ``overlay.drops``), mesh messages and bytes by direction and topology records
  (``set_mesh_stats_source``, e.g. ``MeshCore.stats``), gossip messages and bytes by channel and
  direction, datapath fallbacks.
  A part that already reports a count in the status needs no wiring at all.

Label values that come from the network or from error texts (reasons, channel names) are
normalised to short ``snake_case`` tokens and capped in number per metric, so a misbehaving peer
cannot blow up the series count; pass short reason codes ("tampered", "replayed", "oversize").

Status fields read (see docs/ARCHITECTURE.md, "The status model"); every one may be absent::

    router.connections[]     {state, datapath, encrypted}
    router.peers[]           {name, connections[{name}]}          -> reachability, partitions
    router.counters          {accepted: n, dial_failed: n, ...}   (closed_* ignored, see above)
    ipam                     {allocated, unreachable, entries[{peer, owned, free, reachable}]}
    overlay                  {flows, drops{reason: n},
                              stats{messages_in, messages_out, tap_frames_in, tap_frames_out,
                                    bytes_in, bytes_out}}           (each one optional)
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from weft import __version__
from weft.switch.core import FALLBACK_REASONS

__all__ = [
    "CONNECTION_STATES",
    "DATAPATH_LABELS",
    "DIAL_FAILURE_REASONS",
    "HANDSHAKE_FAILURE_REASONS",
    "PER_PEER_LIMIT",
    "SLEEVE_DROP_REASONS",
    "Metrics",
    "connection_counts",
    "ipam_counts",
    "label_token",
    "partitions",
    "peer_rows",
]

log = logging.getLogger(__name__)

GetStatus = Callable[[], Mapping[str, Any]]

CONNECTION_STATES = ("established", "degraded", "pending", "connecting", "retrying", "failed")
# The sleeve's own drop labels (weft/sleeve/core.py, weft/gossip/crypto.py) that always
# get a series, zero included: "tampered" is a packet that failed to decrypt/authenticate,
# "replayed" and "too_old" fail the replay window.
SLEEVE_DROP_REASONS = ("tampered", "replayed", "too_old", "oversize", "malformed", "truncated")
# Every name and label here is a classic Prometheus name, so the text is valid 0.0.4 exposition,
# which every Prometheus version scrapes (newer prometheus-client labels it 1.0.0 by default).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DATAPATH_LABELS = ("ovs", "vxlan", "sleeve", "none")
# Reasons that always get a series (zero included), so rate() and absent-free alerts work from
# the first scrape: the router's dial codes (errno texts, timeout, refused_*) and the
# handshake's own labels (weft.gossip.handshake HandshakeError.reason).
DIAL_FAILURE_REASONS = ("connection_refused", "timeout", "no_route_to_host", "name_resolution")
HANDSHAKE_FAILURE_REASONS = (
    "wrong_password",
    "version_mismatch",
    "encryption_mismatch",
    "identity_not_proven",
    "timeout",
)
# At most this many connections get per-connection (peer-labelled) series; see peer_rows.
PER_PEER_LIMIT = 64
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
    """This router's address counts: owned, free, allocated, and unreachable (mesh-wide).

    ``owned``/``free`` are the local peer's entry; ``allocated`` is ``ipam.allocated`` (the
    addresses our containers hold) or else owned - free; ``unreachable`` is ``ipam.unreachable``
    or else the sum owned by unreachable entries. Per router, so that summing the series of all
    routers gives the mesh's totals (except ``unreachable``, which every router sees alike).
    None when the status has no ``ipam`` section (IPAM not running).
    """
    ipam = status.get("ipam")
    if not isinstance(ipam, Mapping):
        return None
    local = _router(status).get("name")
    owned = free = unreachable = 0
    for entry in _dicts(ipam.get("entries")):
        n_owned, n_free = _count(entry.get("owned")), _count(entry.get("free"))
        n_free = min(n_free, n_owned)
        if entry.get("reachable", True) is False:
            unreachable += n_owned
        if entry.get("peer") == local:
            owned, free = n_owned, n_free
    allocated = ipam.get("allocated")
    total_unreachable = ipam.get("unreachable")
    return {
        "owned": owned,
        "free": free,
        "allocated": _count(allocated) if _is_count(allocated) else owned - free,
        "unreachable": (_count(total_unreachable) if _is_count(total_unreachable) else unreachable),
    }


def peer_rows(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The connection rows that name a peer, one per peer (the first: live rows come before
    failure rows), sorted by peer name. Dial rows with no peer yet are left out."""
    seen: dict[str, Mapping[str, Any]] = {}
    for conn in _dicts(_router(status).get("connections")):
        peer = conn.get("peer")
        if isinstance(peer, str) and peer and peer not in seen:
            seen[peer] = conn
    return [seen[p] for p in sorted(seen)]


def mesh_ipam_counts(status: Mapping[str, Any]) -> dict[str, int] | None:
    """Mesh-wide address counts: ``range`` (size of the allocation range), ``owned`` (in some
    peer's ranges), ``free`` (free in those, as each owner last announced), ``unowned`` (the rest
    of the range: nobody's yet, e.g. before consensus), ``unreachable`` (owned by unreachable
    peers). None without an ``ipam`` section."""
    import ipaddress

    ipam = status.get("ipam")
    if not isinstance(ipam, Mapping):
        return None
    owned = free = unreachable = 0
    for entry in _dicts(ipam.get("entries")):
        n_owned = _count(entry.get("owned"))
        owned += n_owned
        free += min(_count(entry.get("free")), n_owned)
        if entry.get("reachable", True) is False:
            unreachable += n_owned
    try:
        size = ipaddress.ip_network(str(ipam.get("range")), strict=False).num_addresses
    except ValueError:
        size = owned
    return {
        "range": size,
        "owned": owned,
        "free": free,
        "unowned": max(0, size - owned),
        "unreachable": unreachable,
    }


def reason_code(text: object) -> str:
    """Why a datapath or kernel feature is unavailable, as a short label value."""
    low = str(text).lower()
    for needle, code in (
        ("no esp", "no_esp"),
        ("not permitted", "not_permitted"),
        ("permission denied", "not_permitted"),
        ("not supported", "not_supported"),
        ("not loaded", "module_missing"),
        ("no such file", "module_missing"),
        ("not in this build", "not_built"),
        ("not used", "disabled"),
        ("below the container mtu", "mtu_too_small"),
        ("address already in use", "port_in_use"),
    ):
        if needle in low:
            return code
    # "vxlan: <why>": the datapath prefix says nothing
    return label_token(re.sub(r"^(ovs|vxlan|sleeve|encrypted):\s*", "", low))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# ---------------------------------------------------------------------------------------------
# The collector and the counters


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class _Family:
    name: str  # without the _total suffix (prometheus-client adds it)
    help: str
    labels: tuple[str, ...]


_TERMINATIONS = _Family(
    "weft_connection_terminations", "Connections closed, by reason.", ("reason",)
)
_CONN_EVENTS = _Family(
    "weft_connection_events",
    "Other connection events of the router (accepted, dial_failed, refused_conn_limit,"
    " refused_unauth_limit, refused_unauth_per_source, unauth_evicted, ...).",
    ("event",),
)
_GOSSIP_MESSAGES = _Family(
    "weft_gossip_messages",
    "Gossip messages by channel and direction (in/out).",
    ("channel", "direction"),
)
_GOSSIP_BYTES = _Family(
    "weft_gossip_bytes",
    "Gossip payload bytes by channel and direction (in/out).",
    ("channel", "direction"),
)
_SLEEVE_PACKETS = _Family(
    "weft_sleeve_packets", "Sleeve UDP packets by direction (in/out).", ("direction",)
)
_SLEEVE_FRAMES = _Family(
    "weft_sleeve_frames",
    "Ethernet frames carried by the sleeve, by direction (in/out).",
    ("direction",),
)
_SLEEVE_BYTES = _Family(
    "weft_sleeve_bytes", "Sleeve UDP payload bytes by direction (in/out).", ("direction",)
)
_SLEEVE_DROPS = _Family(
    "weft_sleeve_drops",
    "Sleeve packets dropped, by reason (tampered = failed to decrypt, replayed, oversize, ...).",
    ("reason",),
)
_FALLBACKS = _Family(
    "weft_datapath_fallbacks",
    "Connections that moved to a worse datapath (e.g. vxlan -> sleeve), by why the better one"
    " went: heartbeat_lost, peer_heartbeat_lost, mtu, unavailable.",
    ("from_datapath", "to_datapath", "reason"),
)
_DIAL_FAILURES = _Family(
    "weft_dial_failures",
    "Outbound dials that got no TCP connection, by reason (connection_refused, timeout, ...).",
    ("reason",),
)
_HANDSHAKE_FAILURES = _Family(
    "weft_handshake_failures",
    "Connections closed before their handshake completed, by reason (wrong_password, ...).",
    ("reason",),
)
_FASTDP_FRAMES = _Family(
    "weft_fastdp_frames",
    "Frames a kernel fast datapath (vxlan, ovs) carried, by direction (in/out); the tunnel"
    " device's counters.",
    ("datapath", "direction"),
)
_FASTDP_BYTES = _Family(
    "weft_fastdp_bytes",
    "Bytes of the frames a kernel fast datapath carried, by direction (in/out).",
    ("datapath", "direction"),
)
_CONN_CONTROL_BYTES = _Family(
    "weft_connection_control_bytes",
    "Bytes on a connection's control (TCP) connection, by peer and direction (bounded peers).",
    ("peer", "direction"),
)
_MESH_MESSAGES = _Family(
    "weft_mesh_messages",
    "Mesh control messages (all tags) by direction (in/out).",
    ("direction",),
)
_MESH_BYTES = _Family(
    "weft_mesh_bytes",
    "Mesh control message payload bytes by direction (in/out).",
    ("direction",),
)
_TOPOLOGY_RECORDS = _Family(
    "weft_topology_records",
    "Topology records sent, received, received that were new, refused (beyond the bounds, another"
    " key than the one bound to the name, version out of range), and skipped (not newer).",
    ("event",),
)
_COUNTER_FAMILIES = (
    _MESH_MESSAGES,
    _MESH_BYTES,
    _TOPOLOGY_RECORDS,
    _TERMINATIONS,
    _CONN_EVENTS,
    _GOSSIP_MESSAGES,
    _GOSSIP_BYTES,
    _SLEEVE_PACKETS,
    _SLEEVE_FRAMES,
    _SLEEVE_BYTES,
    _SLEEVE_DROPS,
    _FALLBACKS,
    _DIAL_FAILURES,
    _HANDSHAKE_FAILURES,
    _FASTDP_FRAMES,
    _FASTDP_BYTES,
    _CONN_CONTROL_BYTES,
)


def _status_counters(status: Mapping[str, Any]) -> dict[str, Tally[tuple[str, ...]]]:
    """Counts the status model reports itself, keyed by family name."""
    out: dict[str, Tally[tuple[str, ...]]] = {f.name: Tally() for f in _COUNTER_FAMILIES}
    for key, value in _mapping(_router(status).get("counters")).items():
        if not isinstance(key, str):
            continue
        # closed_<label> are terminations, which reach us through connection_terminated (the
        # daemon wires it to the router's on_connection_closed): counting them here too would
        # count them twice.
        if not key.startswith("closed_"):
            out[_CONN_EVENTS.name][(key,)] += _count(value)
    overlay = _mapping(status.get("overlay"))
    stats = _mapping(overlay.get("stats"))
    for direction in ("in", "out"):
        for family, key in (
            (_SLEEVE_PACKETS, f"messages_{direction}"),
            (_SLEEVE_FRAMES, f"tap_frames_{direction}"),
            (_SLEEVE_BYTES, f"bytes_{direction}"),
        ):
            if key in stats:
                out[family.name][(direction,)] += _count(stats[key])
    for reason, value in _mapping(overlay.get("drops")).items():
        if isinstance(reason, str):
            out[_SLEEVE_DROPS.name][(reason,)] += _count(value)
    failures = _mapping(_router(status).get("failures"))
    for kind, family in (("dial", _DIAL_FAILURES), ("handshake", _HANDSHAKE_FAILURES)):
        for reason, value in _mapping(failures.get(kind)).items():
            if isinstance(reason, str):
                out[family.name][(label_token(reason),)] += _count(value)
    switch = _mapping(overlay.get("switch"))
    for row in _dicts(switch.get("fallback_reasons")):
        labels = tuple(label_token(row.get(k)) for k in ("from", "to", "reason"))
        out[_FALLBACKS.name][labels] += _count(row.get("count"))
    for datapath in ("ovs", "vxlan"):
        traffic = _mapping(_mapping(switch.get(datapath)).get("traffic"))
        for direction in ("in", "out"):
            for family, key in ((_FASTDP_FRAMES, "frames"), (_FASTDP_BYTES, "bytes")):
                if f"{key}_{direction}" in traffic:
                    value = _count(traffic[f"{key}_{direction}"])
                    out[family.name][(datapath, direction)] += value
    return out


# MeshStats attribute -> (family, labels); read duck-typed from set_mesh_stats_source's object.
_MESH_STATS = {
    "messages_sent": (_MESH_MESSAGES, ("out",)),
    "messages_received": (_MESH_MESSAGES, ("in",)),
    "bytes_sent": (_MESH_BYTES, ("out",)),
    "bytes_received": (_MESH_BYTES, ("in",)),
    "records_sent": (_TOPOLOGY_RECORDS, ("sent",)),
    "records_received": (_TOPOLOGY_RECORDS, ("received",)),
    "records_new": (_TOPOLOGY_RECORDS, ("new",)),
    "records_refused": (_TOPOLOGY_RECORDS, ("refused",)),
    "records_skipped": (_TOPOLOGY_RECORDS, ("skipped",)),
}


def _mesh_counters(stats: object) -> dict[str, Tally[tuple[str, ...]]]:
    out: dict[str, Tally[tuple[str, ...]]] = {f.name: Tally() for f in _COUNTER_FAMILIES}
    if stats is None:
        return out
    for attr, (family, labels) in _MESH_STATS.items():
        value = stats.get(attr) if isinstance(stats, Mapping) else getattr(stats, attr, None)
        out[family.name][labels] += _count(value)
    # per gossip channel: MeshStats.by_channel = {channel: [msgs in, bytes in, msgs out, bytes out]}
    by_channel = (
        stats.get("by_channel")
        if isinstance(stats, Mapping)
        else getattr(stats, "by_channel", None)
    )
    if isinstance(by_channel, Mapping):
        for channel, row in by_channel.items():
            if not isinstance(row, (list, tuple)) or len(row) != 4:
                continue
            for (family, direction), value in zip(
                (
                    (_GOSSIP_MESSAGES, "in"),
                    (_GOSSIP_BYTES, "in"),
                    (_GOSSIP_MESSAGES, "out"),
                    (_GOSSIP_BYTES, "out"),
                ),
                row,
                strict=True,
            ):
                out[family.name][(str(channel)[:64], direction)] += _count(value)
    return out


class _StatusCollector(Collector):
    """Every family, computed from one ``get_status()`` call per scrape plus the tallies."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # computed per scrape; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        get_status = self._metrics.get_status
        status: Mapping[str, Any] = {}
        ok = 0
        if get_status is not None:
            try:
                got = get_status()
            except Exception:  # a broken status producer must not take /metrics down with it
                log.exception("reading the status for /metrics failed")
            else:
                if isinstance(got, Mapping):
                    status, ok = got, 1
        yield GaugeMetricFamily(
            "weft_status_up", "1 if this scrape could read the router's status model.", ok
        )

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
                ("owned", "Addresses in this router's ranges of the allocation range."),
                ("free", "Addresses free in this router's ranges."),
                ("allocated", "Addresses this router has given to containers."),
                ("unreachable", "Addresses owned by unreachable peers (reclaim with rmpeer)."),
            ):
                yield GaugeMetricFamily(f"weft_ipam_{key}_addresses", help_text, ipam[key])

        flows = self._metrics.fastdp_flow_count(status)
        if flows is not None:
            yield GaugeMetricFamily("weft_fastdp_flows", "Fast-datapath flows installed.", flows)

        yield from self._mesh_ipam(status)
        yield from self._build_and_containers(status)
        yield from self._datapaths(status)
        per_peer, control_bytes = self._per_connection(status)
        yield from per_peer

        from_status = _status_counters(status)
        from_mesh = _mesh_counters(self._metrics.mesh_stats())
        tallies = self._metrics.tallies()
        from_status[_CONN_CONTROL_BYTES.name] = control_bytes
        preset = _preset_counters(status)
        for family in _COUNTER_FAMILIES:
            values: Tally[tuple[str, ...]] = Tally()
            for part in (preset, from_status, from_mesh, tallies):
                values.update(part[family.name])  # update, unlike +, keeps zero counts
            if family is _SLEEVE_DROPS:
                for reason in SLEEVE_DROP_REASONS:
                    values.setdefault((reason,), 0)
            elif family is _SLEEVE_PACKETS or family is _SLEEVE_BYTES:
                for direction in ("in", "out"):
                    values.setdefault((direction,), 0)
            metric = CounterMetricFamily(family.name, family.help, labels=list(family.labels))
            for labels, value in sorted(values.items()):
                metric.add_metric(list(labels), value)
            yield metric

    # -- gauge groups ------------------------------------------------------------------------

    def _mesh_ipam(self, status: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
        mesh = mesh_ipam_counts(status)
        if mesh is None:
            return
        yield GaugeMetricFamily(
            "weft_ipam_range_addresses", "Addresses in the mesh's allocation range.", mesh["range"]
        )
        family = GaugeMetricFamily(
            "weft_ipam_mesh_addresses",
            "The whole allocation range as this router sees it: owned (by some peer), free (in"
            " owned ranges), unowned (nobody's yet), unreachable (owned by unreachable peers).",
            labels=["state"],
        )
        for key in ("owned", "free", "unowned", "unreachable"):
            family.add_metric([key], mesh[key])
        yield family
        ipam = _mapping(status.get("ipam"))
        if "ready" in ipam:
            yield GaugeMetricFamily(
                "weft_ipam_ready",
                "1 once the range is divided (consensus reached or seeded), else 0.",
                1 if ipam.get("ready") is True else 0,
            )

    def _build_and_containers(self, status: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
        import platform

        router = _router(status)
        info = GaugeMetricFamily(
            "weft_build_info",
            "Always 1; the labels say which weft this is.",
            labels=["version", "protocol", "python"],
        )
        protocol = router.get("protocol")
        info.add_metric(
            [__version__, protocol if isinstance(protocol, str) else "", platform.python_version()],
            1,
        )
        yield info
        if "encryption" in router:
            yield GaugeMetricFamily(
                "weft_encrypted",
                "1 if the mesh is encrypted (a password is set), 0 for a plaintext mesh.",
                1 if router.get("encryption") is True else 0,
            )
        containers = status.get("containers")
        if isinstance(containers, list):
            yield GaugeMetricFamily(
                "weft_containers", "Containers attached to this router's bridge.", len(containers)
            )

    def _datapaths(self, status: Mapping[str, Any]) -> Iterator[GaugeMetricFamily]:
        """Kernel capabilities and the datapaths that run, each 1/0 with why not."""
        overlay = _mapping(status.get("overlay"))
        switch = _mapping(overlay.get("switch"))
        caps = _mapping(switch.get("capabilities"))
        if caps:
            family = GaugeMetricFamily(
                "weft_datapath_capability",
                "Kernel features the fast datapaths need (openvswitch, vxlan, esp), probed at"
                " start: 1 available, 0 not, with why not.",
                labels=["capability", "reason"],
            )
            for name in ("openvswitch", "vxlan", "esp"):
                feature = _mapping(caps.get(name))
                ok = feature.get("available") is True
                reason = "available" if ok else self._metrics.reason(feature.get("detail"))
                family.add_metric([name, reason], 1 if ok else 0)
            yield family
        if not overlay:
            return
        running = switch.get("datapaths")
        running = [d for d in running if isinstance(d, str)] if isinstance(running, list) else []
        family = GaugeMetricFamily(
            "weft_datapath_available",
            "Datapaths this router runs (1) or cannot (0, with why not); sleeve always runs.",
            labels=["datapath", "reason"],
        )
        if switch:
            notes = str(switch.get("note") or "")
            for name in ("ovs", "vxlan"):
                part = _mapping(switch.get(name))
                if name in running and not part.get("problem"):
                    family.add_metric([name, "available"], 1)
                    continue
                why = part.get("problem") or next(
                    (n for n in notes.split("; ") if n.startswith(f"{name}:")), notes
                )
                if overlay.get("datapath") == "sleeve":
                    why = "not used (--datapath sleeve)"
                family.add_metric([name, self._metrics.reason(why or "not built")], 0)
        family.add_metric(["sleeve", "available"], 1)
        yield family

    def _per_connection(
        self, status: Mapping[str, Any]
    ) -> tuple[list[GaugeMetricFamily], Tally[tuple[str, ...]]]:
        """Per-connection gauges for at most ``per_peer_limit`` peers, and the per-peer
        control-byte counts for the counter loop."""
        rows = peer_rows(status)
        chosen = self._metrics.peer_slots([str(r["peer"]) for r in rows])
        by_peer = [r for r in rows if r["peer"] in chosen]
        info = GaugeMetricFamily(
            "weft_connection_info",
            "One per connection with per-peer series: always 1; nickname and address as labels.",
            labels=["peer", "nickname", "address", "direction"],
        )
        state = GaugeMetricFamily(
            "weft_connection_state",
            "1 for the connection's current state, 0 for the others.",
            labels=["peer", "state"],
        )
        datapath = GaugeMetricFamily(
            "weft_connection_datapath",
            "1 for the datapath carrying the connection, 0 for the others.",
            labels=["peer", "datapath"],
        )
        encrypted = GaugeMetricFamily(
            "weft_connection_encrypted",
            "1 if all the connection carries is encrypted.",
            labels=["peer"],
        )
        mtu = GaugeMetricFamily(
            "weft_connection_mtu_bytes", "The connection's overlay MTU.", labels=["peer"]
        )
        heard = GaugeMetricFamily(
            "weft_connection_heard_seconds",
            "Seconds since the carrying datapath's heartbeat was last answered.",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            "weft_connection_rtt_seconds",
            "Round trip of the carrying datapath's last answered heartbeat.",
            labels=["peer"],
        )
        control: Tally[tuple[str, ...]] = Tally()
        for row in by_peer:
            peer = str(row["peer"])
            nickname, address = row.get("nickname"), row.get("address")
            info.add_metric(
                [
                    peer,
                    nickname if isinstance(nickname, str) else "",
                    address if isinstance(address, str) else "",
                    "out" if row.get("outbound") else "in",
                ],
                1,
            )
            current = row.get("state")
            for name in CONNECTION_STATES:
                state.add_metric([peer, name], 1 if current == name else 0)
            dp = row.get("datapath") or "none"
            for name in DATAPATH_LABELS:
                datapath.add_metric([peer, name], 1 if dp == name else 0)
            encrypted.add_metric([peer], 1 if row.get("encrypted") is True else 0)
            for family, key in ((mtu, "mtu"), (heard, "heard"), (rtt, "rtt")):
                value = row.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric([peer], float(value))
            stats = _mapping(row.get("stats"))
            for direction in ("in", "out"):
                if f"bytes_{direction}" in stats:
                    control[(peer, direction)] += _count(stats[f"bytes_{direction}"])
        out = [info, state, datapath, encrypted, mtu, heard, rtt]
        out.append(
            GaugeMetricFamily(
                "weft_connection_series_omitted",
                f"Connections beyond the per-peer series limit ({self._metrics.per_peer_limit}):"
                " counted in weft_connections and the _max gauges only.",
                len(rows) - len(by_peer),
            )
        )
        for key, help_text in (
            ("heard", "The largest weft_connection_heard_seconds of all connections (no limit)."),
            ("rtt", "The largest weft_connection_rtt_seconds of all connections (no limit)."),
        ):
            values = [
                float(r[key])
                for r in rows
                if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
            ]
            if values:
                out.append(
                    GaugeMetricFamily(f"weft_connection_{key}_max_seconds", help_text, max(values))
                )
        return out, control


def _preset_counters(status: Mapping[str, Any]) -> dict[str, Tally[tuple[str, ...]]]:
    """Zero series that exist before the first event, so alerts see 0 rather than nothing."""
    out: dict[str, Tally[tuple[str, ...]]] = {f.name: Tally() for f in _COUNTER_FAMILIES}
    for reason in DIAL_FAILURE_REASONS:
        out[_DIAL_FAILURES.name][(reason,)] = 0
    for reason in HANDSHAKE_FAILURE_REASONS:
        out[_HANDSHAKE_FAILURES.name][(reason,)] = 0
    switch = _mapping(_mapping(status.get("overlay")).get("switch"))
    running = switch.get("datapaths")
    fast = (
        [d for d in running if d in ("ovs", "vxlan")]
        if isinstance(running, list)
        else ["ovs", "vxlan"]
    )
    for i, old in enumerate(fast):
        for new in [*fast[i + 1 :], "sleeve"]:
            for reason in FALLBACK_REASONS:
                out[_FALLBACKS.name][(old, new, reason)] = 0
    for datapath in fast if isinstance(running, list) else ():
        for direction in ("in", "out"):
            out[_FASTDP_FRAMES.name][(datapath, direction)] = 0
            out[_FASTDP_BYTES.name][(datapath, direction)] = 0
    return out


class Metrics:
    """A router's metrics: its own registry, status-derived series and counters to increment.

    Every method is cheap, thread-safe and never raises on odd label text. On hot paths count
    per batch (``sleeve_sent(packets=n, nbytes=b)``), not per packet. Counts the status model
    already carries (see the module docstring) must not also be reported here: they would be
    counted twice.
    """

    def __init__(
        self,
        get_status: GetStatus | None = None,
        *,
        per_peer_limit: int = PER_PEER_LIMIT,
        process_collectors: bool = True,
    ) -> None:
        self.get_status = get_status
        self.per_peer_limit = per_peer_limit
        self._slots: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        if process_collectors:
            # the standard process_*, python_info and python_gc_* series, in our own registry
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._flows_source: Callable[[], int] | None = None
        self._mesh_stats_source: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._tallies: dict[str, Tally[tuple[str, ...]]] = {
            f.name: Tally() for f in _COUNTER_FAMILIES
        }
        self._reason = _BoundedLabel()
        self._channel = _BoundedLabel(preset=("topology", "ipam", "dns"))
        self._drop_reason = _BoundedLabel(preset=SLEEVE_DROP_REASONS)
        self._datapath = _BoundedLabel(preset=DATAPATH_LABELS)
        self._fallback_reason = _BoundedLabel(preset=FALLBACK_REASONS)
        self._capability_reason = _BoundedLabel()
        self.registry.register(_StatusCollector(self))

    def reason(self, text: object) -> str:
        """:func:`reason_code` of ``text``, bounded in number like every free-text label."""
        code = reason_code(text)
        return code if code == "available" else self._capability_reason(code)

    def peer_slots(self, peers: Iterable[str]) -> set[str]:
        """The peers that get per-connection series: at most ``per_peer_limit``. A peer keeps
        its slot while it has a connection row (series stay put as others come and go); free
        slots go to new peers in name order."""
        present = set(peers)
        with self._lock:
            self._slots &= present
            for peer in sorted(present - self._slots):
                if len(self._slots) >= self.per_peer_limit:
                    break
                self._slots.add(peer)
            return set(self._slots)

    def set_mesh_stats_source(self, source: Callable[[], object] | None) -> None:
        """Read mesh counters at scrape time from ``source()``: an object or mapping with
        ``messages_sent``, ``messages_received``, ``bytes_sent``, ``bytes_received``,
        ``records_sent``, ``records_received``, ``records_new`` (``MeshCore.stats``)."""
        self._mesh_stats_source = source

    def mesh_stats(self) -> object:
        source = self._mesh_stats_source
        return source() if source is not None else None

    def bind_status(self, get_status: GetStatus) -> None:
        """Read the status model from ``get_status`` (for metrics made before the router)."""
        self.get_status = get_status

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

    def _add(self, family: _Family, labels: tuple[str, ...], n: int) -> None:
        if n > 0:
            with self._lock:
                self._tallies[family.name][labels] += n

    def tallies(self) -> dict[str, Tally[tuple[str, ...]]]:
        """A copy of what was added through the methods, per family."""
        with self._lock:
            return {name: Tally(t) for name, t in self._tallies.items()}

    def connection_terminated(self, reason: str) -> None:
        self._add(_TERMINATIONS, (self._reason(reason),), 1)

    def gossip_sent(self, channel: str, nbytes: int, messages: int = 1) -> None:
        label = self._channel(channel)
        self._add(_GOSSIP_MESSAGES, (label, "out"), messages)
        self._add(_GOSSIP_BYTES, (label, "out"), nbytes)

    def gossip_received(self, channel: str, nbytes: int, messages: int = 1) -> None:
        label = self._channel(channel)
        self._add(_GOSSIP_MESSAGES, (label, "in"), messages)
        self._add(_GOSSIP_BYTES, (label, "in"), nbytes)

    def sleeve_sent(self, packets: int, nbytes: int) -> None:
        self._add(_SLEEVE_PACKETS, ("out",), packets)
        self._add(_SLEEVE_BYTES, ("out",), nbytes)

    def sleeve_received(self, packets: int, nbytes: int) -> None:
        self._add(_SLEEVE_PACKETS, ("in",), packets)
        self._add(_SLEEVE_BYTES, ("in",), nbytes)

    def sleeve_dropped(self, reason: str, packets: int = 1) -> None:
        self._add(_SLEEVE_DROPS, (self._drop_reason(reason),), packets)

    def fallback(self, from_datapath: str, to_datapath: str, reason: str = "unknown") -> None:
        """A move to a worse datapath, for a data plane that does not report it in its status
        (the overlay switch does: ``overlay.switch.fallback_reasons``; do not count it twice)."""
        labels = (
            self._datapath(from_datapath),
            self._datapath(to_datapath),
            self._fallback_reason(reason),
        )
        self._add(_FALLBACKS, labels, 1)

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE
