"""The router's Ed25519 identity key in its data dir (issue #14 item 4): made once, 0600, kept."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from weft.errors import ConfigError
from weft.router.config import IDENTITY_KEY_FILE, load_or_create_identity_key


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def test_first_start_makes_a_private_key_and_later_starts_reuse_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = load_or_create_identity_key(data)
    path = data / IDENTITY_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert _raw(load_or_create_identity_key(data)) == _raw(key)


def test_a_key_file_readable_by_others_is_tightened(tmp_path: Path) -> None:
    key = load_or_create_identity_key(tmp_path)
    path = tmp_path / IDENTITY_KEY_FILE
    os.chmod(path, 0o644)
    assert _raw(load_or_create_identity_key(tmp_path)) == _raw(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_damaged_key_file_is_refused_naming_the_way_out(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_KEY_FILE).write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"corrupt.*new name"):
        load_or_create_identity_key(tmp_path)
