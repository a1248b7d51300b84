"""`weft demo`: a complete local mesh in network namespaces, for anyone to try.

It builds an underlay "switch" namespace and N host namespaces, launches a router in each (each
given only the first host, so discovery completes the mesh), attaches two containers per host,
pings every container from every other one across the mesh, prints `weft status` and serves the
first host's UI on this machine's loopback through a small forwarder. The mesh is encrypted with a
generated password (printed) unless ``--password`` names one or ``--no-encrypt`` asks for the
plaintext mode: a first look at an encrypted mesh should show encrypted links.
`weft demo --down` removes everything it made. All names start with ``weftdemo-`` so `--down` finds
them after a crash too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoPlan", "demo_password", "main"]

DEFAULT_PREFIX = "weftdemo"
UNDERLAY_NET = "192.168.200"
DEFAULT_UI_PORT = 6790
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class DemoPlan:
    """Names and addresses of one demo mesh; pure, so `--down` can recompute it."""

    hosts: int = 3
    containers_per_host: int = 2
    prefix: str = DEFAULT_PREFIX  # every namespace and directory name starts with it

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def state_dir(self) -> Path:
        return Path("/var/lib") / self.prefix

    @property
    def run_dir(self) -> Path:
        return Path("/run") / self.prefix

    def host_ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def host_ip(self, i: int) -> str:
        return f"{UNDERLAY_NET}.{i}"

    def container_ns(self, i: int, j: int) -> str:
        return f"{self.prefix}-h{i}-c{j}"

    def host_indexes(self) -> range:
        return range(1, self.hosts + 1)

    def containers(self) -> list[tuple[int, int]]:
        return [(i, j) for i in self.host_indexes() for j in range(1, self.containers_per_host + 1)]


def demo_password(args: argparse.Namespace) -> tuple[str | None, str]:
    """The mesh password (None: plaintext) and a line saying where it came from."""
    if args.no_encrypt:
        return None, "weft demo: encryption off (--no-encrypt): links are plaintext"
    if args.password:
        return args.password, "weft demo: mesh encrypted with the password given"
    password = secrets.token_urlsafe(12)  # 96 bits: the KDF is slow, but nothing to guess
    return password, (
        f"weft demo: mesh encrypted with the generated password {password}"
        " (--password to choose one, --no-encrypt for plaintext)"
    )


def _sh(args: Sequence[str], *, check: bool = True, timeout: float = 60) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise SystemExit(f"weft demo: `{' '.join(args)}` failed: {detail}")
    return proc.stdout


def _weft_in(ns: str, *args: str, check: bool = True, timeout: float = 60) -> str:
    return _sh(["ip", "netns", "exec", ns, _weft_exe(), *args], check=check, timeout=timeout)


def _weft_exe() -> str:
    return shutil.which("weft") or sys.argv[0]


def _existing_demo_namespaces(prefix: str) -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"{prefix}-")]


def down(plan: DemoPlan) -> None:
    """Remove every namespace, process and file the demo made. Safe to run repeatedly."""
    pid_file = plan.run_dir / "forwarder.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink(missing_ok=True)
    namespaces = _existing_demo_namespaces(plan.prefix)
    for ns in namespaces:
        for pid in _sh(["ip", "netns", "pids", ns], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in sorted(namespaces, reverse=True):
        _sh(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(plan.run_dir, ignore_errors=True)
    shutil.rmtree(plan.state_dir, ignore_errors=True)
    print(f"weft demo: removed {len(namespaces)} namespaces")


def _build_underlay(plan: DemoPlan) -> None:
    sw = plan.switch_ns
    _sh(["ip", "netns", "add", sw])
    _sh(["ip", "-n", sw, "link", "set", "lo", "up"])
    _sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
    _sh(["ip", "-n", sw, "link", "set", "br0", "up"])
    for i in plan.host_indexes():
        ns = plan.host_ns(i)
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        # temporary names in the root namespace are unique per prefix, then renamed inside
        tmp = f"{plan.prefix[:8]}{i}"
        _sh(["ip", "link", "add", f"{tmp}p", "type", "veth", "peer", "name", f"{tmp}e"])
        _sh(["ip", "link", "set", f"{tmp}p", "netns", sw, "name", f"p{i}"])
        _sh(["ip", "link", "set", f"{tmp}e", "netns", ns, "name", "eth0"])
        _sh(["ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up"])
        _sh(["ip", "-n", ns, "addr", "add", f"{plan.host_ip(i)}/24", "dev", "eth0"])
        _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        for j in range(1, plan.containers_per_host + 1):
            cns = plan.container_ns(i, j)
            _sh(["ip", "netns", "add", cns])
            _sh(["ip", "-n", cns, "link", "set", "lo", "up"])


def _launch_routers(plan: DemoPlan, password: str | None) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    password_args: list[str] = []
    if password:
        pw_file = plan.run_dir / "password"
        pw_file.write_text(password)
        pw_file.chmod(0o600)
        password_args = ["--password-file", str(pw_file)]
    for i in plan.host_indexes():
        peers = [] if i == 1 else [plan.host_ip(1)]
        _weft_in(
            plan.host_ns(i),
            "launch",
            "--nickname",
            f"host{i}",
            "--data-dir",
            str(plan.state_dir / f"h{i}"),
            "--api-socket",
            str(plan.run_dir / f"h{i}.sock"),
            # the hosts split the address range among themselves once all are known
            "--ipalloc-init",
            f"consensus={plan.hosts}",
            *password_args,
            *peers,
            timeout=120,
        )
        print(f"weft demo: router on host{i} ({plan.host_ip(i)}) launched")


def _attach_containers(plan: DemoPlan) -> dict[tuple[int, int], str]:
    """Expose each host and attach its containers, all with addresses from weft's IPAM;
    returns each container's address."""
    for i in plan.host_indexes():
        exposed = _weft_in(plan.host_ns(i), "expose", timeout=120).split()
        print(f"weft demo: host{i} exposed on the overlay as {' '.join(exposed)}")
    addresses: dict[tuple[int, int], str] = {}
    for i, j in plan.containers():
        out = _weft_in(plan.host_ns(i), "attach", plan.container_ns(i, j), timeout=120).split()
        if not out or "/" not in out[0]:
            raise SystemExit(f"weft demo: attach of h{i}-c{j} returned no address: {out}")
        addresses[(i, j)] = out[0].split("/")[0]
        print(f"weft demo: container h{i}-c{j} attached as {addresses[(i, j)]}")
    return addresses


