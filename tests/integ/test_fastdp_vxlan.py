"""The Linux VXLAN datapath on real namespaces: two hosts, a bridge ``weft`` each, one container
each; the vxlan devices and their FDB come from weft.fastdp (VxlanDevice, FdbPlanner,
FdbReconciler). Ping, a 50 MB TCP transfer with matching checksum, the MTU, heartbeat probes
through the tunnel (and not to containers), stale-device cleanup.

One underlay for the whole module; each test leaves the datapath as it found it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integ.hosts import Host, Underlay, have_netns, run, wait_for
from weft.errors import ConfigError
from weft.fastdp.errors import DatapathError
from weft.fastdp.esp import InboundGuard
from weft.fastdp.fdb import FdbEntry, mac_of_peer
from weft.fastdp.vxlan import VxlanConfig, VxlanDatapath, VxlanDevice
from weft.gossip.peer import PeerName

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]

REPO = Path(__file__).resolve().parents[2]
NAMES = [PeerName.parse("02:00:00:00:00:01"), PeerName.parse("02:00:00:00:00:02")]


@dataclass
class Side:
    host: Host
    name: PeerName
    ipr: Any
    dp: VxlanDatapath
    container: str
    container_ip: str
    container_mac: str


@dataclass
class Net:
    underlay: Underlay
    sides: list[Side]

    def reconcile(self, *, carrying: bool = True, with_macs: bool = True) -> None:
        """Drive each side's VxlanDatapath as the overlay switch would."""
        for side in self.sides:
            for other in self.sides:
                if other is not side:
                    if other.name not in side.dp.peers:
                        side.dp.peer_started(other.name, other.host.ip)
                    side.dp.peer_carrying(other.name, carrying)
            macs = {o.container_mac: o.name for o in self.sides if o is not side}
            side.dp.macs_changed(macs if with_macs else {})


def _container(host: Host, i: int, mtu: int) -> tuple[str, str, str]:
    ns = host.add_netns("c")
    veth = f"{host.underlay.prefix}v{i}"
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}c"])
    run(["ip", "link", "set", veth, "netns", host.ns])
    run(["ip", "link", "set", f"{veth}c", "netns", ns, "name", "ethwe"])
    host.exec("ip", "link", "set", veth, "master", "weft", "mtu", str(mtu), "up")
    ip = f"10.40.0.{i}"
    run(["ip", "-n", ns, "link", "set", "ethwe", "mtu", str(mtu), "up"])
    run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "ethwe"])
    mac = run(["ip", "-n", ns, "-br", "link", "show", "ethwe"]).stdout.split()[2]
    return ns, ip, mac


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    from pyroute2 import NetNS

    u = Underlay(2, net=78)
    sides: list[Side] = []
    try:
        for i, host in enumerate(u.hosts, start=1):
            host.exec("ip", "link", "add", "weft", "type", "bridge")
            host.exec("ip", "link", "set", "weft", "up")
            ipr = NetNS(host.ns)
            dp = VxlanDatapath(ipr, VxlanConfig(local_ip=host.ip), NAMES[i - 1])
            mtu = dp.start()
            ns, ip, mac = _container(host, i, mtu)
            sides.append(Side(host, NAMES[i - 1], ipr, dp, ns, ip, mac))
        n = Net(u, sides)
        n.reconcile()
        yield n
    finally:
        for side in sides:
            try:
                side.dp.stop()
            finally:
                side.ipr.close()
        u.close()


