"""The CNI plugin process in-process: validation, versions, results, chaining, router failures.

The router is a recording fake; delegated IPAM is a small script in a temporary CNI_PATH.
Real kernel work is covered by tests/integ/test_cni_conformance.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from weft.cni import plugin
from weft.cni.plugin import (
    SUPPORTED_VERSIONS,
    CniError,
    RouterUnreachable,
    from_current,
    merge_results,
    run,
    to_current,
)
from weft.cni.shim_server import Request


def run_as_the_router(
    env: Mapping[str, str],
    stdin: bytes,
    router: Any = None,
    caller: plugin.Caller | None = None,
) -> tuple[int, str]:
    """``plugin.run`` the way the router runs it for the compiled shim (shim_server.ShimServer):
    CNI_NETNS opened beforehand as the shim opens it (ADD, CHECK), its descriptor or its error
    handed over, log lines to the shim's stderr descriptor."""
    del caller
    netns_fd = netns_errno = None
    if env.get("CNI_COMMAND") in ("ADD", "CHECK") and env.get("CNI_NETNS"):
        try:
            netns_fd = os.open(env["CNI_NETNS"], os.O_RDONLY)
        except OSError as err:
            netns_errno = err.errno
    request = Request(dict(env), stdin, os.dup(2), netns_fd, netns_errno)
    try:
        caller = plugin.Caller(request.stderr_fd, request.open_netns)
        return plugin.run(request.env, request.stdin, router, caller)
    finally:
        request.close()


