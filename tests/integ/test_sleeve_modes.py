"""Mixed sleeve modes, unencrypted, two pairs of hosts:

* host 1 runs super-frames, host 2 the per-frame path. Host 1 must notice from host 2's hello
  that it lacks super-frames, switch its TAP offloads off and strip (completing partial
  checksums) the virtio header; host 2's frames gain one on host 1;
* host 1 runs the per-frame path with its local offloads (UDP GSO sends, UDP GRO, TCP segments
  merged into GSO TAP writes), host 2 the strict per-frame path without any: host 2 must receive
  host 1's GSO sends as the ordinary datagrams they are on the wire, and host 1's merged TAP
  writes must deliver host 2's stream intact.

The receiving containers trust partial checksums, so only the SHA-256 can catch a wrong byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.integ.hosts import Host, Underlay, have_netns, run, underlay, wait_for
from tests.integ.test_sleeve import _RECEIVER, _SENDER, _random_file, attach, status

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]


PAIRS = {
    "superframes-perframe": ("super-frames", "per-frame"),
    "offloads-strict": ("per-frame", "per-frame-strict"),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def mixed(request: pytest.FixtureRequest) -> Iterator[tuple[Underlay, list[str], str]]:
    with underlay(2) as u:
        for i, (host, mode) in enumerate(zip(u.hosts, PAIRS[request.param], strict=True)):
            peer = u.hosts[1 - i].ip
            env = {
                "WEFT_SLEEVE_MODE": mode.removesuffix("-strict"),
                "WEFT_SLEEVE_LOCAL_OFFLOADS": "off" if mode.endswith("-strict") else "auto",
                "WEFT_PASSWORD": "",
            }
            host.spawn(
                sys.executable, "-m", "weft.cli.main", "router", "--data-dir", str(host.data_dir),
                "--api-socket", "", "--datapath", "sleeve", "--nickname", f"h{i + 1}", peer,
                log=host.data_dir / "router.log", env=env,
            )  # fmt: skip
        containers = []
        for i, host in enumerate(u.hosts):
            wait_for(partial(_links_established, host), timeout=60, what="sleeve established")
            ns = host.add_netns("c")
            attach(host, ns, f"10.32.0.{i + 1}/12")
            containers.append(ns)
        yield u, containers, request.param


def _links_established(host: Host) -> bool:
    links = status(host).get("overlay", {}).get("links", {})
    return bool(links) and all(link["state"] == "established" for link in links.values())


def test_modes_negotiated(mixed: tuple[Underlay, list[str], str]) -> None:
    u, _, pair = mixed
    o1, o2 = (status(h)["overlay"] for h in u.hosts)
    if pair == "superframes-perframe":
        assert o1["mode"] == "super-frames" and o1["tap_offload"] is False
        assert o2["mode"] == "per-frame"
    else:
        assert o1["mode"] == o2["mode"] == "per-frame"
        assert (o1["gso"], o1["gro"], o1["tap_gro"]) == (True, True, True)
        assert (o2["gso"], o2["gro"], o2["tap_gro"]) == (False, False, False)
    assert all(not link["superframes"] for link in o1["links"].values())
    assert all(not link["superframes"] for link in o2["links"].values())


def test_transfers_both_ways_arrive_intact(
    mixed: tuple[Underlay, list[str], str], tmp_path: Path
) -> None:
    u, (c1, c2), pair = mixed
    wait_for(
        lambda: (
            run(
                ["ip", "netns", "exec", c1, "ping", "-c1", "-W2", "10.32.0.2"], check=False
            ).returncode
            == 0
        ),
        timeout=30,
        what="ping",
    )
    size = 30 * 1024 * 1024
    for src, dst, ip, port in ((c1, c2, "10.32.0.2", "5101"), (c2, c1, "10.32.0.1", "5102")):
        path = tmp_path / f"file{port}"
        want = _random_file(path, size)
        recv = subprocess.Popen(
            ["ip", "netns", "exec", dst, sys.executable, "-c", _RECEIVER, port],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert recv.stdout is not None and recv.stdout.readline().strip() == "listening"
        run(["ip", "netns", "exec", src, sys.executable, "-c", _SENDER, str(path), ip, port],
            timeout=300)  # fmt: skip
        out, _ = recv.communicate(timeout=300)
        assert out.split() == [str(size), want], json.dumps({"from": src, "got": out})
    if pair == "offloads-strict":
        # The local offloads really ran: host 1's TCP segments left in GSO sends and arrived
        # merged into fewer TAP writes; host 2 moved one frame per syscall. How many messages
        # one send carries depends on load and kernel, so only "fewer" is asserted here; the
        # batching factor is printed by bench/throughput.py.
        o1, o2 = (status(h)["overlay"] for h in u.hosts)
        assert o1["syscalls"]["tap_write"] < o1["stats"]["tap_frames_out"], o1["syscalls"]
        assert o1["syscalls"]["udp_send"] < o1["stats"]["messages_out"], o1["syscalls"]
        assert o2["syscalls"]["tap_write"] >= o2["stats"]["tap_frames_out"], o2["syscalls"]
        assert not o2["drops"].get("malformed") and not o1["drops"].get("malformed")
