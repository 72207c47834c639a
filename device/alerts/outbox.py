"""A durable outbox: events are on disk before anything announces them, and leave only when acked.

SQLite in the state directory (WAL, synchronous=FULL). Two tables: ``outbox`` (the events) and
``kv`` (small persisted state, e.g. the presence tracker's). ``commit`` writes events and state
in one transaction, so a kill -9 at any instant leaves both or neither.

Storage faults never raise: when the disk is full, read-only or failing, the outbox runs
*degraded*. It holds new events (at most ``memory_max``) and the latest state values in memory,
still hands them out for live delivery, and retries the disk with backoff (1 s doubling to
60 s); when a write works again everything held goes to disk in one transaction.

Bounds: past ``max_events`` on disk (or ``memory_max`` in memory) the oldest *reminders* go
first (they are repeated anyway), then the oldest events. Events older than ``expiry_s`` are
never handed out, and deleted. Every drop is counted (since the outbox was opened) and each
storage or drop episode is logged once.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from device.config import MqttConfig

log = logging.getLogger("doorstep.outbox")

REMINDER = "reminder"  # the one kind that yields to every other kind
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, topic TEXT NOT NULL, "
    "payload BLOB NOT NULL, kind TEXT NOT NULL, created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS outbox_priority ON outbox ((kind = 'reminder'), created)",
    "CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created)",
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_STORAGE_ERRORS = (sqlite3.Error, OSError)


class Event(NamedTuple):
    """An event to commit: ``id`` is unique (receivers de-duplicate by it)."""

    id: str
    topic: str
    payload: Mapping[str, Any]
    kind: str


@dataclass(frozen=True)
class Pending:
    """An event waiting for delivery; ``expires_in`` is its life left (s) when it was read."""

    id: str
    topic: str
    payload: bytes
    kind: str
    created: float
    expires_in: float


@dataclass(frozen=True)
class OutboxStats:
    depth: int  # events waiting, on disk and in memory
    in_memory: int  # of which only in memory (storage degraded)
    dropped_full: int  # past max_events on disk
    dropped_expired: int  # older than expiry_s before delivery
    dropped_memory: int  # past memory_max while storage was degraded
    storage: Literal["ok", "degraded"]
    storage_error: str | None
    storage_episodes: int  # times storage went from ok to degraded
    drop_episodes: int  # backlogs (until the outbox emptied) in which events were dropped

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_expired + self.dropped_memory


# (id, topic, payload, kind, created): a row as stored, and as held in memory
_Row = tuple[str, str, bytes, str, float]


def _priority(kind: str, created: float, tiebreak: int) -> tuple[bool, float, int]:
    return (kind == REMINDER, created, tiebreak)


class Outbox:
    """The event outbox and the daemon's small persisted state; thread-safe."""

    def __init__(
        self,
        path: str | Path,
        max_events: int = 10_000,
        memory_max: int = 1_000,
        expiry_s: float = 86_400,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.max_events, self.memory_max, self.expiry_s = max_events, memory_max, expiry_s
        self.clock, self._monotonic = clock, monotonic
        self._lock = threading.Lock()
        self._storage_changed = threading.Condition(self._lock)
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._mem: dict[str, tuple[_Row, int]] = {}  # id -> (row, arrival order)
        self._mem_seq = 0
        self._mem_kv: dict[str, str] = {}
        self._gone: set[str] = set()  # delivered, still on disk: the delete could not be written
        self._disk_count = 0  # the last count read, for when the disk cannot be read
        self.dropped_full = self.dropped_expired = self.dropped_memory = 0
        self._error: str | None = None
        self._storage_episodes = self._drop_episodes = 0
        self._dropping = False
        self._backoff, self._retry_at = RETRY_MIN_S, 0.0
        with self._lock:
            try:
                self._open()
            except _STORAGE_ERRORS as exc:
                self._fail(exc)

    @classmethod
    def from_config(
        cls, path: str | Path, cfg: MqttConfig, clock: Callable[[], float] = time.time
    ) -> Outbox:
        """The outbox the ``mqtt`` section describes, stored at ``path``."""
        return cls(path, cfg.outbox_max_events, cfg.memory_queue_events, cfg.event_expiry_s, clock)

    # -- public interface
    def commit(self, events: Sequence[Event], state: Mapping[str, str] | None = None) -> bool:
        """Store ``events`` and upsert ``state`` in one transaction; True once durable on disk.

        Never raises on a storage fault: it returns False and holds both in memory instead
        (see the module docstring)."""
        now = self.clock()
        rows = [
            (e.id, e.topic, json.dumps(e.payload, separators=(",", ":")).encode(), e.kind, now)
            for e in events
        ]
        kv = dict(state or {})
        with self._lock:
            self._maybe_retry()
            if self._error is None:
                try:
                    self._transaction(rows, kv, ())
                    return True
                except _STORAGE_ERRORS as exc:
                    self._fail(exc)
            self._hold(rows)
            self._mem_kv.update(kv)
            return False

    def add(self, event_id: str, topic: str, payload: Mapping[str, Any], kind: str) -> bool:
        """One event, no state: ``commit([Event(...)])``."""
        return self.commit([Event(event_id, topic, payload, kind)])

    def get_state(self, key: str) -> str | None:
        """The value last committed for ``key`` (the in-memory copy if the disk lags behind)."""
        with self._lock:
            if key in self._mem_kv:
                return self._mem_kv[key]
            if self._db is None:
                return None
            try:
                row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            except _STORAGE_ERRORS as exc:
                self._fail(exc)
                return None
            return None if row is None else str(row[0])

    def pending(self, limit: int = 1000, exclude: Iterable[str] = ()) -> list[Pending]:
        """Up to ``limit`` events to send, in delivery order: every kind before reminders,
        oldest first within each; ``exclude`` (e.g. in flight) left out. Expired events are
        dropped here, never returned."""
        skip = set(exclude)
        with self._lock:
            self._maybe_retry()
            now = self.clock()
            self._prune(now)
            cutoff = now - self.expiry_s
            found: list[tuple[tuple[bool, float, int], _Row]] = []
            if self._db is not None:
                try:
                    rows = self._db.execute(
                        "SELECT id, topic, payload, kind, created, rowid FROM outbox "
                        "WHERE created >= ? ORDER BY (kind = 'reminder'), created, rowid LIMIT ?",
                        (cutoff, limit + len(skip) + len(self._gone)),
                    ).fetchall()
                except _STORAGE_ERRORS as exc:
                    self._fail(exc)
                    rows = []
                for r in rows:
                    if r[0] not in skip and r[0] not in self._gone:
                        found.append(
                            (_priority(r[3], r[4], -1), (r[0], r[1], bytes(r[2]), r[3], r[4]))
                        )
            found += heapq.nsmallest(
                limit,
                (
                    (_priority(row[3], row[4], seq), row)
                    for row, seq in self._mem.values()
                    if row[0] not in skip and row[4] >= cutoff
                ),
            )
            best = heapq.nsmallest(limit, found, key=lambda f: f[0])
        return [
            Pending(r[0], r[1], r[2], r[3], r[4], self.expiry_s - (now - r[4])) for _, r in best
        ]

    def delete(self, event_id: str) -> None:
        """The broker has the event: forget it (from disk or memory)."""
        self.delete_many([event_id])

    def delete_many(self, event_ids: Iterable[str]) -> None:
        """``delete`` for many ids, in one transaction."""
        with self._lock:
            ids = [i for i in event_ids if self._mem.pop(i, None) is None]
            if ids:
                self._maybe_retry()
                if self._error is None:
                    try:
                        self._transaction([], {}, ids)
                        ids = []
                    except _STORAGE_ERRORS as exc:
                        self._fail(exc)
                self._mark_gone(ids)
            if self._dropping and self._depth() == 0:
                self._dropping = False
                log.info("outbox %s: the backlog is delivered; %s", self.path, self._drop_summary())

    def flush(self) -> bool:
        """Write what is held in memory now, whatever the backoff says; True if nothing is
        held any more (storage ok)."""
        with self._lock:
            return self._error is None or self._flush()

    def maintain(self) -> float | None:
        """Retry the disk if due and drop expired events; seconds until the next retry is due
        (None while storage is ok). The publisher's sender calls it between sends."""
        with self._lock:
            self._maybe_retry()
            self._prune(self.clock())
            if self._error is None:
                return None
            return max(0.0, self._retry_at - self._monotonic())

    def wait_stored(self, timeout: float) -> bool:
        """Wait until storage is ok again (something else must retry: commit, maintain, or
        the publisher's sender); True if it is."""
        with self._storage_changed:
            return self._storage_changed.wait_for(lambda: self._error is None, timeout)

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                depth=self._depth(),
                in_memory=len(self._mem),
                dropped_full=self.dropped_full,
                dropped_expired=self.dropped_expired,
                dropped_memory=self.dropped_memory,
                storage="ok" if self._error is None else "degraded",
                storage_error=self._error,
                storage_episodes=self._storage_episodes,
                drop_episodes=self._drop_episodes,
            )

    @property
    def dropped(self) -> int:
        """Events dropped for any reason since the outbox was opened."""
        return self.dropped_full + self.dropped_expired + self.dropped_memory

    def __len__(self) -> int:
        with self._lock:
            return self._depth()

    def close(self) -> None:
        """Try once more to write what memory holds, then close the database."""
        with self._lock:
            if self._error is not None and not self._closed:
                self._flush()
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- storage (all under self._lock)
    def _open(self) -> None:
        if self._closed:
            raise sqlite3.ProgrammingError("the outbox is closed")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                db.execute(statement)
            self._disk_count = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except BaseException:
            db.close()
            raise
        self._db = db

    def _transaction(
        self, rows: Sequence[_Row], kv: Mapping[str, str], deletes: Iterable[str]
    ) -> None:
        """Insert ``rows``, upsert ``kv``, delete ``deletes`` and apply the bound, atomically."""
        if self._db is None:
            self._open()
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?)", rows)
            db.executemany("DELETE FROM outbox WHERE id = ?", ((i,) for i in deletes))
            db.executemany(
                "INSERT INTO kv VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                kv.items(),
            )
            count = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            bounded = self._bound(db, count) if rows else 0
            db.execute("COMMIT")
        except BaseException:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite may have rolled back already (e.g. on SQLITE_FULL)
            raise
        self._disk_count = count - bounded
        if bounded:
            self.dropped_full += bounded
            self._note_drop(f"{bounded} past the bound of {self.max_events}")

    def _bound(self, db: sqlite3.Connection, count: int) -> int:
        excess, dropped = count - self.max_events, 0
        for condition in ("kind = 'reminder'", "1 = 1"):
            if excess <= 0:
                break
            cur = db.execute(
                f"DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox WHERE {condition} "
                "ORDER BY created, rowid LIMIT ?)",
                (excess,),
            )
            dropped += cur.rowcount
            excess -= cur.rowcount
        return dropped

    def _prune(self, now: float) -> None:
        """Drop events past their expiry, from memory and (when it can be written) from disk."""
        cutoff = now - self.expiry_s
        old = [i for i, (row, _) in self._mem.items() if row[4] < cutoff]
        for i in old:
            del self._mem[i]
        expired = len(old)
        if self._db is not None and self._error is None:
            try:
                (n,) = self._db.execute(
                    "SELECT COUNT(*) FROM outbox WHERE created < ?", (cutoff,)
                ).fetchone()
                if n:
                    cur = self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,))
                    expired += cur.rowcount
                    self._disk_count -= cur.rowcount
            except _STORAGE_ERRORS as exc:
                self._fail(exc)
        if expired:
            self.dropped_expired += expired
            self._note_drop(f"{expired} older than {self.expiry_s:g} s")

    def _hold(self, rows: Iterable[_Row]) -> None:
        """Keep ``rows`` in memory, within ``memory_max`` (reminders go first, then the oldest)."""
        for row in rows:
            if row[0] not in self._mem:
                self._mem_seq += 1
                self._mem[row[0]] = (row, self._mem_seq)
        excess = len(self._mem) - self.memory_max
        if excess > 0:
            order = sorted(self._mem.values(), key=lambda m: (m[0][3] != REMINDER, m[0][4], m[1]))
            for row, _ in order[:excess]:
                del self._mem[row[0]]
            self.dropped_memory += excess
            self._note_drop(f"{excess} past the memory queue of {self.memory_max}")

    def _mark_gone(self, ids: Iterable[str]) -> None:
        """Remember delivered ids whose delete could not be written (only those on disk)."""
        for i in ids:
            try:
                on_disk = self._db is not None and (
                    self._db.execute("SELECT 1 FROM outbox WHERE id = ?", (i,)).fetchone()
                    is not None
                )
            except _STORAGE_ERRORS:
                on_disk = True
            if on_disk:
                self._gone.add(i)

    def _depth(self) -> int:
        disk = self._disk_count
        if self._db is not None:
            with contextlib.suppress(*_STORAGE_ERRORS):  # unreadable: the last count read
                disk = self._disk_count = int(
                    self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                )
        return max(0, disk - len(self._gone)) + len(self._mem)

    # -- degraded storage
    def _maybe_retry(self) -> None:
        if self._error is not None and not self._closed and self._monotonic() >= self._retry_at:
            self._flush()

    def _flush(self) -> bool:
        held = [row for row, _ in sorted(self._mem.values(), key=lambda m: m[1])]
        try:
            self._transaction(held, self._mem_kv, self._gone)
        except _STORAGE_ERRORS as exc:
            self._fail(exc)
            return False
        self._mem.clear()
        self._mem_kv.clear()
        self._gone.clear()
        self._error = None
        self._backoff = RETRY_MIN_S
        log.info("outbox %s: storage works again; wrote %d held events", self.path, len(held))
        self._storage_changed.notify_all()
        return True

    def _fail(self, exc: BaseException) -> None:
        error = f"{self.path}: {exc}"
        if self._error is None:
            self._storage_episodes += 1
            self._backoff = RETRY_MIN_S
            log.warning(
                "outbox %s cannot be written (%s): holding up to %d new events in memory, "
                "retrying with backoff",
                self.path,
                exc,
                self.memory_max,
            )
        else:
            self._backoff = min(self._backoff * 2, RETRY_MAX_S)
        self._error = error
        self._retry_at = self._monotonic() + self._backoff
        self._storage_changed.notify_all()

    def _note_drop(self, what: str) -> None:
        if not self._dropping:
            self._dropping = True
            self._drop_episodes += 1
            log.warning(
                "outbox %s: dropping events (%s); counted until the backlog is delivered",
                self.path,
                what,
            )

    def _drop_summary(self) -> str:
        return (
            f"dropped so far: {self.dropped_full} past the bound, {self.dropped_expired} expired, "
            f"{self.dropped_memory} past the memory queue"
        )
