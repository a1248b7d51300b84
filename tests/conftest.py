"""Session-wide guard: no test may leave weft's kernel objects in the machine's own namespace.

Every test that runs a router or a datapath does so inside network namespaces with a per-run
prefix (tests/integ/hosts.py). A bridge ``weft`` (or ``vxlan-weft``, ``vethwe-*``, ``weft-dp``)
appearing in the root namespace during the run means some test escaped its namespace: it is
named, removed, and the run fails, so the leak is fixed instead of piling up on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_WEFT_LINK_PREFIXES = ("weft", "vxlan-weft", "vethwe")


def _root_weft_links() -> set[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return set()
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if name.startswith(_WEFT_LINK_PREFIXES):
            names.add(name)
    return names


_before: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(_root_weft_links())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = sorted(_root_weft_links() - _before)
    if not leaked:
        return
    for name in leaked:
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"tests left links in the root network namespace (removed now): {', '.join(leaked)}"
    if reporter is not None:
        reporter.write_line(f"ERROR: {message}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
