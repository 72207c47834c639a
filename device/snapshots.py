"""The arrivals' snapshots, kept on the device: ``<state_dir>/snapshots/<event id>.jpg``.

The same JPEG the MQTT snapshot carries (the main stream with the parcel outlined), written
atomically for the last ``telemetry.snapshots_keep`` arrivals, so ``doorstep-host report`` can
show what each arrival looked like. Never worth the daemon's life: a write that fails (a full
disk) is skipped and counted, and the next arrival tries again.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from device.safefile import write_atomic

NAME = re.compile(r"^[0-9a-f]{32}\.jpg$")  # an event id (hex uuid4) + .jpg: nothing else is ours


class SnapshotStore:
    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep
        self.failed = 0

    def save(self, event_id: str, jpeg: bytes | None) -> str | None:
        """Write the snapshot of event ``event_id``; its file name, or None (off, or failed)."""
        name = f"{event_id}.jpg"
        if self.keep <= 0 or jpeg is None or not NAME.match(name):
            return None
        try:
            self.folder.mkdir(mode=0o750, exist_ok=True)
            write_atomic(self.folder / name, jpeg)
        except OSError:
            self.failed += 1
            return None
        self._prune()
        return name

    def _prune(self) -> None:
        """Keep the newest ``keep`` snapshots (by modification time)."""
        try:
            ours = [p for p in self.folder.iterdir() if NAME.match(p.name) and p.is_file()]
        except OSError:
            return
        ours.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in ours[self.keep :]:
            with contextlib.suppress(OSError):
                old.unlink()
