"""The small error hierarchy shared by all of weft.

Errors are raised inside the cores and converted to a user-facing form at one boundary each:
the connection pump (close that connection with ``str(err)`` as the logged reason), the HTTP API
(a 4xx/5xx JSON body ``{"error": str(err)}``), the CLI (one line on stderr, non-zero exit) and the
CNI plugin (spec-shaped JSON with a code).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "LocalError",
    "ProtocolError",
    "RemoteProtocolError",
    "WeftError",
]


class WeftError(Exception):
    """Base of every error weft raises on purpose."""


class ConfigError(WeftError):
    """A user-supplied setting is invalid; the message says which and why."""


class LocalError(WeftError):
    """We misused an API (a bug on our side or a caller's), never the peer's fault."""


class ProtocolError(WeftError):
    """Something about a protocol exchange went wrong."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something malformed, oversized, out of order or unauthentic.

    The only consequence allowed is closing that peer's connection with ``str(err)`` as reason.
    """
