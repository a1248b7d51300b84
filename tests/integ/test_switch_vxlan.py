"""The overlay switch on real namespaces: 3 hosts running `weft router --datapath auto` with the
switch (sleeve + Linux VXLAN), one container each, short fast-path heartbeats
(``WEFT_FASTDP_HEARTBEAT``), no password.

Shown: every connection on vxlan (`weft status connections`), ping, a 50 MB TCP transfer with
matching checksum, ARP over the tunnel, known unicast sent to one peer only (MAC announcements
-> FDB entries); an nftables rule dropping UDP 6784 on one host moves that host's connections to
sleeve with the reason shown while pings keep answering (a short gap allowed), removing it moves
them back; the fallbacks are counted. A second, encrypted pair stays on sleeve and says why.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integ.hosts import Host, Underlay, have_netns, run, underlay, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]

REPO = Path(__file__).resolve().parents[2]
ENV = {"WEFT_FASTDP_HEARTBEAT": "0.25,0.5,4", "WEFT_FASTDP_RECOVERY_HOLD": "0.5"}


@dataclass
class Mesh:
    u: Underlay
    hosts: list[Host]
    containers: list[tuple[str, str]]  # (netns, ip) per host


def api(host: Host, path: str, body: dict[str, Any] | None = None) -> Any:
    args = ["curl", "-s", "-f", "--max-time", "10"]
    if body is not None:
        args += ["-X", "POST", "-H", "Content-Type: application/json", "-d", json.dumps(body)]
    proc = host.exec(*args, f"http://127.0.0.1:6784{path}", check=False)
    if proc.returncode != 0 or not proc.stdout:
        return {}
    return json.loads(proc.stdout)


def connections(host: Host) -> dict[str, dict[str, Any]]:
    rows = api(host, "/status").get("router", {}).get("connections", [])
    return {str(r.get("nickname")): r for r in rows if r.get("peer")}


def datapaths(host: Host) -> dict[str, str]:
    return {
        nick: str(r.get("datapath"))
        for nick, r in connections(host).items()
        if r.get("state") == "established"
    }


def all_on(host: Host, nicks: set[str], datapath: str) -> bool:
    found = datapaths(host)
    return all(found.get(nick) == datapath for nick in nicks)


def start_router(host: Host, i: int, peers: list[str], env: dict[str, str]) -> None:
    host.spawn(
        sys.executable, "-m", "weft.cli.main", "router", "--data-dir", str(host.data_dir),
        "--api-socket", "", "--datapath", "auto", "--nickname", f"h{i}",
        "--heartbeat-interval", "1", "--heartbeat-timeout", "20", *peers,
        log=host.data_dir / "router.log", env={**env, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def pings(ns: str, ip: str, extra: tuple[str, ...] = ()) -> bool:
    cmd = ["ip", "netns", "exec", ns, "ping", "-c1", "-W1", *extra, ip]
    return run(cmd, check=False).returncode == 0


def dump_logs(u: Underlay) -> None:
    for host in u.hosts:
        log = host.data_dir / "router.log"
        if log.exists():
            sys.stderr.write(f"--- {host.ns} router log (tail) ---\n{log.read_text()[-6000:]}\n")


def make_mesh(
    n: int, net: int, env: dict[str, str], stale_vxlan: bool = False
) -> tuple[Underlay, list[tuple[str, str]]]:
    u = Underlay(n, net=net)
    try:
        if stale_vxlan:  # as a crashed unencrypted router would leave it, FDB included
            u.hosts[0].sh(
                "ip link add vxlan-weft type vxlan id 16777215 dstport 6784 dev eth0"
                f" && bridge fdb append 00:00:00:00:00:00 dev vxlan-weft dst {u.hosts[1].ip}"
            )
        for i, host in enumerate(u.hosts, 1):
            start_router(host, i, [h.ip for h in u.hosts if h is not host], env)
        containers = []
        for i, host in enumerate(u.hosts, 1):
            wait_for(partial(api, host, "/status"), timeout=60, what=f"router h{i} up")
            ns = host.add_netns("c")
            ip = f"10.32.{net}.{i}"
            body = {"netns": ns, "ip": [f"{ip}/16"]}
            reply = wait_for(
                partial(api, host, "/attach", body), timeout=30, what=f"attach on h{i}"
            )
            assert reply
            containers.append((ns, ip))
    except BaseException:  # leave nothing behind, and say why the routers did not come up
        dump_logs(u)
        u.close()
        raise
    return u, containers


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    u, containers = make_mesh(3, 81, ENV)
    try:
        for i, host in enumerate(u.hosts, 1):
            others = {f"h{j}" for j in range(1, 4) if j != i}
            wait_for(
                partial(all_on, host, others, "vxlan"),
                timeout=60,
                what=f"h{i}: every connection on vxlan",
            )
        yield Mesh(u, list(u.hosts), containers)
    finally:
        dump_logs(u)
        u.close()


def test_connections_on_vxlan_in_weft_status(mesh: Mesh) -> None:
    h1 = mesh.hosts[0]
    out = h1.exec(
        sys.executable, "-m", "weft.cli.main", "status", "connections",
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if "h2" in line or "h3" in line]
    assert len(rows) == 2 and all("vxlan" in row for row in rows), out
    row = connections(h1)["h2"]
    assert row["mtu"] == 1450 and row["state"] == "established"
    overlay = api(h1, "/status")["overlay"]
    assert overlay["datapath"] == "auto"
    assert overlay["switch"]["vxlan"]["mtu"] == 1450
    assert overlay["switch"]["container_mtu"] == 1376
    details = h1.exec("ip", "-d", "link", "show", "vxlan-weft").stdout
    assert "master weft" in details and "isolated on" in details
    assert "isolated on" in h1.exec("ip", "-d", "link", "show", "weft-tap").stdout


def test_ping_all_pairs_and_arp_over_the_tunnel(mesh: Mesh) -> None:
    cs = mesh.containers

    def all_ping() -> bool:
        return all(pings(a[0], b[1]) for a in cs for b in cs if a != b)

    wait_for(all_ping, timeout=60, interval=0.5, what="every container pings every other")
    # ARP again from scratch: the broadcast must cross the tunnel (flood entries).
    run(["ip", "-n", cs[0][0], "neigh", "flush", "all"])
    assert pings(cs[0][0], cs[1][1])
    # Full-size packets with DF: 1376-byte IP packets (the container MTU).
    assert pings(cs[0][0], cs[2][1], ("-s", "1348", "-M", "do"))


def vxlan_tx(host: Host) -> int:
    out = host.exec("cat", "/sys/class/net/vxlan-weft/statistics/tx_bytes").stdout
    return int(out)


def sleeve_tap_frames(host: Host) -> int:
    stats = api(host, "/status").get("overlay", {}).get("stats", {})
    return int(stats.get("tap_frames_in", 0))


def mac_of(ns: str) -> str:
    return run(["ip", "-n", ns, "-br", "link", "show", "ethwe"]).stdout.split()[2]


def fdb_points_at(host: Host, mac: str, ip: str) -> bool:
    """``mac`` goes into the tunnel towards ``ip``: a vxlan FDB entry and a static, sticky
    bridge entry on the vxlan port."""
    lines = host.exec("bridge", "fdb", "show", "dev", "vxlan-weft").stdout.splitlines()
    bridge_entry = [
        line for line in lines if line.startswith(mac) and "master weft" in line.split(mac)[1]
    ]
    return f"{mac} dst {ip} self permanent" in lines and any(
        "static" in line.split() and "sticky" in line.split() for line in bridge_entry
    )


def fdb_mentions(host: Host, mac: str, ip: str) -> bool:
    fdb = host.exec("bridge", "fdb", "show", "dev", "vxlan-weft").stdout
    return mac in fdb or f"00:00:00:00:00:00 dst {ip}" in fdb


def test_traffic_goes_by_vxlan_and_macs_get_fdb_entries(mesh: Mesh) -> None:
    h1, h2, _ = mesh.hosts
    (c1, _), (c2, ip2), _ = mesh.containers
    mac2 = mac_of(c2)

    wait_for(
        partial(fdb_points_at, h1, mac2, h2.ip),
        timeout=30,
        what="h1's vxlan FDB and bridge point c2's MAC at the tunnel to h2",
    )
    tx, frames = vxlan_tx(h1), sleeve_tap_frames(h1)
    for _ in range(20):
        pings(c1, ip2)
    assert vxlan_tx(h1) - tx >= 20 * 84  # 20 echo requests (84-byte IP packets) at least
    assert sleeve_tap_frames(h1) - frames < 10  # the sleeve saw (almost) nothing


def test_broadcast_reaches_every_container_exactly_once(mesh: Mesh) -> None:
    """Broadcasts go by the tunnel's flood entries only: the sleeve leaves carried peers out and
    the isolated bridge ports never pass a frame between the tunnel and the sleeve."""
    (c1, _), (c2, _), (c3, _) = mesh.containers
    listen = """
        import select, socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 9999)); print("ready", flush=True)
        got = []
        while select.select([s], [], [], 3)[0]:
            got.append(s.recv(100).decode())
        print(" ".join(sorted(got)))
        """
    receivers = [_py(ns, listen) for ns in (c2, c3)]
    for proc in receivers:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    sender = _py(
        c1,
        """
        import socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for i in range(5):
            s.sendto(f"b{i}".encode(), ("10.32.255.255", 9999)); time.sleep(0.1)
        """,
    )
    _finish(sender)
    for proc in receivers:
        assert _finish(proc).split() == ["b0", "b1", "b2", "b3", "b4"]


def _py(ns: str, code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"helper timed out\nstdout: {out}\nstderr: {err}") from None
    assert proc.returncode == 0, f"helper failed ({proc.returncode}): {err}"
    return out


def test_50mb_tcp_transfer_checksum(mesh: Mesh) -> None:
    (c1, _), (c2, ip2), _ = mesh.containers
    tx = vxlan_tx(mesh.hosts[0])
    server = _py(
        c2,
        f"""
        import hashlib, socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("{ip2}", 5001)); s.listen(1); print("ready", flush=True)
        c, _ = s.accept(); h = hashlib.sha256(); n = 0
        while chunk := c.recv(1 << 20):
            h.update(chunk); n += len(chunk)
        print(n, h.hexdigest())
        """,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    client = _py(
        c1,
        f"""
        import hashlib, random, socket
        data = random.Random(6784).randbytes(50 * 1024 * 1024)
        c = socket.create_connection(("{ip2}", 5001), timeout=60)
        c.sendall(data); c.close()
        print(len(data), hashlib.sha256(data).hexdigest())
        """,
    )
    sent = _finish(client).split()
    received = _finish(server).split()
    assert sent == received and sent[0] == str(50 * 1024 * 1024)
    assert vxlan_tx(mesh.hosts[0]) - tx > 50 * 1024 * 1024  # it went through the tunnel


def test_blocking_udp_6784_falls_back_to_sleeve_and_returns(mesh: Mesh) -> None:
    h1, h2, h3 = mesh.hosts
    (c1, _), (_, ip2), _ = mesh.containers
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", c1, "ping", "-i", "0.1", "-W", "1", ip2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    table = "wfswitch"
    try:
        time.sleep(0.5)  # a few answered pings before the cut (what "throughout" compares to)
        h2.sh(
            f"nft add table inet {table}"
            f" && nft add chain inet {table} in '{{ type filter hook input priority 0; }}'"
            f" && nft add rule inet {table} in udp dport 6784 drop"
        )
        wait_for(
            lambda: datapaths(h1).get("h2") == "sleeve" and datapaths(h2).get("h1") == "sleeve",
            timeout=30,
            what="h1<->h2 on sleeve",
        )
        # Nothing points into the tunnel to h2 any more: no MAC, no flood entry.
        mac2 = mac_of(mesh.containers[1][0])
        wait_for(lambda: not fdb_mentions(h1, mac2, h2.ip), timeout=10, what="h1 FDB cleaned")
        info = connections(h1)["h2"]["info"]
        assert "vxlan:" in info and "using sleeve" in info, info
        assert "6784" in info or "peer's heartbeats" in info, info
        wait_for(lambda: datapaths(h3).get("h2") == "sleeve", timeout=30, what="h3->h2 sleeve")
        assert datapaths(h1).get("h3") == "vxlan"  # untouched by the rule
        out = h1.exec(sys.executable, "-m", "weft.cli.main", "status", "connections").stdout
        assert "using sleeve" in out, out
        wait_for(lambda: pings(c1, ip2), timeout=20, what="ping over sleeve")
        fallbacks = api(h1, "/status")["overlay"]["switch"]["fallbacks"]
        assert fallbacks.get("vxlan->sleeve", 0) >= 1
        metrics = h1.exec("curl", "-s", "http://127.0.0.1:6784/metrics", check=False).stdout
        moved = {
            sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "weft_datapath_fallbacks_total"
            and sample.labels["from_datapath"] == "vxlan"
            and sample.labels["to_datapath"] == "sleeve"
        }
        # the rule drops the tunnel's heartbeats: ours or the peer's went unanswered
        assert moved.get("heartbeat_lost", 0) + moved.get("peer_heartbeat_lost", 0) >= 1, moved
        assert moved.get("mtu") == 0 and moved.get("unavailable") == 0, moved
        frames = {
            sample.labels["direction"]: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "weft_fastdp_frames_total" and sample.labels["datapath"] == "vxlan"
        }
        assert frames.get("out", 0) > 0 and frames.get("in", 0) > 0, frames  # pings, probes
    finally:
        h2.sh(f"nft delete table inet {table}", check=False)
    try:
        wait_for(
            lambda: datapaths(h1).get("h2") == "vxlan" and datapaths(h2).get("h1") == "vxlan",
            timeout=30,
            what="h1<->h2 back on vxlan",
        )
        wait_for(lambda: datapaths(h3).get("h2") == "vxlan", timeout=30, what="h3->h2 vxlan")
        assert connections(h1)["h2"]["info"] == ""
        wait_for(partial(fdb_points_at, h1, mac2, h2.ip), timeout=10, what="h1 FDB back")
        wait_for(lambda: pings(c1, ip2), timeout=20, what="ping over vxlan again")
        time.sleep(1.0)
    finally:
        pinger.terminate()
        out, _ = pinger.communicate(timeout=10)
    replies = [line for line in out.splitlines() if "bytes from" in line]
    seqs = sorted(int(line.split("icmp_seq=")[1].split()[0]) for line in replies)
    assert seqs, out
    # Pings kept answering: the one ping flow was answered before its longest run of lost pings
    # and after it. How long that gap is depends on the load (a figure, printed, not asserted).
    gaps = [b - a - 1 for a, b in itertools.pairwise(seqs)]
    print(f"pings answered {len(seqs)} of {seqs[-1]}, longest gap {max(gaps, default=0)} x 0.1s")
    split = max(range(len(gaps)), key=gaps.__getitem__) + 1 if gaps else len(seqs)
    assert split > 0 and len(seqs) - split > 0, f"answered {seqs[:5]}..{seqs[-5:]}"


def test_a_host_cut_off_on_udp_shows_degraded_while_its_control_connection_lives(
    mesh: Mesh,
) -> None:
    """Issue #17 item 1: with every UDP datagram to h2 dropped (sleeve 6783 and VXLAN 6784) but
    TCP untouched, h1's connection to h2 kept saying "established" until the control
    connection's heartbeat timeout; that never comes here (TCP passes), so the row stayed
    healthy for ever. Now the silent data path shows as "degraded" with the reason, the sleeve
    keeps its MTU (silence is not a smaller path), and everything returns when UDP does."""
    h1, h2, _ = mesh.hosts
    mtu_before = connections(h1)["h2"]["mtu"]
    table = "wfcut"
    try:
        h2.sh(
            f"nft add table inet {table}"
            f" && nft add chain inet {table} in '{{ type filter hook input priority 0; }}'"
            f" && nft add rule inet {table} in meta l4proto udp drop"
        )
        wait_for(
            lambda: connections(h1).get("h2", {}).get("state") == "degraded",
            timeout=60,
            what="h1 shows its connection to h2 degraded",
        )
        row = connections(h1)["h2"]
        assert row["datapath"] == "sleeve" and "silent" in row["info"], row
        assert row["data_state"] in ("degraded", "failed"), row
        # the control connection lives (TCP passes); h2's own sends still arrive at h1 and are
        # answered, so h2's side of the link is truthfully not silent
        assert connections(h2)["h1"]["state"] == "established"
        sleeve = api(h1, "/status")["overlay"]["links"][str(api(h2, "/status")["router"]["name"])]
        assert sleeve["pmtu"] > 548, sleeve  # not lowered to the minimum by the silence
    finally:
        h2.sh(f"nft delete table inet {table}", check=False)
    wait_for(
        lambda: connections(h1).get("h2", {}).get("state") == "established"
        and datapaths(h1).get("h2") == "vxlan",
        timeout=60,
        what="h1<->h2 established on vxlan again",
    )
    assert connections(h1)["h2"]["mtu"] == mtu_before


def test_a_path_too_small_for_the_mtu_falls_back_and_returns(mesh: Mesh) -> None:
    """h3's underlay shrinks to 1400: full-size (1450) probes no longer cross, so h3's
    connections go to sleeve (which finds the smaller path MTU) and come back at 1500."""
    h1, _, h3 = mesh.hosts
    (c1, _), _, (_, ip3) = mesh.containers
    h3.set_mtu(1400)
    try:
        wait_for(
            lambda: datapaths(h1).get("h3") == "sleeve" and datapaths(h3).get("h1") == "sleeve",
            timeout=30,
            what="h1<->h3 on sleeve",
        )
        assert "vxlan:" in connections(h3)["h1"]["info"]
        wait_for(lambda: pings(c1, ip3, ("-s", "1348")), timeout=30, what="full-size over sleeve")
    finally:
        h3.set_mtu(1500)
    wait_for(partial(all_on, h3, {"h1", "h2"}, "vxlan"), timeout=30, what="h3 back on vxlan")
    wait_for(lambda: pings(c1, ip3, ("-s", "1348", "-M", "do")), timeout=20, what="ping")


def test_stop_removes_the_vxlan_device(mesh: Mesh) -> None:
    h3 = mesh.hosts[2]
    assert h3.exec("ip", "link", "show", "vxlan-weft", check=False).returncode == 0
    api(h3, "/stop", {})
    wait_for(
        lambda: h3.exec("ip", "link", "show", "vxlan-weft", check=False).returncode != 0,
        timeout=30,
        what="h3's vxlan device gone after stop",
    )


@pytest.fixture(scope="module")
def encrypted_pair() -> Iterator[Mesh]:
    env = {**ENV, "WEFT_PASSWORD": "integ-switch-password"}
    u, containers = make_mesh(2, 82, env, stale_vxlan=True)
    try:
        for i, host in enumerate(u.hosts, 1):
            other = "h2" if i == 1 else "h1"
            wait_for(
                partial(all_on, host, {other}, "sleeve"),
                timeout=60,
                what=f"h{i}: connection on sleeve",
            )
        yield Mesh(u, list(u.hosts), containers)
    finally:
        dump_logs(u)
        u.close()


def test_encrypted_without_esp_stays_on_sleeve_and_says_so(encrypted_pair: Mesh) -> None:
    h1, h2 = encrypted_pair.hosts
    (c1, _), (_, ip2) = encrypted_pair.containers
    row = connections(h1)["h2"]
    assert row["info"] == "encrypted: kernel has no ESP; using sleeve"
    assert row["datapath"] == "sleeve" and row["data_encrypted"] is True
    wait_for(lambda: pings(c1, ip2), timeout=30, what="encrypted ping over sleeve")
    # No vxlan device at all (h1's stale one was deleted): nothing can leave unencrypted.
    for host in (h1, h2):
        assert host.exec("ip", "link", "show", "vxlan-weft", check=False).returncode != 0
    assert api(h1, "/status")["overlay"]["switch"]["vxlan"] is None


def test_the_strict_esp_guard_drops_plain_udp_6784_from_anyone() -> None:
    """What a router with a password and ESP puts in place before its vxlan device exists
    (weft.fastdp.esp_links.StrictInboundGuard): plain UDP 6784 is dropped whatever its source,
    other ports pass; stop removes the table."""
    from weft.fastdp.esp_links import StrictInboundGuard

    with underlay(2, net=83) as u:
        h1, h2 = u.hosts
        guard = StrictInboundGuard(nft=("ip", "netns", "exec", h2.ns, "nft"))
        listen = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind(('0.0.0.0', {port})); s.settimeout(3); print('ready', flush=True); "
            "print(s.recv(100).decode())"
        )

        def delivered(port: int) -> bool:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h2.ns, sys.executable, "-c", listen.format(port=port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            send = (
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"[s.sendto(b'plain', ('{h2.ip}', {port})) for _ in range(3)]"
            )
            h1.exec(sys.executable, "-c", send)
            out, _ = proc.communicate(timeout=30)
            return proc.returncode == 0 and "plain" in out

        guard.start()
        try:
            rules = h2.exec("nft", "list", "table", "inet", "weft-esp").stdout
            assert "udp dport 6784 meta ipsec missing" in rules and "saddr" not in rules
            assert not delivered(6784)
            assert delivered(6785)
            assert "packets 0 " not in h2.exec("nft", "list", "table", "inet", "weft-esp").stdout
            guard.start()  # again: recreated, not duplicated
            rules = h2.exec("nft", "list", "table", "inet", "weft-esp").stdout
            assert rules.count("meta ipsec missing") == 1
        finally:
            guard.stop()
        assert h2.exec("nft", "list", "table", "inet", "weft-esp", check=False).returncode != 0
        assert delivered(6784)
