"""weft.policy.nft against the real kernel: the scripts load, updates equal full loads, and the
ruleset enforces on a bridge as a node's pods see it; denied packets are counted and reach NFLOG
(weft.policy.nflog, .counters and .denied on the kernel's data).

A "node" network namespace holds a bridge with br_netfilter on (as weft's bridge on a Kubernetes
node, where kube-proxy needs it too) and pods as namespaces with a veth on the bridge. Names carry a
per-run prefix; everything is removed in a finally, also when the test fails. Traffic stays inside
these namespaces.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from tests.integ.hosts import have_netns, run, wait_for
from tests.integ.test_policy_nflog import NflogWatcher
from tests.unit.policy_support import ip, ns, pod, policy, view_of
from weft.policy.compiler import DesiredState, Direction, compile_policy
from weft.policy.counters import Count, read_counters, read_element_counters
from weft.policy.denied import DeniedLog
from weft.policy.model import ClusterView, IPAddress
from weft.policy.nflog import DeniedPacket
from weft.policy.nft import (
    COUNTERS,
    COUNTING_SETS,
    FAMILY,
    LOG_GROUP,
    SET_TYPES,
    TABLE,
    render_full,
    render_update,
    set_elements,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)"),
]


def nft(netns: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )


def load(netns: str, script: str) -> None:
    proc = nft(netns, script)
    assert proc.returncode == 0, f"nft refused the script: {proc.stderr}\n{script}"


def elements(netns: str) -> dict[str, list[str]]:
    """Every set's elements as the kernel lists them (JSON, normalised for comparison)."""
    out = run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", FAMILY, TABLE]).stdout
    sets: dict[str, list[str]] = {}
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            s = item["set"]
            # per-element counters are not content: compare values only
            sets[s["name"]] = sorted(
                json.dumps(
                    e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e, sort_keys=True
                )
                for e in s.get("elem", [])
            )
    return sets


def counters(netns: str) -> dict[str, Count]:
    return asyncio.run(read_counters(netns))


def drops(netns: str, chain: str) -> int:
    """Packets the drop rule at the end of ``chain`` (e.g. ``ingress4``) dropped so far."""
    direction = {"ingress": "in", "egress": "out"}[chain[:-1]]
    return counters(netns)[f"denied_{direction}{chain[-1]}"].packets


@contextmanager
def namespaces(*names: str) -> Iterator[None]:
    made: list[str] = []
    try:
        for name in names:
            run(["ip", "netns", "add", name])
            made.append(name)
        yield
    finally:
        for name in reversed(made):
            with suppress(Exception):
                run(["ip", "netns", "del", name], check=False)


PREFIX = f"wpn{secrets.token_hex(3)}"


# ---------------------------------------------------------------------- the scripts load


def rich_view(extra_pod: bool, relabel: bool) -> ClusterView:
    """Most features at once: both families, overlapping rules, except, named ports, SCTP."""
    pods = [
        pod("x", "a", ["10.32.1.1", "fd00::1:1"], node="n1", ports=[("web", 8080, "TCP")]),
        pod("x", "b", ["10.32.1.2", "fd00::1:2"], node="n1", ports=[("web", 9090, "TCP")]),
        pod("y", "a", ["10.32.2.1", "fd00::2:1"], node="n2", ports=[("dns", 53, "UDP")]),
        pod("y", "b", "10.32.2.2", node="n2", labels={"pod": "a" if relabel else "b"}),
    ]
    if extra_pod:
        pods.append(pod("y", "c", "10.32.2.3", node="n2", labels={"pod": "a"}))
    policies = [
        policy(
            "x",
            "mixed",
            policyTypes=["Ingress", "Egress"],
            ingress=[
                {
                    "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.32.2.0/28"]}}],
                    "ports": [{"port": 80, "endPort": 90}, {"protocol": "SCTP", "port": 9}],
                },
                {
                    "from": [{"ipBlock": {"cidr": "10.32.0.0/16"}}],
                    "ports": [{"port": 85, "endPort": 100}, {"port": "web"}],
                },
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]},
                {"from": [{"ipBlock": {"cidr": "fd00::/16", "except": ["fd00::2:0/112"]}}]},
            ],
            egress=[
                {
                    "to": [
                        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}
                    ],
                    "ports": [
                        {"protocol": "UDP", "port": "dns"},
                        {"protocol": "UDP", "port": 5353},
                    ],
                },
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}]},
            ],
        )
    ]
    return view_of([ns("x"), ns("y")], pods, policies)


