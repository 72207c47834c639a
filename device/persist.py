"""The presence tracker's state, kept in the outbox's database beside the events it raised.

Events and the tracker's state after them go to disk in one transaction, before anything
announces the events: a kill -9 at any instant leaves both or neither, so a restarted daemon
neither forgets a parcel nor announces it twice. Between events, a present parcel's last
sighting is stored every few seconds (one small transaction, not one per frame: SD cards wear).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from device.alerts.outbox import Event as Stored
from device.alerts.outbox import Outbox
from device.presence import PresenceTracker

PRESENCE_KEY = "presence"
PERSIST_EVERY_S = 5.0  # how often a present parcel's last sighting is stored without events


class TrackerStore:
    """Commits event payloads (for the broker, when there is one) with the tracker's state.

    ``persist`` is False for sources that run on their own clock (a file replayed as fast as it
    decodes): their tracker state means nothing to the next run, so it is neither stored nor
    resumed."""

    def __init__(
        self, outbox: Outbox, tracker: PresenceTracker, events_topic: str | None, persist: bool
    ) -> None:
        self.outbox, self.tracker = outbox, tracker
        self.events_topic, self.persist = events_topic, persist
        self._stored_doc: str | None = None
        self._stored_at = 0.0

    def resume(self) -> list[str]:
        """Give the tracker back its stored state; the zones resumed."""
        if not self.persist:
            return []
        raw = self.outbox.get_state(PRESENCE_KEY)
        if raw is None:
            return []
        try:
            doc = json.loads(raw)
        except ValueError:
            return []
        resumed = self.tracker.restore(doc)
        self._stored_doc = raw
        return resumed

    def due(self) -> bool:
        """A present parcel's last sighting is older on disk than ``PERSIST_EVERY_S``."""
        return (
            self.persist
            and any(self.tracker.present().values())
            and time.monotonic() - self._stored_at >= PERSIST_EVERY_S
        )

    def commit(self, payloads: Sequence[dict[str, Any]]) -> bool:
        """Store ``payloads`` and the tracker's state in one transaction; True when it is on
        disk (False: held in memory, the disk is full)."""
        items = (
            [Stored(p["id"], self.events_topic, p, p["event"]) for p in payloads]
            if self.events_topic is not None
            else []
        )
        state = None
        if self.persist:
            doc = json.dumps(self.tracker.snapshot(), separators=(",", ":"))
            if items or doc != self._stored_doc:
                state = {PRESENCE_KEY: doc}
                self._stored_doc, self._stored_at = doc, time.monotonic()
        if not items and not state:
            return True
        return self.outbox.commit(items, state)
