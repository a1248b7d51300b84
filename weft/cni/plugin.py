"""The weft CNI plugin process (CNI spec 0.3.0 .. 1.1.0).

A container runtime runs this program several times per container (podman: VERSION twice, then ADD;
later VERSION twice, then DEL), so it stays lean: it imports only json, os and sys from the standard
library (plus _socket, or subprocess for a delegated IPAM plugin, when needed) and leaves the kernel
work to the router, which already holds netlink handles, over the router's HTTP API on a unix
socket (``socket`` in the config, default ``/run/weft/weft.sock``).

What the plugin itself does:

- validates the environment (``CNI_*``), the configuration and the version, in the order libcni's
  ``skel`` does, and answers VERSION without talking to anyone;
- converts between the runtime's spec version and the router's internal form (1.1.0 shaped): results
  are printed in the input's version (0.3.x/0.4.0 carry ``ips[].version``; fields newer than the
  version are dropped), and ``prevResult`` is read in the input's version and extended, never lost;
- runs a delegated IPAM plugin (``ipam.type`` other than ``weft``) found in ``CNI_PATH`` with the
  same environment and stdin, and undoes it (DEL) when a later step of ADD fails;
- when the router cannot be reached on DEL, records the release in a spool directory
  (``spoolDir``, default ``/var/lib/weft/cni-spool``) and succeeds: the router drains that directory
  when it starts (and before each CNI request), so the address is released once it is back.

Error codes are the spec's (1 version, 3 no such netns, 4 environment, 6 decoding, 7 config, 11 try
again later, 50 not available) plus weft's own from 100 (see ``ERR_*``). Errors are printed as JSON
on stdout with a non-zero exit status; logs go to stderr.
"""

from __future__ import annotations

import os
import sys

from weft.atomicfile import write_atomic
from weft.jsonlimit import dumps, loads

# Imported for the type checker only: at run time every import costs start-up time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

# ----------------------------------------------------------------------------- JSON, lean
#
# ``import json`` pulls in ``re`` (and enum, functools, ...) and compiles its regular expressions:
# ~10 ms per plugin run on an idle 2-core machine, ~50 ms under load, more than the interpreter's
# own start-up. weft.jsonlimit drives CPython's C accelerator ``_json`` directly instead, and
# bounds the nesting depth: a too-deep document is a decoding failure (code 6), not a crash.

__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_SPOOL_DIR",
    "SUPPORTED_VERSIONS",
    "Caller",
    "CniError",
    "RouterClient",
    "RouterNoAnswer",
    "RouterUnreachable",
    "decode_answer",
    "from_current",
    "invoke",
    "main",
    "run",
    "spool_name",
    "to_current",
]

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT = "1.1.0"
DEFAULT_SOCKET = "/run/weft/weft.sock"
DEFAULT_SPOOL_DIR = "/var/lib/weft/cni-spool"

ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_KERNEL = 100  # weft: a kernel operation failed (details say which)
ERR_INTERFACE_EXISTS = 101  # weft: CNI_IFNAME already exists in the container
ERR_CHECK_FAILED = 102  # weft: CHECK found the attachment not as expected
ERR_IPAM = 103  # weft: the address allocator refused (e.g. no space left)
ERR_INTERNAL = 999

# Seconds to wait for the router. ADD may wait for the allocator (which bounds its own wait).
ADD_TIMEOUT = 90.0
OTHER_TIMEOUT = 30.0

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_REQUIRED_ENV = {
    "CNI_CONTAINERID": ("ADD", "CHECK", "DEL"),
    "CNI_NETNS": ("ADD", "CHECK"),
    "CNI_IFNAME": ("ADD", "CHECK", "DEL"),
    "CNI_PATH": ("ADD", "CHECK", "DEL", "GC", "STATUS"),
}
_COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


