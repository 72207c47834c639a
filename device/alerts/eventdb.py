"""The outbox's SQLite file: the raw operations, each one transaction, every error raised.

WAL with synchronous=FULL: a committed transaction is on disk (fsync'd) when ``write``
returns. Tables: ``outbox`` (the events; the schema of the first outbox, so an old file opens
as it is) and ``kv`` (key -> text). The policy (what to do when a write fails) is the
``Outbox``'s.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from device.alerts.memqueue import Row

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, topic TEXT NOT NULL, "
    "payload BLOB NOT NULL, kind TEXT NOT NULL, created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS outbox_priority ON outbox ((kind = 'reminder'), created)",
    "CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created)",
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
STORAGE_ERRORS = (sqlite3.Error, OSError)  # what a full, read-only or failing disk raises


class EventDb:
    """An open outbox database (created with its folder if missing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except BaseException:
            self._db.close()
            raise

    def write(
        self, rows: Sequence[Row], kv: Mapping[str, str], deletes: Iterable[str], max_events: int
    ) -> tuple[int, int]:
        """Insert ``rows`` (an id already stored is kept), upsert ``kv``, delete ``deletes``
        and, if rows were added, apply the bound, all in one transaction.
        Returns (events dropped by the bound, events stored after)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?)", rows)
            db.executemany("DELETE FROM outbox WHERE id = ?", ((i,) for i in deletes))
            db.executemany(
                "INSERT INTO kv VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                kv.items(),
            )
            count = self.count()
            dropped = self._bound(count - max_events) if rows else 0
            db.execute("COMMIT")
        except BaseException:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite may have rolled back by itself (e.g. on SQLITE_FULL)
            raise
        return dropped, count - dropped

    def _bound(self, excess: int) -> int:
        dropped = 0
        for condition in ("kind = 'reminder'", "1 = 1"):
            if excess <= 0:
                break
            cur = self._db.execute(
                f"DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox WHERE {condition} "
                "ORDER BY created, rowid LIMIT ?)",
                (excess,),
            )
            dropped += cur.rowcount
            excess -= cur.rowcount
        return dropped

    def pending(self, cutoff: float, limit: int) -> list[tuple[Row, int]]:
        """The first ``limit`` events created at or after ``cutoff`` in delivery order
        (every other kind before reminders, then oldest first), each with its rowid."""
        found = self._db.execute(
            "SELECT id, topic, payload, kind, created, rowid FROM outbox WHERE created >= ? "
            "ORDER BY (kind = 'reminder'), created, rowid LIMIT ?",
            (cutoff, limit),
        ).fetchall()
        return [(Row(r[0], r[1], bytes(r[2]), r[3], r[4]), r[5]) for r in found]

    def expire(self, cutoff: float) -> int:
        """Delete the events created before ``cutoff``; how many (no write if none)."""
        (n,) = self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE created < ?", (cutoff,)
        ).fetchone()
        if not n:
            return 0
        return int(self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,)).rowcount)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def has(self, event_id: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM outbox WHERE id = ?", (event_id,)).fetchone()
            is not None
        )

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self._db.close()
