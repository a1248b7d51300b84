"""Errors of the kernel datapaths."""

from __future__ import annotations

import errno as _errno
import os

from weft.errors import WeftError

__all__ = ["DatapathError", "wrap_os_error"]


class DatapathError(WeftError):
    """The kernel refused or failed a datapath operation.

    ``op`` names what we tried ("create vxlan device weft-vxlan", "add flow", ...), ``errno`` is the
    kernel's error number when there is one. ``str(err)`` is meant for logs and ``/status``.
    """

    def __init__(self, op: str, reason: str, errno: int | None = None) -> None:
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.reason = reason
        self.errno = errno


def wrap_os_error(op: str, err: BaseException) -> DatapathError:
    """Turn a netlink/OS error (pyroute2's NetlinkError has ``code``) into a DatapathError."""
    code = getattr(err, "code", None)
    if not isinstance(code, int):
        code = getattr(err, "errno", None)
    if isinstance(code, int) and code > 0:
        name = _errno.errorcode.get(code, str(code))
        return DatapathError(op, f"{os.strerror(code)} ({name})", code)
    return DatapathError(op, str(err) or type(err).__name__)
