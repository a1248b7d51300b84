"""weft.jsonlimit: JSON decoding with a nesting bound (issue #14, item 11)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from weft import jsonlimit
from weft.jsonlimit import MAX_DEPTH, JsonError, dumps, loads

ROOT = Path(jsonlimit.__file__).resolve().parent.parent


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "text",
    ['{"a": [1, 2.5, "x", null, true, false, {"b": {}}]}', "[]", '"s"', "0", " \n[1]\t"],
)
def test_decodes_like_json(text: str) -> None:
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


def test_encodes_like_json() -> None:
    value: Any = {"a": [1, "é", None, {"b": True}]}
    assert dumps(value) == json.dumps(value)


def test_depth_limit_is_exact() -> None:
    assert loads(nested(MAX_DEPTH)) is not None
    with pytest.raises(JsonError, match="nested too deeply"):
        loads(nested(MAX_DEPTH + 1))
    deep_object = '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)
    with pytest.raises(JsonError, match="nested too deeply"):
        loads(deep_object)
    assert loads(nested(3), max_depth=3) == [[[]]]
    with pytest.raises(JsonError):
        loads(nested(4), max_depth=3)


@pytest.mark.parametrize(
    "text", ["[" * 100_000, '{"a":' * 100_000, nested(100_000)], ids=["open", "objects", "closed"]
)
def test_interpreter_deep_input_is_a_value_error(text: str) -> None:
    # json.loads raises RecursionError here, which `except ValueError` does not catch
    with pytest.raises(RecursionError):
        json.loads(text)
    with pytest.raises(ValueError, match="nested too deeply"):
        loads(text)


@pytest.mark.parametrize("data", [b"", b"{nope", b"[1] x", b"\xff\xfe", b"[1,]"])
def test_invalid_input_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        loads(data)


def test_wide_documents_are_fine() -> None:
    wide = "[" + ",".join(nested(10) for _ in range(10_000)) + "]"
    assert len(loads(wide)) == 10_000


def test_import_stays_lean() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import weft.jsonlimit\n"
        "print([m for m in ('json', 're', 'enum', 'typing') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
