"""The README's main job: `weft demo` brings up a mesh whose containers ping across it, and
`weft demo --down` removes everything it made."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integ.hosts import have_netns, run

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft.cli.main", "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _established(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in report["router"]["connections"] if c.get("state") == "established"]


def test_demo_pings_across_an_encrypted_mesh_and_down_removes_everything() -> None:
    """No flags (as README's `./scripts/demo.sh`): encrypted with a generated, printed password."""
    prefix = f"wd{secrets.token_hex(3)}"
    try:
        up = _demo("--hosts", "3", "--prefix", prefix, "--ui-port", "0")
        assert up.returncode == 0, up.stdout + up.stderr
        # 3 hosts x 2 containers: each container pings the 4 on other hosts
        assert up.stdout.count(": ok") == 24, up.stdout
        assert "FAIL" not in up.stdout
        assert "Encryption: enabled" in up.stdout
        assert up.stdout.count("established") >= 2
        found = re.search(r"generated password (\S+)", up.stdout)
        assert found, up.stdout
        # the printed password is the mesh's (the routers read it from this file)
        assert Path(f"/run/{prefix}/password").read_text() == found.group(1)
        host1 = f"{prefix}-h1"
        report = json.loads(run(["ip", "netns", "exec", host1, "weft", "report"]).stdout)
        # the status the UI draws: every link encrypted, control and data plane alike
        # (weft/ui/static/app.js: encrypted = controlEncrypted && dataEncrypted !== false)
        assert report["router"]["encryption"] is True
        links = _established(report)
        assert len(links) >= 1, report["router"]["connections"]
        assert all(c["encrypted"] is True and c.get("data_encrypted") is True for c in links), links
        assert "plaintext" not in run(
            ["ip", "netns", "exec", host1, "weft", "status", "connections"]).stdout
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


def test_demo_no_encrypt_shows_the_plaintext_mode() -> None:
    prefix = f"wd{secrets.token_hex(3)}"
    try:
        up = _demo("--hosts", "2", "--prefix", prefix, "--ui-port", "0", "--no-encrypt")
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.count(": ok") == 8, up.stdout  # 2 hosts x 2 containers
        assert "Encryption: disabled" in up.stdout and "password" not in up.stdout
        report = json.loads(run(["ip", "netns", "exec", f"{prefix}-h1", "weft", "report"]).stdout)
        assert report["router"]["encryption"] is False
        links = _established(report)
        assert len(links) == 1 and not links[0]["encrypted"], report["router"]["connections"]
    finally:
        down = _demo("--down", "--prefix", prefix)
    assert down.returncode == 0, down.stderr
    assert prefix not in run(["ip", "netns", "list"]).stdout
