"""JSON decoding with a nesting bound, for everything weft takes from a caller.

``json.loads`` on ``[`` x 100 000 raises ``RecursionError`` (not ``ValueError``), which the
callers' ``except ValueError`` let through as a crash (CNI code 999, HTTP 500 with a traceback);
and a value nested just under the interpreter's limit still makes any later recursive walk of it
(``jsonable``, ``json.dumps``) fail. :func:`loads` turns both into :class:`JsonError`, a
``ValueError`` whose message says what is wrong, so every existing ``except ValueError`` answers
"decoding failure" (CNI code 6, HTTP 400).

Lean on purpose: the CNI plugin process imports this, and it must not pull in ``json`` (and with
it ``re``, ``enum``, ...) at start-up, so it drives CPython's C scanner ``_json`` directly.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MAX_DEPTH", "JsonError", "dumps", "loads"]

MAX_DEPTH = 64  # arrays/objects inside each other; weft's own documents use fewer than 10

_WS = " \t\n\r"


class JsonError(ValueError):
    """The text is not JSON, or is nested deeper than allowed."""


def _no_default(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _constant(name: str) -> float:
    return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}[name])


class _DecodeContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)
    memo: dict[str, str] = {}


try:
    import _json

    _scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]  # duck-typed in C
    _encode = _json.make_encoder(
        None, _no_default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )

    def _parse(text: str) -> Any:
        start = len(text) - len(text.lstrip(_WS))
        try:
            value, end = _scan(text, start)
        except StopIteration as stop:
            raise JsonError(f"Expecting value at char {stop.value}") from None
        if text[end:].strip(_WS):
            raise JsonError(f"Extra data at char {end}")
        return value

    def dumps(value: Any) -> str:
        """``json.dumps`` with the default separators."""
        return "".join(_encode(value, 0))

except ImportError:  # pragma: no cover - interpreters without the C accelerator
    import json

    def _parse(text: str) -> Any:
        return json.loads(text)

    def dumps(value: Any) -> str:
        return json.dumps(value)


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether ``value`` nests containers more than ``max_depth`` deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        else:
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Decode UTF-8 bytes or text; :class:`JsonError` when invalid or nested over ``max_depth``
    (a non-UTF-8 body is a ``UnicodeDecodeError``, also a ``ValueError``)."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    try:
        value = _parse(text)
    except RecursionError:
        raise JsonError(f"JSON nested too deeply (max {max_depth} levels)") from None
    except JsonError:
        raise
    except ValueError as err:  # the fallback decoder's JSONDecodeError
        raise JsonError(str(err)) from None
    if isinstance(value, dict | list) and _too_deep(value, max_depth):
        raise JsonError(f"JSON nested too deeply (max {max_depth} levels)")
    return value