class CniError(Exception):
    """A failure with a CNI error code; printed as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Caller:
    """Where one invocation runs: the plugin's own process (the default) or the router, which runs
    the same logic for the compiled shim (weft/cni/shim.c, weft/cni/shim_server.py).

    stderr_fd: where log lines and delegated plugins' stderr go (None: this process's stderr).
    open_netns: opens CNI_NETNS, returning a file descriptor the caller may close (None:
        ``os.open``); the router's opens the descriptor the shim passed, which names the
        namespace as the runtime's mount namespace sees it.
    client_for: the router client for the configuration's ``socket`` (None: ``RouterClient``).
    """

    def __init__(
        self,
        stderr_fd: int | None = None,
        open_netns: Callable[[str], int] | None = None,
        client_for: Callable[[str], RouterClient] | None = None,
    ) -> None:
        self.stderr_fd = stderr_fd
        self.open_netns = open_netns
        self.client_for = client_for

    def log(self, line: str) -> None:
        if self.stderr_fd is None:
            print(line, file=sys.stderr)
            return
        try:  # noqa: SIM105 - contextlib is one more import at start-up
            os.write(self.stderr_fd, (line + "\n").encode(errors="replace"))
        except OSError:
            pass


_PROCESS = Caller()


# --------------------------------------------------------------------------- validation


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def validate_env(env: Mapping[str, str]) -> str:
    """Return the command, or raise error 4 naming every missing or invalid variable."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENV, "required env variables [CNI_COMMAND] missing")
    if command not in _COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}", "CNI_COMMAND")
    missing = [n for n, cmds in _REQUIRED_ENV.items() if command in cmds and not env.get(n)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    if command in ("ADD", "CHECK", "DEL"):
        cid = env["CNI_CONTAINERID"]
        if not valid_name(cid):
            raise CniError(ERR_INVALID_ENV, "invalid characters in CNI_CONTAINERID", cid)
        ifname = env["CNI_IFNAME"]
        problem = interface_name_problem(ifname)
        if problem:
            raise CniError(ERR_INVALID_ENV, f"invalid CNI_IFNAME: {problem}", ifname)
    return command


def valid_name(name: str) -> bool:
    """The spec's rule for container ids and network names: ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``."""
    return bool(name) and name[0].isascii() and name[0].isalnum() and set(name) <= _NAME_CHARS


def interface_name_problem(ifname: str) -> str:
    """Why ``ifname`` is not a valid Linux interface name, or '' when it is."""
    if not ifname:
        return "interface name is empty"
    if len(ifname.encode()) > 15:
        return "interface name is too long (at most 15 characters)"
    if ifname in (".", ".."):
        return "interface name is . or .."
    if any(ch in "/:" or ch.isspace() for ch in ifname):
        return "interface name contains / or : or whitespace"
    return ""


def parse_config(stdin: bytes) -> dict[str, Any]:
    """Decode the network configuration (error 6) and check its name (error 7)."""
    try:
        conf = loads(stdin)
    except (ValueError, UnicodeDecodeError) as err:
        raise CniError(ERR_DECODING, "error decoding network config", str(err)) from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODING, "network config is not a JSON object")
    name = conf.get("name")
    if not name:
        raise CniError(ERR_INVALID_CONFIG, "missing network name")
    if not isinstance(name, str) or not valid_name(name):
        raise CniError(ERR_INVALID_CONFIG, "invalid characters found in network name", str(name))
    return conf


def check_version(conf: Mapping[str, Any], command: str) -> str:
    version = conf.get("cniVersion") or "0.1.0"
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    minimum = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}.get(command)
    if minimum and _version_key(version) < _version_key(minimum):
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {command}")
    return version


# --------------------------------------------------------------------------- result versions


def _ip_version(address: str) -> str:
    return "6" if ":" in address else "4"


