"""State in the data dir survives crashes and full disks, or is refused loudly (issue #14 item 10).

* an empty or truncated ``ipam.db`` is refused at startup with an error naming the file and the
  way out, never taken for a first start (which would hand out addresses in use again);
* every other state file is replaced atomically: a writer that dies or fails between writing
  the temporary file and the rename leaves the old file intact.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from weft.atomicfile import write_atomic
from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.ipam.allocator import IpamConfig
from weft.ipam.service import IpamService
from weft.ipam.store import DB_FILE, IpamStateLost, SqliteStore
from weft.router.config import (
    MESH_SALT_FILE,
    NAME_FILE,
    load_mesh_salt,
    load_or_create_name,
    save_mesh_salt,
)

A = PeerName(0x020000000001)
ROOT = Path(__file__).resolve().parents[2]


async def _fill(data_dir: Path, n: int) -> dict[str, str]:
    service = IpamService(A, IpamConfig(), data_dir)
    try:
        return {f"c{i}": (await service.allocate(f"c{i}")).cidr for i in range(n)}
    finally:
        service.close()


def _db_size(data_dir: Path) -> int:
    assert not (data_dir / f"{DB_FILE}-wal").exists()  # checkpointed at close: one file holds all
    return (data_dir / DB_FILE).stat().st_size


# ------------------------------------------------------------------------------- ipam.db


async def test_an_empty_ipam_db_is_refused_naming_the_file_and_the_way_out(
    tmp_path: Path,
) -> None:
    await _fill(tmp_path, 20)
    path = tmp_path / DB_FILE
    os.truncate(path, 0)  # what a crash or a full disk can leave
    with pytest.raises(IpamStateLost) as info:
        IpamService(A, IpamConfig(), tmp_path)
    message = str(info.value)
    assert str(path) in message and "is empty" in message
    assert f"weft rmpeer {A}" in message  # the command, with our name, to run on another peer
    assert "weft reset" in message
    assert path.stat().st_size == 0  # refused without touching it (the evidence stays)
    assert isinstance(info.value, ConfigError)  # the daemon prints it and exits non-zero


async def test_a_first_start_without_ipam_db_is_not_refused(tmp_path: Path) -> None:
    service = IpamService(A, IpamConfig(), tmp_path)
    try:
        assert service.allocations() == []
    finally:
        service.close()
    assert (tmp_path / DB_FILE).exists()


@pytest.mark.parametrize("cut", ["inside_the_last_page", "half", "header_only"])
async def test_a_truncated_ipam_db_is_refused(tmp_path: Path, cut: str) -> None:
    await _fill(tmp_path, 300)
    path = tmp_path / DB_FILE
    size = _db_size(tmp_path)
    keep = {"inside_the_last_page": size - 100, "half": size // 2, "header_only": 100}[cut]
    os.truncate(path, keep)
    with pytest.raises(IpamStateLost, match=r"IPAM state lost: .*ipam\.db is") as info:
        IpamService(A, IpamConfig(), tmp_path)
    assert f"weft rmpeer {A}" in str(info.value)
    assert path.stat().st_size == keep


def test_a_kill_inside_a_save_transaction_keeps_the_committed_state(tmp_path: Path) -> None:
    """A writer killed between two statements of one save: the transaction never happened."""
    before = asyncio.run(_fill(tmp_path, 10))
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from weft.gossip.peer import PeerName
        from weft.ipam.allocator import StateChanges
        from weft.ipam.store import SqliteStore

        class KillOnSecondStatement:
            def __init__(self, db):
                self.db, self.n = db, 0
            def execute(self, *args):
                self.n += 1
                if self.n == 3:  # BEGIN, one DELETE done, the INSERTs next
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.db.execute(*args)
            def executemany(self, *args):
                return self.db.executemany(*args)

        store = SqliteStore.in_dir(Path({str(tmp_path)!r}))
        store._db = KillOnSecondStatement(store._db)
        store.save(StateChanges(allocations={{"c0": [], "c1": [], "c2": [(1, 24)]}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    service = IpamService(A, IpamConfig(), tmp_path)
    try:
        assert {a.container_id: a.cidr for a in service.allocations()} == before
    finally:
        service.close()


# ------------------------------------------------------------------------ other state files


def test_write_atomic_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failing_write_leaves_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, json.dumps({"v": 1}))
    real = getattr(os, failing)

    def full_disk(*args: object) -> object:
        if failing == "write":  # half of it gets written, then the disk is full
            fd, data = args
            assert isinstance(fd, int) and isinstance(data, memoryview)
            real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, json.dumps({"v": 2, "pad": "x" * 100_000}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_writer_killed_between_temporary_write_and_rename_leaves_the_old_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "targets.json"
    write_atomic(path, '["10.0.0.1:6783"]')
    script = textwrap.dedent(
        f"""
        import os, signal
        from weft import atomicfile

        def die(src, dst):
            assert open(src).read() == '["10.0.0.2:6783"]'  # the temporary file is complete
            os.kill(os.getpid(), signal.SIGKILL)

        atomicfile.os.replace = die
        atomicfile.write_atomic({str(path)!r}, '["10.0.0.2:6783"]')
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_text() == '["10.0.0.1:6783"]'


Writer = Callable[[Path], None]


def _salt(data_dir: Path) -> None:
    save_mesh_salt(data_dir, bytes(range(16)))


def _name(data_dir: Path) -> None:
    load_or_create_name(data_dir, PeerName(0x020000000099), __import__("random").Random(1))


@pytest.mark.parametrize(
    ("writer", "file"), [(_salt, MESH_SALT_FILE), (_name, NAME_FILE)], ids=["mesh-salt", "name"]
)
def test_data_dir_files_are_written_durably_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Writer, file: str
) -> None:
    """A full disk shows at fsync: the old file stays and the error names the file."""
    save_mesh_salt(tmp_path, b"\xaa" * 16)
    load_or_create_name(tmp_path, PeerName(0x020000000042), __import__("random").Random(1))
    old = (tmp_path / file).read_bytes()

    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(ConfigError, match=f"cannot write {tmp_path / file}: No space left"):
        writer(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / file).read_bytes() == old
    assert load_mesh_salt(tmp_path) == (b"\xaa" * 16, True)


def test_sqlite_store_still_loads_none_on_a_fresh_file(tmp_path: Path) -> None:
    store = SqliteStore.in_dir(tmp_path)
    try:
        assert store.load() is None  # schema only: a first start that never made a ring
    finally:
        store.close()
    store = SqliteStore.in_dir(tmp_path)  # and again: an existing file, but nothing lost
    try:
        assert store.load() is None
    finally:
        store.close()
