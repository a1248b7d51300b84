"""Router configuration: one frozen dataclass, validated with messages a user can act on.

Defaults follow Weave Net where it had one (ports, connection limit, heartbeat timings), so an
operator who knew Weave finds familiar numbers. Everything here is pure except the few helpers
that read the password file, the persisted peer name or the mesh salt, which say so in their
names.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.atomicfile import write_atomic
from weft.errors import ConfigError
from weft.gossip.admission import AdmissionConfig
from weft.gossip.peer import PeerName, random_peer_name
from weft.gossip.topology import MAX_CONNECTIONS
from weft.hostport import DEFAULT_PORT, format_hostport

if TYPE_CHECKING:
    from weft.docker.plugin import DockerPluginConfig
    from weft.k8s.core import K8sConfig

__all__ = [
    "DATAPATHS",
    "DEFAULT_HTTP_ADDR",
    "DEFAULT_PORT",
    "IDENTITY_KEY_FILE",
    "PASSWORD_ENV",
    "RouterConfig",
    "format_hostport",
    "load_mesh_salt",
    "load_or_create_identity_key",
    "load_or_create_name",
    "parse_hostport",
    "parse_peer",
    "read_password_file",
    "save_mesh_salt",
]

DEFAULT_HTTP_ADDR: Final = "127.0.0.1:6784"
DEFAULT_API_SOCKET: Final = "/run/weft/weft.sock"
DEFAULT_DATA_DIR: Final = "/var/lib/weft"
PASSWORD_ENV: Final = "WEFT_PASSWORD"
DATAPATHS: Final = ("auto", "ovs", "vxlan", "sleeve", "none")
NAME_FILE: Final = "peer-name"
IDENTITY_KEY_FILE: Final = "identity.key"  # Ed25519, raw 32 bytes, 0600: signs our record
MESH_SALT_FILE: Final = "mesh-salt"  # the mesh salt, hex, once a handshake authenticated under it
_SALT_SIZE: Final = 16
_MAX_NICKNAME: Final = 255  # as the handshake's hello allows
_MAX_UNIX_PATH: Final = 107  # sun_path is 108 bytes including the terminating NUL


def _default_nickname() -> str:
    return socket.gethostname() or "weft"


@dataclass(frozen=True)
class RouterConfig:
    """Everything a router needs to start. Build it, then call :meth:`validated`.

    Fields and defaults:

    * ``name`` — our 48-bit peer name; None loads it from ``data_dir`` (or makes and stores one),
      so a restarted router keeps its name. A fresh incarnation uid is drawn on every start.
    * ``nickname`` — a human label shown next to the name; the hostname by default.
    * ``data_dir`` — ``/var/lib/weft``: the peer name, persisted targets, the launch log.
    * ``port`` — 6783: TCP control connections (and the sleeve's UDP port).
    * ``listen_host`` — ``0.0.0.0``: the address the control listener binds.
    * ``http_addr`` — ``127.0.0.1:6784``: the HTTP API (``host:port``; port 0 picks a free one).
    * ``api_socket`` — ``/run/weft/weft.sock``: the same API on a unix socket (None: off).
    * ``api_group`` — None (the router's own group): members of this group (name or gid) may
      change the router over the API, and the unix socket is given to it (weft/router/access.py).
    * ``api_allow_hosts`` — (): names besides loopback, ``localhost`` and the ``http_addr`` host
      that the API answers to in ``Host`` (anything else gets 421: DNS rebinding).
    * ``status_addr`` — None (off): a read-only status, UI and Prometheus ``/metrics`` endpoint,
      e.g. ``0.0.0.0:6782`` (Weave's status port) for scraping from other hosts.
    * ``password`` — the mesh password (bytes) or None for plaintext; from ``--password-file``
      or the environment variable ``WEFT_PASSWORD``.
    * ``discovery`` — True: also connect to peers learned from others' topology records.
    * ``conn_limit`` — 200 (Weave's): most control connections, handshaking ones included.
    * ``unauth_limit`` — 32: most connections still in their handshake (not yet authenticated),
      inbound and outbound together (weft/gossip/admission.py).
    * ``unauth_per_source`` — 4: most of those inbound from one IPv4 address or IPv6 /64.
    * ``unauth_outbound_reserve`` — None (a quarter of ``unauth_limit``, 8): slots of
      ``unauth_limit`` only our own dials may use, so strangers cannot keep us from our peers.
    * ``peers`` — initial direct targets, ``host`` or ``host:port`` (port defaults to ``port``).
    * ``datapath`` — ``auto`` (per connection the best healthy of kernel VXLAN and the sleeve),
      ``vxlan`` (no fallback), ``sleeve`` or ``none`` (control plane only).
    * ``ipam`` — True: run the distributed address allocator (``/ip``, and ``/cni`` on it).
    * ``ipalloc_range`` — None (IPAM's default, 10.32.0.0/12, as Weave): the range it hands out.
    * ``ipalloc_default_subnet`` — None (the whole range): the subnet of plain allocations.
    * ``ipalloc_init`` — None (``consensus=<peers + 1>``, as Weave), or ``seed=NAME,...``,
      ``consensus=N``, ``observer``.
    * ``heartbeat_interval`` — 30 s: a heartbeat goes out when nothing else was sent for this long.
    * ``heartbeat_timeout`` — 60 s: a connection that received nothing for this long is closed
      (it must exceed the interval; short values make a cut link noticed sooner).
    * ``connect_timeout`` — 10 s: TCP connect bound for a dial.
    * ``handshake_timeout`` — 10 s: the whole handshake must finish within this (as Weave).
    * ``accept_burst`` / ``accept_interval`` — 20 tokens, one more every 50 ms (Weave's accept
      token bucket): bounds how fast inbound connections are taken on.
    * ``docker_plugin`` — None (off): serve the Docker network/IPAM plugin (``--docker-plugin``).
    * ``k8s`` — None (off): peers are the Kubernetes nodes, deleted nodes reclaimed (``--k8s``).
    """

    name: PeerName | None = None
    nickname: str = field(default_factory=_default_nickname)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    port: int = DEFAULT_PORT
    listen_host: str = "0.0.0.0"
    http_addr: str = DEFAULT_HTTP_ADDR
    api_socket: Path | None = Path(DEFAULT_API_SOCKET)
    api_group: str | None = None
    api_allow_hosts: tuple[str, ...] = ()
    status_addr: str | None = None
    password: bytes | None = field(default=None, repr=False)
    discovery: bool = True
    conn_limit: int = 200
    unauth_limit: int = 32
    unauth_per_source: int = 4
    unauth_outbound_reserve: int | None = None
    peers: tuple[str, ...] = ()
    datapath: str = "auto"
    ipam: bool = True
    ipalloc_range: str | None = None
    ipalloc_default_subnet: str | None = None
    ipalloc_init: str | None = None
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 60.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    accept_burst: int = 20
    accept_interval: float = 0.05
    docker_plugin: DockerPluginConfig | None = None
    k8s: K8sConfig | None = None

    def validated(self) -> RouterConfig:
        """Check every field; return a normalised copy (peers as ``host:port``) or raise."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(
                f"--port {self.port} out of range: must be 1..65535 (0 picks a free one)"
            )
        nickname = self.nickname.strip()
        if not nickname:
            raise ConfigError("--nickname must not be empty")
        if len(nickname) > _MAX_NICKNAME or any(
            c.isspace() or not c.isprintable() for c in nickname
        ):
            raise ConfigError(
                f"--nickname {self.nickname!r} invalid: up to {_MAX_NICKNAME} printable characters,"
                " no spaces"
            )
        parse_hostport(self.http_addr, what="--http-addr")
        if self.status_addr:
            parse_hostport(self.status_addr, what="--status-addr")
        if self.api_socket is not None and len(os.fsencode(self.api_socket)) > _MAX_UNIX_PATH:
            raise ConfigError(
                f"--api-socket {self.api_socket} is too long for a unix socket"
                f" (at most {_MAX_UNIX_PATH} bytes)"
            )
        if self.api_group is not None:
            from weft.router.access import resolve_group

            resolve_group(self.api_group)
        for name in self.api_allow_hosts:
            if not name.strip() or any(c.isspace() or c in "/:@[]" for c in name.strip()):
                raise ConfigError(f"--api-allow-host {name!r}: expected a host name")
        if self.password is not None and not self.password:
            raise ConfigError("the password is empty; leave it unset to run without encryption")
        if not 1 <= self.conn_limit <= MAX_CONNECTIONS:
            raise ConfigError(
                f"--conn-limit {self.conn_limit} invalid: must be in 1..{MAX_CONNECTIONS}"
                " (a topology record lists at most that many connections)"
            )
        self.admission_config()
        if self.datapath not in DATAPATHS:
            raise ConfigError(
                f"--datapath {self.datapath!r} invalid: expected one of {', '.join(DATAPATHS)}"
            )
        for flag, cidr in (
            ("--ipalloc-range", self.ipalloc_range),
            ("--ipalloc-default-subnet", self.ipalloc_default_subnet),
        ):
            if cidr is not None:
                try:
                    ipaddress.IPv4Network(cidr, strict=True)
                except ValueError as err:
                    raise ConfigError(f"{flag} {cidr!r} is not a valid IPv4 CIDR: {err}") from None
        if not self.heartbeat_interval > 0:
            raise ConfigError(f"--heartbeat-interval {self.heartbeat_interval} must be positive")
        if not self.heartbeat_timeout > self.heartbeat_interval:
            raise ConfigError(
                f"--heartbeat-timeout {self.heartbeat_timeout} must be longer than"
                f" --heartbeat-interval {self.heartbeat_interval}"
            )
        for label, value in (
            ("connect_timeout", self.connect_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("accept_interval", self.accept_interval),
        ):
            if not value > 0:
                raise ConfigError(f"{label} {value} must be positive")
        if self.accept_burst < 1:
            raise ConfigError(f"accept_burst {self.accept_burst} must be at least 1")
        try:
            ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise ConfigError(f"listen address {self.listen_host!r} is not an IP address") from None
        peers = tuple(parse_peer(p, self.port or DEFAULT_PORT) for p in self.peers)
        return replace(self, nickname=nickname, peers=peers)

    def admission_config(self) -> AdmissionConfig:
        """The unauthenticated-connection budget; raises ConfigError naming the option."""
        reserve = self.unauth_outbound_reserve
        if reserve is None:
            reserve = max(1, self.unauth_limit // 4)
        if self.unauth_limit < 2:
            raise ConfigError(f"--unauth-limit {self.unauth_limit} invalid: must be at least 2")
        if self.unauth_per_source < 1:
            raise ConfigError(
                f"--unauth-per-source {self.unauth_per_source} invalid: must be at least 1"
            )
        return AdmissionConfig(
            limit=self.unauth_limit, per_source=self.unauth_per_source, outbound_reserve=reserve
        ).validated()

    @property
    def http_host_port(self) -> tuple[str, int]:
        return parse_hostport(self.http_addr, what="--http-addr")


def parse_hostport(
    text: str, *, what: str = "address", default_port: int | None = None
) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); without a port, ``default_port`` or raise."""
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{what} is empty")
    host: str
    port_text: str | None
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ConfigError(f"{what} {text!r}: missing ']' after an IPv6 address")
        host = raw[1:end]
        rest = raw[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    elif ":" in raw:  # a bare IPv6 address
        host, port_text = raw, None
    else:
        host, port_text = raw, None
    if not host:
        raise ConfigError(f"{what} {text!r}: missing host")
    if any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"{what} {text!r}: invalid host {host!r}")
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{what} {text!r}: expected host:port, e.g. 127.0.0.1:6784")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r}: port must be a number 0..65535")
    return host, int(port_text)


def parse_peer(text: str, default_port: int = DEFAULT_PORT) -> str:
    """Normalise a peer address to ``host:port`` (the port defaults to 6783)."""
    host, port = parse_hostport(text, what="peer", default_port=default_port)
    if port == 0:
        raise ConfigError(f"peer {text!r}: port 0 is not dialable")
    return format_hostport(host, port)


def read_password_file(path: str | os.PathLike[str]) -> bytes:
    """Read a password file (one trailing newline is dropped). Raises ConfigError, never OSError."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read password file {path}: {err.strerror or err}") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ConfigError(f"password file {path} is empty")
    return data


def load_or_create_name(data_dir: Path, wanted: PeerName | None, rng: random.Random) -> PeerName:
    """Our persisted peer name; the first start makes one (or stores ``wanted``).

    An explicit ``wanted`` name always wins and is stored, so ``--name`` once is enough.
    Raises ConfigError when the data dir cannot be used or holds garbage.
    """
    path = data_dir / NAME_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create data dir {data_dir}: {err.strerror or err}") from None
    stored: PeerName | None = None
    try:
        stored = PeerName.parse(path.read_text())
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except ConfigError as err:
        raise ConfigError(f"{path} is corrupt ({err}); delete it to get a new name") from None
    name = wanted if wanted is not None else stored
    if name is None:
        name = random_peer_name(rng)
    if name != stored:
        try:
            write_atomic(path, f"{name}\n")
        except OSError as err:
            raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None
    return name


def load_or_create_identity_key(data_dir: Path) -> Ed25519PrivateKey:
    """Our persisted identity key (signs our topology record; peers bind our name to it on
    first sight); the first start makes one, written 0600. Losing it means coming back under a
    new peer name (docs/SECURITY.md, "Forged and out-of-range topology records"). Raises
    ConfigError on an unusable file."""
    path = data_dir / IDENTITY_KEY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    if raw is not None:
        if len(raw) != 32:
            raise ConfigError(
                f"{path} is corrupt (expected a 32-byte Ed25519 key); restore it, or remove it"
                " and the peer-name file to rejoin under a new name"
            )
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # a private key readable by others: tighten, keep using it
        return Ed25519PrivateKey.from_private_bytes(raw)
    key = Ed25519PrivateKey.generate()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, key.private_bytes_raw(), mode=0o600)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None
    return key


def load_mesh_salt(data_dir: Path) -> tuple[bytes | None, bool]:
    """The persisted mesh salt and True, or (None, False) on a first start (or after the file
    was removed: the router then learns its mesh's salt from the first peer it authenticates).

    Raises ConfigError when the file cannot be read or holds garbage.
    """
    path = data_dir / MESH_SALT_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None, False
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != _SALT_SIZE:
        raise ConfigError(
            f"{path} is corrupt (expected {_SALT_SIZE * 2} hex digits); delete it and the router"
            " learns the mesh salt again from its peers"
        )
    return salt, True


def save_mesh_salt(data_dir: Path, salt: bytes) -> None:
    """Persist the mesh salt (atomically). Raises ConfigError when it cannot be written."""
    path = data_dir / MESH_SALT_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f"{salt.hex()}\n")
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None
