"""What the daemon knows of its own faults, as the state, telemetry and daemon.json say it.

A stalled source and degraded storage are *episodes* (:class:`device.storage.Episode`): each is
logged when it starts and when it ends, and reported while it lasts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from device.alerts.payloads import DroppedEvents, SourceStatus, StorageStatus
from device.storage import Episode

if TYPE_CHECKING:
    from device.alerts.outbox import Outbox
    from device.logsink import LogSink


class Conditions:
    def __init__(self, outbox: Outbox, log: LogSink) -> None:
        self.outbox, self.log = outbox, log
        self.stall = Episode()  # the source delivers nothing
        self.storage = Episode()  # the state directory's probe and daemon.json
        self.last_frame: float | None = None  # monotonic time of the last frame
        self._outbox_error: str | None = None  # the outbox's last storage error, as logged
        self._drop_episodes = 0

    def check_outbox(self) -> bool:
        """Log the outbox's storage and drop episodes once each (the outbox retries the disk
        on its own); True when something changed that the retained state shows."""
        stats = self.outbox.stats()
        changed = False
        if stats.storage_error and not self._outbox_error:
            self.log.emit(
                "storage_degraded",
                f"events held in memory: {stats.storage_error}",
                error=stats.storage_error,
            )
            changed = True
        elif self._outbox_error and not stats.storage_error:
            self.log.emit("storage_ok", "events are stored on disk again")
            changed = True
        self._outbox_error = stats.storage_error
        if stats.drop_episodes > self._drop_episodes:
            self._drop_episodes = stats.drop_episodes
            self.log.emit(
                "events_dropped",
                f"events dropped so far: {stats.dropped_full} (outbox full), "
                f"{stats.dropped_expired} (expired), {stats.dropped_memory} (memory full)",
                full=stats.dropped_full,
                expired=stats.dropped_expired,
                memory=stats.dropped_memory,
            )
            changed = True
        return changed

    def source(self) -> SourceStatus:
        age = None if self.last_frame is None else round(time.monotonic() - self.last_frame, 3)
        return SourceStatus(
            status="stalled" if self.stall.active else "ok",
            last_frame_age_s=age,
            error=self.stall.error,
        )

    def storage_status(self) -> StorageStatus:
        stats = self.outbox.stats()
        error = stats.storage_error or self.log.storage.error or self.storage.error
        return StorageStatus(
            status="degraded" if error else "ok", error=error, events_in_memory=stats.in_memory
        )

    def dropped(self) -> DroppedEvents:
        s = self.outbox.stats()
        return DroppedEvents(full=s.dropped_full, expired=s.dropped_expired, memory=s.dropped_memory)

    def payload_fields(self) -> dict[str, Any]:
        """The ``source``, ``storage`` and ``events_dropped`` of the state and telemetry."""
        return {
            "source": self.source(),
            "storage": self.storage_status(),
            "events_dropped": self.dropped(),
        }

    def record_fields(self) -> dict[str, Any]:
        """The same, as ``daemon.json`` has them."""
        src, store, s = self.source(), self.storage_status(), self.outbox.stats()
        return {
            "source": src.model_dump(),
            "storage": store.status,
            "storage_error": store.error,
            "outbox": {
                "depth": s.depth,
                "in_memory": s.in_memory,
                "dropped_full": s.dropped_full,
                "dropped_expired": s.dropped_expired,
                "dropped_memory": s.dropped_memory,
            },
        }