def to_current(result: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Read a result of ``version`` (0.3.0 .. 1.1.0) into the internal 1.1.0 form."""
    if not isinstance(result, dict):
        raise CniError(ERR_DECODING, "result is not a JSON object")
    out: dict[str, Any] = {"cniVersion": CURRENT}
    interfaces = result.get("interfaces") or []
    ips = result.get("ips") or []
    routes = result.get("routes") or []
    if not all(isinstance(x, list) for x in (interfaces, ips, routes)):
        raise CniError(ERR_DECODING, "result interfaces/ips/routes must be lists")
    out["interfaces"] = [dict(i) for i in interfaces if isinstance(i, dict)]
    converted_ips = []
    for ip in ips:
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            raise CniError(ERR_DECODING, "result ips[] entry without an address")
        entry = {k: v for k, v in ip.items() if k != "version"}
        converted_ips.append(entry)
    out["ips"] = converted_ips
    out["routes"] = [dict(r) for r in routes if isinstance(r, dict)]
    dns = result.get("dns")
    if isinstance(dns, dict) and dns:
        out["dns"] = dict(dns)
    del version  # every supported version reads the same way once ``version`` is dropped
    return out


_IFACE_KEYS_1_0 = ("name", "mac", "sandbox")
_ROUTE_KEYS_1_0 = ("dst", "gw")


def from_current(result: Mapping[str, Any], version: str) -> dict[str, Any]:
    """Write an internal (1.1.0 shaped) result in ``version``'s format."""
    modern = _version_key(version) >= (1, 1, 0)
    interfaces = [
        dict(i) if modern else {k: v for k, v in i.items() if k in _IFACE_KEYS_1_0}
        for i in result.get("interfaces", [])
    ]
    routes = [
        dict(r) if modern else {k: v for k, v in r.items() if k in _ROUTE_KEYS_1_0}
        for r in result.get("routes", [])
    ]
    ips = []
    for ip in result.get("ips", []):
        entry = dict(ip)
        if _version_key(version) < (1, 0, 0):
            entry = {"version": _ip_version(entry["address"]), **entry}
        ips.append(entry)
    out: dict[str, Any] = {"cniVersion": version}
    if interfaces:
        out["interfaces"] = interfaces
    out["ips"] = ips
    if routes:
        out["routes"] = routes
    dns = result.get("dns")
    out["dns"] = dict(dns) if isinstance(dns, dict) else {}
    return out


def merge_results(prev: Mapping[str, Any] | None, ours: Mapping[str, Any]) -> dict[str, Any]:
    """Append our interfaces, addresses and routes to ``prev`` (both internal form)."""
    if not prev:
        return dict(ours)
    interfaces = list(prev.get("interfaces", []))
    ips = list(prev.get("ips", []))
    routes = list(prev.get("routes", []))
    offset = len(interfaces)
    interfaces.extend(ours.get("interfaces", []))
    for ip in ours.get("ips", []):
        entry = dict(ip)
        if isinstance(entry.get("interface"), int):
            entry["interface"] += offset
        ips.append(entry)
    routes.extend(ours.get("routes", []))
    merged: dict[str, Any] = {
        "cniVersion": CURRENT,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
    }
    dns = ours.get("dns") or prev.get("dns")
    if dns:
        merged["dns"] = dns
    return merged


# --------------------------------------------------------------------------- router client


class RouterUnreachable(Exception):
    """The router's socket is missing, refuses or times out: nothing was done there."""


class RouterNoAnswer(CniError):
    """The request went out but no (valid) answer came back: the router may have acted on it."""


def _http_body(raw: bytes) -> tuple[int, bytes]:
    """Status and body of an HTTP/1.1 response read to EOF (Content-Length or chunked)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2) if lines else []
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError("malformed HTTP response")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        out = bytearray()
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2 :]
        body = bytes(out)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) < length:
            raise ValueError("truncated HTTP response")
        body = body[:length]
    return int(parts[1]), body


class RouterClient:
    """POSTs JSON to the router's ``/cni/...`` routes over its unix socket.

    A hand-written HTTP/1.1 exchange (one request, ``Connection: close``, read to EOF) instead
    of http.client, whose import (email.*) costs the plugin ~30 ms per run on this machine.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def post(self, route: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Return the JSON answer; raise CniError for an error answer, RouterUnreachable when
        the router could not be asked."""
        import _socket

        payload = dumps(body).encode()
        request = (
            f"POST {route} HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode() + payload
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
                sock.sendall(request)
            except OSError as err:
                raise RouterUnreachable(f"{self.path}: {err}") from None
            chunks = []
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                status, data = _http_body(b"".join(chunks))
            except (OSError, ValueError) as err:
                # The request went out; the router may have acted on it. ADD reports "try
                # again"; DEL is idempotent, so the runtime's retry is harmless.
                raise RouterNoAnswer(
                    ERR_TRY_AGAIN_LATER, "no answer from the weft router", f"{self.path}: {err}"
                ) from None
        finally:
            sock.close()
        return decode_answer(status, data)


class NoAnswerClient(RouterClient):
    """Every request went out and got no answer: what the shim reports when the router took its
    request and then closed, garbled or timed out (``WEFT_CNI_NO_ANSWER``); the plugin then does
    exactly what it does when its own request goes unanswered (ADD 11, DEL spooled)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path)
        self.reason = reason

    def post(self, route: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        del route, body, timeout
        raise RouterNoAnswer(
            ERR_TRY_AGAIN_LATER, "no answer from the weft router", f"{self.path}: {self.reason}"
        )


def decode_answer(status: int, data: bytes) -> dict[str, Any]:
    """The router's answer to a ``/cni`` request: its JSON object, or CniError for an error."""
    try:
        answer = loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        answer = {"msg": data[:200].decode(errors="replace")}
    if not isinstance(answer, dict):
        answer = {}
    if status >= 400:
        code = answer.get("code")
        if not isinstance(code, int):
            code = ERR_TRY_AGAIN_LATER if status == 503 else ERR_INTERNAL
        raise CniError(
            code,
            str(answer.get("msg") or answer.get("error") or f"router HTTP {status}"),
            str(answer.get("details") or ""),
        )
    return answer


# --------------------------------------------------------------------------- delegated IPAM


def find_plugin(name: str, cni_path: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise CniError(ERR_INVALID_CONFIG, "invalid ipam type", repr(name))
    for directory in cni_path.split(":"):
        if not directory:
            continue
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(ERR_INVALID_CONFIG, f"failed to find plugin {name!r} in path", cni_path)


def exec_plugin(
    path: str,
    command: str,
    env: Mapping[str, str],
    stdin: bytes,
    caller: Caller = _PROCESS,
) -> dict[str, Any] | None:
    """Run a delegated plugin the way a runtime would; its stderr goes to ours (the caller's)."""
    import subprocess  # only delegated IPAM pays for it

    child_env = dict(env)
    child_env["CNI_COMMAND"] = command
    proc = subprocess.run(
        [path],
        input=stdin,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=caller.stderr_fd,
        check=False,
        timeout=120,
    )
    out = proc.stdout.strip()
    parsed: Any = None
    if out:
        try:
            parsed = loads(out)
        except ValueError:
            parsed = None
    if proc.returncode != 0:
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), int):
            raise CniError(
                parsed["code"], str(parsed.get("msg", "")), str(parsed.get("details", ""))
            )
        raise CniError(
            ERR_INTERNAL,
            f"{os.path.basename(path)} {command} failed (exit {proc.returncode})",
            out[:500].decode(errors="replace"),
        )
    return parsed if isinstance(parsed, dict) else None


class DelegatedIpam:
    """An IPAM plugin from CNI_PATH, run with our environment and stdin.

    Debian's reference plugins stop at spec 1.0.0; when one refuses our version (error 1) we ask
    again with the configuration's ``cniVersion`` lowered to 1.0.0 and read its answer in that
    version, so a 1.1.0 network can still use host-local.
    """

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        stdin: bytes,
        version: str,
        caller: Caller = _PROCESS,
    ) -> None:
        self.path = find_plugin(name, env.get("CNI_PATH", ""))
        self.env = env
        self.stdin = stdin
        self.version = version
        self.caller = caller

    def _lowered(self) -> bytes:
        conf = loads(self.stdin)
        conf["cniVersion"] = "1.0.0"
        prev = conf.get("prevResult")
        if isinstance(prev, dict):
            conf["prevResult"] = from_current(to_current(prev, self.version), "1.0.0")
        return dumps(conf).encode()

    def call(self, command: str) -> tuple[dict[str, Any] | None, str]:
        try:
            return exec_plugin(self.path, command, self.env, self.stdin, self.caller), self.version
        except CniError as err:
            if err.code != ERR_INCOMPATIBLE_VERSION or _version_key(self.version) <= (1, 0, 0):
                raise
        if command in ("STATUS", "GC"):
            return None, self.version  # nothing to ask a plugin that predates these commands
        return exec_plugin(self.path, command, self.env, self._lowered(), self.caller), "1.0.0"

    def add(self) -> dict[str, Any]:
        result, version = self.call("ADD")
        if result is None:
            raise CniError(ERR_IPAM, f"{os.path.basename(self.path)} returned no result")
        ours = to_current(result, version)
        if not ours["ips"]:
            raise CniError(ERR_IPAM, f"{os.path.basename(self.path)} returned no addresses")
        return ours