def _ping(src_ns: str, ip: str) -> bool:
    proc = subprocess.run(
        ["ip", "netns", "exec", src_ns, "ping", "-c1", "-W2", ip], capture_output=True
    )
    return proc.returncode == 0


def _ping_all(plan: DemoPlan, addresses: dict[tuple[int, int], str], deadline: float) -> bool:
    pairs = [(a, b) for a, b in itertools.permutations(plan.containers(), 2) if a[0] != b[0]]
    pending = list(pairs)
    while pending and time.monotonic() < deadline:
        pending = [(a, b) for a, b in pending if not _ping(plan.container_ns(*a), addresses[b])]
        if pending:
            time.sleep(1)
    for a, b in pairs:
        mark = "FAIL" if (a, b) in pending else "ok"
        print(f"  ping h{a[0]}-c{a[1]} -> h{b[0]}-c{b[1]} ({addresses[b]}): {mark}")
    return not pending


# --- UI forwarder: loopback here -> loopback inside host 1's namespace ------------------------


def _enter_netns(ns: str) -> None:
    """Move the calling thread into network namespace ``ns`` (setns affects one thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


async def _forward(ns: str, listen: tuple[str, int], target: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    in_ns = ThreadPoolExecutor(max_workers=1, initializer=_enter_netns, initargs=(ns,))

    def connect_inside() -> int:
        import socket

        sock = socket.create_connection(target, timeout=5)
        sock.setblocking(False)
        return sock.detach()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import socket

        try:
            fd = await loop.run_in_executor(in_ns, connect_inside)
        except OSError:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def _start_forwarder(plan: DemoPlan, port: int) -> None:
    log = open(plan.run_dir / "forwarder.log", "ab")  # noqa: SIM115 - handed to the child
    args = ["--forward-ui", plan.host_ns(1), "--ui-port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "weft.cli.demo", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (plan.run_dir / "forwarder.pid").write_text(str(proc.pid))


def up(plan: DemoPlan, password: str | None, ui_port: int) -> int:
    if _existing_demo_namespaces(plan.prefix):
        print("weft demo: removing the previous demo first")
        down(plan)
    try:
        _build_underlay(plan)
        _launch_routers(plan, password)
        addresses = _attach_containers(plan)
    except BaseException:
        print("weft demo: set-up failed; removing what was made", file=sys.stderr)
        down(plan)
        raise
    print("weft demo: pinging every container from every other host...")
    ok = _ping_all(plan, addresses, time.monotonic() + 90)
    print()
    print(_weft_in(plan.host_ns(1), "status", check=False))
    print(_weft_in(plan.host_ns(1), "status", "connections", check=False))
    if ui_port:
        _start_forwarder(plan, ui_port)
        print(f"weft demo: UI of host1 at http://127.0.0.1:{ui_port}/ui")
    print(
        f"weft demo: try `ip netns exec {plan.host_ns(1)} weft status`;"
        " remove everything with `weft demo --down`"
    )
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weft demo",
        description="Bring up a local weft mesh of N hosts in network namespaces (needs root).",
    )
    parser.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3, 2..50)")
    enc = parser.add_mutually_exclusive_group()
    enc.add_argument(
        "--password", help="encrypt the mesh with this password (default: a generated one)"
    )
    enc.add_argument(
        "--no-encrypt", action="store_true", help="run the mesh unencrypted (plaintext links)"
    )
    parser.add_argument(
        "--down", action="store_true", help="remove the demo and everything it made"
    )
    parser.add_argument(
        "--ui-port",
        type=int,
        default=DEFAULT_UI_PORT,
        help=f"serve host1's UI on 127.0.0.1:PORT here (default {DEFAULT_UI_PORT}; 0: don't)",
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"name prefix of everything the demo makes (default {DEFAULT_PREFIX})",
    )
    parser.add_argument("--forward-ui", metavar="NETNS", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.forward_ui:
        listen = ("127.0.0.1", args.ui_port)
        asyncio.run(_forward(args.forward_ui, listen, ("127.0.0.1", 6784)))
        return 0
    if os.geteuid() != 0:
        print("weft demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", args.prefix):
        print("weft demo: --prefix must be 1-10 lowercase letters or digits", file=sys.stderr)
        return 2
    if args.down:
        down(DemoPlan(prefix=args.prefix))
        return 0
    if not 2 <= args.hosts <= 50:
        print("weft demo: --hosts must be between 2 and 50", file=sys.stderr)
        return 2
    password, how = demo_password(args)
    print(how)
    return up(DemoPlan(hosts=args.hosts, prefix=args.prefix), password, args.ui_port)


if __name__ == "__main__":
    sys.exit(main())
