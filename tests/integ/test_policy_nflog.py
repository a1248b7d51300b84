"""weft.policy.nflog against the kernel: a reader in a network namespace gets the packets an
nftables ``log group`` rule copies, IPv4 and IPv6, and a second reader cannot take the group.

The reader runs as ``python3`` inside the namespace (as the router runs in its own); it prints
each packet as a JSON line. Names carry a per-run prefix; the namespace is removed in a finally.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import weft
from tests.integ.hosts import have_netns, run, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_netns(), reason="needs root and iproute2"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)"),
]

READER = textwrap.dedent(
    """
    import asyncio, json, sys
    from weft.policy.nflog import NflogError, NflogReader

    def show(p):
        print(json.dumps({"prefix": p.prefix, "family": p.family, "src": str(p.src),
                          "dst": str(p.dst), "protocol": p.protocol, "sport": p.sport,
                          "dport": p.dport}), flush=True)

    async def main():
        reader = NflogReader(show, int(sys.argv[1]), flush_centiseconds=5)
        reader.start()
        try:
            NflogReader(show, int(sys.argv[1])).start()
            second = "bound"
        except NflogError as err:
            second = str(err)
        print(json.dumps({"ready": True, "second": second}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class NflogWatcher:
    """weft.policy.nflog.NflogReader in namespace ``netns``; its packets as dicts, in order."""

    def __init__(self, netns: str, group: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(Path(weft.__file__).resolve().parents[1]))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", READER, str(group)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, daemon=True).start()
        first = self.lines.get(timeout=60)
        assert first.get("ready"), first
        self.second_bind: str = first["second"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def packets(self) -> list[dict[str, Any]]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def wait_for(self, what: str, **fields: Any) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise AssertionError(f"reader exited: {self.proc.stderr.read()}")
            for p in self.packets():
                if all(p.get(k) == v for k, v in fields.items()):
                    return p
            return None

        found = wait_for(match, what=what)
        assert isinstance(found, dict)
        return found

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_reader_in_a_namespace_gets_logged_packets() -> None:
    netns = f"wpl{secrets.token_hex(3)}"
    group = 4783
    rules = textwrap.dedent(
        f"""
        table inet {netns} {{
            chain input {{
                type filter hook input priority filter; policy accept;
                udp dport 9 log prefix "weft-deny-in" group {group} drop
                tcp dport 9 log prefix "weft-deny-out" group {group} drop
                udp dport 10 log prefix "other" group {group + 1} drop
            }}
        }}
        """
    )
    run(["ip", "netns", "add", netns])
    watcher: NflogWatcher | None = None
    try:
        exec_ = ["ip", "netns", "exec", netns]
        run([*exec_, "ip", "link", "set", "lo", "up"])
        subprocess.run([*exec_, "nft", "-f", "-"], input=rules, text=True, check=True)
        watcher = NflogWatcher(netns, group)
        assert "group taken" in watcher.second_bind  # one reader per group and namespace
        sender = textwrap.dedent(
            """
            import socket
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                s = socket.socket(family, socket.SOCK_DGRAM)
                s.bind((host, 4242))
                s.sendto(b"x" * 1000, (host, 9))  # longer than the copy range
                s.sendto(b"y", (host, 10))  # another group: not ours
                s.close()
            t = socket.socket()
            t.settimeout(1)
            try:
                t.connect(("127.0.0.1", 9))
            except OSError:
                pass
            """
        )
        run([*exec_, sys.executable, "-c", sender])
        udp4 = watcher.wait_for("UDP over IPv4", family=4, protocol=socket.IPPROTO_UDP)
        assert udp4 == {
            "prefix": "weft-deny-in",
            "family": 4,
            "src": "127.0.0.1",
            "dst": "127.0.0.1",
            "protocol": 17,
            "sport": 4242,
            "dport": 9,
        }
        udp6 = watcher.wait_for("UDP over IPv6", family=6)
        assert (udp6["src"], udp6["dst"], udp6["sport"], udp6["dport"]) == ("::1", "::1", 4242, 9)
        syn = watcher.wait_for("a TCP SYN", protocol=socket.IPPROTO_TCP)
        assert (syn["prefix"], syn["dport"]) == ("weft-deny-out", 9)
        assert all(p["dport"] == 9 for p in watcher.packets())  # group+1 never reached us
    finally:
        if watcher is not None:
            watcher.close()
        run(["ip", "netns", "del", netns], check=False)
