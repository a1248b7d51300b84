"""`weft policy explain|denied|status`: the router's /policy routes, rendered for people.

Standard library only (the CLI starts fast); renders the JSON of weft/policy/http.py, never
imports weft.policy. ``--json`` prints the router's JSON as it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlencode

__all__ = ["add_policy_parser", "render_denied", "render_explain", "render_status"]


def _pod_or_address(end: Mapping[str, Any]) -> str:
    pod, address = end.get("pod"), end.get("address", "?")
    return f"{pod} ({address})" if pod else str(address)


def _direction_lines(doc: Mapping[str, Any], key: str) -> list[str]:
    d = doc.get(key)
    if not isinstance(d, Mapping):
        return []
    peer_end = doc.get("destination" if key == "egress" else "source") or {}
    peer = peer_end.get("address", "?") if isinstance(peer_end, Mapping) else "?"
    if not d.get("pod"):
        return [f"  {key}: {d.get('reason', '')}"]
    label = f"{key} of {d['pod']}"
    if not d.get("isolated"):
        kind = "Ingress" if key == "ingress" else "Egress"
        return [f"  {label}: not isolated (no policy selects it for {kind}): allowed"]
    by = ", ".join(d.get("isolated_by", []))
    lines = [f"  {label}: isolated by {by}: {'allowed' if d.get('allowed') else 'DENIED'}"]
    way = "from" if key == "ingress" else "to"
    for r in d.get("allowed_by", []):
        lines.append(
            f"    allowed by {r['policy']} {key} rule {r['rule']}: {way} {r['peers']};"
            f" ports {r['ports']}"
        )
    if not d.get("allowed"):
        lines.append(f"    no rule allows {peer} {doc.get('flow', '')}")
    for r in d.get("other_ports", []):
        lines.append(
            f"    {r['policy']} {key} rule {r['rule']} allows {peer} on other ports only:"
            f" {r['ports']}"
        )
    return lines


def render_explain(doc: Mapping[str, Any]) -> str:
    """A verdict of GET /policy/explain: the answer first, then each direction and its rules."""
    verdict = "ALLOWED" if doc.get("allowed") else "DENIED"
    src, dst = doc.get("source") or {}, doc.get("destination") or {}
    lines = [f"{verdict}: {_pod_or_address(src)} -> {_pod_or_address(dst)} {doc.get('flow', '')}"]
    if doc.get("always_allowed"):
        lines.append(f"  always allowed: {doc['always_allowed']}")
    lines += _direction_lines(doc, "egress")
    lines += _direction_lines(doc, "ingress")
    return "\n".join(lines)


def _when(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return "" if value is None else str(value)


def render_denied(doc: Mapping[str, Any]) -> str:
    """GET /policy/denied as a table, newest last."""
    from weft.cli.status import render_table

    flows = [f for f in doc.get("flows", []) if isinstance(f, Mapping)]
    if not flows:
        return "no denied flows"
    rows = []
    for f in flows:
        port = f.get("port")
        proto = f.get("protocol") or ""
        by = f.get("isolated_pod") or ""
        if f.get("policies"):
            by = f"{by} ({', '.join(f['policies'])})" if by else ", ".join(f["policies"])
        rows.append(
            (
                _when(f.get("time")),
                f.get("direction") or "",
                f.get("source_pod") or f.get("source") or "",
                f.get("destination_pod") or f.get("destination") or "",
                f"{port}/{proto}" if port is not None else proto,
                "" if f.get("count") is None else str(f["count"]),
                by,
            )
        )
    header = ("TIME", "DIRECTION", "SOURCE", "DESTINATION", "PORT", "PACKETS", "DENIED BY")
    return render_table(header, rows)


def render_status(doc: Mapping[str, Any]) -> str:
    """GET /policy/status (free-form): one ``key: value`` line each, nested values as JSON."""
    if not doc:
        return "no NetworkPolicy status (is the router enforcing, under --k8s?)"
    lines = []
    for key in sorted(doc):
        value = doc[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"{key}: {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- commands


class _Client(Protocol):
    def get(self, path: str) -> Any: ...


def _show(
    args: Any,
    doc: Any,
    render: Callable[[Mapping[str, Any]], str],
    what: str,
    error: type[Exception],
) -> int:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    if not isinstance(doc, dict):
        raise error(f"the router sent a malformed {what}")
    print(render(doc))
    return 0


def _explain_path(args: Any) -> str:
    query = {"from": args.source, "to": args.destination}
    if args.port:
        query["port"] = args.port
    return f"/policy/explain?{urlencode(query)}"


# subcommand -> (path from the arguments, renderer, what the reply is)
_COMMANDS: dict[str, tuple[Callable[[Any], str], Callable[[Mapping[str, Any]], str], str]] = {
    "explain": (_explain_path, render_explain, "verdict"),
    "denied": (lambda args: "/policy/denied", render_denied, "list of denied flows"),
    "status": (lambda args: "/policy/status", render_status, "policy status"),
}


def add_policy_parser(
    sub: Any,
    http_addr_default: str,
    parser_class: type,
    client: Callable[[str], _Client],
    error: type[Exception],
) -> None:
    """``weft policy`` and its subcommands, on the top-level subparsers ``sub``.

    ``client`` makes the API client for an address and ``error`` is the CLI's one-line error
    (weft.cli.main passes its own: this module must not import it, which may be ``__main__``).
    """
    import argparse

    def run(args: Any) -> int:
        path, render, what = _COMMANDS[args.policy_command]
        return _show(args, client(args.http_addr).get(path(args)), render, what, error)

    help_text = "Kubernetes NetworkPolicy on this node: explain a flow, denied flows, status"
    p = sub.add_parser("policy", help=help_text, description=help_text)
    p.add_argument(
        "--http-addr",
        default=http_addr_default,
        help="the router's HTTP API (default 127.0.0.1:6784 or $WEFT_HTTP_ADDR)",
    )
    inner = p.add_subparsers(dest="policy_command", metavar="COMMAND", parser_class=parser_class)
    inner.required = True

    def command(name: str, help_text: str) -> Any:
        q = inner.add_parser(name, help=help_text, description=help_text)
        # also after the subcommand; SUPPRESS keeps the value given before it
        q.add_argument("--http-addr", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        q.add_argument("--json", action="store_true", help="print the router's JSON as it is")
        q.set_defaults(func=run)
        return q

    q = command(
        "explain",
        "is a new connection allowed, and which policies and rules decide it (computed by the"
        " same compiler that programs the kernel)",
    )
    q.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="NS/POD|ADDR",
        help="the source: a pod as namespace/name, or an address",
    )
    q.add_argument(
        "--to",
        dest="destination",
        required=True,
        metavar="NS/POD|ADDR",
        help="the destination: a pod as namespace/name, or an address",
    )
    q.add_argument(
        "--port",
        metavar="PORT[/PROTO]",
        help="destination port, e.g. 80/TCP, 53/UDP (TCP if no protocol) or a portless protocol"
        " such as ICMP (default: every port and protocol)",
    )
    command("denied", "the latest denied flows on this node, newest last")
    command("status", "the NetworkPolicy enforcer's status")
