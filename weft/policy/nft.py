"""The desired policy state as nftables scripts (text for ``nft -f -``); pure, deterministic.

One table of our own, ``inet weft-policy``, hooked at ``forward`` and ``input``. Pod traffic on a
node crosses the weft bridge; with br_netfilter (``net.bridge.bridge-nf-call-iptables`` and
``-ip6tables`` = 1, which kube-proxy needs too) bridged IP packets pass the inet hooks, so
``forward`` sees pod<->pod on this node, pod<->overlay (sleeve TAP, VXLAN) and routed pod<->outside
traffic, after service DNAT; ``input`` sees pods talking to the node itself. Locally generated
traffic (the node to its pods) passes ``output``, which this table does not hook: always allowed.
A bridge-family table would not need br_netfilter, but conntrack in the bridge family needs
nf_conntrack_bridge, which kernels may lack (this test host's does) — and without ``ct state``
there are no replies.

The rule list is fixed; only set elements depend on the cluster (see :func:`render_full`):

* :func:`render_full` replaces the whole table in one transaction (``add table`` so the
  ``delete`` cannot fail, ``delete table``, then the table with every set filled): used at start
  and to repair drift; anything stale in the table is gone after it, atomically.
* :func:`render_update` turns one state into another with element changes only (deletes before
  adds, so a range that grows never overlaps its old self); counters survive it.

Visibility, also fixed (no rule per policy or pod):

* Named counters (``nft -j list counters table inet weft-policy``, read by
  :mod:`weft.policy.counters`): ``allowed_in4``, ``allowed_out4``, ``denied_in4``,
  ``denied_out4`` and the same with 6 — per direction and family, packets an isolated pod's
  policy accepted or dropped (:data:`COUNTERS`). Conntrack accepts the rest of a connection
  before policy is looked at, so "allowed" counts mostly first packets of connections, and
  "denied" counts every dropped attempt (retransmitted SYNs included).
* Per-element counters: the four ``*_all`` and four ``*_ports`` sets are declared with
  ``counter``, so each element counts the packets it let through (:data:`COUNTING_SETS`). An
  element is keyed by its local pod's address, so this is "allowed per local pod and peer range
  (and protocol/port)"; mapping elements back to the grants that produced them attributes counts
  to policies. Elements keep their counters across :func:`render_update` (only deleted and
  re-added elements restart from zero).
* Before each drop, ``limit name "deny_log" log prefix "weft-deny-in" group 4783`` (or
  ``weft-deny-out``) copies the denied packet to NFLOG (:mod:`weft.policy.nflog` reads it). The
  one named ``limit`` object is shared by all four deny points, so a flood costs at most
  ``log_rate`` messages a second in total; the drop rule after it does not depend on the log
  rule, so every denied packet is dropped and counted whether logged or not. No NFQUEUE: the
  verdict never waits for user space.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from weft.policy.compiler import AllowAll, AllowPorts, DesiredState, Direction, DirectionState

__all__ = [
    "COUNTERS",
    "COUNTING_SETS",
    "DENY_PREFIX",
    "FAMILY",
    "LOG_GROUP",
    "SET_TYPES",
    "TABLE",
    "render_full",
    "render_update",
    "set_elements",
]

FAMILY: Final = "inet"
TABLE: Final = "weft-policy"
LOG_GROUP: Final = 4783  # NFLOG group of denied packets
LOG_RATE: Final = 50  # denied-packet log messages per second, all directions together
LOG_BURST: Final = 100
DENY_PREFIX: Final[dict[Direction, str]] = {"ingress": "weft-deny-in", "egress": "weft-deny-out"}
LOG_LIMIT: Final = "deny_log"

_ADDR: Final = {4: "ipv4_addr", 6: "ipv6_addr"}
_IP: Final = {4: "ip", 6: "ip6"}
_ND_TYPES: Final = (
    "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, "
    "mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report"
)


def _set_types() -> dict[str, tuple[str, bool]]:
    """Set name -> (type, interval flag). Suffix 4/6 is the family."""
    types: dict[str, tuple[str, bool]] = {}
    for v in (4, 6):
        a = _ADDR[v]
        types[f"node{v}"] = (a, False)
        types[f"self{v}"] = (f"{a} . {a}", False)
        for d in ("in", "out"):
            types[f"{d}_isolated{v}"] = (a, False)
            types[f"{d}_all{v}"] = (f"{a} . {a}", True)
            types[f"{d}_ports{v}"] = (f"{a} . {a} . inet_proto . inet_service", True)
    return types


SET_TYPES: Final = _set_types()
# sets declared with ``counter``: every element counts the packets it allowed
COUNTING_SETS: Final = tuple(name for name in SET_TYPES if "_all" in name or "_ports" in name)


_DIRECTIONS: Final[tuple[tuple[Direction, str], ...]] = (("ingress", "in"), ("egress", "out"))


def _counters() -> dict[str, tuple[str, Direction, int]]:
    """Named counter -> (``allowed``/``denied``, direction, IP version)."""
    out: dict[str, tuple[str, Direction, int]] = {}
    for kind in ("allowed", "denied"):
        for v in (4, 6):
            for direction, d in _DIRECTIONS:
                out[f"{kind}_{d}{v}"] = (kind, direction, v)
    return out


COUNTERS: Final = _counters()


def _all(e: AllowAll) -> str:
    return f"{e.local} . {e.peer}"


def _ports(e: AllowPorts) -> str:
    return f"{e.local} . {e.peer} . {e.protocol.lower()} . {e.ports}"


def _direction_elements(prefix: str, state: DirectionState, out: dict[str, list[str]]) -> None:
    for host in state.isolated:
        out[f"{prefix}_isolated{host.version}"].append(str(host))
    for a in state.allow_all:
        out[f"{prefix}_all{a.local.version}"].append(_all(a))
    for p in state.allow_ports:
        out[f"{prefix}_ports{p.local.version}"].append(_ports(p))


def set_elements(state: DesiredState) -> dict[str, list[str]]:
    """Every set's elements in nftables notation, each list sorted the same way every time."""
    out: dict[str, list[str]] = {name: [] for name in SET_TYPES}
    for host in state.node_addresses:
        out[f"node{host.version}"].append(str(host))
    for host in state.local_addresses:
        out[f"self{host.version}"].append(f"{host} . {host}")
    _direction_elements("in", state.ingress, out)
    _direction_elements("out", state.egress, out)
    return out


