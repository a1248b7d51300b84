"""The README's main job: `weft demo` brings up a mesh whose containers ping across it, and
`weft demo --down` removes everything it made."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from tests.integ.hosts import have_netns, run

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft.router.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_pings_across_an_encrypted_mesh_and_down_removes_everything() -> None:
    prefix = f"wd{secrets.token_hex(3)}"
    try:
        up = _demo("--hosts", "3", "--prefix", prefix, "--ui-port", "0", "--password", "s3cret")
        assert up.returncode == 0, up.stdout + up.stderr
        # 3 hosts x 2 containers: each container pings the 4 on other hosts
        assert up.stdout.count(": ok") == 24, up.stdout
        assert "FAIL" not in up.stdout
        assert "Encryption: enabled" in up.stdout
        assert up.stdout.count("established") >= 2
        host1 = f"{prefix}-h1"
        report = json.loads(run(["ip", "netns", "exec", host1, "weft", "report"]).stdout)
        # the containers attached on host1, with the addresses IPAM gave them
        assert len(report["containers"]) == 2, report["containers"]
        assert all(c["addresses"] for c in report["containers"])
        assert report["ipam"]["ready"] is True
        metrics = run(
            ["ip", "netns", "exec", host1, "curl", "-sf", "http://127.0.0.1:6784/metrics"]
        ).stdout
        assert 'weft_gossip_messages_total{channel="topology",direction="in"}' in metrics
        assert 'weft_gossip_messages_total{channel="ipam",direction="out"}' in metrics
    finally:
        down = _demo("--down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    left = run(["ip", "netns", "list"]).stdout
    assert prefix not in left
