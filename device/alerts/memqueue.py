"""The outbox's rows and their delivery order, and the bounded queue that holds them in memory
while the disk cannot be written. Pure: no I/O, tested with plain rows."""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable
from typing import NamedTuple

REMINDER = "reminder"  # the one kind that yields to every other kind


class Row(NamedTuple):
    """An event as stored: ``payload`` is its JSON, ``created`` the outbox clock at commit."""

    id: str
    topic: str
    payload: bytes
    kind: str
    created: float


Priority = tuple[bool, float, int]


def priority(row: Row, tiebreak: int) -> Priority:
    """Delivery order: every other kind before reminders, then oldest first, then
    ``tiebreak`` (the order of commit)."""
    return (row.kind == REMINDER, row.created, tiebreak)


def drop_order(row: Row, tiebreak: int) -> Priority:
    """What a bound gives up first: reminders (they are repeated anyway), then the oldest."""
    return (row.kind != REMINDER, row.created, tiebreak)


class MemoryQueue:
    """At most ``max_events`` rows, by id; past it the ``drop_order`` first are dropped."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._rows: dict[str, tuple[Row, int]] = {}  # id -> (row, arrival number)
        self._seq = 0

    def add(self, rows: Iterable[Row]) -> int:
        """Hold ``rows`` (an id already held is kept as it was); how many were dropped."""
        for row in rows:
            if row.id not in self._rows:
                self._seq += 1
                self._rows[row.id] = (row, self._seq)
        excess = len(self._rows) - self.max_events
        if excess <= 0:
            return 0
        for row, _ in heapq.nsmallest(excess, self._rows.values(), key=lambda m: drop_order(*m)):
            del self._rows[row.id]
        return excess

    def discard(self, event_id: str) -> bool:
        """Forget ``event_id``; True if it was held."""
        return self._rows.pop(event_id, None) is not None

    def expire(self, cutoff: float) -> int:
        """Drop the rows created before ``cutoff``; how many."""
        old = [i for i, (row, _) in self._rows.items() if row.created < cutoff]
        for i in old:
            del self._rows[i]
        return len(old)

    def best(self, limit: int, skip: Collection[str], cutoff: float) -> list[tuple[Priority, Row]]:
        """The first ``limit`` rows in delivery order, created at or after ``cutoff``, not in
        ``skip``."""
        return heapq.nsmallest(
            limit,
            (
                (priority(row, seq), row)
                for row, seq in self._rows.values()
                if row.id not in skip and row.created >= cutoff
            ),
        )

    def rows(self) -> list[Row]:
        """Everything held, in the order it came."""
        return [row for row, _ in self._rows.values()]

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)
