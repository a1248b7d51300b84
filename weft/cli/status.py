"""The status model's human renderings (`weft status ...`), from the ``/status`` JSON document.

The router produces one document (docs/ARCHITECTURE.md, "The status model"); the CLI, the UI and
metrics all read it. This module only turns that document into aligned text tables, so it imports
nothing beyond the standard library (the CLI imports it for every `weft status`).

Every renderer tolerates missing keys: a router of another version, or a part that is not there
(no overlay, no IPAM), must not make `weft status` crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "render_connections",
    "render_peers",
    "render_summary",
    "render_table",
    "render_targets",
]

Doc = Mapping[str, Any]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _router(doc: Doc) -> Doc:
    router = doc.get("router", {})
    return router if isinstance(router, Mapping) else {}


def _list(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, Mapping)]


def _peer_label(name: object, nickname: object) -> str:
    if not name:
        return "-"
    return f"{name}({nickname})" if nickname else str(name)


def render_summary(doc: Doc) -> str:
    """The default `weft status`: one screen in the shape of Weave's."""
    r = _router(doc)
    conns = _list(r.get("connections"))
    peers = _list(r.get("peers"))
    targets = _list(r.get("targets"))
    by_state: dict[str, int] = {}
    for c in conns:
        state = str(c.get("state", "?"))
        by_state[state] = by_state.get(state, 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "none"
    established_links = sum(
        1 for p in peers for c in _list(p.get("connections")) if c.get("established")
    )
    overlay = doc.get("overlay")
    datapath = overlay.get("datapath", "?") if isinstance(overlay, Mapping) else "none"
    rows: list[tuple[str, str]] = [
        ("Version", f"weft {r.get('software', '?')} (protocol {r.get('protocol', '?')})"),
        ("Name", _peer_label(r.get("name"), r.get("nickname"))),
        ("Encryption", "enabled" if r.get("encryption") else "disabled"),
        ("PeerDiscovery", "enabled" if r.get("discovery", True) else "disabled"),
        ("Port", str(r.get("port", "?"))),
        ("Datapath", str(datapath)),
        ("Targets", str(len(targets))),
        ("Connections", f"{len(conns)} ({states})"),
        ("Peers", f"{len(peers)} (with {established_links} established connections)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.rjust(width)}: {v}" for k, v in rows)


def render_peers(doc: Doc) -> str:
    """Every peer we know, then one indented line per connection it reports."""
    lines: list[str] = []
    peers = _list(_router(doc).get("peers"))
    nicknames = {p.get("name"): p.get("nickname") for p in peers}
    for p in sorted(peers, key=lambda p: str(p.get("name", ""))):
        lines.append(
            f"{_peer_label(p.get('name'), p.get('nickname'))}  uid={p.get('uid', '?')}"
            f"  version={p.get('version', '?')}  short_id={p.get('short_id', '?')}"
        )
        rows = []
        for c in sorted(_list(p.get("connections")), key=lambda c: str(c.get("name", ""))):
            rows.append(
                (
                    "  ->" if c.get("outbound") else "  <-",
                    c.get("address", ""),
                    _peer_label(c.get("name"), c.get("nickname") or nicknames.get(c.get("name"))),
                    "established" if c.get("established") else "pending",
                )
            )
        if rows:
            lines.append(render_table(("", "ADDRESS", "PEER", "STATE"), rows).split("\n", 1)[1])
    return "\n".join(lines) if lines else "no peers"


def render_connections(doc: Doc) -> str:
    """Our connections, including failed and retrying ones with their reason."""
    conns = _list(_router(doc).get("connections"))
    if not conns:
        return "no connections"
    rows = []
    for c in conns:
        mtu = c.get("mtu")
        rows.append(
            (
                "->" if c.get("outbound") else "<-",
                c.get("address", ""),
                c.get("state", "?"),
                _peer_label(c.get("peer"), c.get("nickname")),
                ("encrypted" if c.get("encrypted") else "plaintext")
                if c.get("state") in ("established", "pending")
                else "-",
                c.get("datapath") or "-",
                mtu if mtu else "-",
                c.get("info", ""),
            )
        )
    return render_table(
        ("DIR", "ADDRESS", "STATE", "PEER", "ENCRYPTION", "DATAPATH", "MTU", "INFO"), rows
    )


def _seconds(value: object) -> str:
    if isinstance(value, int | float):
        return f"{value:.1f}s"
    return "-" if value is None else str(value)


def render_targets(doc: Doc) -> str:
    """The connection maker's targets: direct and discovered addresses and their state."""
    targets = _list(_router(doc).get("targets"))
    if not targets:
        return "no targets"
    rows = [
        (
            t.get("address", ""),
            t.get("state", "?"),
            t.get("attempts", 0),
            _seconds(t.get("next_try")),
            t.get("last_error") or "",
        )
        for t in targets
    ]
    return render_table(("ADDRESS", "STATE", "ATTEMPTS", "NEXT TRY", "LAST ERROR"), rows)
