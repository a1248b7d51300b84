"""Mixed sleeve modes, unencrypted: host 1 runs super-frames, host 2 the per-frame path.

Host 1 must notice from host 2's hello that it lacks super-frames, switch its TAP offloads off
and strip (completing partial checksums) the virtio header; host 2's frames gain one on host 1.
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


@pytest.fixture(scope="module")
def mixed() -> Iterator[tuple[Underlay, list[str]]]:
    with underlay(2) as u:
        for i, (host, mode) in enumerate(zip(u.hosts, ("super-frames", "per-frame"), strict=True)):
            peer = u.hosts[1 - i].ip
            host.spawn(
                sys.executable, "-m", "weft.router.cli", "router", "--data-dir", str(host.data_dir),
                "--api-socket", "", "--datapath", "sleeve", "--nickname", f"h{i + 1}", peer,
                log=host.data_dir / "router.log",
                env={"WEFT_SLEEVE_MODE": mode, "WEFT_PASSWORD": ""},
            )  # fmt: skip
        containers = []
        for i, host in enumerate(u.hosts):
            wait_for(partial(_links_established, host), timeout=60, what="sleeve established")
            ns = host.add_netns("c")
            attach(host, ns, f"10.32.0.{i + 1}/12")
            containers.append(ns)
        yield u, containers


def _links_established(host: Host) -> bool:
    links = status(host).get("overlay", {}).get("links", {})
    return bool(links) and all(link["state"] == "established" for link in links.values())


def test_modes_negotiated(mixed: tuple[Underlay, list[str]]) -> None:
    u, _ = mixed
    o1, o2 = (status(h)["overlay"] for h in u.hosts)
    assert o1["mode"] == "super-frames" and o1["tap_offload"] is False
    assert o2["mode"] == "per-frame"
    assert all(not link["superframes"] for link in o1["links"].values())
    assert all(not link["superframes"] for link in o2["links"].values())


def test_transfers_both_ways_arrive_intact(
    mixed: tuple[Underlay, list[str]], tmp_path: Path
) -> None:
    _, (c1, c2) = mixed
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
