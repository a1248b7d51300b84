"""The capability probe on this kernel, in a throwaway namespace (so nothing touches the host)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integ.hosts import Underlay, have_netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]

REPO = Path(__file__).resolve().parents[2]
CODE = (
    "import json; from weft.fastdp.capabilities import probe_capabilities as p; "
    "print(json.dumps(p().status()))"
)


def test_probe_reports_each_feature_once_with_a_reason() -> None:
    u = Underlay(0)
    try:
        ns = u.switch_ns
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CODE],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=True,
        ).stdout
        status = json.loads(out)
        assert status["vxlan"]["available"] is True
        assert set(status) == {"openvswitch", "vxlan", "esp", "fast_datapaths"}
        for key in ("openvswitch", "esp"):
            assert status[key]["detail"]
        if not status["openvswitch"]["available"]:
            assert "ovs_datapath" in status["openvswitch"]["detail"]
            assert "ovs" not in status["fast_datapaths"]
        if not status["esp"]["available"]:
            assert "add an ESP SA" in status["esp"]["detail"]
        # The probe's throwaway vxlan link is gone.
        links = subprocess.run(
            ["ip", "-n", ns, "-br", "link"], capture_output=True, text=True, check=True
        ).stdout
        assert "wfcap" not in links
    finally:
        u.close()
