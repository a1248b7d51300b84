"""The router's side of the compiled CNI shim (weft/cni/shim.c): the plugin logic, in-process.

The shim hands the router, on a root-only unix socket (default ``/run/weft/cni.sock``: next to the
API socket, see ``shim_socket_for``), its environment, its stdin, its stderr and, for ADD and
CHECK, the container's network namespace opened in the runtime's mount namespace. The router runs
``weft.cni.plugin.invoke`` on them - the very function the Python plugin process runs - and
answers with the stdout bytes and the exit status.

Wire format (big-endian u32 integers)::

    request  "WCNI" flags netns_errno env_len stdin_len | env ("K=V\\0"...) | stdin
             SCM_RIGHTS with the header: stderr (flags & 1), then the netns fd (flags & 2);
             flags & 4: opening CNI_NETNS failed with errno netns_errno
    answer   "A" as soon as the whole request is read | "WCNR" exit_status stdout_len | stdout
             or "P" (declined) and nothing more

A request that is malformed (or from a peer that is not root or the router's user) is closed
without the "A": the shim then runs the Python plugin itself. So is a request the router would
run differently from the plugin process, answered "P": one that needs the caller's filesystem
view (a delegated IPAM plugin found in CNI_PATH and keeping its state on disk, or a
configuration ``socket`` other than this router's API socket) when the shim runs in another
mount namespace than the router (a runtime on the host, the router in a pod).

Threads: the event loop only accepts connections; each one is served on a dedicated thread pool
(not the default executor, which the CNI service's own kernel work uses: plugin threads waiting
for that work must not starve it). The plugin logic reaches the service through ``LocalClient``,
which runs the same ``dispatch`` as the HTTP routes on the event loop, with the same JSON bytes
in and out. A delegated IPAM plugin is a subprocess of the router, run with the caller's
environment, and its stderr goes to the shim's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from weft import jsonlimit
from weft.cni import plugin
from weft.cni.plugin import ERR_TRY_AGAIN_LATER, Caller, RouterClient, RouterNoAnswer

__all__ = [
    "DEFAULT_SHIM_SOCKET",
    "LocalClient",
    "ShimServer",
    "parse_request",
    "shim_socket_for",
]

log = logging.getLogger(__name__)

DEFAULT_SHIM_SOCKET = "/run/weft/cni.sock"
SHIM_SOCKET_NAME = "cni.sock"

_HEADER = struct.Struct("!4sIIII")
_ANSWER = struct.Struct("!4sII")
FLAG_STDERR = 1
FLAG_NETNS = 2
FLAG_NETNS_ERRNO = 4
MAX_ENV = 1 << 20
MAX_STDIN = 64 << 20
READ_TIMEOUT = 30.0  # seconds for the shim to send its request once connected


def shim_socket_for(api_socket: str) -> str:
    """The shim's socket beside the router's API socket (``/run/weft/weft.sock`` ->
    ``/run/weft/cni.sock``): ``weft setup-cni --api-socket`` and the router agree on it."""
    return os.path.join(os.path.dirname(api_socket) or ".", SHIM_SOCKET_NAME)


class BadRequest(Exception):
    """The shim's request is malformed: close without acknowledging it."""