def _chains(log_group: int) -> list[str]:
    lines = [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        "\t\tjump check",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tjump check",
        "\t}",
        "\tchain check {",
        "\t\tct state established,related accept",
        f"\t\ticmpv6 type {{ {_ND_TYPES} }} accept",
    ]
    for v in (4, 6):
        lines.append(f"\t\t{_IP[v]} saddr @node{v} accept")
    for v in (4, 6):
        lines.append(f"\t\t{_IP[v]} saddr . {_IP[v]} daddr @self{v} accept")
    # egress first: a local pod to a local pod must pass its own egress and the peer's ingress
    for v in (4, 6):
        lines.append(f"\t\t{_IP[v]} saddr @out_isolated{v} jump egress{v}")
    for v in (4, 6):
        lines.append(f"\t\t{_IP[v]} daddr @in_isolated{v} jump ingress{v}")
    lines.append("\t}")
    for v in (4, 6):
        ip = _IP[v]
        chains: tuple[tuple[Direction, str, str, str], ...] = (
            ("egress", "out", "saddr", "daddr"),
            ("ingress", "in", "daddr", "saddr"),
        )
        for chain, d, local, peer in chains:
            allowed, denied = f'counter name "allowed_{d}{v}"', f'counter name "denied_{d}{v}"'
            prefix = DENY_PREFIX[chain]
            lines += [
                f"\tchain {chain}{v} {{",
                f"\t\t{ip} {local} . {ip} {peer} @{d}_all{v} {allowed} return",
                f"\t\t{ip} {local} . {ip} {peer} . meta l4proto . th dport @{d}_ports{v} "
                f"{allowed} return",
                # no verdict here: the drop below happens whether the limit lets the log through
                f'\t\tlimit name "{LOG_LIMIT}" log prefix "{prefix}" group {log_group}',
                f'\t\t{denied} drop comment "{chain} denied"',
                "\t}",
            ]
    return lines


def render_full(
    state: DesiredState,
    *,
    log_group: int = LOG_GROUP,
    log_rate: int = LOG_RATE,
    log_burst: int = LOG_BURST,
) -> str:
    """The script replacing table ``inet weft-policy`` with ``state``, atomically (``nft -f -``).

    Denied packets go to NFLOG group ``log_group``, at most ``log_rate`` a second (after a burst
    of ``log_burst``) over all directions and families; each is dropped either way.
    """
    if not 0 <= log_group <= 0xFFFF or log_rate < 1 or log_burst < 1:
        raise ValueError(f"bad log settings: group {log_group}, {log_rate}/s burst {log_burst}")
    elements = set_elements(state)
    lines = [
        f"# weft NetworkPolicy for node {state.node}: {len(state.pods)} local pods",
        f"add table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
    ]
    for name in COUNTERS:
        lines.append(f"\tcounter {name} {{ }}")
    lines.append(f"\tlimit {LOG_LIMIT} {{ rate {log_rate}/second burst {log_burst} packets }}")
    for name, (typ, interval) in SET_TYPES.items():
        lines.append(f"\tset {name} {{")
        lines.append(f"\t\ttype {typ}")
        if interval:
            lines.append("\t\tflags interval")
        if name in COUNTING_SETS:
            lines.append("\t\tcounter")
        if elements[name]:
            lines.append("\t\telements = {")
            lines += [f"\t\t\t{e}," for e in elements[name]]
            lines.append("\t\t}")
        lines.append("\t}")
    lines += _chains(log_group)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _element_commands(verb: str, name: str, items: Iterable[str]) -> list[str]:
    items = list(items)
    if not items:
        return []
    return [f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(items)} }}"]


def render_update(old: DesiredState, new: DesiredState) -> str:
    """Element changes turning ``old`` (what the kernel holds) into ``new``; "" if none.

    Precondition: the table exists with ``old``'s content (the reconciler falls back to
    :func:`render_full` when it cannot be sure, e.g. at start or after a failed transaction).
    """
    before, after = set_elements(old), set_elements(new)
    deletes: list[str] = []
    adds: list[str] = []
    for name in SET_TYPES:
        old_set, new_set = set(before[name]), set(after[name])
        deletes += _element_commands("delete", name, sorted(old_set - new_set))
        adds += _element_commands("add", name, sorted(new_set - old_set))
    if not deletes and not adds:
        return ""
    return "\n".join(deletes + adds) + "\n"
