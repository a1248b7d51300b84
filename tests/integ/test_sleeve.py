"""The sleeve on real namespaces: 3 hosts running `weft router`, 2 containers each, encrypted.

One mesh per module (built once, it is the expensive part):

* host 1 and host 3 cannot exchange UDP (an nftables rule on host 1), so their traffic is relayed
  by host 2 along the mesh routes;
* host 3's underlay has MTU 1280, so the sleeve's path-MTU discovery has to find it;
* a password is set, so everything on the underlay is sealed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integ.hosts import Host, Underlay, have_netns, run, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]

PASSWORD = "integ-sleeve-password"


@dataclass
class Container:
    host: Host
    ns: str
    ip: str

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return run(
            ["ip", "netns", "exec", self.ns, "sh", "-c", script], check=check, timeout=timeout
        ).stdout

    def pings(self, ip: str, extra: str = "") -> bool:
        cmd = ["ip", "netns", "exec", self.ns, "ping", "-c1", "-W2", *extra.split(), ip]
        return run(cmd, check=False).returncode == 0


@dataclass
class Mesh:
    u: Underlay
    hosts: list[Host]
    containers: dict[str, Container]


def status(host: Host) -> dict[str, Any]:
    proc = host.exec("curl", "-s", "--max-time", "3", "http://127.0.0.1:6784/status", check=False)
    if proc.returncode != 0 or not proc.stdout:
        return {}
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def established_to(host: Host) -> set[str]:
    conns = status(host).get("router", {}).get("connections", [])
    return {str(c.get("nickname")) for c in conns if c.get("state") == "established"}


def _post(host: Host, path: str, body: dict[str, Any]) -> Any:
    proc = host.exec(
        "curl", "-s", "--max-time", "20", "-X", "POST", "-H", "Content-Type: application/json",
        "-d", json.dumps(body), f"http://127.0.0.1:6784{path}",
    )  # fmt: skip
    return json.loads(proc.stdout)


def attach(host: Host, ns: str, cidr: str) -> dict[str, Any]:
    """``weft attach``'s request to the router's HTTP API."""
    reply: dict[str, Any] = _post(host, "/attach", {"netns": ns, "ip": [cidr]})
    assert reply.get("addresses") == [cidr], reply
    return reply


def detach(host: Host, ns: str) -> None:
    assert _post(host, "/detach", {"netns": ns}) == {"detached": True}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    u = Underlay(3)
    try:
        h1, _, h3 = u.hosts
        h3.set_mtu(1280)
        h1.sh(
            "nft add table inet wfsleeve"
            " && nft add chain inet wfsleeve out '{ type filter hook output priority 0; }'"
            " && nft add chain inet wfsleeve in '{ type filter hook input priority 0; }'"
            f" && nft add rule inet wfsleeve out ip daddr {h3.ip} udp dport 6783 drop"
            f" && nft add rule inet wfsleeve in ip saddr {h3.ip} udp sport 6783 drop"
        )
        for i, host in enumerate(u.hosts, 1):
            peers = [h.ip for h in u.hosts if h is not host]
            host.spawn(
                sys.executable, "-m", "weft.cli.main", "router", "--data-dir", str(host.data_dir),
                "--api-socket", "", "--datapath", "sleeve", "--nickname", f"h{i}", *peers,
                log=host.data_dir / "router.log", env={"WEFT_PASSWORD": PASSWORD},
            )  # fmt: skip
        wait_for(lambda: established_to(h1) >= {"h2"}, timeout=60, what="h1-h2 sleeve")
        wait_for(lambda: established_to(h3) >= {"h2"}, timeout=60, what="h3-h2 sleeve")
        containers = {}
        for i, host in enumerate(u.hosts, 1):
            for j, suffix in enumerate("ab", 1):
                ns = host.add_netns(f"c{suffix}")
                ip = f"10.32.{i}.{j}"
                attach(host, ns, f"{ip}/12")
                containers[f"c{i}{suffix}"] = Container(host, ns, ip)
        yield Mesh(u, list(u.hosts), containers)
    finally:
        for host in u.hosts:
            log = host.data_dir / "router.log"
            if log.exists():
                sys.stderr.write(
                    f"--- {host.ns} router log (tail) ---\n{log.read_text()[-4000:]}\n"
                )
        u.close()


def test_all_pairs_ping(mesh: Mesh) -> None:
    names = sorted(mesh.containers)

    def all_ping() -> bool:
        return all(
            mesh.containers[a].pings(mesh.containers[b].ip) for a in names for b in names if a != b
        )

    wait_for(all_ping, timeout=60, interval=1, what="every container pings every other")


def test_no_direct_udp_between_h1_and_h3_so_h2_relays(mesh: Mesh) -> None:
    h1, h2, _ = mesh.hosts
    assert "h3" not in established_to(h1)
    before = status(h2)["overlay"]["stats"].get("relayed", 0)
    c1, c3 = mesh.containers["c1a"], mesh.containers["c3a"]
    wait_for(lambda: c1.pings(c3.ip), timeout=30, what="c1a -> c3a")
    assert status(h2)["overlay"]["stats"].get("relayed", 0) > before


def test_broadcast_reaches_every_host(mesh: Mesh) -> None:
    for c in mesh.containers.values():
        c.sh("sysctl -qw net.ipv4.icmp_echo_ignore_broadcasts=0")
    src = mesh.containers["c1a"]

    def responders() -> set[str]:
        out = src.sh("ping -b -c 3 -i 0.3 -W 1 10.47.255.255 2>/dev/null || true")
        return set(re.findall(r"from (10\.32\.\d+\.\d+)", out))

    others = {c.ip for name, c in mesh.containers.items() if name != "c1a"}
    wait_for(lambda: responders() >= others, timeout=30, interval=1, what="broadcast replies")
    # ARP resolved the remote containers through the overlay's broadcast tree too.
    neigh = src.sh("ip neigh show dev ethwe")
    assert mesh.containers["c3b"].ip in neigh


def test_expose_and_ps(mesh: Mesh) -> None:
    h1 = mesh.hosts[0]
    proc = h1.exec(
        "curl", "-s", "-f", "--max-time", "10", "-X", "POST",
        "-H", "Content-Type: application/json", "-d", json.dumps({"cidr": "10.32.1.254/12"}),
        "http://127.0.0.1:6784/expose",
    )  # fmt: skip
    assert "10.32.1.254/12" in json.loads(proc.stdout)["addresses"]
    c3 = mesh.containers["c3a"]
    wait_for(
        lambda: h1.exec("ping", "-c1", "-W2", c3.ip, check=False).returncode == 0,
        timeout=30,
        what="host 1 reaches a container on host 3 through its exposed address",
    )
    assert c3.pings("10.32.1.254")
    listed = json.loads(h1.exec("curl", "-s", "-f", "http://127.0.0.1:6784/ps").stdout)
    by_ns = {row["netns"]: row for row in listed}
    for name in ("c1a", "c1b"):
        c = mesh.containers[name]
        if c.host is h1:
            row = by_ns[c.ns]
            assert row["addresses"] == [f"{c.ip}/12"] and re.match(r"^[0-9a-f:]{17}$", row["mac"])


_RECEIVER = """
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept(); h = hashlib.sha256(); n = 0
while True:
    b = conn.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

