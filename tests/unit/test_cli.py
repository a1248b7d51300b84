"""The `weft` CLI: parsing, one-line errors, client commands against a fake API, renderings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from weft.cli import main as cli
from weft.cli.status import (
    render_connections,
    render_peers,
    render_summary,
    render_table,
    render_targets,
)

STATUS: dict[str, Any] = {
    "router": {
        "name": "02:00:00:00:00:01",
        "nickname": "one",
        "uid": 7,
        "version": 3,
        "software": "0.1.0",
        "protocol": "1..1",
        "encryption": True,
        "discovery": True,
        "port": 6783,
        "peers": [
            {
                "name": "02:00:00:00:00:01",
                "nickname": "one",
                "uid": 7,
                "version": 3,
                "short_id": 1,
                "connections": [
                    {
                        "name": "02:00:00:00:00:02",
                        "address": "10.0.0.2:6783",
                        "outbound": True,
                        "established": True,
                    }
                ],
            },
            {"name": "02:00:00:00:00:02", "nickname": "two", "connections": []},
        ],
        "connections": [
            {
                "peer": "02:00:00:00:00:02",
                "nickname": "two",
                "address": "10.0.0.2:6783",
                "outbound": True,
                "state": "established",
                "info": "encrypted sleeve",
                "encrypted": True,
                "datapath": "sleeve",
                "mtu": 1414,
            },
            {
                "peer": "02:00:00:00:00:03",
                "nickname": "three",
                "address": "10.0.0.3:41000",
                "outbound": False,
                "state": "failed",
                "info": "wrong password: the peer's confirm did not authenticate",
                "encrypted": False,
                "datapath": None,
                "mtu": None,
            },
        ],
        "targets": [
            {
                "address": "10.0.0.2:6783",
                "state": "connected",
                "attempts": 0,
                "next_try": None,
                "last_error": "",
            }
        ],
    },
    "overlay": {"datapath": "sleeve"},
}


class FakeApi:
    """A tiny HTTP server standing in for the router's API; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.replies: dict[tuple[str, str], tuple[int, Any]] = {
            ("GET", "/status"): (200, STATUS),
            ("GET", "/report"): (200, STATUS),
        }
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((self.command, self.path, body))
                code, reply = api.replies.get((self.command, self.path), (200, {}))
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _reply
            do_POST = _reply

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    yield fake
    fake.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_router_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    addr = f"127.0.0.1:{free_port()}"
    for argv in (["status"], ["connect", "10.0.0.1"], ["report"], ["stop"], ["ps"]):
        assert cli.main([*argv, "--http-addr", addr]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"cannot reach the weft router at {addr}" in err
        assert "Traceback" not in err


def test_unreachable_router_from_a_real_process() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "weft.cli.main",
            "status",
            "--http-addr",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("weft status: cannot reach the weft router")
    assert proc.stderr.count("\n") == 1


def test_env_sets_the_http_address(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.HTTP_ADDR_ENV, api.addr)
    assert cli.main(["status", "connections"]) == 0
    assert "wrong password" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["launch", "--port", "x"], "argument --port: invalid int value: 'x'"),
        (["status", "everything"], "invalid choice: 'everything'"),
        (["connect"], "the following arguments are required: PEER"),
        (["launch", "--datapath", "dpdk"], "invalid choice: 'dpdk'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1, err


def test_launch_refuses_bad_config_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["launch", "--data-dir", str(tmp_path), "--http-addr", f"127.0.0.1:{free_port()}"]
    assert cli.main([*base, "--password-file", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weft launch: cannot read password file") and err.count("\n") == 1
    assert cli.main([*base, "--name", "not-a-name"]) == 1
    assert "invalid peer name" in capsys.readouterr().err
    assert cli.main([*base, "--heartbeat-interval", "5", "--heartbeat-timeout", "2"]) == 1
    assert "--heartbeat-timeout 2.0 must be longer" in capsys.readouterr().err
    assert not (tmp_path / "weft.log").exists()


def test_launch_refuses_when_a_router_already_answers(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["launch", "--data-dir", str(tmp_path), "--http-addr", api.addr]) == 1
    assert "already answering" in capsys.readouterr().err


def test_client_commands_send_the_documented_requests(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    a = ["--http-addr", api.addr]
    assert cli.main(["connect", "--replace", "10.0.0.1", "10.0.0.2:7000", *a]) == 0
    assert cli.main(["forget", "10.0.0.1", *a]) == 0
    api.replies[("POST", "/expose")] = (200, {"addresses": ["10.32.0.1/12"]})
    assert cli.main(["expose", "10.32.0.1/12", *a]) == 0
    assert cli.main(["expose", *a]) == 0
    api.replies[("POST", "/attach")] = (200, {"addresses": ["10.32.0.5/12"], "mac": "x"})
    assert cli.main(["attach", "--ip", "10.32.0.5/12", "--ifname", "eth1", "c1", *a]) == 0
    assert cli.main(["detach", "c1", *a]) == 0
    api.replies[("GET", "/ps")] = (
        200,
        [{"netns": "c1", "ifname": "eth1", "host_ifname": "v1", "mac": "m", "addresses": ["a"]}],
    )
    assert cli.main(["ps", *a]) == 0
    assert api.requests == [
        ("POST", "/connect", {"peers": ["10.0.0.1", "10.0.0.2:7000"], "replace": True}),
        ("POST", "/forget", {"peers": ["10.0.0.1"]}),
        ("POST", "/expose", {"cidr": "10.32.0.1/12"}),
        ("POST", "/expose", {"cidr": None}),
        ("POST", "/attach", {"netns": "c1", "ip": ["10.32.0.5/12"], "ifname": "eth1", "mtu": None}),
        ("POST", "/detach", {"netns": "c1"}),
        ("GET", "/ps", None),
    ]
    out = capsys.readouterr().out
    assert "10.32.0.1/12" in out and "10.32.0.5/12" in out
    assert "NETNS" in out and "c1" in out


def test_router_error_message_is_shown_as_is(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.replies[("POST", "/connect")] = (400, {"error": 'peer "x:y": port must be a number'})
    assert cli.main(["connect", "x:y", "--http-addr", api.addr]) == 1
    assert capsys.readouterr().err == 'weft connect: peer "x:y": port must be a number\n'


def test_status_and_report(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--http-addr", api.addr]) == 0
    out = capsys.readouterr().out
    assert "Encryption: enabled" in out
    assert "Connections: 2 (1 established, 1 failed)" in out
    assert cli.main(["report", "--http-addr", api.addr]) == 0
    assert json.loads(capsys.readouterr().out) == STATUS


def test_renderings_are_aligned_and_name_reasons() -> None:
    conns = render_connections(STATUS).splitlines()
    assert conns[0].split() == [
        "DIR", "ADDRESS", "STATE", "PEER", "ENCRYPTION", "DATAPATH", "MTU", "INFO"
    ]  # fmt: skip
    # every column starts at the same offset in every line
    col = conns[0].index("STATE")
    assert all(line[col:].split()[0] in ("STATE", "established", "failed") for line in conns)
    assert "02:00:00:00:00:03(three)" in conns[2] and "wrong password" in conns[2]
    assert "encrypted" in conns[1] and "1414" in conns[1]
    peers = render_peers(STATUS)
    assert "02:00:00:00:00:01(one)" in peers and "10.0.0.2:6783" in peers
    assert "->  10.0.0.2:6783  02:00:00:00:00:02(two)  established" in peers
    assert "connected" in render_targets(STATUS)
    summary = render_summary(STATUS)
    assert "Peers: 2 (with 1 established connections)" in summary
    # missing parts never crash a rendering
    for render in (render_summary, render_peers, render_connections, render_targets):
        assert render({})
        assert render({"router": {"connections": "junk", "peers": [1, None]}})
    assert render_table(("A", "B"), [("xx", None)]) == "A   B\nxx"


def test_client_import_stays_cheap() -> None:
    code = (
        "import sys, weft.cli.main, weft.cli.status; "
        "print(sorted(m for m in ('aiohttp', 'cryptography', 'pyroute2', 'msgpack') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = ["launch", "router", "status", "report", "connect", "forget", "stop"]
    commands += ["expose", "attach", "detach", "ps"]
    for command in commands:
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: weft {command}" in out and "--http-addr" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listing = capsys.readouterr().out
    assert all(c in listing for c in [*commands, "demo", "setup-cni"])


def test_demo_gets_its_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from weft.cli import demo

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    assert cli.main(["demo", "--help"]) == 0
    assert cli.main(["demo", "--hosts", "4", "--down"]) == 0
    assert seen == [["--help"], ["--hosts", "4", "--down"]]


def test_router_options_build_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEFT_PASSWORD", "from-env")
    monkeypatch.setenv(cli.HTTP_ADDR_ENV, "127.0.0.1:7777")
    parser = cli.build_parser()
    argv = ["router", "--data-dir", str(tmp_path), "--no-discovery", "--conn-limit", "5"]
    argv += ["--heartbeat-interval", "1", "--heartbeat-timeout", "3", "--api-socket", ""]
    argv += ["--status-addr", "0.0.0.0:6782", "--name", "02:00:00:00:00:09", "10.0.0.1"]
    argv += ["--ipalloc-range", "10.40.0.0/16", "--ipalloc-init", "seed=02:00:00:00:00:09"]
    argv += ["--unauth-limit", "16", "--unauth-per-source", "2"]
    args = parser.parse_args(argv)
    config = cli.config_from_args(args)
    assert config.password == b"from-env"
    assert config.http_addr == "127.0.0.1:7777"
    assert config.discovery is False and config.conn_limit == 5
    adm = config.admission_config()
    assert (adm.limit, adm.per_source, adm.outbound_reserve) == (16, 2, 4)
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (1.0, 3.0)
    assert config.api_socket is None and config.status_addr == "0.0.0.0:6782"
    assert str(config.name) == "02:00:00:00:00:09"
    assert config.peers == ("10.0.0.1:6783",)
    assert config.ipam is True and config.ipalloc_range == "10.40.0.0/16"
    assert config.ipalloc_init == "seed=02:00:00:00:00:09"
    assert cli.config_from_args(parser.parse_args(["router", "--no-ipam"])).ipam is False
    # a password file wins over the environment
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    args = parser.parse_args(["router", "--data-dir", str(tmp_path), "--password-file", str(pw)])
    assert cli.config_from_args(args).password == b"from-file"


def _launch_args(tmp_path: Path, port: int, http_port: int) -> list[str]:
    return [
        "launch",
        "--data-dir",
        str(tmp_path),
        "--port",
        str(port),
        "--http-addr",
        f"127.0.0.1:{http_port}",
        "--api-socket",
        "",
        "--datapath",
        "none",
        "--nickname",
        "launched",
    ]


def _weft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weft.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_launch_status_stop_round_trip(tmp_path: Path) -> None:
    import os
    import signal

    http = f"127.0.0.1:{free_port()}"
    launched = _weft(*_launch_args(tmp_path, free_port(), int(http.split(":")[1])))
    pid = None
    try:
        assert launched.returncode == 0, launched.stderr
        name = launched.stdout.strip()
        pid = json.loads(_weft("report", "--http-addr", http).stdout)["router"]["pid"]
        assert pid != os.getpid()  # a daemon of its own
        status = _weft("status", "--http-addr", http)
        assert status.returncode == 0
        assert f"Name: {name}(launched)" in status.stdout
        assert (tmp_path / "weft.log").read_text().count("listening on") == 1
        again = _weft(*_launch_args(tmp_path, free_port(), int(http.split(":")[1])))
        assert again.returncode == 1 and "already answering" in again.stderr
    finally:
        stopped = _weft("stop", "--http-addr", http)
        if stopped.returncode != 0 and pid is not None:
            os.kill(pid, signal.SIGKILL)  # never leave a daemon behind
    assert stopped.returncode == 0, stopped.stderr
    gone = _weft("status", "--http-addr", http)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr


def test_launch_reports_why_the_router_did_not_start(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        proc = _weft(*_launch_args(tmp_path, port, free_port()))
    assert proc.returncode == 1
    assert proc.stderr.startswith("weft launch: the router did not start: cannot listen on")
    assert "address already in use" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_setup_cni_installs_the_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    argv = ["setup-cni", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)]
    assert cli.main(argv) == 0
    assert (bin_dir / "weft").exists()
    conf = json.loads((conf_dir / "10-weft.conflist").read_text())
    assert conf["plugins"][0]["type"] == "weft"
    assert "installed" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["setup-cni", "--bin-dir", str(blocker / "bin")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weft setup-cni: ") and err.count("\n") == 1


def test_attach_and_detach_send_names_as_given_and_paths_absolute(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The router runs in another directory: a relative path must reach it absolute."""
    a = ["--http-addr", api.addr]
    monkeypatch.chdir(tmp_path)
    api.replies[("POST", "/attach")] = (200, {"addresses": ["10.32.0.5/12"], "mac": "x"})
    assert cli.main(["attach", "/run/netns/c1", *a]) == 0
    assert cli.main(["attach", "./ns/c2", *a]) == 0
    assert cli.main(["detach", "c1", *a]) == 0
    assert cli.main(["detach", "ns/c2", *a]) == 0
    sent = [(path, body["netns"]) for _, path, body in api.requests]
    assert sent == [
        ("/attach", "/run/netns/c1"),
        ("/attach", f"{tmp_path}/ns/c2"),
        ("/detach", "c1"),
        ("/detach", f"{tmp_path}/ns/c2"),
    ]