# --------------------------------------------------------------------------- commands


def spool_name(network: str, container_id: str, ifname: str) -> str:
    """File name of a pending release; ':' appears in none of the three parts."""
    return f"{network}:{container_id}:{ifname}.json"


def _write_spool(spool_dir: str, request: Mapping[str, Any]) -> None:
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    name = spool_name(request["network"], request["containerId"], request["ifname"])
    # a unique temporary name per writer: the router may write for several shim requests at once
    write_atomic(os.path.join(spool_dir, name), dumps(request), mode=0o600)


def _uses_weft_ipam(conf: Mapping[str, Any]) -> bool:
    ipam = conf.get("ipam")
    if ipam is None:
        return True
    if not isinstance(ipam, dict):
        raise CniError(ERR_INVALID_CONFIG, "ipam must be an object")
    kind = ipam.get("type", "weft")
    if not isinstance(kind, str):
        raise CniError(ERR_INVALID_CONFIG, "ipam.type must be a string")
    return kind in ("", "weft")


def _base_request(env: Mapping[str, str], conf: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "containerId": env.get("CNI_CONTAINERID", ""),
        "netns": env.get("CNI_NETNS", ""),
        "ifname": env.get("CNI_IFNAME", ""),
        "args": env.get("CNI_ARGS", ""),
        "network": conf["name"],
        "config": {k: v for k, v in conf.items() if k != "prevResult"},
    }


