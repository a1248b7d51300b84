"""The `weft` command line.

Client commands (`status`, `connect`, `report`, ...) talk to a running router over its HTTP API
(127.0.0.1:6784, ``--http-addr`` or ``WEFT_HTTP_ADDR`` to change) with the standard library only,
so they start fast: nothing heavy (aiohttp, cryptography, pyroute2) is imported unless the command
runs a router. `weft router` runs one in the foreground; `weft launch` starts `weft router` in the
background, waits until its API answers and exits 0, or exits non-zero with the reason the router
logged. Commands that change the router work for root, the router's uid and members of its API
group (``--api-group``); the router refuses anyone else with a line the CLI shows
(weft/router/access.py). Reads work for every user.

Errors are one line on stderr and a non-zero exit: 2 for bad arguments, 1 for everything else
(router unreachable, refused request, invalid configuration). Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from weft.router.config import RouterConfig

__all__ = ["ClientError", "WeftClient", "build_parser", "config_from_args", "main"]

HTTP_ADDR_ENV = "WEFT_HTTP_ADDR"
LOG_FILE = "weft.log"
LAUNCH_TIMEOUT = 60.0  # seconds `weft launch` waits for the router's API to answer
STOP_TIMEOUT = 15.0
FATAL_MARK = "weft router: error: "  # the daemon prefixes its fatal error line with this


class ClientError(Exception):
    """A client command failed; the message is the one line shown to the user."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the exit code 2), never a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _default_http_addr() -> str:
    return os.environ.get(HTTP_ADDR_ENV) or "127.0.0.1:6784"


# ---------------------------------------------------------------------------------------------
# HTTP client (stdlib only)


class WeftClient:
    """A tiny JSON client for the router's API."""

    def __init__(self, http_addr: str, timeout: float = 10.0) -> None:
        self.http_addr = http_addr
        self.timeout = timeout
        host_port = http_addr.strip()
        if host_port.startswith("http://"):
            host_port = host_port[len("http://") :]
        self.base = f"http://{host_port.rstrip('/')}"
        # Never send requests for our own loopback API through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise ClientError(_error_text(err)) from None
        except urllib.error.URLError as err:
            reason = err.reason
            text = getattr(reason, "strerror", None) or str(reason)
            raise ClientError(
                f"cannot reach the weft router at {self.http_addr}: {text}"
                " (is it running? start it with `weft launch`)"
            ) from None
        except (TimeoutError, OSError) as err:
            raise ClientError(
                f"cannot reach the weft router at {self.http_addr}: {err.strerror or err}"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(f"the router at {self.http_addr} sent a non-JSON reply") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: object = None) -> Any:
        return self.request("POST", path, {} if body is None else body)


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    except (ValueError, OSError):
        pass
    return f"the router refused the request: HTTP {err.code} {err.reason}"


# ---------------------------------------------------------------------------------------------
# Router options, shared by `launch` and `router`


