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

__all__ = ["DB_FILE", "IpamStateLost", "SqliteStore"]

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


class IpamStateLost(ConfigError):
    """``ipam.db`` exists but its state cannot be read: refuse to start rather than start empty.

    An empty ring would hand out again the addresses this peer's containers hold, and claim
    space the other peers' rings still give to us (duplicate addresses). The message names the
    file and the ways out.
    """

    def __init__(self, path: Path, what: str, peer: str | None) -> None:
        who = peer or "<this peer's name>"
        super().__init__(
            f"IPAM state lost: {path} {what}. Refusing to start IPAM with an empty ring: it would"
            " hand out again addresses that containers already use. Restore the file from a"
            f" backup; or, with this router stopped, run `weft rmpeer {who}` on another peer (it"
            f" takes over this peer's address space), then remove {path} and start again (on a"
            " one-peer mesh: remove it and restart this host's containers). `weft reset` cannot"
            " help: it needs the state this file held."
        )
        self.path = path


class SqliteStore:
    """A :class:`~weft.ipam.node.Store` in one SQLite file. Not thread-safe (one loop)."""

    def __init__(self, path: Path, synchronous: str = "FULL", *, peer: str | None = None) -> None:
        self.path = path
        self._peer = peer  # our peer name, for the way out in IpamStateLost
        try:
            size: int | None = path.stat().st_size
        except FileNotFoundError:
            size = None  # a first start: SQLite creates it
        except OSError as err:
            raise ConfigError(f"cannot open the IPAM database {path}: {err.strerror}") from None
        if size == 0:
            # SQLite would take an empty file for a new database; the file existing says a
            # previous run had state here (a crash or a full disk emptied it).
            raise IpamStateLost(path, "is empty (0 bytes)", peer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot open the IPAM database {path}: {err}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            if size is not None:
                # a file cut short inside a page opens fine and loads part of the ring
                problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise IpamStateLost(path, f"is damaged ({problems[0][:200]})", peer)
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise ConfigError(
                    f"{path}: IPAM schema {row[0]} is not the supported {_SCHEMA_VERSION}"
                )
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise IpamStateLost(path, f"is not a readable database ({err})", peer) from None
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_dir(cls, data_dir: Path, *, peer: str | None = None) -> SqliteStore:
        return cls(data_dir / DB_FILE, peer=peer)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def load(self) -> PersistedState | None:
        """The persisted state; None on a first start (nothing was ever handed out)."""
        try:
            return self._load()
        except (sqlite3.DatabaseError, ValueError, TypeError) as err:
            raise IpamStateLost(self.path, f"holds unreadable state ({err})", self._peer) from None

    def _load(self) -> PersistedState | None:
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