def _prev_result(conf: Mapping[str, Any], version: str) -> dict[str, Any] | None:
    prev = conf.get("prevResult")
    if prev is None:
        return None
    if not isinstance(prev, dict):
        raise CniError(ERR_DECODING, "prevResult is not a JSON object")
    return to_current(prev, version)


def netns_ref(netns: str, caller: Caller = _PROCESS) -> tuple[str, int]:
    """A path to the container's namespace that the router can open, whatever its mounts.

    Runtimes often create CNI_NETNS as a bind mount inside their own mount namespace (podman
    under ``ip netns exec``, for one), where the router - another process, maybe in another mount
    namespace - sees only the empty mount point. So the plugin opens the namespace itself and
    hands the router ``/proc/<our pid>/fd/<fd>``, valid while we wait for its answer; the caller
    closes the fd afterwards. Raises error 3 when there is no namespace. (In the router, serving
    the shim, ``caller.open_netns`` gives the descriptor the shim opened in the runtime's mount
    namespace, and the path names it in the router's own ``/proc``.)
    """
    try:
        fd = caller.open_netns(netns) if caller.open_netns else os.open(netns, os.O_RDONLY)
    except OSError as err:
        detail = f"{netns}: {err.strerror}"
        raise CniError(ERR_UNKNOWN_CONTAINER, "network namespace does not exist", detail) from None
    if os.fstat(fd).st_dev != os.stat("/proc/self/ns/net").st_dev:  # not on nsfs
        os.close(fd)
        raise CniError(ERR_UNKNOWN_CONTAINER, "not a network namespace", netns)
    return f"/proc/{os.getpid()}/fd/{fd}", fd


def cmd_add(
    env: Mapping[str, str],
    stdin: bytes,
    conf: dict[str, Any],
    version: str,
    router: RouterClient,
    caller: Caller = _PROCESS,
) -> dict[str, Any]:
    ref, fd = netns_ref(env["CNI_NETNS"], caller)
    try:
        return _add(env, stdin, conf, version, router, ref, caller)
    finally:
        os.close(fd)


