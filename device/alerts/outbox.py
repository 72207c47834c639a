"""A durable outbox: events are on disk before they are published, and leave only when acked.

SQLite in the state directory (WAL, synchronous=FULL): a broker outage or a daemon restart
loses nothing, and receivers de-duplicate by the event's id. It is bounded: past ``max_events``
the oldest *reminders* go first (they are repeated anyway), then the oldest events; what was
dropped is counted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.errors import DoorstepError


@dataclass(frozen=True)
class Pending:
    id: str
    topic: str
    payload: bytes
    kind: str


class Outbox:
    def __init__(self, path: str | Path, max_events: int = 10_000) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.dropped = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, topic TEXT NOT NULL, "
                "payload BLOB NOT NULL, kind TEXT NOT NULL, created REAL NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise DoorstepError(f"{self.path}: cannot open the event outbox: {exc}") from None

    def add(self, event_id: str, topic: str, payload: dict[str, Any], kind: str) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?)",
                    (event_id, topic, data, kind, time.time()),
                )
                self._bound()
            except sqlite3.Error as exc:  # e.g. a full disk: say so, keep running
                raise DoorstepError(f"{self.path}: cannot store event {event_id}: {exc}") from None

    def _bound(self) -> None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        excess = count - self.max_events
        if excess <= 0:
            return
        for condition in ("kind = 'reminder'", "1 = 1"):
            if excess <= 0:
                break
            cur = self._db.execute(
                f"DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE {condition} ORDER BY created LIMIT ?)",
                (excess,),
            )
            self.dropped += cur.rowcount
            excess -= cur.rowcount

    def pending(self, limit: int = 1000) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, kind FROM outbox ORDER BY created LIMIT ?", (limit,)
            ).fetchall()
        return [Pending(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def delete(self, event_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (event_id,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
