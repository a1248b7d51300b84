"""RouterConfig validation, address parsing, password files, the persisted peer name, the
accept token bucket."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.router.config import (
    MESH_SALT_FILE,
    RouterConfig,
    load_mesh_salt,
    load_or_create_name,
    parse_hostport,
    parse_peer,
    read_password_file,
    save_mesh_salt,
)
from weft.router.router import TokenBucket


def test_defaults_follow_weave() -> None:
    c = RouterConfig().validated()
    assert c.port == 6783
    assert c.http_addr == "127.0.0.1:6784"
    assert c.api_socket == Path("/run/weft/weft.sock")
    assert c.data_dir == Path("/var/lib/weft")
    assert c.conn_limit == 200
    adm = c.admission_config()  # the stranger budget (issue #14 item 6)
    assert (adm.limit, adm.per_source, adm.outbound_reserve) == (32, 4, 8)
    assert c.discovery is True
    assert c.password is None
    assert (c.heartbeat_interval, c.heartbeat_timeout) == (30.0, 60.0)
    assert (c.accept_burst, c.accept_interval) == (20, 0.05)
    assert c.datapath == "auto"
    assert c.nickname  # the hostname


def test_peers_are_normalised_with_the_default_port() -> None:
    c = RouterConfig(peers=("10.0.0.1", "10.0.0.2:7000", "[fd00::1]", "fd00::2"), port=6790)
    assert c.validated().peers == (
        "10.0.0.1:6790",
        "10.0.0.2:7000",
        "[fd00::1]:6790",
        "[fd00::2]:6790",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "--port 70000 out of range"),
        ({"port": -1}, "--port -1 out of range"),
        ({"nickname": "  "}, "--nickname must not be empty"),
        ({"nickname": "a b"}, "no spaces"),
        ({"nickname": "x" * 256}, "up to 255"),
        ({"http_addr": "localhost"}, "expected host:port"),
        ({"http_addr": "127.0.0.1:http"}, "port must be a number"),
        ({"conn_limit": 0}, "--conn-limit 0 invalid"),
        ({"unauth_limit": 1}, "--unauth-limit 1 invalid"),
        ({"unauth_per_source": 0}, "--unauth-per-source 0 invalid"),
        ({"unauth_limit": 8, "unauth_outbound_reserve": 8}, "outbound reserve 8: must be 1..7"),
        ({"datapath": "dpdk"}, "expected one of auto, ovs, vxlan, sleeve, none"),
        ({"heartbeat_interval": 0}, "--heartbeat-interval 0 must be positive"),
        ({"heartbeat_interval": 10, "heartbeat_timeout": 10}, "must be longer than"),
        ({"password": b""}, "password is empty"),
        ({"peers": ("10.0.0.1:99999",)}, "port must be a number"),
        ({"peers": ("10.0.0.1:0",)}, "port 0 is not dialable"),
        ({"peers": ("",)}, "peer is empty"),
        ({"api_socket": Path("/" + "s" * 120)}, "too long for a unix socket"),
        ({"listen_host": "example.org"}, "is not an IP address"),
        ({"ipalloc_range": "10.32.0.1/12"}, "--ipalloc-range '10.32.0.1/12' is not a valid IPv4"),
        ({"ipalloc_default_subnet": "fd00::/64"}, "--ipalloc-default-subnet 'fd00::/64'"),
    ],
)
def test_invalid_settings_name_the_option(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        RouterConfig(**kwargs).validated()  # type: ignore[arg-type]


def test_parse_hostport_forms() -> None:
    assert parse_hostport("1.2.3.4:5") == ("1.2.3.4", 5)
    assert parse_hostport("[::1]:6784") == ("::1", 6784)
    assert parse_hostport("host", default_port=9) == ("host", 9)
    with pytest.raises(ConfigError, match="missing ']'"):
        parse_hostport("[::1")
    with pytest.raises(ConfigError, match="invalid host"):
        parse_hostport("a/b:1")
    assert parse_peer("h") == "h:6783"


def test_password_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_bytes(b"s3cret\n")
    assert read_password_file(f) == b"s3cret"
    f.write_bytes(b"two words\r\n")
    assert read_password_file(f) == b"two words"
    f.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_password_file(f)
    with pytest.raises(ConfigError, match=r"cannot read password file .*No such file"):
        read_password_file(tmp_path / "missing")


def test_peer_name_is_kept_across_restarts(tmp_path: Path) -> None:
    rng = random.Random(1)
    first = load_or_create_name(tmp_path / "d", None, rng)
    assert load_or_create_name(tmp_path / "d", None, random.Random(2)) == first
    wanted = PeerName.parse("02:00:00:00:00:42")
    assert load_or_create_name(tmp_path / "d", wanted, rng) == wanted
    assert load_or_create_name(tmp_path / "d", None, rng) == wanted  # --name once is enough
    (tmp_path / "d" / "peer-name").write_text("garbage")
    with pytest.raises(ConfigError, match=r"corrupt.*delete it"):
        load_or_create_name(tmp_path / "d", None, rng)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create data dir"):
        load_or_create_name(blocker / "sub", None, rng)


def test_token_bucket_allows_a_burst_then_one_per_interval() -> None:
    bucket = TokenBucket(capacity=20, interval=0.05, now=100.0)
    assert [bucket.take(100.0) for _ in range(20)] == [0.0] * 20
    # the 21st waits one interval, the 22nd two
    assert bucket.take(100.0) == pytest.approx(0.05)
    assert bucket.take(100.0) == pytest.approx(0.10)
    # after a long idle period the bucket is full again, never fuller
    assert [bucket.take(200.0) for _ in range(20)] == [0.0] * 20
    assert bucket.take(200.0) == pytest.approx(0.05)
    # refill: one token per interval
    assert bucket.take(200.2) == 0.0
    with pytest.raises(ConfigError):
        TokenBucket(0, 0.05, 0.0)


def test_mesh_salt_is_kept_and_corruption_refused(tmp_path: Path) -> None:
    assert load_mesh_salt(tmp_path) == (None, False)  # first start: learnt from a peer
    salt = bytes(range(16))
    save_mesh_salt(tmp_path / "sub", salt)
    assert load_mesh_salt(tmp_path / "sub") == (salt, True)
    (tmp_path / MESH_SALT_FILE).write_text("not hex\n")
    with pytest.raises(ConfigError, match=r"corrupt.*delete it"):
        load_mesh_salt(tmp_path)
    (tmp_path / MESH_SALT_FILE).write_text("00ff\n")  # too short
    with pytest.raises(ConfigError, match="corrupt"):
        load_mesh_salt(tmp_path)