def _add(
    env: Mapping[str, str],
    stdin: bytes,
    conf: dict[str, Any],
    version: str,
    router: RouterClient,
    ref: str,
    caller: Caller,
) -> dict[str, Any]:
    prev = _prev_result(conf, version)
    request = _base_request(env, conf)
    request["netnsRef"] = ref
    delegated: DelegatedIpam | None = None
    if not _uses_weft_ipam(conf):
        delegated = DelegatedIpam(conf["ipam"]["type"], env, stdin, version, caller)
        request["ipam"] = delegated.add()
    try:
        try:
            answer = router.post("/cni/add", request, ADD_TIMEOUT)
        except RouterUnreachable as err:
            raise CniError(ERR_TRY_AGAIN_LATER, "weft router is not reachable", str(err)) from None
    except CniError:
        if delegated is not None:
            try:
                delegated.call("DEL")
            except CniError as undo:
                caller.log(f"weft: undoing ipam after failed ADD: {undo.msg}")
        raise
    ours = answer.get("result")
    if not isinstance(ours, dict):
        raise CniError(ERR_INTERNAL, "router answered ADD without a result")
    return from_current(merge_results(prev, ours), version)


def cmd_del(
    env: Mapping[str, str],
    stdin: bytes,
    conf: dict[str, Any],
    version: str,
    router: RouterClient,
    caller: Caller = _PROCESS,
) -> None:
    request = _base_request(env, conf)
    request["weftIpam"] = _uses_weft_ipam(conf)
    try:
        router.post("/cni/del", request, OTHER_TIMEOUT)
    except (RouterUnreachable, RouterNoAnswer) as err:
        # Replaying a DEL is harmless (idempotent), so "maybe done" is spooled like "not done".
        spool_dir = str(conf.get("spoolDir") or DEFAULT_SPOOL_DIR)
        _write_spool(spool_dir, request)
        caller.log(f"weft: router unreachable ({err}); release spooled in {spool_dir}")
    if not request["weftIpam"]:
        DelegatedIpam(conf["ipam"]["type"], env, stdin, version, caller).call("DEL")


def cmd_check(
    env: Mapping[str, str],
    stdin: bytes,
    conf: dict[str, Any],
    version: str,
    router: RouterClient,
    caller: Caller = _PROCESS,
) -> None:
    prev = _prev_result(conf, version)
    if prev is None:
        raise CniError(ERR_INVALID_CONFIG, "required prevResult missing for CHECK")
    if not _uses_weft_ipam(conf):
        DelegatedIpam(conf["ipam"]["type"], env, stdin, version, caller).call("CHECK")
    request = _base_request(env, conf)
    request["netnsRef"], fd = netns_ref(env["CNI_NETNS"], caller)
    request["prevResult"] = prev
    request["weftIpam"] = _uses_weft_ipam(conf)
    try:
        router.post("/cni/check", request, OTHER_TIMEOUT)
    except RouterUnreachable as err:
        raise CniError(ERR_TRY_AGAIN_LATER, "weft router is not reachable", str(err)) from None
    finally:
        os.close(fd)


def cmd_status(
    env: Mapping[str, str],
    stdin: bytes,
    conf: dict[str, Any],
    version: str,
    router: RouterClient,
    caller: Caller = _PROCESS,
) -> None:
    try:
        router.post("/cni/status", {"network": conf["name"]}, OTHER_TIMEOUT)
    except RouterUnreachable as err:
        raise CniError(ERR_NOT_AVAILABLE, "weft router is not reachable", str(err)) from None
    except CniError as err:
        if err.code not in (ERR_NOT_AVAILABLE, 51):
            raise CniError(ERR_NOT_AVAILABLE, err.msg, err.details) from None
        raise
    if not _uses_weft_ipam(conf):
        try:
            DelegatedIpam(conf["ipam"]["type"], env, stdin, version, caller).call("STATUS")
        except CniError as err:
            raise CniError(ERR_NOT_AVAILABLE, f"ipam: {err.msg}", err.details) from None