def test_full_scripts_load_replace_and_updates_match_full_loads() -> None:
    node_ips = [ip("192.168.0.1")]
    a = compile_policy(rich_view(False, False), "n1", node_ips)
    b = compile_policy(rich_view(True, True), "n1", node_ips)
    assert a.ingress.allow_ports and a.egress.allow_ports and a.ingress.allow_all
    one, two = f"{PREFIX}-one", f"{PREFIX}-two"
    with namespaces(one, two):
        load(one, render_full(a))
        first = elements(one)
        # every allow element counts, and its key reads back as set_elements wrote it
        counted = asyncio.run(read_element_counters(one))
        wanted = set_elements(a)
        for name in COUNTING_SETS:
            assert sorted(counted[name]) == sorted(wanted[name]), name
        assert set(counters(one)) == set(COUNTERS)
        load(one, render_full(a))  # replacing the table with itself works (add + delete + define)
        assert elements(one) == first
        assert set(first) == set(SET_TYPES)
        assert len(first["in_ports4"]) == len(a.ingress.allow_ports) - sum(
            1 for e in a.ingress.allow_ports if e.local.version == 6
        )
        update = render_update(a, b)
        assert update and "delete element" in update and "add element" in update
        load(one, update)
        load(two, render_full(b))
        assert elements(one) == elements(two)  # the update reached exactly the full state
        assert render_update(b, b) == ""
        # and back again, so deletes of merged ranges work too
        load(one, render_update(b, a))
        assert elements(one) == first


# ---------------------------------------------------------------------- it enforces


SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(64)
        while True:
            c, _ = s.accept(); c.sendall(b"ok"); c.close()
    for p in (80, 81):
        threading.Thread(target=serve, args=(p,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)

CLIENT = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    assert s.recv(2) == b"ok"
    """
)


class Node:
    """A node namespace with bridge br0 (10.32.0.254/16, the node's own address on it)."""

    def __init__(self, prefix: str) -> None:
        self.ns = f"{prefix}-node"
        self.pods: dict[str, str] = {}  # "x/a" -> netns
        self.servers: list[subprocess.Popen[str]] = []

    def setup(self) -> None:
        sh = self.sh
        sh("ip link add br0 type bridge && ip link set br0 up")
        sh("ip addr add 10.32.0.254/16 dev br0")
        sh("sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1")

    def sh(self, cmd: str, netns: str | None = None) -> str:
        return run(["ip", "netns", "exec", netns or self.ns, "sh", "-c", cmd]).stdout

    def add_pod(self, ref: str, netns: str, address: str, index: int) -> None:
        self.pods[ref] = netns
        host_end = f"wpv{index}"
        self.sh(f"ip link add {host_end} type veth peer name eth0 netns {netns}")
        self.sh(f"ip link set {host_end} master br0 up")
        self.sh(
            f"ip link set lo up && ip link set eth0 up && ip addr add {address}/16 dev eth0",
            netns,
        )
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "python3", "-c", SERVER],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.servers.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def connects(self, src_netns: str, dst: str, port: int, timeout: float) -> bool:
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                src_netns,
                "python3",
                "-c",
                CLIENT,
                dst,
                str(port),
                str(timeout),
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        return proc.returncode == 0

    def close(self) -> None:
        for proc in self.servers:
            proc.kill()
            with suppress(Exception):
                proc.wait(timeout=10)


def pods_json(y_a_label: str) -> list[dict[str, Any]]:
    return [
        pod("x", "a", "10.32.1.1", node="n1"),
        pod("x", "b", "10.32.1.2", node="n1"),
        pod("y", "a", "10.32.2.1", node="n1", labels={"pod": y_a_label}),
    ]


POLICIES = [
    # x/a: ingress only from pods labelled pod=b in any namespace, TCP 80; no egress at all,
    # so its replies pass only through conntrack
    policy(
        "x",
        "a-in",
        podSelector={"matchLabels": {"pod": "a"}},
        policyTypes=["Ingress", "Egress"],
        ingress=[
            {
                "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}],
                "ports": [{"port": 80}],
            }
        ],
    )
]


def state_for(y_a_label: str) -> DesiredState:
    view = view_of([ns("x"), ns("y")], pods_json(y_a_label), POLICIES)
    return compile_policy(view, "n1", [ip("10.32.0.254")])


def test_ruleset_enforces_on_a_bridge() -> None:
    prefix = f"{PREFIX}e"
    node = Node(prefix)
    names = {"x/a": f"{prefix}-xa", "x/b": f"{prefix}-xb", "y/a": f"{prefix}-ya"}
    addresses = {"x/a": "10.32.1.1", "x/b": "10.32.1.2", "y/a": "10.32.2.1"}
    watcher: NflogWatcher | None = None
    with namespaces(node.ns, *names.values()):
        try:
            node.setup()
            for i, (ref, netns) in enumerate(names.items()):
                node.add_pod(ref, netns, addresses[ref], i)
            xa, xb, ya = names["x/a"], names["x/b"], names["y/a"]
            # no policy: open (and the bridge works at all)
            wait_for(lambda: node.connects(ya, "10.32.1.1", 80, 10), what="y/a -> x/a:80 open")

            old = state_for("other")
            load(node.ns, render_full(old))
            watcher = NflogWatcher(node.ns, LOG_GROUP)
            assert wait_for(lambda: node.connects(xb, "10.32.1.1", 80, 10), what="x/b -> x/a:80")
            assert counters(node.ns)["allowed_in4"].packets > 0
            # the element that let x/b in counted it (an allow element per local pod and peer)
            xb_in = "10.32.1.1 . 10.32.1.2 . tcp . 80"
            assert xb_in in set_elements(old)["in_ports4"]
            xb_count = asyncio.run(read_element_counters(node.ns))["in_ports4"][xb_in].packets
            assert xb_count > 0
            before = drops(node.ns, "ingress4")
            assert not node.connects(ya, "10.32.1.1", 80, 3)  # y/a is not pod=b
            assert drops(node.ns, "ingress4") > before  # dropped by isolation, not lost to load
            before = drops(node.ns, "ingress4")
            assert not node.connects(xb, "10.32.1.1", 81, 3)  # port 81 not allowed
            assert drops(node.ns, "ingress4") > before
            before = drops(node.ns, "egress4")
            assert not node.connects(xa, "10.32.1.2", 80, 3)  # x/a has no egress at all
            assert drops(node.ns, "egress4") > before
            assert node.connects(xb, "10.32.2.1", 80, 30)  # y/a is not isolated
            # the node itself reaches its pods (kubelet probes)
            assert node.connects(node.ns, "10.32.1.1", 81, 30)

            # each denial reached NFLOG with its direction, addresses and port
            seen = [
                watcher.wait_for("y/a -> x/a:80 denied", prefix="weft-deny-in", src="10.32.2.1"),
                watcher.wait_for("x/b -> x/a:81 denied", prefix="weft-deny-in", dport=81),
                watcher.wait_for("x/a -> x/b:80 denied", prefix="weft-deny-out", src="10.32.1.1"),
            ]
            assert (seen[0]["dst"], seen[0]["protocol"], seen[0]["dport"]) == ("10.32.1.1", 6, 80)
            assert (seen[2]["dst"], seen[2]["dport"]) == ("10.32.1.2", 80)
            assert all(p["prefix"].startswith("weft-deny-") for p in watcher.packets())
            # and reads as denied flows (SYN retransmits merge into one record per flow)
            flows = denied_flows(watcher.packets(), old)
            assert {
                (f["direction"], f["source_pod"], f["destination_pod"], f["port"]): (
                    f["isolated_pod"],
                    f["policies"],
                )
                for f in flows
            } == {
                ("ingress", "y/a", "x/a", 80): ("x/a", ["x/a-in"]),
                ("ingress", "x/b", "x/a", 81): ("x/a", ["x/a-in"]),
                ("egress", "x/a", "x/b", 80): ("x/a", ["x/a-in"]),
            }

            # relabel y/a to pod=b: an element update, no rule change; counters survive it
            allowed = counters(node.ns)["allowed_in4"].packets
            new = state_for("b")
            load(node.ns, render_update(old, new))
            after = asyncio.run(read_element_counters(node.ns))["in_ports4"]
            assert after[xb_in].packets >= xb_count  # an untouched element keeps its count
            assert counters(node.ns)["allowed_in4"].packets >= allowed
            assert wait_for(lambda: node.connects(ya, "10.32.1.1", 80, 10), what="relabelled")
        finally:
            node.close()
            if watcher is not None:
                watcher.close()


def denied_flows(packets: list[dict[str, Any]], state: DesiredState) -> list[dict[str, Any]]:
    """The NFLOG packets through DeniedLog, resolving pods and policies from ``state``."""
    pods = {a: str(p.pod) for p in state.pods for a in p.addresses}
    isolating: dict[tuple[IPAddress, Direction], list[str]] = {}
    for p in state.pods:
        for a in p.addresses:
            isolating[(a, "ingress")] = [str(r) for r in p.ingress_policies]
            isolating[(a, "egress")] = [str(r) for r in p.egress_policies]
    log = DeniedLog()
    for i, raw in enumerate(packets):
        packet = DeniedPacket(
            raw["prefix"],
            raw["family"],
            ip(raw["src"]),
            ip(raw["dst"]),
            raw["protocol"],
            raw["sport"],
            raw["dport"],
        )
        log.record(packet, 1000.0 + i * 0.1, pods.get, lambda a, d: isolating.get((a, d), []))
    flows: list[dict[str, Any]] = log.to_json()["flows"]
    return flows
