"""The durable outbox: which spooled objects each site still lacks.

One SQLite database in WAL mode with synchronous=FULL: a row is committed only after its spool file was
fsync'd, and an object counts as shipped to a site only after that site acknowledged the write. Rows go when
every target site holds the object; then the spool file goes too. Barrier objects (indexes, snapshot records)
are shipped to a site only after every earlier object bound for that site: a snapshot record at a site
therefore proves that everything it needs is there.

All methods are synchronous, cheap and thread-safe; async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL UNIQUE,
    tenant   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    barrier  INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS copies (
    seq        INTEGER NOT NULL REFERENCES objects(seq) ON DELETE CASCADE,
    site       TEXT NOT NULL,
    acked      REAL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (seq, site)
);
CREATE INDEX IF NOT EXISTS copies_pending ON copies(site, acked, seq);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Pending:
    seq: int
    key: str
    size: int
    barrier: bool
    attempts: int


@dataclass(frozen=True)
class SiteBacklog:
    site: str
    objects: int
    bytes: int
    oldest: float | None
    last_error: str | None


def _locked(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(self: Outbox, *args: object, **kw: object) -> T:
        with self._lock:
            return fn(self, *args, **kw)

    return wrapper


class Outbox:
    """Thread-safe: snapshot workers add objects while shippers take them."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)

    @classmethod
    def open_readonly(cls, path: Path, busy_timeout: float = 5.0) -> Outbox:
        """The outbox of another process, for reading only (``drsvc status`` while the daemon runs): no
        state lock, no schema, nothing written. Only the read methods (backlog, get_meta, ...) may be used.
        Raises ``sqlite3.Error`` if the database cannot be opened."""
        self = cls.__new__(cls)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout,
        )
        self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        return self

    def close(self) -> None:
        self.db.close()

    @_locked
    def add(self, key: str, tenant: str, size: int, sites: Sequence[str], barrier: bool = False) -> int:
        """Record a spooled object for `sites`. Adding a key again adds any missing sites, nothing else."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT seq FROM objects WHERE key = ?", (key,)).fetchone()
            if row is None:
                cur = self.db.execute(
                    "INSERT INTO objects(key, tenant, size, barrier, created) VALUES (?, ?, ?, ?, ?)",
                    (key, tenant, size, int(barrier), now),
                )
                seq = int(cur.lastrowid or 0)
            else:
                seq = int(row[0])
            self.db.executemany(
                "INSERT OR IGNORE INTO copies(seq, site) VALUES (?, ?)", [(seq, s) for s in sites]
            )
        return seq

    @_locked
    def pending(self, site: str, limit: int, exclude: Sequence[int] = ()) -> list[Pending]:
        """The next objects `site` lacks, in order; a barrier comes only when nothing before it is pending."""
        rows = self.db.execute(
            "SELECT o.seq, o.key, o.size, o.barrier, c.attempts FROM copies c JOIN objects o USING (seq)"
            " WHERE c.site = ? AND c.acked IS NULL ORDER BY o.seq LIMIT ?",
            (site, limit + len(exclude)),
        ).fetchall()
        out: list[Pending] = []
        skip = set(exclude)
        for i, (seq, key, size, barrier, attempts) in enumerate(rows):
            if barrier and i > 0:
                break  # an earlier object for this site is still pending (or in flight)
            if seq in skip:
                if barrier:
                    break
                continue
            out.append(Pending(seq, key, size, bool(barrier), attempts))
            if barrier or len(out) >= limit:
                break
        return out

    @_locked
    def ack(self, seq: int, site: str) -> bool:
        """Record that `site` holds object `seq`. True when every target site now holds it."""
        with self.db:
            self.db.execute(
                "UPDATE copies SET acked = ?, last_error = NULL WHERE seq = ? AND site = ?",
                (time.time(), seq, site),
            )
            left = self.db.execute(
                "SELECT COUNT(*) FROM copies WHERE seq = ? AND acked IS NULL", (seq,)
            ).fetchone()[0]
        return int(left) == 0

    @_locked
    def fail(self, seq: int, site: str, error: str) -> None:
        with self.db:
            self.db.execute(
                "UPDATE copies SET attempts = attempts + 1, last_error = ? WHERE seq = ? AND site = ?",
                (error[:500], seq, site),
            )

    @_locked
    def forget(self, seq: int) -> None:
        """Drop a fully shipped object (its spool file is already gone)."""
        with self.db:
            self.db.execute("DELETE FROM objects WHERE seq = ?", (seq,))

    @_locked
    def forget_shipped(self) -> list[str]:
        """Drop rows that every target site acknowledged (left by a crash before ``forget``); their keys."""
        with self.db:
            rows = self.db.execute(
                "SELECT o.seq, o.key FROM objects o WHERE NOT EXISTS"
                " (SELECT 1 FROM copies c WHERE c.seq = o.seq AND c.acked IS NULL)"
            ).fetchall()
            self.db.executemany("DELETE FROM objects WHERE seq = ?", [(seq,) for seq, _ in rows])
        return [str(k) for _, k in rows]

    @_locked
    def acked_sites(self, key: str) -> tuple[list[str], list[str]] | None:
        """(sites holding, sites lacking) for a key still in the outbox; None if it is gone (all shipped)."""
        rows = self.db.execute(
            "SELECT c.site, c.acked FROM copies c JOIN objects o USING (seq) WHERE o.key = ?", (key,)
        ).fetchall()
        if not rows:
            return None
        return [s for s, a in rows if a is not None], [s for s, a in rows if a is None]

    @_locked
    def site_errors(self, site: str) -> str | None:
        row = self.db.execute(
            "SELECT last_error FROM copies WHERE site = ? AND acked IS NULL AND last_error IS NOT NULL"
            " ORDER BY seq LIMIT 1",
            (site,),
        ).fetchone()
        return None if row is None else str(row[0])

    @_locked
    def backlog(self, site: str) -> SiteBacklog:
        n, size, oldest = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(o.size), 0), MIN(o.created)"
            " FROM copies c JOIN objects o USING (seq)"
            " WHERE c.site = ? AND c.acked IS NULL",
            (site,),
        ).fetchone()
        return SiteBacklog(site, int(n), int(size), oldest, self.site_errors(site))

    @_locked
    def spooled_bytes(self) -> int:
        return int(self.db.execute("SELECT COALESCE(SUM(size), 0) FROM objects").fetchone()[0])

    @_locked
    def keys(self, tenant: str, prefix: str = "") -> list[tuple[str, list[str]]]:
        """Keys of `tenant` still in the outbox (optionally under a prefix) with their target sites."""
        rows = self.db.execute(
            "SELECT o.key, group_concat(c.site) FROM objects o JOIN copies c USING (seq)"
            # not LIKE: it is case-insensitive and `_` and `%` in the prefix would be wildcards
            " WHERE o.tenant = ? AND substr(o.key, 1, length(?)) = ? GROUP BY o.seq ORDER BY o.seq",
            (tenant, prefix, prefix),
        ).fetchall()
        return [(k, sites.split(",")) for k, sites in rows]

    @_locked
    def get_meta(self, k: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else str(row[0])

    @_locked
    def set_meta(self, k: str, v: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", (k, v))