def _add_router_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name", help="peer name like aa:bb:cc:dd:ee:ff (default: kept in the data dir)"
    )
    p.add_argument("--nickname", help="human label shown next to the name (default: hostname)")
    p.add_argument(
        "--data-dir", default="/var/lib/weft", help="state directory (default %(default)s)"
    )
    p.add_argument("--port", type=int, default=6783, help="TCP/UDP port for peers (default 6783)")
    p.add_argument(
        "--http-addr",
        default=_default_http_addr(),
        help="HTTP API address (default 127.0.0.1:6784 or $WEFT_HTTP_ADDR)",
    )
    p.add_argument(
        "--api-socket",
        default="/run/weft/weft.sock",
        help="unix socket serving the same API; '' disables it (default %(default)s)",
    )
    p.add_argument(
        "--api-group",
        metavar="GROUP",
        help="members of GROUP may change the router over the API (default: the router's own"
        " group); the unix socket is given to it",
    )
    p.add_argument(
        "--api-allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the API answers to besides loopback, localhost and the --http-addr host"
        " (repeatable; other Host headers get 421)",
    )
    p.add_argument(
        "--status-addr",
        default="",
        help="serve read-only status, UI and /metrics here too, e.g. 0.0.0.0:6782 (default: off)",
    )
    p.add_argument(
        "--password-file",
        help="file holding the mesh password (or set $WEFT_PASSWORD); enables encryption",
    )
    p.add_argument("--no-discovery", action="store_true", help="connect only to the given peers")
    p.add_argument("--conn-limit", type=int, default=200, help="most connections (default 200)")
    p.add_argument(
        "--unauth-limit",
        type=int,
        default=32,
        help="most connections still authenticating, a quarter kept for our dials (default 32)",
    )
    p.add_argument(
        "--unauth-per-source",
        type=int,
        default=4,
        help="most inbound connections authenticating from one IPv4 address or IPv6 /64"
        " (default 4)",
    )
    p.add_argument(
        "--datapath",
        default="auto",
        choices=("auto", "ovs", "vxlan", "sleeve", "none"),
        help="data plane: auto (per connection the best healthy of the kernel's OVS datapath,"
        " kernel vxlan and sleeve), ovs, vxlan (both forced: no fallback), sleeve (userspace UDP)"
        " or none (control only)",
    )
    p.add_argument(
        "--no-ipam", action="store_true", help="no address allocator (and so no /ip, /cni)"
    )
    p.add_argument(
        "--ipalloc-range",
        metavar="CIDR",
        help="addresses IPAM hands out, the same on every peer (default 10.32.0.0/12)",
    )
    p.add_argument(
        "--ipalloc-default-subnet",
        metavar="CIDR",
        help="subnet of allocations that name none (default: the whole range)",
    )
    p.add_argument(
        "--ipalloc-init",
        metavar="MODE",
        help="how the range is first split: consensus[=N] (default N = peers + 1),"
        " seed=NAME,..., or observer",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="send a heartbeat on an idle connection this often (default 30)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close a connection silent for this long (default 60)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity (default info)",
    )
    from weft.docker.cli import add_docker_arguments
    from weft.k8s.cli import add_k8s_arguments

    add_docker_arguments(p)
    add_k8s_arguments(p)
    p.add_argument("peers", nargs="*", metavar="PEER", help="peers to connect to, host[:port]")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """A validated RouterConfig from parsed `launch`/`router` options; raises ConfigError."""
    from weft.errors import ConfigError
    from weft.gossip.peer import PeerName
    from weft.router.config import PASSWORD_ENV, RouterConfig, read_password_file

    password: bytes | None = None
    if args.password_file:
        password = read_password_file(args.password_file)
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV].encode()
    kwargs: dict[str, Any] = {}
    if args.nickname is not None:
        kwargs["nickname"] = args.nickname
    if args.name:
        kwargs["name"] = PeerName.parse(args.name)
    if not args.data_dir:
        raise ConfigError("--data-dir must not be empty")
    from weft.docker.cli import docker_config_from_args
    from weft.k8s.cli import k8s_config_from_args

    default_pool = args.ipalloc_default_subnet or args.ipalloc_range or "10.32.0.0/12"
    kwargs["docker_plugin"] = docker_config_from_args(args, Path(args.data_dir), default_pool)
    kwargs["k8s"] = k8s_config_from_args(args, args.port)
    return RouterConfig(
        data_dir=Path(args.data_dir),
        port=args.port,
        http_addr=args.http_addr,
        api_socket=Path(args.api_socket) if args.api_socket else None,
        api_group=args.api_group or None,
        api_allow_hosts=tuple(args.api_allow_host),
        status_addr=args.status_addr or None,
        password=password,
        discovery=not args.no_discovery,
        conn_limit=args.conn_limit,
        unauth_limit=args.unauth_limit,
        unauth_per_source=args.unauth_per_source,
        peers=tuple(args.peers),
        datapath=args.datapath,
        ipam=not args.no_ipam,
        ipalloc_range=args.ipalloc_range or None,
        ipalloc_default_subnet=args.ipalloc_default_subnet or None,
        ipalloc_init=args.ipalloc_init or None,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        **kwargs,
    ).validated()


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_router(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from weft.router.daemon import run_router

    return run_router(config, log_level=str(args.log_level))


def cmd_launch(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # refuse bad options here, before anything is started
    client = WeftClient(config.http_addr, timeout=2.0)
    try:
        client.get("/status")
    except ClientError:
        pass
    else:
        raise ClientError(
            f"a router is already answering at {config.http_addr}; stop it first with `weft stop`"
        )
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = config.data_dir / LOG_FILE
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    except OSError as err:
        raise ClientError(
            f"cannot write the log in {config.data_dir}: {err.strerror or err}"
        ) from None
    start_offset = log.tell()
    child_argv = [sys.executable, "-m", "weft.cli.main", "router", *args.forwarded]
    with log:
        proc = subprocess.Popen(
            child_argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            reason = _fatal_reason(log_path, start_offset) or f"the router exited with code {code}"
            raise ClientError(f"the router did not start: {reason} (log: {log_path})")
        try:
            status = client.get("/status")
        except ClientError:
            status = None
        if isinstance(status, dict):
            router = status.get("router", {})
            print(f"{router.get('name', '?')}")
            return 0
        if time.monotonic() > deadline:
            proc.terminate()
            raise ClientError(
                f"the router did not answer at {config.http_addr} within {LAUNCH_TIMEOUT:.0f}s"
                f" (log: {log_path})"
            )
        time.sleep(0.1)


def _fatal_reason(log_path: Path, offset: int) -> str | None:
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if FATAL_MARK in line:
            return line.split(FATAL_MARK, 1)[1]
    return lines[-1] if lines else None


def _client(args: argparse.Namespace) -> WeftClient:
    return WeftClient(args.http_addr)


def cmd_status(args: argparse.Namespace) -> int:
    from weft.cli import status as render

    doc = _client(args).get("/status")
    if not isinstance(doc, dict):
        raise ClientError("the router sent a malformed status document")
    renderers: dict[str | None, Callable[[Any], str]] = {
        None: render.render_summary,
        "peers": render.render_peers,
        "connections": render.render_connections,
        "targets": render.render_targets,
        "ipam": _render_ipam,
    }
    print(renderers[args.what](doc))
    return 0


def _render_ipam(doc: dict[str, Any]) -> str:
    ipam = doc.get("ipam")
    if not isinstance(ipam, dict):
        raise ClientError("this router runs no IPAM (it was started with --no-ipam)")
    from weft.ipam.service import render_status

    return render_status(ipam)


def cmd_rmpeer(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    reply = _client(args).post(f"/rmpeer/{quote(args.peer, safe='')}")
    taken = reply.get("taken") if isinstance(reply, dict) else None
    print(f"{taken} addresses of {args.peer} taken over by this peer")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    client = _client(args)
    status = client.get("/status")
    reply = client.post("/ipam/reset")
    to = reply.get("handed_to") if isinstance(reply, dict) else None
    print(f"address space handed to {to}" if to else "no live peer to hand address space to")
    if isinstance(status, dict) and "policy" in status:
        # the NetworkPolicy rules outlive a restart on purpose; a reset takes them away
        client.post("/policy/remove")
        print("NetworkPolicy rules removed from this host")
    return cmd_stop(args)


def cmd_report(args: argparse.Namespace) -> int:
    doc = _client(args).get("/report")
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    _client(args).post("/connect", {"peers": args.peers, "replace": args.replace})
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    _client(args).post("/forget", {"peers": args.peers})
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    client.post("/stop")
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            client.get("/status")
        except ClientError:
            return 0
        time.sleep(0.1)
    raise ClientError(
        f"the router at {args.http_addr} is still answering after {STOP_TIMEOUT:.0f}s"
    )


def cmd_expose(args: argparse.Namespace) -> int:
    reply = _client(args).post("/expose", {"cidr": args.cidr})
    addresses = reply.get("addresses", []) if isinstance(reply, dict) else []
    for address in addresses:
        print(address)
    return 0


def _netns_arg(netns: str) -> str:
    """A namespace name as given; a path made absolute (the router runs in another directory)."""
    return os.path.abspath(netns) if "/" in netns else netns


def cmd_attach(args: argparse.Namespace) -> int:
    netns = _netns_arg(args.netns)
    body = {"netns": netns, "ip": args.ip or [], "ifname": args.ifname, "mtu": args.mtu}
    reply = _client(args).post("/attach", body)
    if isinstance(reply, dict):
        print(" ".join(str(a) for a in reply.get("addresses", [])) or reply.get("mac", ""))
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    _client(args).post("/detach", {"netns": _netns_arg(args.netns)})
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from weft.cli.status import render_table

    reply = _client(args).get("/ps")
    rows = [
        (
            e.get("netns", ""),
            e.get("ifname", ""),
            e.get("host_ifname", ""),
            e.get("mac", ""),
            " ".join(str(a) for a in e.get("addresses", [])),
        )
        for e in (reply if isinstance(reply, list) else [])
        if isinstance(e, dict)
    ]
    print(render_table(("NETNS", "IFNAME", "HOST IFNAME", "MAC", "ADDRESSES"), rows))
    return 0


# Commands implemented by other parts with their own argument parser: (module, function).
PASSTHROUGH = {
    "demo": ("weft.cli.demo", "main"),
    "setup-cni": ("weft.cni.install", "main"),
}


def _passthrough(command: str, argv: list[str]) -> int:
    import importlib

    from weft.errors import WeftError

    module_name, func_name = PASSTHROUGH[command]
    main_fn = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(main_fn(argv))
    except (WeftError, OSError) as err:
        text = (
            f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else err
        )
        print(f"weft {command}: {text}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="weft",
        description="weft: an encrypted mesh overlay network for containers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def client_command(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--http-addr",
            default=_default_http_addr(),
            help="the router's HTTP API (default 127.0.0.1:6784 or $WEFT_HTTP_ADDR)",
        )
        p.set_defaults(func=func)
        return p

    p = sub.add_parser(
        "launch",
        help="start a router in the background and wait until it is ready",
        description="Start `weft router` in the background (log in DATA_DIR/weft.log), wait until"
        " its API answers, print its peer name.",
    )
    _add_router_options(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser(
        "router",
        help="run a router in the foreground (for systemd, Kubernetes)",
        description="Run a router in the foreground until SIGTERM/SIGINT or `weft stop`.",
    )
    _add_router_options(p)
    p.set_defaults(func=cmd_router)

    p = client_command("status", "show the router's state", cmd_status)
    p.add_argument(
        "what",
        nargs="?",
        choices=("peers", "connections", "targets", "ipam"),
        help="a table of peers, connections, targets or IPAM ranges (default: a summary)",
    )
    p = client_command(
        "rmpeer", "take over the address space of a peer that is gone for good", cmd_rmpeer
    )
    p.add_argument("peer", help="the dead peer's name (or nickname)")
    client_command(
        "reset", "hand this peer's address space to a live peer, then stop the router", cmd_reset
    )
    client_command("report", "print the full status as JSON", cmd_report)
    p = client_command("connect", "add peers to connect to", cmd_connect)
    p.add_argument("--replace", action="store_true", help="replace the current direct targets")
    p.add_argument("peers", nargs="+", metavar="PEER", help="host[:port]")
    p = client_command("forget", "stop connecting to peers", cmd_forget)
    p.add_argument("peers", nargs="+", metavar="PEER", help="host[:port]")
    client_command("stop", "stop the router", cmd_stop)
    p = client_command("expose", "give this host an address on the overlay", cmd_expose)
    p.add_argument("cidr", nargs="?", help="address/prefix, e.g. 10.32.0.1/12 (default: from IPAM)")
    p = client_command("attach", "connect a network namespace to the overlay", cmd_attach)
    p.add_argument("--ip", action="append", metavar="CIDR", help="address/prefix (repeatable)")
    p.add_argument("--ifname", default="ethwe", help="interface name inside (default ethwe)")
    p.add_argument("--mtu", type=int, help="interface MTU (default: the overlay's)")
    p.add_argument("netns", metavar="NETNS", help="namespace name or path")
    p = client_command("detach", "disconnect a network namespace from the overlay", cmd_detach)
    p.add_argument("netns", metavar="NETNS", help="namespace name or path")
    client_command("ps", "list attached namespaces", cmd_ps)
    from weft.cli.policy import add_policy_parser

    add_policy_parser(sub, _default_http_addr(), _Parser, WeftClient, ClientError)
    # listed for --help only: main() hands these to their own parsers before argparse runs
    sub.add_parser("demo", help="a local mesh of hosts in network namespaces (needs root)")
    sub.add_parser(
        "setup-cni", help="install the CNI plugin and its network config (/opt/cni, /etc/cni)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASSTHROUGH:
        # commands with their own parser: hand them everything, --help included
        return _passthrough(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "launch":
        # The child gets our options verbatim (same cwd, so relative paths mean the same).
        args.forwarded = argv[argv.index("launch") + 1 :]
    from weft.errors import WeftError

    try:
        return int(args.func(args))
    except (ClientError, WeftError) as err:
        print(f"weft {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `weft report | head`: the reader went away; no traceback, and none at exit either
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