def cmd_gc(
    env: Mapping[str, str],
    stdin: bytes,
    conf: dict[str, Any],
    version: str,
    router: RouterClient,
    caller: Caller = _PROCESS,
) -> None:
    valid = conf.get("cni.dev/valid-attachments")
    if valid is None:  # not the same as an empty list: that one would release everything
        raise CniError(ERR_INVALID_CONFIG, "GC needs cni.dev/valid-attachments")
    if not isinstance(valid, list) or not all(
        isinstance(a, dict)
        and isinstance(a.get("containerID"), str)
        and isinstance(a.get("ifname"), str)
        for a in valid
    ):
        raise CniError(ERR_INVALID_CONFIG, "cni.dev/valid-attachments must list containerID/ifname")
    errors: list[str] = []
    try:
        router.post(
            "/cni/gc",
            {"network": conf["name"], "valid": valid, "weftIpam": _uses_weft_ipam(conf)},
            OTHER_TIMEOUT,
        )
    except RouterUnreachable as err:
        errors.append(f"weft router is not reachable: {err}")
    except CniError as err:
        errors.append(err.msg)
    if not _uses_weft_ipam(conf):
        try:
            DelegatedIpam(conf["ipam"]["type"], env, stdin, version, caller).call("GC")
        except CniError as err:
            errors.append(f"ipam: {err.msg}")
    if errors:
        raise CniError(ERR_TRY_AGAIN_LATER, "GC incomplete", "; ".join(errors))


def run(
    env: Mapping[str, str],
    stdin: bytes,
    router: RouterClient | None = None,
    caller: Caller = _PROCESS,
) -> tuple[int, str]:
    """One plugin invocation: returns (exit status, stdout text). Never raises.

    ``router``: the client to use whatever the configuration's ``socket`` says (tests);
    ``caller``: where the invocation runs (see ``Caller``).
    """
    version = CURRENT
    try:
        command = validate_env(env)
        if command == "VERSION":
            try:
                asked = loads(stdin).get("cniVersion") if stdin.strip() else None
            except (ValueError, AttributeError, UnicodeDecodeError):
                asked = None
            version = asked if asked in SUPPORTED_VERSIONS else CURRENT
            return 0, dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
        conf = parse_config(stdin)
        if conf.get("cniVersion") in SUPPORTED_VERSIONS:
            version = conf["cniVersion"]  # errors, too, speak the runtime's version
        version = check_version(conf, command)
        sock = conf.get("socket") or DEFAULT_SOCKET
        if not isinstance(sock, str):
            raise CniError(ERR_INVALID_CONFIG, "socket must be a path")
        if router is None:
            router = caller.client_for(sock) if caller.client_for else RouterClient(sock)
        if command == "ADD":
            return 0, dumps(cmd_add(env, stdin, conf, version, router, caller))
        handler = {"DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc}
        handler[command](env, stdin, conf, version, router, caller)
        return 0, ""
    except CniError as err:
        return 1, dumps(err.to_json(version))
    except Exception as err:  # the last boundary: still answer in the spec's shape
        return 1, dumps(CniError(ERR_INTERNAL, "internal error", repr(err)).to_json(version))


def invoke(env: Mapping[str, str], stdin: bytes, caller: Caller = _PROCESS) -> tuple[bytes, int]:
    """One invocation as the runtime sees it: (stdout bytes, exit status). The plugin process
    (``main``) and the router serving the compiled shim both run exactly this."""
    status, text = run(env, stdin, None, caller)
    return ((text + "\n").encode() if text else b""), status


NO_ANSWER_ENV = "WEFT_CNI_NO_ANSWER"  # set by the shim: "<socket>: <reason>"


def main(argv: list[str] | None = None) -> int:
    """Entry point (console script ``weft-cni``, the launcher ``weft`` in /opt/cni/bin, and the
    compiled shim's fallback when the router cannot be reached)."""
    del argv
    no_answer = os.environ.pop(NO_ANSWER_ENV, None)
    if not os.environ.get("CNI_COMMAND") and sys.stdin.isatty():
        print(
            "weft CNI plugin; CNI protocol versions supported: " + ", ".join(SUPPORTED_VERSIONS),
            file=sys.stderr,
        )
        return 1
    try:
        stdin = sys.stdin.buffer.read()
    except OSError as err:
        out = CniError(ERR_IO, "error reading from stdin", str(err)).to_json(CURRENT)
        print(dumps(out))
        return 1
    caller = _PROCESS
    if no_answer is not None:
        path, _, reason = no_answer.partition(": ")
        caller = Caller(client_for=lambda sock: NoAnswerClient(path, reason))
    answer, status = invoke(os.environ, stdin, caller)
    if answer:
        sys.stdout.buffer.write(answer)
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