@pytest.fixture(autouse=True, params=["process", "router"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: as the plugin process runs the logic, and as the router does for the
    shim (the conformance of both ways; test_cni_shim.py runs the real shim)."""
    if request.param == "router":
        monkeypatch.setattr(sys.modules[__name__], "run", run_as_the_router)
    return str(request.param)


ROUTER_RESULT: dict[str, Any] = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "weft", "mac": "aa:00:00:00:00:01", "mtu": 1376},
        {"name": "vwf0123456789ab", "mac": "aa:00:00:00:00:02", "mtu": 1376},
        {"name": "eth0", "mac": "aa:00:00:00:00:03", "mtu": 1376, "sandbox": "/proc/self/ns/net"},
    ],
    "ips": [{"address": "10.32.0.2/12", "gateway": "10.32.0.1", "interface": 2}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.32.0.1", "mtu": 1376}],
    "dns": {"nameservers": ["10.32.0.1"]},
}


class FakeRouter:
    """Records every request; answers from ``answers`` (route -> answer or exception).

    Like the real router it opens ``netnsRef`` while answering: the plugin must keep it valid.
    """

    def __init__(self, answers: Mapping[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.answers = dict(answers or {})

    def post(self, route: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append((route, dict(body)))
        if "netnsRef" in body:
            assert os.stat(body["netnsRef"]).st_ino == os.stat("/proc/self/ns/net").st_ino
        answer = self.answers.get(route, {})
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)


def env_for(command: str, **extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/proc/self/ns/net",  # exists everywhere; the fake router does no kernel work
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/nonexistent",
    }
    env.update(extra)
    return env


def conf(version: str = "1.0.0", **extra: Any) -> bytes:
    body: dict[str, Any] = {"cniVersion": version, "name": "weftnet", "type": "weft"}
    body.update(extra)
    return json.dumps(body).encode()


def invoke(
    command: str,
    stdin: bytes,
    router: FakeRouter | None = None,
    **env: str,
) -> tuple[int, dict[str, Any] | None]:
    status, out = run(env_for(command, **env), stdin, router or FakeRouter())  # type: ignore[arg-type]
    return status, (json.loads(out) if out else None)


# ------------------------------------------------------------------ VERSION


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_version_echoes_the_asked_version(version: str) -> None:
    status, out = invoke("VERSION", json.dumps({"cniVersion": version}).encode())
    assert status == 0 and out is not None
    assert out["cniVersion"] == version
    assert out["supportedVersions"] == list(SUPPORTED_VERSIONS)


@pytest.mark.parametrize("stdin", [b"", b"garbage", b'{"cniVersion": "9.9.9"}', b"[1]"])
def test_version_answers_whatever_the_input(stdin: bytes) -> None:
    status, out = run({"CNI_COMMAND": "VERSION"}, stdin)
    assert status == 0
    assert json.loads(out)["cniVersion"] == "1.1.0"


# ------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    ("command", "missing", "names"),
    [
        ("ADD", "CNI_CONTAINERID", ["CNI_CONTAINERID"]),
        ("ADD", "CNI_NETNS", ["CNI_NETNS"]),
        ("ADD", "CNI_IFNAME", ["CNI_IFNAME"]),
        ("ADD", "CNI_PATH", ["CNI_PATH"]),
        ("CHECK", "CNI_NETNS", ["CNI_NETNS"]),
        ("DEL", "CNI_CONTAINERID", ["CNI_CONTAINERID"]),
        ("DEL", "CNI_IFNAME", ["CNI_IFNAME"]),
        ("GC", "CNI_PATH", ["CNI_PATH"]),
        ("STATUS", "CNI_PATH", ["CNI_PATH"]),
    ],
)
def test_missing_environment_is_error_4_naming_it(
    command: str, missing: str, names: list[str]
) -> None:
    env = env_for(command)
    del env[missing]
    status, out = run(env, conf("1.1.0"), FakeRouter())  # type: ignore[arg-type]
    err = json.loads(out)
    assert status == 1 and err["code"] == 4
    for name in names:
        assert name in err["msg"]


def test_all_missing_variables_are_named_at_once() -> None:
    status, out = run({"CNI_COMMAND": "ADD"}, conf())
    err = json.loads(out)
    assert status == 1 and err["code"] == 4
    for name in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"):
        assert name in err["msg"]


def test_missing_command_is_error_4() -> None:
    status, out = run({}, conf())
    assert status == 1 and json.loads(out)["code"] == 4
    assert "CNI_COMMAND" in json.loads(out)["msg"]


def test_unknown_command_is_error_4() -> None:
    status, out = invoke("FROB", conf())
    assert status == 1 and out is not None and out["code"] == 4
    assert "FROB" in out["msg"]


def test_del_needs_no_netns() -> None:
    router = FakeRouter()
    status, out = invoke("DEL", conf(), router, CNI_NETNS="")
    assert status == 0 and out is None
    assert router.calls[0][0] == "/cni/del"


@pytest.mark.parametrize("cid", ["-lead", "has space", "a/b", "ünï", "x:y", ".dot"])
def test_invalid_container_id_is_error_4(cid: str) -> None:
    status, out = invoke("ADD", conf(), CNI_CONTAINERID=cid)
    assert status == 1 and out is not None and out["code"] == 4
    assert "CNI_CONTAINERID" in out["msg"]


@pytest.mark.parametrize("cid", ["a", "0", "abc_def.g-h", "A" * 64])
def test_valid_container_ids(cid: str) -> None:
    status, _ = invoke(
        "ADD", conf(), FakeRouter({"/cni/add": {"result": ROUTER_RESULT}}), CNI_CONTAINERID=cid
    )
    assert status == 0


@pytest.mark.parametrize("ifname", [".", "..", "a" * 16, "a/b", "a:b", "a b", "tab\t"])
def test_invalid_interface_name_is_error_4(ifname: str) -> None:
    status, out = invoke("ADD", conf(), CNI_IFNAME=ifname)
    assert status == 1 and out is not None and out["code"] == 4
    assert "CNI_IFNAME" in out["msg"]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "STATUS", "GC"])
@pytest.mark.parametrize("stdin", [b"", b"{not json", b"\xff\xfe", b"[]", b"42"])
def test_garbage_stdin_is_error_6(command: str, stdin: bytes) -> None:
    status, out = invoke(command, stdin)
    assert status == 1 and out is not None and out["code"] == 6


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize(
    "stdin",
    [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 65 + b"]" * 65],
    ids=["arrays", "objects", "65-closed"],
)
def test_deeply_nested_stdin_is_error_6_not_999(command: str, stdin: bytes) -> None:
    # before weft.jsonlimit: RecursionError escaped the ValueError handlers -> code 999
    status, out = invoke(command, stdin)
    assert status == 1 and out is not None and out["code"] == 6
    assert "nested too deeply" in out["details"]


@pytest.mark.parametrize("body", [{"cniVersion": "1.0.0"}, {"cniVersion": "1.0.0", "name": ""}])
def test_missing_name_is_error_7(body: dict[str, Any]) -> None:
    status, out = invoke("ADD", json.dumps(body).encode())
    assert status == 1 and out is not None and out["code"] == 7


def test_invalid_name_is_error_7() -> None:
    status, out = invoke("ADD", json.dumps({"cniVersion": "1.0.0", "name": "a/b"}).encode())
    assert status == 1 and out is not None and out["code"] == 7


@pytest.mark.parametrize("version", [None, "0.1.0", "0.2.0", "1.2.0", "2.0.0", "one", 1])
@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_unsupported_version_is_error_1(command: str, version: Any) -> None:
    body = {"name": "weftnet", "type": "weft"}
    if version is not None:
        body["cniVersion"] = version
    status, out = invoke(command, json.dumps(body).encode())
    assert status == 1 and out is not None and out["code"] == 1


@pytest.mark.parametrize(
    ("command", "version"),
    [
        ("CHECK", "0.3.0"),
        ("CHECK", "0.3.1"),
        ("STATUS", "1.0.0"),
        ("GC", "1.0.0"),
        ("STATUS", "0.4.0"),
        ("GC", "0.3.1"),
    ],
)
def test_commands_before_their_version_are_error_1(command: str, version: str) -> None:
    router = FakeRouter()
    status, out = invoke(
        command, conf(version, prevResult=from_current(ROUTER_RESULT, version)), router
    )
    assert status == 1 and out is not None and out["code"] == 1
    assert out["cniVersion"] == version
    assert router.calls == []


def test_unknown_keys_and_capabilities_are_tolerated() -> None:
    router = FakeRouter({"/cni/add": {"result": ROUTER_RESULT}})
    stdin = conf(
        "1.0.0",
        frobnicate={"x": 1},
        capabilities={"portMappings": True, "bandwidth": True},
        runtimeConfig={"portMappings": [{"hostPort": 8080, "containerPort": 80}]},
        args={"cni": {"x": "y"}},
        **{"cni.dev/whatever": 1},
    )
    status, out = invoke("ADD", stdin, router)
    assert status == 0 and out is not None
    assert router.calls[0][1]["config"]["frobnicate"] == {"x": 1}


# ------------------------------------------------------------------ results and versions


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_result_in_the_input_version(version: str) -> None:
    router = FakeRouter({"/cni/add": {"result": ROUTER_RESULT}})
    status, out = invoke("ADD", conf(version), router)
    assert status == 0 and out is not None
    assert out["cniVersion"] == version
    assert [i["name"] for i in out["interfaces"]] == ["weft", "vwf0123456789ab", "eth0"]
    ip = out["ips"][0]
    assert ip["address"] == "10.32.0.2/12" and ip["gateway"] == "10.32.0.1"
    assert ip["interface"] == 2
    if version in ("0.3.0", "0.3.1", "0.4.0"):
        assert ip["version"] == "4"
    else:
        assert "version" not in ip
    if version == "1.1.0":
        assert out["interfaces"][2]["mtu"] == 1376 and out["routes"][0]["mtu"] == 1376
    else:
        assert "mtu" not in out["interfaces"][2] and "mtu" not in out["routes"][0]
    assert out["dns"] == {"nameservers": ["10.32.0.1"]}
    request = router.calls[0][1]
    assert request["containerId"] == "c0ffee" and request["ifname"] == "eth0"
    assert request["network"] == "weftnet" and "ipam" not in request


def test_ipv6_addresses_carry_version_6_in_old_results() -> None:
    result = dict(ROUTER_RESULT, ips=[{"address": "fd00::2/64", "interface": 2}])
    out = from_current(result, "0.4.0")
    assert out["ips"][0]["version"] == "6"


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_round_trips_through_every_version(version: str) -> None:
    there = from_current(ROUTER_RESULT, version)
    back = to_current(there, version)
    assert from_current(back, version) == there


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_chained_add_extends_prev_result(version: str) -> None:
    prev_internal = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "lo0", "mac": "00:00:00:00:00:00", "sandbox": "/proc/self/ns/net"}],
        "ips": [{"address": "192.168.9.2/24", "interface": 0}],
        "routes": [{"dst": "192.168.0.0/16"}],
        "dns": {"domain": "example"},
    }
    prev = from_current(prev_internal, version)
    router = FakeRouter({"/cni/add": {"result": ROUTER_RESULT}})
    status, out = invoke("ADD", conf(version, prevResult=prev), router)
    assert status == 0 and out is not None
    assert [i["name"] for i in out["interfaces"]] == ["lo0", "weft", "vwf0123456789ab", "eth0"]
    assert [ip["address"] for ip in out["ips"]] == ["192.168.9.2/24", "10.32.0.2/12"]
    assert out["ips"][0]["interface"] == 0 and out["ips"][1]["interface"] == 3
    assert [r["dst"] for r in out["routes"]] == ["192.168.0.0/16", "0.0.0.0/0"]
    assert out["dns"] == {"nameservers": ["10.32.0.1"]}  # ours, as configured, wins
    assert "prevResult" not in router.calls[0][1]["config"]


def test_merge_without_prev_is_ours() -> None:
    assert merge_results(None, ROUTER_RESULT) == ROUTER_RESULT


def test_add_missing_netns_is_error_3_and_asks_nobody() -> None:
    router = FakeRouter()
    status, out = invoke("ADD", conf(), router, CNI_NETNS="/var/run/netns/does-not-exist-x1")
    assert status == 1 and out is not None and out["code"] == 3
    assert router.calls == []


def test_router_error_is_passed_through() -> None:
    router = FakeRouter({"/cni/add": CniError(101, "interface eth0 already exists")})
    status, out = invoke("ADD", conf(), router)
    assert status == 1 and out == {
        "cniVersion": "1.0.0",
        "code": 101,
        "msg": "interface eth0 already exists",
    }


# ------------------------------------------------------------------ router down


def test_add_with_router_down_is_error_11() -> None:
    router = FakeRouter({"/cni/add": RouterUnreachable("/run/weft/weft.sock: refused")})
    status, out = invoke("ADD", conf(), router)
    assert status == 1 and out is not None and out["code"] == 11


def test_add_with_real_missing_socket_is_error_11(tmp_path: Path) -> None:
    stdin = conf(socket=str(tmp_path / "nobody.sock"))
    status, out = run(env_for("ADD"), stdin)
    assert status == 1 and json.loads(out)["code"] == 11


def test_del_with_router_down_succeeds_and_spools(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    stdin = conf(socket=str(tmp_path / "nobody.sock"), spoolDir=str(spool))
    status, out = run(env_for("DEL", CNI_NETNS=""), stdin)
    assert status == 0 and out == ""
    files = list(spool.iterdir())
    assert [f.name for f in files] == ["weftnet:c0ffee:eth0.json"]
    request = json.loads(files[0].read_text())
    assert request["containerId"] == "c0ffee" and request["weftIpam"] is True
    # DEL again (runtimes retry): still success, still one pending release
    status, _ = run(env_for("DEL", CNI_NETNS=""), stdin)
    assert status == 0 and len(list(spool.iterdir())) == 1


def test_del_without_an_answer_spools_too(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    router = FakeRouter({"/cni/del": plugin.RouterNoAnswer(11, "no answer from the weft router")})
    status, _ = invoke("DEL", conf(spoolDir=str(spool)), router)
    assert status == 0
    assert [f.name for f in spool.iterdir()] == ["weftnet:c0ffee:eth0.json"]


def test_router_that_hangs_up_is_error_11_on_add(tmp_path: Path) -> None:
    import socket
    import threading

    path = str(tmp_path / "hangup.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        status, out = run(env_for("ADD"), conf(socket=path))
    finally:
        thread.join(timeout=10)
        listener.close()
    assert status == 1 and json.loads(out)["code"] == 11
    assert "no answer" in json.loads(out)["msg"]


def test_status_with_router_down_is_50(tmp_path: Path) -> None:
    status, out = run(env_for("STATUS"), conf("1.1.0", socket=str(tmp_path / "x.sock")))
    assert status == 1 and json.loads(out)["code"] == 50


def test_status_not_ready_is_50() -> None:
    router = FakeRouter({"/cni/status": CniError(11, "bridge missing")})
    status, out = invoke("STATUS", conf("1.1.0"), router)
    assert status == 1 and out is not None and out["code"] == 50


def test_status_ready_prints_nothing() -> None:
    status, out = invoke("STATUS", conf("1.1.0"))
    assert status == 0 and out is None


# ------------------------------------------------------------------ CHECK, GC


def test_check_sends_prev_result_in_internal_form() -> None:
    router = FakeRouter()
    prev = from_current(ROUTER_RESULT, "0.4.0")
    status, _ = invoke("CHECK", conf("0.4.0", prevResult=prev), router)
    assert status == 0
    route, body = router.calls[0]
    assert route == "/cni/check"
    assert body["prevResult"]["ips"][0] == {
        "address": "10.32.0.2/12",
        "gateway": "10.32.0.1",
        "interface": 2,
    }


def test_check_without_prev_result_fails() -> None:
    status, out = invoke("CHECK", conf("1.0.0"))
    assert status == 1 and out is not None and out["code"] == 7


def test_check_failure_is_reported() -> None:
    router = FakeRouter(
        {
            "/cni/check": CniError(
                102, "attachment is not as expected", "address 10.32.0.2/12 is missing on eth0"
            )
        }
    )
    status, out = invoke("CHECK", conf("1.1.0", prevResult=ROUTER_RESULT), router)
    assert status == 1 and out is not None and out["code"] == 102
    assert "10.32.0.2" in out["details"]


def test_gc_forwards_valid_attachments() -> None:
    router = FakeRouter({"/cni/gc": {"released": []}})
    valid = [{"containerID": "a1", "ifname": "eth0"}, {"containerID": "b2", "ifname": "net1"}]
    status, _ = invoke("GC", conf("1.1.0", **{"cni.dev/valid-attachments": valid}), router)
    assert status == 0
    assert router.calls == [("/cni/gc", {"network": "weftnet", "valid": valid, "weftIpam": True})]


def test_gc_without_valid_attachments_is_error_7_and_releases_nothing() -> None:
    router = FakeRouter()
    status, out = invoke("GC", conf("1.1.0"), router)
    assert status == 1 and out is not None and out["code"] == 7
    assert router.calls == []


def test_gc_with_an_empty_list_releases_everything() -> None:
    router = FakeRouter()
    status, _ = invoke("GC", conf("1.1.0", **{"cni.dev/valid-attachments": []}), router)
    assert status == 0 and router.calls[0][1]["valid"] == []


def test_gc_with_bad_attachments_is_error_7() -> None:
    status, out = invoke("GC", conf("1.1.0", **{"cni.dev/valid-attachments": [{"x": 1}]}))
    assert status == 1 and out is not None and out["code"] == 7


# ------------------------------------------------------------------ delegated IPAM

FAKE_IPAM = """#!{python}
import json, os, sys
log = {log!r}
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
with open(log, "a") as f:
    f.write(json.dumps({{"cmd": cmd, "version": conf["cniVersion"],
                        "cid": os.environ.get("CNI_CONTAINERID")}}) + "\\n")
if conf["cniVersion"] not in {supported!r}:
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 1, "msg": "incompatible"}}))
    sys.exit(1)
