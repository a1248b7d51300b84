"""``weft attach`` / ``weft detach`` through the CLI with a namespace given by name and by path
(issue 13: ``weft attach /run/netns/NAME`` failed with ``invalid container id``).

One host runs ``weft launch`` (IPAM ready at once: consensus among 1); addresses come from IPAM,
and each detach must release what the attach allocated, whichever form named the namespace.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator

import pytest

from tests.integ.hosts import Host, have_netns, run, underlay, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and network namespaces"),
]


def weft(host: Host, *args: str) -> str:
    proc = host.exec(sys.executable, "-m", "weft.cli.main", *args, check=False, timeout=90)
    assert proc.returncode == 0, f"weft {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def allocations(host: Host) -> dict[str, str]:
    out = host.exec("curl", "-sf", "http://127.0.0.1:6784/ip").stdout
    return {a["container_id"]: a["cidr"] for a in json.loads(out)["allocations"]}


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with underlay(1, net=79) as u:
        h = u.hosts[0]
        d = h.data_dir
        try:
            weft(h, "launch", "--nickname", "h1", "--data-dir", str(d), "--api-socket",
                 str(d / "weft.sock"), "--datapath", "sleeve", "--ipalloc-range", "10.32.0.0/24")
            yield h
        finally:
            log = d / "weft.log"
            if log.exists():  # shown by pytest only when something failed
                print("\n".join(log.read_text().splitlines()[-30:]))
    shutil.rmtree(u.base_dir, ignore_errors=True)


@pytest.mark.parametrize(("attach_as", "detach_as"), [("path", "name"), ("name", "path")])
def test_attach_and_detach_by_name_or_path(host: Host, attach_as: str, detach_as: str) -> None:
    name = host.add_netns(f"c{attach_as[0]}{detach_as[0]}")
    form = {"name": name, "path": f"/run/netns/{name}"}
    cidr = weft(host, "attach", form[attach_as]).strip()
    assert cidr.startswith("10.32.0."), cidr
    # the address is on ethwe inside
    assert f"{cidr} " in run(["ip", "-n", name, "-o", "-4", "addr", "show"]).stdout
    assert allocations(host) == {f"netns:{name}": cidr}
    assert name in weft(host, "ps")
    # the same namespace by its other form: already attached, nothing new allocated
    again = host.exec(sys.executable, "-m", "weft.cli.main", "attach", form[detach_as],
                      check=False)
    assert again.returncode != 0 and "already attached" in again.stderr, again.stderr
    weft(host, "detach", form[detach_as])
    wait_for(lambda: allocations(host) == {}, timeout=30, what=f"{cidr} released")
    assert "ethwe" not in run(["ip", "-n", name, "-o", "link"]).stdout
    assert name not in weft(host, "ps")
