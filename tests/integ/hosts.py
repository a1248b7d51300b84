"""Test hosts as network namespaces on a shared underlay.

Layout: one "switch" namespace holding a bridge, one namespace per host with ``eth0`` (a veth into
the switch bridge) at ``192.168.<net>.<i>/24``. Every name starts with a per-run prefix so parallel
runs never collide, and :meth:`Underlay.close` removes everything (processes first), also after a
failure. Traffic stays inside these namespaces.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "Underlay", "have_netns", "run", "underlay", "wait_for", "wait_until"]


def run(
    args: Sequence[str], *, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise with its stderr when ``check`` and it fails."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {shlex.join(args)}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def have_netns() -> bool:
    """True when this process may create network namespaces (root with iproute2)."""
    return (os.geteuid() == 0 and Path("/usr/sbin/ip").exists()) or Path("/sbin/ip").exists()


def wait_for(
    predicate: Callable[[], object], *, timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # the condition may not be checkable yet
            last_error = err
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what or predicate!r}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        time.sleep(interval)


async def wait_until(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """The event-loop form of :func:`wait_for`, for routers running in the test's own loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Host:
    """A host namespace on the underlay."""

    underlay: Underlay
    index: int
    ns: str
    ip: str
    switch_port: str
    data_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns, *args], check=check, timeout=timeout)

    def sh(
        self, script: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.exec("sh", "-c", script, check=check, timeout=timeout)

    def spawn(
        self, *args: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in this host; it is killed by :meth:`Underlay.close`."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Disconnect this host from the underlay (its switch port goes down)."""
        run(["ip", "-n", self.underlay.switch_ns, "link", "set", self.switch_port, "down"])

    def restore(self) -> None:
        run(["ip", "-n", self.underlay.switch_ns, "link", "set", self.switch_port, "up"])

    def set_mtu(self, mtu: int) -> None:
        """Set the underlay MTU on both ends of this host's link."""
        run(["ip", "-n", self.ns, "link", "set", "eth0", "mtu", str(mtu)])
        run(["ip", "-n", self.underlay.switch_ns, "link", "set", self.switch_port, "mtu", str(mtu)])

    def add_netns(self, suffix: str) -> str:
        """Create an extra namespace (e.g. a container) owned by this run; returns its name."""
        name = f"{self.ns}-{suffix}"
        self.underlay.make_ns(name)
        return name


class Underlay:
    """A switch namespace and ``n`` host namespaces joined by veths into the switch's bridge."""

    def __init__(
        self, n: int, *, net: int = 77, mtu: int = 1500, base_dir: Path | None = None
    ) -> None:
        self.prefix = f"wf{secrets.token_hex(2)}"
        self.switch_ns = f"{self.prefix}-sw"
        self.namespaces: list[str] = []
        self.hosts: list[Host] = []
        self.base_dir = base_dir or Path(f"/tmp/{self.prefix}")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.make_ns(self.switch_ns)
            run(["ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.switch_ns, "link", "set", "br0", "up"])
            for i in range(1, n + 1):
                self.add_host(i, net=net, mtu=mtu)
        except BaseException:
            self.close()
            raise

    def make_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def add_host(self, i: int, *, net: int, mtu: int) -> Host:
        ns = f"{self.prefix}-h{i}"
        self.make_ns(ns)
        port = f"p{i}"
        run(
            [
                "ip",
                "link",
                "add",
                f"{self.prefix}p{i}",
                "type",
                "veth",
                "peer",
                "name",
                f"{self.prefix}e{i}",
            ]
        )
        run(["ip", "link", "set", f"{self.prefix}p{i}", "netns", self.switch_ns, "name", port])
        run(["ip", "link", "set", f"{self.prefix}e{i}", "netns", ns, "name", "eth0"])
        run(
            [
                "ip",
                "-n",
                self.switch_ns,
                "link",
                "set",
                port,
                "master",
                "br0",
                "mtu",
                str(mtu),
                "up",
            ]
        )
        ip = f"192.168.{net}.{i}"
        run(["ip", "-n", ns, "link", "set", "eth0", "mtu", str(mtu), "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        data_dir = self.base_dir / f"h{i}"
        data_dir.mkdir(parents=True, exist_ok=True)
        host = Host(self, i, ns, ip, port, data_dir)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        """Kill every process in our namespaces, then delete the namespaces. Never raises."""
        for host in self.hosts:
            for proc in host.procs:
                if proc.poll() is None:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        for name in reversed(self.namespaces):
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for name in reversed(self.namespaces):
            run(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()


@contextmanager
def underlay(n: int, **kwargs: object) -> Iterator[Underlay]:
    """``with underlay(3) as u: ...`` — everything is removed on exit, also on failure."""
    u = Underlay(n, **kwargs)  # type: ignore[arg-type]
    try:
        yield u
    finally:
        u.close()
