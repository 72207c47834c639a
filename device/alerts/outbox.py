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
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from device.alerts.eventdb import STORAGE_ERRORS, EventDb
from device.alerts.memqueue import MemoryQueue, Priority, Row, priority

if TYPE_CHECKING:
    from device.config import MqttConfig

log = logging.getLogger("doorstep.outbox")

RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0


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
        """``clock`` dates events (their age decides expiry); ``monotonic`` paces retries."""
        self.path = Path(path)
        self.max_events, self.expiry_s = max_events, expiry_s
        self.clock, self._monotonic = clock, monotonic
        self._lock = threading.Lock()
        self._storage_changed = threading.Condition(self._lock)
        self._db: EventDb | None = None
        self._closed = False
        self._mem = MemoryQueue(memory_max)
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
            except STORAGE_ERRORS as exc:
                self._fail(exc)

    @property
    def memory_max(self) -> int:
        return self._mem.max_events

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
            Row(e.id, e.topic, json.dumps(e.payload, separators=(",", ":")).encode(), e.kind, now)
            for e in events
        ]
        kv = dict(state or {})
        with self._lock:
            self._maybe_retry()
            if self._error is None and self._write(rows, kv, ()):
                return True
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
                return self._db.get(key)
            except STORAGE_ERRORS as exc:
                self._fail(exc)
                return None

    def pending(self, limit: int = 1000, exclude: Iterable[str] = ()) -> list[Pending]:
        """Up to ``limit`` events to send, in delivery order: every kind before reminders,
        oldest first within each; ``exclude`` (e.g. in flight) left out. Expired events are
        dropped here, never returned."""
        skip = set(exclude)
        with self._lock:
            self._maybe_retry()
            now = self.clock()
            self._expire(now)
            cutoff = now - self.expiry_s
            found: list[tuple[Priority, Row]] = []
            if self._db is not None:
                try:
                    stored = self._db.pending(cutoff, limit + len(skip) + len(self._gone))
                except STORAGE_ERRORS as exc:
                    self._fail(exc)
                    stored = []
                found = [
                    (priority(row, -1), row)
                    for row, _ in stored
                    if row.id not in skip and row.id not in self._gone
                ]
            found += self._mem.best(limit, skip, cutoff)
            best = heapq.nsmallest(limit, found, key=lambda f: f[0])
        return [Pending(*r, expires_in=self.expiry_s - (now - r.created)) for _, r in best]

    def delete(self, event_id: str) -> None:
        """The broker has the event: forget it (from disk or memory)."""
        self.delete_many([event_id])

    def delete_many(self, event_ids: Iterable[str]) -> None:
        """``delete`` for many ids, in one transaction."""
        with self._lock:
            ids = [i for i in event_ids if not self._mem.discard(i)]
            if ids:
                self._maybe_retry()
                if self._error is not None or not self._write([], {}, ids):
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
            self._expire(self.clock())
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
            raise RuntimeError("the outbox is closed")
        self._db = EventDb(self.path)
        self._disk_count = self._db.count()

    def _write(self, rows: Sequence[Row], kv: Mapping[str, str], deletes: Iterable[str]) -> bool:
        """One transaction; False (and degraded) if the disk refused it."""
        try:
            if self._db is None:
                self._open()
            assert self._db is not None
            bounded, self._disk_count = self._db.write(rows, kv, deletes, self.max_events)
        except (*STORAGE_ERRORS, RuntimeError) as exc:
            self._fail(exc)
            return False
        if bounded:
            self.dropped_full += bounded
            self._note_drop(f"{bounded} past the bound of {self.max_events}")
        return True

    def _expire(self, now: float) -> None:
        """Drop events past their expiry, from memory and (when it can be written) from disk."""
        cutoff = now - self.expiry_s
        expired = self._mem.expire(cutoff)
        if self._db is not None and self._error is None:
            try:
                expired += (n := self._db.expire(cutoff))
                self._disk_count -= n
            except STORAGE_ERRORS as exc:
                self._fail(exc)
        if expired:
            self.dropped_expired += expired
            self._note_drop(f"{expired} older than {self.expiry_s:g} s")

    def _hold(self, rows: Iterable[Row]) -> None:
        if dropped := self._mem.add(rows):
            self.dropped_memory += dropped
            self._note_drop(f"{dropped} past the memory queue of {self.memory_max}")

    def _mark_gone(self, ids: Iterable[str]) -> None:
        """Remember delivered ids whose delete could not be written (only those on disk)."""
        for i in ids:
            try:
                on_disk = self._db is not None and self._db.has(i)
            except STORAGE_ERRORS:
                on_disk = True
            if on_disk:
                self._gone.add(i)

    def _depth(self) -> int:
        if self._db is not None:
            with contextlib.suppress(*STORAGE_ERRORS):  # unreadable: the last count read
                self._disk_count = self._db.count()
        return max(0, self._disk_count - len(self._gone)) + len(self._mem)

    # -- degraded storage
    def _maybe_retry(self) -> None:
        if self._error is not None and not self._closed and self._monotonic() >= self._retry_at:
            self._flush()

    def _flush(self) -> bool:
        held = self._mem.rows()
        if not self._write(held, self._mem_kv, self._gone):
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
        reason = str(exc)
        error = reason if str(self.path.parent) in reason else f"{self.path}: {reason}"
        if self._error is None:
            self._storage_episodes += 1
            self._backoff = RETRY_MIN_S
            log.warning(
                "outbox %s cannot be written (%s): holding up to %d new events in memory, "
                "retrying with backoff",
                self.path,
                reason,
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