class Request:
    """One decoded shim request; owns the file descriptors it carries (``close``)."""

    def __init__(
        self,
        env: dict[str, str],
        stdin: bytes,
        stderr_fd: int | None,
        netns_fd: int | None,
        netns_errno: int | None,
    ) -> None:
        self.env = env
        self.stdin = stdin
        self.stderr_fd = stderr_fd
        self.netns_fd = netns_fd
        self.netns_errno = netns_errno

    def open_netns(self, netns: str) -> int:
        """``Caller.open_netns``: a duplicate of the shim's descriptor, or its error."""
        if self.netns_fd is not None:
            return os.dup(self.netns_fd)
        if self.netns_errno is not None:
            raise OSError(self.netns_errno, os.strerror(self.netns_errno), netns)
        return os.open(netns, os.O_RDONLY)

    def close(self) -> None:
        for fd in (self.stderr_fd, self.netns_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.stderr_fd = self.netns_fd = None


def _decode_env(block: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in block.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env[os.fsdecode(key)] = os.fsdecode(value)  # like os.environ (surrogateescape)
    return env


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if not n:
            raise BadRequest("connection closed mid-request")
        got += n
    return bytes(buf)


def parse_request(conn: socket.socket) -> Request:
    """Read one request (blocking); BadRequest when malformed (its descriptors closed)."""
    header = b""
    fds: list[int] = []
    try:
        while len(header) < _HEADER.size:
            data, ancdata, _flags, _addr = conn.recvmsg(
                _HEADER.size - len(header), socket.CMSG_SPACE(2 * 4)
            )
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % 4
                    fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
            if not data:
                raise BadRequest("connection closed before the header")
            header += data
        magic, flags, netns_errno, env_len, stdin_len = _HEADER.unpack(header)
        expected = bool(flags & FLAG_STDERR) + bool(flags & FLAG_NETNS)
        if magic != b"WCNI" or len(fds) != expected or env_len > MAX_ENV or stdin_len > MAX_STDIN:
            raise BadRequest(f"bad header {header!r} with {len(fds)} descriptors")
        env = _decode_env(_recv_exact(conn, env_len))
        stdin = _recv_exact(conn, stdin_len)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    stderr_fd = fds.pop(0) if flags & FLAG_STDERR else None
    netns_fd = fds.pop(0) if flags & FLAG_NETNS else None
    errno_ = netns_errno if flags & FLAG_NETNS_ERRNO else None
    return Request(env, stdin, stderr_fd, netns_fd, errno_)


Route = Callable[[bytes], Coroutine[Any, Any, tuple[int, bytes]]]
"""One ``/cni`` route of the service in-process: the request body as sent in, (HTTP status, JSON
answer) out (``weft.cni.server.local_routes``; injected so this module needs no service import)."""


class LocalClient(RouterClient):
    """``RouterClient`` without the socket: runs the route's ``dispatch`` on the router's loop
    with the same JSON bytes the HTTP request would carry, and decodes its answer the same way."""

    def __init__(
        self,
        path: str,
        loop: asyncio.AbstractEventLoop,
        routes: Mapping[str, Route],
    ) -> None:
        super().__init__(path)
        self.loop = loop
        self.routes = routes

    def post(self, route: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        answer = self.routes.get(route)
        if answer is None:
            return plugin.decode_answer(404, b"")
        payload = jsonlimit.dumps(body).encode()
        future = asyncio.run_coroutine_threadsafe(answer(payload), self.loop)
        try:
            status, data = future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RouterNoAnswer(
                ERR_TRY_AGAIN_LATER, "no answer from the weft router", f"{self.path}: timed out"
            ) from None
        return plugin.decode_answer(status, data)


class ShimServer:
    """Serves the shim's socket for one CNI service.

    routes: the service's ``/cni`` routes in-process; path: the socket (0600); api_socket: the
    router's API socket, which the plugin logic reaches
    in-process when a network configuration's ``socket`` names it (any other socket: over HTTP,
    as the Python plugin would); workers: concurrent invocations (more wait their turn).
    """

    def __init__(
        self, routes: Mapping[str, Route], path: str, api_socket: str | None, workers: int = 32
    ) -> None:
        self.routes = routes
        self.path = path
        self.api_socket = api_socket
        self.workers = workers
        self._sock: socket.socket | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):  # a stale one; never another file
                os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, "weft-cni-shim")
        self._loop.add_reader(sock.fileno(), self._accept)
        log.info("CNI shim socket on %s", self.path)

    async def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    def _accept(self) -> None:
        assert self._sock is not None and self._pool is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("CNI shim socket: accept failed: %s", err)
                return
            conn.setblocking(True)
            self._pool.submit(self._serve, conn)

    def _client_for(self, sock: str) -> RouterClient:
        assert self._loop is not None
        if self.api_socket is not None and _same_path(sock, self.api_socket):
            return LocalClient(sock, self._loop, self.routes)
        return RouterClient(sock)

    def _needs_callers_files(self, request: Request) -> bool:
        """Would the plugin logic touch files by the caller's paths (see module docstring)?"""
        if request.env.get("CNI_COMMAND") == "VERSION":
            return False
        try:
            conf = jsonlimit.loads(request.stdin)
        except ValueError:
            return False  # a decoding error, whoever reports it
        if not isinstance(conf, dict):
            return False
        ipam = conf.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type", "weft") not in ("", "weft"):
            return True
        sock = conf.get("socket") or plugin.DEFAULT_SOCKET
        return not (
            isinstance(sock, str)
            and self.api_socket is not None
            and _same_path(sock, self.api_socket)
        )

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid, uid, _gid = struct.unpack("3i", creds)
                if uid not in (0, os.geteuid()):
                    log.warning("CNI shim socket: refused uid %d", uid)
                    return
                conn.settimeout(READ_TIMEOUT)
                request = parse_request(conn)
            except (OSError, BadRequest) as err:
                log.warning("CNI shim request refused: %s", err)
                return
            try:
                if not same_mount_namespace(pid) and self._needs_callers_files(request):
                    conn.sendall(b"P")  # the shim runs the Python plugin where it is
                    return
                conn.sendall(b"A")
                caller = Caller(request.stderr_fd, request.open_netns, self._client_for)
                out, status = plugin.invoke(request.env, request.stdin, caller)
                conn.settimeout(READ_TIMEOUT)
                conn.sendall(_ANSWER.pack(b"WCNR", status, len(out)) + out)
            except OSError as err:
                log.warning("CNI shim request: the shim went away: %s", err)
            finally:
                request.close()


def same_mount_namespace(pid: int) -> bool:
    """Does process ``pid`` (0: not in our pid namespace) see the files we see?"""
    if pid <= 0:
        return False
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
        return os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt") and (
            (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
        )
    except OSError:
        return False


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def setup_shim_server(
    app: Any, routes: Mapping[str, Route], api_socket: str | None, path: str | None = None
) -> Callable[[], ShimServer | None]:
    """Serve the shim socket while ``app`` (an aiohttp Application) runs: started on startup,
    closed on cleanup. ``path`` defaults to ``shim_socket_for(api_socket)``; nothing is served
    without either. Returns a getter for the running server (None before startup)."""
    where = path or (shim_socket_for(api_socket) if api_socket else None)
    holder: list[ShimServer] = []

    async def on_startup(_app: Any) -> None:
        if where is None:
            return
        server = ShimServer(routes, where, api_socket)
        try:
            await server.start()
        except OSError as err:  # the HTTP API still works; the shim falls back to Python
            log.warning("cannot serve the CNI shim socket %s: %s", where, err)
            return
        holder.append(server)

    async def on_cleanup(_app: Any) -> None:
        while holder:
            await holder.pop().close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return lambda: holder[0] if holder else None
