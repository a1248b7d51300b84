"""IPAM across three hosts in network namespaces (issue 4, "Must be shown").

Each host runs ``weft launch`` (IPAM composed by the daemon, SQLite in the host's data dir) on its
own underlay address; the test talks to each through its HTTP API on 127.0.0.1:6784 inside the
host. Shown: consensus among the three; concurrent allocations on all hosts never hand out an
address twice; ``kill -9`` of one router and a relaunch keep its allocations (it re-claims them,
same address for the same container); a host stopped for good is ``rmpeer``-ed from another and
its space is used again.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest

from tests.integ.hosts import Host, Underlay, have_netns, underlay, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and network namespaces"),
]

TIMEOUT = 60.0

CLIENT = textwrap.dedent(
    """
    import json, sys, urllib.request, urllib.error
    from concurrent.futures import ThreadPoolExecutor

    def call(item):
        method, path = item
        req = urllib.request.Request("http://127.0.0.1:6784" + path, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return [r.status, json.loads(r.read())]
        except urllib.error.HTTPError as err:
            return [err.code, json.loads(err.read())]

    items = json.loads(sys.argv[1])
    with ThreadPoolExecutor(8) as pool:
        print(json.dumps(list(pool.map(call, items))))
    """
)


def api_many(host: Host, calls: list[tuple[str, str]]) -> list[tuple[int, Any]]:
    proc = host.exec(sys.executable, "-c", CLIENT, json.dumps(calls), timeout=120)
    return [(code, body) for code, body in json.loads(proc.stdout)]


def api(host: Host, method: str, path: str) -> tuple[int, Any]:
    return api_many(host, [(method, path)])[0]


def weft(host: Host, *args: str, check: bool = True) -> str:
    proc = host.exec(sys.executable, "-m", "weft.cli.main", *args, check=check, timeout=90)
    return proc.stdout + proc.stderr


@dataclass
class Cluster:
    u: Underlay
    hosts: list[Host]

    def start(self, host: Host, *peers: str) -> None:
        weft(
            host,
            "launch",
            "--nickname",
            f"h{host.index}",
            "--data-dir",
            str(host.data_dir),
            "--api-socket",
            str(host.data_dir / "weft.sock"),
            "--datapath",
            "none",
            "--heartbeat-interval",
            "0.5",
            "--heartbeat-timeout",
            "3",
            "--ipalloc-range",
            "10.32.0.0/22",
            "--ipalloc-init",
            "consensus=3",
            *peers,
        )

    def kill(self, host: Host) -> None:
        """kill -9 the host's router (its pid from its own status)."""
        pid = int(self.status(host)["router"]["pid"])
        host.exec("kill", "-9", str(pid))
        wait_for(lambda: not _alive(pid), timeout=TIMEOUT, what=f"router {pid} gone")

    def status(self, host: Host) -> dict[str, Any]:
        code, body = api(host, "GET", "/status")
        assert code == 200
        return dict(body)

    def logs(self) -> str:
        out = []
        for h in self.hosts:
            log = h.data_dir / "weft.log"
            if log.exists():
                out.append(f"--- h{h.index} ---\n" + "\n".join(log.read_text().splitlines()[-30:]))
        return "\n".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with underlay(3, net=78) as u:
        c = Cluster(u, u.hosts)
        try:
            for i, host in enumerate(c.hosts):
                c.start(host, *([c.hosts[i - 1].ip] if i else []))
            yield c
        finally:
            print(c.logs())  # shown by pytest only when something failed


def ready(c: Cluster, host: Host) -> bool:
    return bool(c.status(host)["ipam"]["ready"])


def test_consensus_concurrent_allocation_restart_and_rmpeer(cluster: Cluster) -> None:
    c = cluster
    h1, h2, h3 = c.hosts
    wait_for(lambda: all(ready(c, h) for h in c.hosts), timeout=TIMEOUT, what="IPAM ready")
    seeds = {tuple(c.status(h)["ipam"]["seeds"]) for h in c.hosts}
    assert len(seeds) == 1 and len(next(iter(seeds))) == 3
    names = {h.index: c.status(h)["router"]["name"] for h in c.hosts}

    # 3 hosts x 30 containers at once
    results: dict[int, list[tuple[int, Any]]] = {}

    def run(host: Host) -> None:
        results[host.index] = api_many(
            host, [("POST", f"/ip/h{host.index}-c{i}") for i in range(30)]
        )

    threads = [threading.Thread(target=run, args=(h,)) for h in c.hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    addresses = []
    for index, rows in results.items():
        assert all(code == 200 for code, _ in rows), (index, rows)
        addresses += [body["address"] for _, body in rows]
    assert len(addresses) == 90 and len(set(addresses)) == 90

    # kill -9 h1's router and restart it: same allocations, same answer per container
    before = api(h1, "GET", "/ip")[1]["allocations"]
    c.kill(h1)
    c.start(h1)  # its direct targets are persisted in the data dir
    wait_for(lambda: ready(c, h1), timeout=TIMEOUT, what="h1 back with its ring")
    assert api(h1, "GET", "/ip")[1]["allocations"] == before
    code, body = api(h1, "POST", "/ip/h1-c3")
    was = {a["container_id"]: a["cidr"] for a in before}
    assert code == 200 and body["cidr"] == was["h1-c3"]

    # h3 goes away for good; rmpeer it from h2; its space is used again
    gone = names[3]
    c.kill(h3)

    def h3_unreachable() -> bool:
        entries = c.status(h2)["ipam"]["entries"]
        return any(e["peer"] == gone and not e["reachable"] for e in entries)

    wait_for(h3_unreachable, timeout=TIMEOUT, what="h3 unreachable in h2's ipam status")
    code, body = api(h2, "POST", "/rmpeer/02:00:00:00:00:99")
    assert code == 404 and "unknown peer" in body["error"]
    code, body = api(h2, "POST", f"/rmpeer/{gone}")
    assert code == 200 and body["taken"] > 0, body
    wait_for(
        lambda: gone not in {e["peer"] for e in c.status(h1)["ipam"]["entries"]},
        timeout=TIMEOUT,
        what="the takeover to reach h1",
    )
    # an address h3 used to hold (it had handed out h3-c0 from its own span) is free again:
    # h1 claims it, which h2 (its owner now) hands over
    h3_had = {b["container_id"]: b["address"] for _, b in results[3]}
    h3_first = IPv4Address(h3_had["h3-c0"])
    code, body = api(h1, "PUT", f"/ip/reuse/{h3_first}/22")
    assert code == 200 and body["address"] == str(h3_first), body
    assert c.status(h2)["ipam"]["unreachable"] == 0
