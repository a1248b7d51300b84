"""Crash-safe replacement of small state files (peer name, mesh salt, targets, plugin state).

:func:`write_atomic` writes a temporary file next to the target, fsyncs it, renames it over the
target and fsyncs the directory, so after a crash, a ``kill -9`` or a full disk the target holds
either its old content or the new one, never an empty or half-written file. (A plain
``write_text`` + rename without the fsyncs can leave a zero-length file after a power cut on
ext4/xfs: the rename reaches the disk before the data.) ``ipam.db`` is SQLite, whose own
transactions give the same guarantee (weft/ipam/store.py).

Only ``os``: the CNI plugin imports this and must start fast (tests/unit/test_cni_plugin.py).
"""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) atomically and durably.

    Raises OSError; the target is then unchanged and no temporary file is left behind.
    """
    target = os.fspath(path)
    directory, name = os.path.split(target)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    # unique per writer: two writers (threads, processes) never share a temporary file, and the
    # leading dot keeps it out of directory scans (the CNI spool lists *.json without dots)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        # not contextlib.suppress: one import too many for the CNI plugin
        try:  # noqa: SIM105
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory or ".")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``directory`` durable (fsync of the directory itself)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
