"""What the in-VM check scripts (tests/e2e/qemu/check_*.py) share: waiting, the routers' HTTP
API, starting a router on a host of tests/integ/hosts.py, and entering a network namespace.

Imported inside the VM with the repository on ``PYTHONPATH`` (the scripts put it first on
``sys.path``). Python is slow under TCG: every wait is bounded by a condition with a generous
timeout.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from tests.integ.hosts import Host, wait_for

__all__ = [
    "api",
    "attach_containers",
    "connection",
    "enter_netns",
    "on_datapath",
    "start_router",
    "wait",
]

API = "http://127.0.0.1:6784"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    """Poll ``predicate`` until truthy (exceptions count as not yet); AssertionError after
    ``timeout`` seconds, naming ``what``."""
    return wait_for(predicate, timeout=timeout, interval=interval, what=what)


def api(host: Host, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    """GET (or POST ``body`` to) the router API on ``host``; {} when it does not answer."""
    args = ["curl", "-s", "-f", "--max-time", "20"]
    if body is not None:
        args += ["-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body)]
    proc = host.exec(*args, f"{API}{path}", check=False, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout:
        return {}
    return json.loads(proc.stdout)


def connection(host: Host, nick: str) -> dict[str, Any]:
    """The router's connection row to the peer nicknamed ``nick`` ({} while there is none)."""
    rows = api(host, "/status").get("router", {}).get("connections", [])
    return dict(next((r for r in rows if r.get("nickname") == nick and r.get("peer")), {}))


def on_datapath(host: Host, nick: str, datapath: str, *, encrypted: bool = False) -> bool:
    """The connection to ``nick`` is established on ``datapath`` (and, with ``encrypted``, its
    data is encrypted)."""
    row = connection(host, nick)
    return (
        row.get("state") == "established"
        and row.get("datapath") == datapath
        and (not encrypted or row.get("data_encrypted") is True)
    )


def start_router(
    host: Host,
    i: int,
    peer_ip: str,
    *,
    datapath: str,
    env: dict[str, str],
    heartbeat: tuple[str, str],
) -> None:
    """``weft router`` on ``host`` (nickname ``h<i>``, API on TCP 6784, no socket) towards
    ``peer_ip``; ``heartbeat`` is the control connection's (interval, timeout) in seconds."""
    interval, timeout = heartbeat
    host.spawn(
        sys.executable, "-m", "weft.cli.main", "router", "--data-dir", str(host.data_dir),
        "--api-socket", "", "--datapath", datapath, "--nickname", f"h{i}",
        "--heartbeat-interval", interval, "--heartbeat-timeout", timeout, peer_ip,
        log=host.data_dir / "router.log", env=env,
    )  # fmt: skip


def attach_containers(
    hosts: Sequence[Host],
    subnet: str,
    *,
    up_timeout: float,
    attach_timeout: float,
    interval: float = 0.3,
) -> list[tuple[str, str]]:
    """Once each host's router answers, a container (namespace) attached with address
    ``<subnet>.<i>/16`` on the i-th host (from 1); returns ``(namespace, address)`` each."""
    containers = []
    for i, host in enumerate(hosts, 1):
        wait(partial(api, host, "/status"), up_timeout, f"router h{i} up", interval)
        ns = host.add_netns("c")
        ip = f"{subnet}.{i}"
        body = {"netns": ns, "ip": [f"{ip}/16"]}
        wait(partial(api, host, "/attach", body), attach_timeout, f"attach h{i}", interval)
        containers.append((ns, ip))
    return containers


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into a named network namespace ("" = the VM's)."""
    fd = os.open(f"/run/netns/{name}" if name else "/proc/1/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)