def _ping(ns: str, ip: str, size: int = 56, df: bool = False) -> bool:
    args = ["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "-s", str(size)]
    if df:
        args += ["-M", "do"]
    return run([*args, ip], check=False).returncode == 0


def test_devices_mtu_and_fdb(net: Net) -> None:
    a, b = net.sides
    assert a.dp.mtu == 1450
    status = a.dp.status()
    assert status["peers"] == {str(b.name): {"ip": b.host.ip, "carrying": True}}
    assert status["vni"] == 0xFFFFFF and status["last_error"] == ""
    details = a.host.exec("ip", "-d", "link", "show", "vxlan-weft").stdout
    assert "dstport 6784" in details and "nolearning" in details and "df set" in details
    assert "master weft" in details and "mtu 1450" in details
    assert a.dp.device.fdb_entries() == {
        FdbEntry(str(b.name), b.host.ip),
        FdbEntry("00:00:00:00:00:00", b.host.ip),
        FdbEntry(b.container_mac, b.host.ip),
    }


def test_ping_across_and_full_mtu_with_df(net: Net) -> None:
    a, b = net.sides
    wait_for(lambda: _ping(a.container, b.container_ip), timeout=30, what="ping over vxlan")
    # 1450-byte IP packets (1422 + 28) with DF cross: the tunnel carries the whole MTU.
    assert _ping(a.container, b.container_ip, size=1422, df=True)
    assert _ping(b.container, a.container_ip, size=1422, df=True)


def test_no_flood_entry_means_no_broadcast(net: Net) -> None:
    a, b = net.sides
    net.reconcile(carrying=False, with_macs=False)  # heartbeat entries only
    try:
        run(["ip", "-n", a.container, "neigh", "flush", "all"])
        assert not _ping(a.container, b.container_ip)  # ARP has nowhere to go
    finally:
        net.reconcile()
    wait_for(lambda: _ping(a.container, b.container_ip), timeout=30, what="ping after restore")


def _py(ns: str, code: str, timeout: float = 120) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"helper timed out\nstdout: {out}\nstderr: {err}") from None
    assert proc.returncode == 0, f"helper failed ({proc.returncode}): {err}"
    return out


