"""Who may use the router's HTTP API: the caller check on changes and the Host allow-list.

Changes (every method but GET, HEAD, OPTIONS) are accepted only from a principal who could
change the host's networking itself: uid 0, the router's own uid, or a member of the API group
(``--api-group``; without it, the router's own group, the group the 0660 unix socket grants).
The caller is named by the kernel, never by the request:

* on the unix socket, ``SO_PEERCRED`` (the credentials of the process that connected);
* on TCP, the owner of the client's socket: a loopback client is a socket of this network
  namespace, listed in ``/proc/net/tcp{,6}`` with its uid (what ``identd`` did). The entry
  must be ESTABLISHED with an inode: a closed (orphaned) socket is listed with uid 0, and a
  client that closes before we look is refused, never promoted. A client from another host or
  namespace has no entry and is refused.

Reads stay open to every local user (``weft status`` as any user, the UI, ``/metrics``).

The Host allow-list (DNS rebinding, issue #14 item 9): a browser page of ``evil.example`` whose
name rebinds to 127.0.0.1 sends ``Host: evil.example``; every request on a TCP listener of the API
(``/ws`` included) must name the API by a loopback address, ``localhost``, the address it is
bound to, or a name the operator allowed (``--api-allow-host``). Others get 421. The unix
socket is exempt: no browser can reach it.

Group membership is the account's as ``/etc/group`` (NSS) lists it, plus the socket peer's
primary gid.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import os
import pwd
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from weft.errors import ConfigError

__all__ = [
    "AccessPolicy",
    "Caller",
    "caller_of",
    "host_allowed",
    "resolve_group",
    "tcp_socket_owner",
]

log = logging.getLogger("weft.router.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TCP_ESTABLISHED = "01"
_PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``uid``/``gid`` (None: unknown), over which transport."""

    transport: str  # "unix" or "tcp"
    uid: int | None
    gid: int | None = None
    pid: int | None = None


def resolve_group(name: str) -> int:
    """A group name (or number) to its gid; ConfigError naming the option when unknown."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"--api-group {name!r}: no such group") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _groups_of(uid: int, gid: int | None) -> set[int]:
    groups = {gid} if gid is not None else set()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return groups
    groups.add(entry.pw_gid)
    with contextlib.suppress(OSError):
        groups.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return groups


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A /proc/net/tcp address field (hex, 32-bit words in host byte order) as an address."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _plain(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address with IPv4-mapped IPv6 (a dual-stack socket's view of IPv4) made IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def tcp_socket_owner(
    client: tuple[str, int], server: tuple[str, int], tables: Iterable[str] = _PROC_TABLES
) -> int | None:
    """The uid owning the live socket of this network namespace whose local end is ``client``
    and remote end ``server`` (the other end of a connection we accepted); None when there is
    none (a remote client, or one that already closed its socket)."""
    want = (_plain(client[0]), client[1], _plain(server[0]), server[1])
    for table in tables:
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != _TCP_ESTABLISHED or cols[9] == "0":
                continue
            local, _, lport = cols[1].partition(":")
            remote, _, rport = cols[2].partition(":")
            try:
                got = (
                    _plain(str(_proc_address(local))),
                    int(lport, 16),
                    _plain(str(_proc_address(remote))),
                    int(rport, 16),
                )
            except ValueError:
                continue
            if got == want:
                return int(cols[7])
    return None


def caller_of(request: web.Request) -> Caller:
    """The kernel's account of who is on the other end of ``request``'s connection."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return Caller("tcp", None)
    if sock.family == socket.AF_UNIX:
        fmt = "3i"
        try:
            pid, uid, gid = struct.unpack(
                fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
            )
        except OSError:
            return Caller("unix", None)
        return Caller("unix", uid, gid, pid)
    peer: Any = transport.get_extra_info("peername") if transport is not None else None
    local: Any = transport.get_extra_info("sockname") if transport is not None else None
    if not peer or not local:
        return Caller("tcp", None)
    try:
        uid = tcp_socket_owner((peer[0], int(peer[1])), (local[0], int(local[1])))
    except ValueError:
        uid = None
    return Caller("tcp", uid)


def _host_part(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host  # a bare name, or a bare IPv6 literal


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return _plain(text)
    except ValueError:
        return None


def host_allowed(host_header: str, bound_host: str, extra: Iterable[str] = ()) -> bool:
    """Whether a ``Host`` header names the API listener bound to ``bound_host``: a loopback
    address, ``localhost`` (or a ``.localhost`` name: resolved locally, RFC 6761), the bound
    address, any IP literal when bound to a wildcard (a literal cannot be rebound), or one of
    the ``extra`` names."""
    host = _host_part(host_header).rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    if host in {name.lower().rstrip(".") for name in extra}:
        return True
    ip, bound = _ip(host), _ip(bound_host)
    if ip is None:
        return host == bound_host.lower()
    return ip.is_loopback or ip == bound or (bound is not None and bound.is_unspecified)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may change the router and which names the API answers to.

    * ``owner_uid`` — the router's uid (it may always talk to itself).
    * ``group`` — gid whose members may change the router (``--api-group``, else the router's
      group: the one the 0660 unix socket already lets in); None: root and the owner only.
    * ``bound_host`` — the API's TCP address (``--http-addr``'s host), an allowed Host.
    * ``allow_hosts`` — more names the API answers to (``--api-allow-host``).
    * ``socket_path`` — the unix socket, named in refusals.
    """

    owner_uid: int = field(default_factory=os.geteuid)
    group: int | None = field(default_factory=os.getegid)
    bound_host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()
    socket_path: str | None = None

    def permits(self, caller: Caller) -> bool:
        if caller.uid is None:
            return False
        if caller.uid in (0, self.owner_uid):
            return True
        return self.group is not None and self.group in _groups_of(caller.uid, caller.gid)

    def refusal(self, caller: Caller) -> str:
        who = "root"
        if self.owner_uid != 0:
            who += f", uid {self.owner_uid}"
        if self.group is not None:
            who += f" or members of group {_group_name(self.group)!r}"
        via = f"the unix socket {self.socket_path}" if caller.transport == "unix" else "TCP"
        if caller.uid is None:
            origin = f"a client over {via} whose local process could not be identified"
            hint = (
                f"; changes over TCP are taken only from this host's loopback, use the unix"
                f" socket {self.socket_path}" if self.socket_path else ""
            )
        else:
            origin = f"uid {caller.uid} over {via}"
            hint = "; ask an administrator to run it, or to add you to the API group (--api-group)"
        return (
            f"permission denied: only {who} may change the router; this request came from"
            f" {origin}{hint} (reading status is open to every local user)"
        )

    def middleware(self) -> Middleware:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            transport = request.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            over_unix = sock is not None and sock.family == socket.AF_UNIX
            host_header = request.headers.get("Host")
            if not over_unix and host_header is not None and not host_allowed(
                host_header, self.bound_host, self.allow_hosts
            ):
                log.info("API request for Host %r refused (not a name of this API)", host_header)
                return _error(
                    421,
                    f"request refused: Host {host_header!r} is not a name of this router's API"
                    " (a page of another site rebinding its name to this host?); use"
                    " 127.0.0.1, localhost or the listen address, or allow the name with"
                    " --api-allow-host",
                )
            if request.method not in _READ_METHODS:
                caller = caller_of(request)
                if not self.permits(caller):
                    log.warning(
                        "API %s %s refused: caller uid %s over %s is not allowed to change the"
                        " router",
                        request.method, request.path, caller.uid, caller.transport,
                    )
                    return _error(403, self.refusal(caller))
            return await handler(request)

        return guard
