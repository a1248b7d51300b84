"""The netns harness itself: hosts reach each other, cut/restore works, cleanup leaves nothing."""

from __future__ import annotations

import pytest

from tests.integ.hosts import have_netns, run, underlay, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
]


def _pings(src_ns: str, ip: str) -> bool:
    return (
        run(["ip", "netns", "exec", src_ns, "ping", "-c1", "-W1", ip], check=False).returncode == 0
    )


def test_hosts_reach_each_other_and_cleanup_is_complete() -> None:
    with underlay(2) as u:
        h1, h2 = u.hosts
        assert _pings(h1.ns, h2.ip)
        h2.cut()
        assert not _pings(h1.ns, h2.ip)
        h2.restore()
        wait_for(lambda: _pings(h1.ns, h2.ip), timeout=20, what="ping after restore")
        names = list(u.namespaces)
    left = run(["ip", "netns", "list"]).stdout
    assert not any(name in left for name in names)