def test_50mb_tcp_transfer_checksum(net: Net) -> None:
    a, b = net.sides
    server = _py(
        b.container,
        f"""
        import hashlib, socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("{b.container_ip}", 5001)); s.listen(1); print("ready", flush=True)
        c, _ = s.accept(); h = hashlib.sha256(); n = 0
        while chunk := c.recv(1 << 20):
            h.update(chunk); n += len(chunk)
        print(n, h.hexdigest())
        """,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    client = _py(
        a.container,
        f"""
        import hashlib, random, socket
        data = random.Random(6784).randbytes(50 * 1024 * 1024)
        c = socket.create_connection(("{b.container_ip}", 5001), timeout=60)
        c.sendall(data); c.close()
        print(len(data), hashlib.sha256(data).hexdigest())
        """,
    )
    sent = _finish(client).split()
    received = _finish(server).split()
    assert sent == received and sent[0] == str(50 * 1024 * 1024)


def test_heartbeat_probe_crosses_the_tunnel_and_not_to_containers(net: Net) -> None:
    a, b = net.sides
    listen = f"""
        import select, sys
        from weft.fastdp.vxlan import HeartbeatSocket
        from weft.fastdp.heartbeat import decode_probe
        from weft.gossip.peer import PeerName
        sock = HeartbeatSocket(sys.argv[1] if len(sys.argv) > 1 else "{{dev}}")
        print("ready", flush=True)
        got = []
        while select.select([sock], [], [], {{wait}})[0]:
            for frame in sock.receive():
                p = decode_probe(frame, PeerName({int(b.name)}))
                got.append(f"{{p.seq}}:{{p.size}}" if p else f"other:{{len(frame)}}")
        print(" ".join(got))
        """
    receiver = _py(b.host.ns, listen.replace("{dev}", "vxlan-weft").replace("{wait}", "5"))
    bystander = _py(b.container, listen.replace("{dev}", "ethwe").replace("{wait}", "5"))
    for proc in (receiver, bystander):
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    sender = _py(
        a.host.ns,
        f"""
        from weft.fastdp.vxlan import HeartbeatSocket
        from weft.fastdp.heartbeat import encode_probe
        from weft.gossip.peer import PeerName
        sock = HeartbeatSocket("vxlan-weft")
        src, dst = PeerName({int(a.name)}), PeerName({int(b.name)})
        print(sock.send(encode_probe(src, dst, 1, 1450 + 14)))
        print(sock.send(encode_probe(src, dst, 2, 1450 + 14)))
        """,
    )
    assert _finish(sender).split() == ["True", "True"]
    assert _finish(receiver).split() == ["1:1464", "2:1464"]
    assert _finish(bystander).split() == []  # the bridge dropped them


def test_full_size_probe_fails_when_underlay_mtu_shrinks(net: Net) -> None:
    a, b = net.sides
    a.host.set_mtu(1400)
    try:
        receiver = _py(
            b.host.ns,
            f"""
            import select
            from weft.fastdp.vxlan import HeartbeatSocket
            from weft.fastdp.heartbeat import decode_probe
            from weft.gossip.peer import PeerName
            sock = HeartbeatSocket("vxlan-weft"); print("ready", flush=True)
            got = []
            while select.select([sock], [], [], 3)[0]:
                got += [decode_probe(f, PeerName({int(b.name)})) for f in sock.receive()]
            print(" ".join(f"{{p.seq}}:{{p.size}}" for p in got if p))
            """,
        )
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        sender = _py(
            a.host.ns,
            f"""
            from weft.fastdp.vxlan import HeartbeatSocket
            from weft.fastdp.heartbeat import encode_probe
            from weft.gossip.peer import PeerName
            sock = HeartbeatSocket("vxlan-weft")
            src, dst = PeerName({int(a.name)}), PeerName({int(b.name)})
            sock.send(encode_probe(src, dst, 1, 1450 + 14))  # DF: cannot fit 1400
            sock.send(encode_probe(src, dst, 2, 1350 + 14))  # fits
            """,
        )
        _finish(sender)
        assert _finish(receiver).split() == ["2:1364"]
    finally:
        a.host.set_mtu(1500)


def test_stale_device_is_replaced_and_foreign_one_refused(net: Net) -> None:
    from pyroute2 import NetNS

    a, b = net.sides
    before = a.host.exec("ip", "-br", "link", "show", "vxlan-weft").stdout
    # A new router in the same host (the old one "crashed"): the stale device is replaced.
    ipr = NetNS(a.host.ns)
    try:
        probe = VxlanDevice(ipr, VxlanConfig(local_ip=a.host.ip))
        assert probe.remove_stale() == ["vxlan-weft"]  # what start() does first
        assert probe.find() is None
        fresh = VxlanDatapath(ipr, VxlanConfig(local_ip=a.host.ip), a.name)
        assert fresh.start() == 1450
        a.dp = fresh
        a.ipr.close()
        a.ipr = ipr
    except BaseException:
        ipr.close()
        raise
    assert before and a.dp.device.fdb_entries() == frozenset()
    net.reconcile()
    wait_for(lambda: _ping(a.container, b.container_ip), timeout=30, what="ping after restart")
    # A device under another name on our port and VNI (here: the running one, seen by a router
    # configured with another device name) is refused by name and left alone.
    other = VxlanDevice(a.ipr, VxlanConfig(name="vx2", local_ip=a.host.ip))
    with pytest.raises(DatapathError, match="vxlan-weft already uses UDP 6784 with VNI 16777215"):
        other.start(a.name)
    assert a.dp.device.find() is not None and other.find() is None
    assert mac_of_peer(a.name) in a.host.exec("bridge", "fdb", "show", "dev", "vxlan-weft").stdout


def test_inbound_guard_drops_plain_vxlan_from_encrypted_peers(net: Net) -> None:
    a, b = net.sides
    wait_for(lambda: _ping(a.container, b.container_ip), timeout=30, what="ping before guard")
    guard = InboundGuard(nft=("ip", "netns", "exec", b.host.ns, "nft"))
    guard.start()
    try:
        guard.require_esp_from(a.host.ip)  # a sends plain VXLAN (no ESP in this kernel)
        assert not _ping(a.container, b.container_ip)
        rules = b.host.exec("nft", "list", "table", "inet", "weft-esp").stdout
        assert "ipsec missing" in rules and "packets 0 " not in rules  # nft spells secpath so
        guard.forget(a.host.ip)
        guard.forget(a.host.ip)  # idempotent
        wait_for(lambda: _ping(a.container, b.container_ip), timeout=30, what="ping unguarded")
        guard.start()  # restarting empties the set (a crashed router's elements go)
        assert _ping(a.container, b.container_ip)
    finally:
        guard.stop()
    assert "weft-esp" not in b.host.exec("nft", "list", "tables").stdout


def test_underlay_mtu_detection(net: Net) -> None:
    a, b = net.sides
    by_address = VxlanDevice(a.ipr, VxlanConfig(name="vxmtu", vni=5, local_ip=a.host.ip))
    assert by_address.detect_underlay_mtu() == 1500
    by_route = VxlanDevice(a.ipr, VxlanConfig(name="vxmtu", vni=5))
    with pytest.raises(ConfigError, match="no default route"):
        by_route.detect_underlay_mtu()
    a.host.exec("ip", "route", "add", "default", "via", b.host.ip)
    try:
        assert by_route.detect_underlay_mtu() == 1500
    finally:
        a.host.exec("ip", "route", "del", "default")
    with pytest.raises(ConfigError, match="no interface has the local address"):
        VxlanDevice(a.ipr, VxlanConfig(name="vxmtu", local_ip="10.255.0.1")).detect_underlay_mtu()