_SENDER = """
import socket, sys, time
path, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(100):
    try:
        s = socket.create_connection((ip, port), timeout=5); break
    except OSError:
        time.sleep(0.1)
s.settimeout(120)
with open(path, "rb") as f:
    s.sendfile(f)
s.close()
"""


def _transfer_start(src: Container, dst: Container, path: Path, port: int) -> subprocess.Popen[str]:
    recv = subprocess.Popen(
        ["ip", "netns", "exec", dst.ns, sys.executable, "-c", _RECEIVER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == "listening"
    subprocess.Popen(
        ["ip", "netns", "exec", src.ns, sys.executable, "-c", _SENDER, str(path), dst.ip, str(port)]
    ).wait(timeout=300)
    return recv


def _transfer_result(recv: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = recv.communicate(timeout=300)
    n, digest = out.split()
    return int(n), digest


def _random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 << 20))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def test_200mb_both_ways_across_relay_and_small_mtu_arrive_intact(
    mesh: Mesh, tmp_path: Path
) -> None:
    """c1a (host 1) <-> c3a (host 3): relayed by host 2, last hop on a 1280-MTU underlay."""
    c1, c3 = mesh.containers["c1a"], mesh.containers["c3a"]
    wait_for(lambda: c1.pings(c3.ip), timeout=30, what="c1a -> c3a")
    size = 200 * 1024 * 1024
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    want_f, want_b = _random_file(forward, size), _random_file(backward, size)
    t0 = time.monotonic()
    recv_f = subprocess.Popen(
        ["ip", "netns", "exec", c3.ns, sys.executable, "-c", _RECEIVER, "5001"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    recv_b = subprocess.Popen(
        ["ip", "netns", "exec", c1.ns, sys.executable, "-c", _RECEIVER, "5002"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    for r in (recv_f, recv_b):
        assert r.stdout is not None and r.stdout.readline().strip() == "listening"
    send_f = subprocess.Popen(
        ["ip", "netns", "exec", c1.ns, sys.executable, "-c", _SENDER, str(forward), c3.ip, "5001"]
    )
    send_b = subprocess.Popen(
        ["ip", "netns", "exec", c3.ns, sys.executable, "-c", _SENDER, str(backward), c1.ip, "5002"]
    )
    assert send_f.wait(timeout=300) == 0 and send_b.wait(timeout=300) == 0
    assert _transfer_result(recv_f) == (size, want_f)
    assert _transfer_result(recv_b) == (size, want_b)
    elapsed = time.monotonic() - t0
    sys.stderr.write(
        f"2 x 200 MB relayed in {elapsed:.1f}s ({2 * size * 8 / elapsed / 1e9:.2f} Gbit/s)\n"
    )


def test_pmtu_found_on_the_small_link_and_large_pings_pass(mesh: Mesh) -> None:
    h2 = mesh.hosts[1]
    links = status(h2)["overlay"]["links"]
    h3_name = next(
        p["name"] for p in status(mesh.hosts[2])["router"]["peers"] if p["nickname"] == "h3"
    )
    link = links[h3_name]
    assert link["state"] == "established"
    assert 1280 - 28 - 16 < link["pmtu"] <= 1280 - 28, link
    c2, c3 = mesh.containers["c2a"], mesh.containers["c3b"]
    for size in (1400, 4000, 30000):
        assert c2.pings(c3.ip, f"-s {size}"), size
        assert c3.pings(c2.ip, f"-s {size}"), size


def _pcap_udp(path: Path) -> list[tuple[str, str, bytes]]:
    """(src ip, dst ip, UDP payload) of every IPv4/UDP packet in a pcap file (Ethernet)."""
    data = path.read_bytes()
    out = []
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        pkt = data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if len(pkt) < 42 or pkt[12:14] != b"\x08\x00" or pkt[23] != 17:
            continue
        ihl = (pkt[14] & 0x0F) * 4
        src = ".".join(str(b) for b in pkt[26:30])
        dst = ".".join(str(b) for b in pkt[30:34])
        out.append((src, dst, pkt[14 + ihl + 8 :]))
    return out


def test_underlay_never_carries_plaintext_and_replays_are_dropped(
    mesh: Mesh, tmp_path: Path
) -> None:
    h1, h2, _ = mesh.hosts
    c1, c2 = mesh.containers["c1a"], mesh.containers["c2b"]
    wait_for(lambda: c1.pings(c2.ip), timeout=30, what="c1a -> c2b")
    marker = b"WEFT-PLAINTEXT-MARKER-7f3a9c"
    path = tmp_path / "marker"
    path.write_bytes(marker * (4 * 1024 * 1024 // len(marker)))
    pcap = tmp_path / "underlay.pcap"
    dump = h2.spawn(
        "tcpdump", "-i", "eth0", "-U", "-s", "0", "-w", str(pcap), "udp", "port", "6783"
    )
    wait_for(lambda: pcap.exists() and pcap.stat().st_size >= 24, timeout=20, what="tcpdump up")
    time.sleep(0.5)
    recv = _transfer_start(c1, c2, path, 5003)
    n, _ = _transfer_result(recv)
    assert n == path.stat().st_size
    time.sleep(0.5)
    dump.terminate()
    dump.wait(timeout=10)
    packets = _pcap_udp(pcap)
    # The transfer really crossed this wire: full-size data datagrams were captured (how many
    # tcpdump keeps depends on load). The marker repeats every 28 bytes, so any one of them
    # carried in plaintext would show it.
    assert any(len(payload) > 1000 for _, _, payload in packets), len(packets)
    assert not any(marker[:12] in payload for _, _, payload in packets)
    assert marker not in pcap.read_bytes()
    # Replay a captured single-datagram data packet from host 1, then a bit-flipped copy under a
    # fresh counter (so only authentication can refuse it).
    # (A captured GSO packet holds several datagrams back to back: take the first one, whose
    # length its header gives: 27 header bytes + the message length.)
    singles = [
        p[: 27 + int.from_bytes(p[15:19], "big")]
        for s, d, p in packets
        if s == h1.ip and d == h2.ip and p[0] == 0x21 and p[25:27] == b"\x00\x01"
    ]
    assert singles
    sample = singles[-1]
    drops = status(h2)["overlay"]["drops"]
    flipped = bytearray(sample)
    fresh = (1 << 62).to_bytes(8, "big")
    flipped[7:15] = fresh
    flipped[27:35] = fresh
    flipped[-20] ^= 0x01
    for payload in (sample, bytes(flipped)):
        h1.exec(
            sys.executable, "-c",
            "import socket,sys; socket.socket(2, 2).sendto("
            "bytes.fromhex(sys.argv[1]), (sys.argv[2], 6783))",
            payload.hex(), h2.ip,
        )  # fmt: skip

    def counted() -> bool:
        now = status(h2)["overlay"]["drops"]
        replayed = int(now.get("replayed", 0)) > int(drops.get("replayed", 0))
        return replayed and int(now.get("tampered", 0)) > int(drops.get("tampered", 0))

    wait_for(counted, timeout=20, what="replayed and tampered drops counted")
    assert c1.pings(c2.ip)  # and the link still works


def test_moved_container_is_reachable_again(mesh: Mesh) -> None:
    h1, h2, _ = mesh.hosts
    moving, peer = mesh.containers["c1b"], mesh.containers["c3b"]
    wait_for(lambda: peer.pings(moving.ip), timeout=30, what="before the move")
    mac = json.loads(moving.sh("ip -j link show ethwe"))[0]["address"]
    detach(h1, moving.ns)
    attach(h2, moving.ns, f"{moving.ip}/12")
    run(["ip", "-n", moving.ns, "link", "set", "ethwe", "address", mac])
    moving.host = h2
    wait_for(lambda: moving.pings(peer.ip), timeout=60, interval=1, what="moved container out")
    wait_for(lambda: peer.pings(moving.ip), timeout=60, interval=1, what="moved container in")
    assert any(status(h).get("overlay", {}).get("mac_moves", 0) > 0 for h in mesh.hosts)
