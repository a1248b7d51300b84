"""SQLite persistence of one peer's IPAM state (``<data dir>/ipam.db``).

WAL journal with ``synchronous=FULL``: every :meth:`SqliteStore.save` is one transaction that is
on disk when it returns, and :class:`~weft.ipam.node.IpamNode` saves before it sends or answers
anything, so a ``kill -9`` (or a power cut) can lose only what nobody has been told yet.

Tables: ``meta`` (range, seeds, our Paxos claim), ``ring`` (token -> owner, version, free) and
``allocations`` (address -> container id, prefix length).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from weft.errors import ConfigError
from weft.gossip.peer import PeerName
from weft.ipam.allocator import PersistedState, StateChanges
from weft.ipam.paxos import Claim
from weft.ipam.ring import Entry

__all__ = ["DB_FILE", "SqliteStore"]

DB_FILE = "ipam.db"
_SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ring (
    token INTEGER PRIMARY KEY, owner INTEGER NOT NULL, version INTEGER NOT NULL,
    free INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS allocations (
    address INTEGER PRIMARY KEY, container_id TEXT NOT NULL, prefix INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS allocations_by_container ON allocations (container_id);
"""


class SqliteStore:
    """A :class:`~weft.ipam.node.Store` in one SQLite file. Not thread-safe (one loop)."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise ConfigError(
                    f"{path}: IPAM schema {row[0]} is not the supported {_SCHEMA_VERSION}"
                )
        except sqlite3.Error as err:
            raise ConfigError(f"cannot open the IPAM database {path}: {err}") from None

    @classmethod
    def in_dir(cls, data_dir: Path) -> SqliteStore:
        return cls(data_dir / DB_FILE)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def load(self) -> PersistedState | None:
        rng = self._meta("range")
        if rng is None:
            return None
        start, end = json.loads(rng)
        seeds = tuple(PeerName(s) for s in json.loads(self._meta("seeds") or "[]"))
        entries = {
            int(t): Entry(PeerName(o), int(v), int(f))
            for t, o, v, f in self._db.execute("SELECT token, owner, version, free FROM ring")
        }
        allocations: dict[str, list[tuple[int, int]]] = {}
        for addr, cid, prefix in self._db.execute(
            "SELECT address, container_id, prefix FROM allocations ORDER BY address"
        ):
            allocations.setdefault(str(cid), []).append((int(addr), int(prefix)))
        paxos_text = self._meta("paxos")
        paxos = None
        if paxos_text is not None:
            pr, pp, ar, ap = json.loads(paxos_text)
            paxos = Claim((pr, pp), (ar, ap))
        return PersistedState(int(start), int(end), seeds, entries, allocations, paxos)

    def save(self, changes: StateChanges) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if changes.wipe:
                db.execute("DELETE FROM ring")
                db.execute("DELETE FROM allocations")
                db.execute("DELETE FROM meta WHERE key != 'schema'")
            if changes.range is not None:
                self._put("range", json.dumps(list(changes.range)))
            if changes.seeds is not None:
                self._put("seeds", json.dumps([int(s) for s in changes.seeds]))
            if changes.paxos is not None:
                c = changes.paxos
                self._put("paxos", json.dumps([*c.promise, *c.accepted]))
            if changes.entries:
                db.executemany(
                    "INSERT OR REPLACE INTO ring VALUES (?, ?, ?, ?)",
                    [(t, int(e.owner), e.version, e.free) for t, e in changes.entries.items()],
                )
            for cid, items in changes.allocations.items():
                db.execute("DELETE FROM allocations WHERE container_id=?", (cid,))
                if items:
                    db.executemany(
                        "INSERT OR REPLACE INTO allocations VALUES (?, ?, ?)",
                        [(addr, cid, prefix) for addr, prefix in items],
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _put(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        self._db.close()