if cmd == "ADD":
    r = {{"cniVersion": conf["cniVersion"], "ips": [{{"address": "192.168.50.7/24",
         "gateway": "192.168.50.1"}}], "routes": [{{"dst": "10.0.0.0/8"}}]}}
    if conf["cniVersion"].startswith("0."):
        r["ips"][0]["version"] = "4"
    print(json.dumps(r))
"""


def make_ipam(tmp_path: Path, supported: tuple[str, ...]) -> tuple[Path, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ipam.log"
    script = bindir / "fake-ipam"
    script.write_text(FAKE_IPAM.format(python=sys.executable, log=str(log), supported=supported))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir, log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_delegated_ipam_result_goes_to_the_router(tmp_path: Path, version: str) -> None:
    bindir, log = make_ipam(tmp_path, SUPPORTED_VERSIONS)
    router = FakeRouter({"/cni/add": {"result": ROUTER_RESULT}})
    stdin = conf(version, ipam={"type": "fake-ipam"})
    status, out = invoke("ADD", stdin, router, CNI_PATH=f"/nowhere:{bindir}")
    assert status == 0, out
    ipam = router.calls[0][1]["ipam"]
    assert ipam["ips"] == [{"address": "192.168.50.7/24", "gateway": "192.168.50.1"}]
    assert ipam["routes"] == [{"dst": "10.0.0.0/8"}]
    assert [c["cmd"] for c in calls(log)] == ["ADD"]


def test_delegated_ipam_is_undone_when_the_router_fails(tmp_path: Path) -> None:
    bindir, log = make_ipam(tmp_path, SUPPORTED_VERSIONS)
    router = FakeRouter({"/cni/add": CniError(101, "exists")})
    status, out = invoke("ADD", conf(ipam={"type": "fake-ipam"}), router, CNI_PATH=str(bindir))
    assert status == 1 and out is not None and out["code"] == 101
    assert [c["cmd"] for c in calls(log)] == ["ADD", "DEL"]


def test_delegated_ipam_gets_del_check_gc_status(tmp_path: Path) -> None:
    bindir, log = make_ipam(tmp_path, SUPPORTED_VERSIONS)
    stdin = conf(
        "1.1.0",
        ipam={"type": "fake-ipam"},
        prevResult=ROUTER_RESULT,
        **{"cni.dev/valid-attachments": []},
    )
    for command in ("CHECK", "DEL", "GC", "STATUS"):
        status, out = invoke(command, stdin, FakeRouter(), CNI_PATH=str(bindir))
        assert status == 0, (command, out)
    assert [c["cmd"] for c in calls(log)] == ["CHECK", "DEL", "GC", "STATUS"]


def test_delegated_ipam_stuck_at_1_0_0_is_asked_again_at_1_0_0(tmp_path: Path) -> None:
    bindir, log = make_ipam(tmp_path, ("0.3.0", "0.3.1", "0.4.0", "1.0.0"))
    router = FakeRouter({"/cni/add": {"result": ROUTER_RESULT}})
    status, out = invoke(
        "ADD", conf("1.1.0", ipam={"type": "fake-ipam"}), router, CNI_PATH=str(bindir)
    )
    assert status == 0 and out is not None and out["cniVersion"] == "1.1.0"
    assert [(c["cmd"], c["version"]) for c in calls(log)] == [("ADD", "1.1.0"), ("ADD", "1.0.0")]
    # GC and STATUS do not exist before 1.1.0: nothing more to ask such a plugin
    gc_conf = conf("1.1.0", ipam={"type": "fake-ipam"}, **{"cni.dev/valid-attachments": []})
    status, out = invoke("GC", gc_conf, FakeRouter(), CNI_PATH=str(bindir))
    assert status == 0, out


def test_delegated_ipam_not_found_is_an_error(tmp_path: Path) -> None:
    status, out = invoke("ADD", conf(ipam={"type": "nope"}), CNI_PATH=str(tmp_path))
    assert status == 1 and out is not None and out["code"] == 7
    assert "nope" in out["msg"]


# ------------------------------------------------------------------ HTTP parsing


def test_http_body_content_length_and_chunked() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert plugin._http_body(raw) == (200, b"{}")
    chunked = (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3\r\n{"a\r\n4\r\n": 1\r\n1\r\n}\r\n0\r\n\r\n'
    )
    assert plugin._http_body(chunked) == (503, b'{"a": 1}')
    with pytest.raises(ValueError):
        plugin._http_body(b"garbage")
    with pytest.raises(ValueError):
        plugin._http_body(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}")


# ------------------------------------------------------------------ process


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(plugin.__file__))))


def test_plugin_process_imports_stay_lean() -> None:
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "from weft.cni.plugin import run\n"
        "heavy = [m for m in ('aiohttp', 'pyroute2', 'cryptography', 'http.client', 'asyncio',"
        " 'subprocess', 'typing', 'json', 're', 'enum') if m in sys.modules]\n"
        "print(repr(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_plugin_process_answers_version_quickly() -> None:
    """A figure, not a timed assertion: the start-up cost goes to stderr of the test log."""
    root = ROOT
    env = {"CNI_COMMAND": "VERSION"}
    argv = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        f"import sys; sys.path.insert(0, {root!r}); from weft.cni.plugin import main; "
        "sys.exit(main())",
    ]
    start = time.perf_counter()
    out = subprocess.run(
        argv, input=b'{"cniVersion": "1.0.0"}', env=env, capture_output=True, check=True
    )
    took = time.perf_counter() - start
    assert json.loads(out.stdout)["cniVersion"] == "1.0.0"
    print(f"plugin VERSION round trip {took * 1000:.1f} ms", file=sys.stderr)


def test_add_into_a_file_that_is_not_a_namespace_is_error_3(tmp_path: Path) -> None:
    plain = tmp_path / "netns-mount-point"  # what a bind mount looks like from outside
    plain.write_text("")
    router = FakeRouter()
    status, out = invoke("ADD", conf(), router, CNI_NETNS=str(plain))
    assert status == 1 and out is not None and out["code"] == 3
    assert "not a network namespace" in out["msg"]
    assert router.calls == []


def test_add_hands_the_router_a_path_it_can_open() -> None:
    router = FakeRouter({"/cni/add": {"result": ROUTER_RESULT}})
    status, _ = invoke("ADD", conf(), router)
    assert status == 0
    ref = router.calls[0][1]["netnsRef"]
    assert ref.startswith(f"/proc/{os.getpid()}/fd/")
    assert not os.path.exists(ref)  # closed once the router has answered
