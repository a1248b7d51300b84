"""Routers on hosts in network namespaces, driven only through the `weft` CLI inside each host.

Issue 2, "Must be shown": four hosts on an underlay launched as a chain (each given only its
predecessor) with a password; discovery makes a full mesh, every connection established and
encrypted; cutting one host's underlay link makes the others drop it and keep their mesh;
restoring it heals; a router with a wrong password is refused and `weft status connections` on
both sides names the password as the reason.

Routers run with the default datapath (`auto`: the sleeve here), so "established" means the
encrypted data path was proven too. The heartbeat is shortened (0.5 s, read timeout 3 s) so a
cut link is noticed in bounded time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integ.hosts import Host, Underlay, have_netns, underlay, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and network namespaces"),
]

N = 4  # the mesh; host N+1 is the intruder with a wrong password
HEARTBEAT = ["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"]
TIMEOUT = 60.0


def weft(host: Host, *args: str, check: bool = True) -> str:
    proc = host.exec(sys.executable, "-m", "weft.cli.main", *args, check=check, timeout=90)
    return proc.stdout + proc.stderr


def report(host: Host) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(weft(host, "report"))
    return doc


def established(host: Host) -> dict[str, dict[str, Any]]:
    """peer name -> connection row, for the established connections of ``host``."""
    conns = report(host)["router"]["connections"]
    return {c["peer"]: c for c in conns if c["state"] == "established"}


@dataclass
class Mesh:
    u: Underlay
    hosts: list[Host]
    names: dict[int, str]  # host index -> peer name

    def others(self, host: Host, among: list[Host] | None = None) -> set[str]:
        return {self.names[h.index] for h in (among or self.hosts) if h is not host}

    def logs(self) -> str:
        out = []
        for h in self.u.hosts:
            log = h.data_dir / "weft.log"
            if log.exists():
                out.append(f"--- h{h.index} ---\n" + "\n".join(log.read_text().splitlines()[-25:]))
        return "\n".join(out)


def launch(host: Host, u: Underlay, password_file: str, *peers: str) -> str:
    out = weft(
        host,
        "launch",
        "--nickname",
        f"h{host.index}",
        "--data-dir",
        str(host.data_dir),
        "--api-socket",
        str(host.data_dir / "weft.sock"),
        "--password-file",
        password_file,
        *HEARTBEAT,
        *peers,
    )
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with underlay(N + 1) as u:
        password = u.base_dir / "password"
        password.write_text("correct horse battery staple\n")
        hosts = u.hosts[:N]
        names: dict[int, str] = {}
        for i, host in enumerate(hosts):
            peers = [hosts[i - 1].ip] if i > 0 else []
            names[host.index] = launch(host, u, str(password), *peers)
        m = Mesh(u, hosts, names)
        try:
            yield m
        finally:
            print(m.logs())  # shown by pytest only when something failed


def full_mesh(m: Mesh, among: list[Host]) -> bool:
    for host in among:
        conns = established(host)
        if set(conns) != m.others(host, among):
            return False
        # control encrypted, and the data path (the sleeve, `auto`'s choice here) proven and
        # encrypted too: "established" means the overlay carried heartbeats both ways
        if not all(
            c["encrypted"] and c["datapath"] == "sleeve" and c.get("data_encrypted")
            for c in conns.values()
        ):
            return False
    return True


def test_chain_discovers_an_encrypted_full_mesh(mesh: Mesh) -> None:
    wait_for(lambda: full_mesh(mesh, mesh.hosts), timeout=TIMEOUT, what="an encrypted full mesh")
    for host in mesh.hosts:
        doc = report(host)["router"]
        assert doc["encryption"] is True
        assert {p["name"] for p in doc["peers"]} == set(mesh.names.values())
        table = weft(host, "status", "connections").splitlines()
        assert table[0].split()[:5] == ["DIR", "ADDRESS", "STATE", "PEER", "ENCRYPTION"]
        states = [line.split()[2:5:2] for line in table[1:]]
        assert states == [["established", "encrypted"]] * (N - 1), table
    # each was given only its predecessor: the others were found by discovery
    assert "Peers: 4" in weft(mesh.hosts[0], "status")


def test_cut_host_is_dropped_and_the_rest_keep_their_mesh(mesh: Mesh) -> None:
    wait_for(lambda: full_mesh(mesh, mesh.hosts), timeout=TIMEOUT, what="full mesh before cut")
    rest, cut = mesh.hosts[:-1], mesh.hosts[-1]
    before = {h.index: {p: c["address"] for p, c in established(h).items()} for h in rest}
    cut.cut()
    try:

        def dropped() -> bool:
            return all(mesh.names[cut.index] not in established(h) for h in rest)

        wait_for(dropped, timeout=TIMEOUT, what="the others to drop the cut host")
        assert full_mesh(mesh, rest)
        # the survivors' connections are the same ones as before the cut (not re-made)
        for h in rest:
            now = {p: c["address"] for p, c in established(h).items()}
            assert now == {p: a for p, a in before[h.index].items() if p in now}

        def forgotten() -> bool:  # unreachable peers are garbage-collected
            return all(
                mesh.names[cut.index] not in {p["name"] for p in report(h)["router"]["peers"]}
                for h in rest
            )

        wait_for(forgotten, timeout=TIMEOUT, what="the cut host's record to be collected")
    finally:
        cut.restore()
    wait_for(lambda: full_mesh(mesh, mesh.hosts), timeout=TIMEOUT, what="the mesh to heal")


def test_wrong_password_is_refused_and_named_on_both_sides(mesh: Mesh) -> None:
    intruder = mesh.u.hosts[N]
    wrong = mesh.u.base_dir / "wrong-password"
    wrong.write_text("not the password\n")
    target = mesh.hosts[0]
    name = launch(intruder, mesh.u, str(wrong), target.ip)

    def names_password(host: Host, peer_addr: str) -> bool:
        table = weft(host, "status", "connections")
        return any(
            peer_addr in line
            and "wrong password" in line
            and ("failed" in line or "retrying" in line)
            for line in table.splitlines()
        )

    wait_for(lambda: names_password(intruder, target.ip), timeout=TIMEOUT, what="intruder's row")
    wait_for(lambda: names_password(target, intruder.ip), timeout=TIMEOUT, what="target's row")
    assert name not in established(target)
    assert established(intruder) == {}
    assert full_mesh(mesh, mesh.hosts)  # the mesh is unaffected

    # `weft stop` ends the intruder's router; after that its CLI gets a one-line error
    weft(intruder, "stop")
    proc = intruder.exec(sys.executable, "-m", "weft.cli.main", "status", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("weft status: cannot reach the weft router at 127.0.0.1:6784")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
