"""`weft demo`'s choice of encryption (the mesh itself is tests/integ/test_demo.py)."""

from __future__ import annotations

import pytest

from weft.cli.demo import build_parser, demo_password


def _password(*argv: str) -> tuple[str | None, str]:
    return demo_password(build_parser().parse_args(list(argv)))


def test_encrypted_by_default_with_a_fresh_printed_password() -> None:
    password, line = _password()
    assert password and len(password) >= 16
    assert password in line and "--no-encrypt" in line
    assert _password()[0] != password  # generated per run, not a constant


def test_password_given_and_no_encrypt() -> None:
    assert _password("--password", "s3cret")[0] == "s3cret"
    assert "s3cret" not in _password("--password", "s3cret")[1]  # the user knows it
    password, line = _password("--no-encrypt")
    assert password is None and "plaintext" in line


def test_password_and_no_encrypt_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _password("--password", "x", "--no-encrypt")
    assert "not allowed with" in capsys.readouterr().err
