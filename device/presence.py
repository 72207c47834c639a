"""Parcel presence: noisy per-frame detections in, events out (arrived, reminder, removed).

A pure state machine: no I/O, no clock. Time comes from frame timestamps, so replaying a
recording behaves exactly as live, and tests are deterministic.

Per zone (an optional polygon in 0..1 frame coordinates; a parcel counts in the zone holding
its box's centre):

* **arrived** once a parcel is seen in at least ``arrive_hits`` of the last ``arrive_window``
  inferences;
* **reminder** every ``reminder_every_s`` while it stays;
* **removed** once no parcel has been seen for ``remove_after_s``; flagged as a **possible
  theft** when a person was seen during that absence;
* parcel boxes that overlap a person are not counted while the person is there (a person
  carrying a box is not a delivery, and a person in front of the parcel hides it).

Every event of one parcel's stay carries its ``arrival_id`` (the id of its ``arrived``). The
tracker's state is a plain document (:meth:`PresenceTracker.snapshot`), which the daemon stores
with the events it raised, in one transaction, and gives back after a restart
(:meth:`PresenceTracker.restore`): the parcel already there stays the same parcel.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from device.detect.detector import Detection

if TYPE_CHECKING:
    from device.config import PresenceConfig

STATE_VERSION = 1

EventKind = Literal["arrived", "reminder", "removed"]


@dataclass(frozen=True)
class Zone:
    name: str
    polygon: tuple[tuple[float, float], ...] | None = None  # None: the whole frame

    def contains(self, x: float, y: float) -> bool:
        """Ray casting; ``x``, ``y`` in 0..1 frame coordinates."""
        if self.polygon is None:
            return True
        inside = False
        pts = self.polygon
        for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1], strict=True):
            if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
        return inside


@dataclass(frozen=True)
class PresenceSettings:
    arrive_hits: int = 3
    arrive_window: int = 5
    remove_after_s: float = 10.0
    reminder_every_s: float | None = 1800.0
    person_overlap: float = 0.3  # share of a parcel box covered by a person box to ignore it
    zones: tuple[Zone, ...] = (Zone("doorstep"),)


@dataclass(frozen=True)
class Event:
    """What subscribers receive; ``id`` is unique, ``seq`` counts this tracker's events."""

    kind: EventKind
    id: str
    seq: int
    time: float
    zone: str
    count: int
    boxes: tuple[tuple[float, float, float, float], ...]
    scores: tuple[float, ...]
    model_sha256: str
    possible_theft: bool = False
    since: float | None = None
    arrival_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "id": self.id,
            "seq": self.seq,
            "time": round(self.time, 3),
            "zone": self.zone,
            "count": self.count,
            "boxes": [[round(v, 1) for v in b] for b in self.boxes],
            "scores": [round(s, 4) for s in self.scores],
            "model_sha256": self.model_sha256,
            "possible_theft": self.possible_theft,
            "since": None if self.since is None else round(self.since, 3),
            "arrival_id": self.arrival_id,
        }


@dataclass
class _ZoneState:
    hits: deque[bool]
    present: bool = False
    since: float = 0.0
    last_seen: float = 0.0
    last_reminder: float = 0.0
    person_during_absence: bool = False
    arrival_id: str = ""
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    scores: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "hits": [bool(h) for h in self.hits],
            "present": self.present,
            "since": self.since,
            "last_seen": self.last_seen,
            "last_reminder": self.last_reminder,
            "person_during_absence": self.person_during_absence,
            "arrival_id": self.arrival_id,
            "boxes": [list(b) for b in self.boxes],
            "scores": list(self.scores),
        }


def _covered(box: Sequence[float], other: Sequence[float]) -> float:
    """Share of ``box``'s area that ``other`` covers."""
    w = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    h = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    area = max(1e-9, (box[2] - box[0]) * (box[3] - box[1]))
    return w * h / area


@dataclass
class PresenceTracker:
    settings: PresenceSettings
    package_ids: frozenset[int]
    person_ids: frozenset[int] = frozenset()
    model_sha256: str = ""
    new_id: Callable[[], str] = field(default=lambda: uuid.uuid4().hex)
    seq: int = 0

    def __post_init__(self) -> None:
        if not self.package_ids:
            raise ValueError("the model has no class with the role 'package': nothing to track")
        n = self.settings.arrive_window
        self._zones = {z.name: _ZoneState(hits=deque(maxlen=n)) for z in self.settings.zones}

    @classmethod
    def from_config(
        cls,
        cfg: PresenceConfig,
        package_ids: frozenset[int],
        person_ids: frozenset[int] = frozenset(),
        model_sha256: str = "",
    ) -> PresenceTracker:
        """A tracker built from the ``presence`` section alone."""
        settings = PresenceSettings(
            cfg.arrive_hits,
            cfg.arrive_window,
            cfg.remove_after_s,
            cfg.reminder_every_s,
            cfg.person_overlap,
            tuple(Zone(z.name, tuple(z.polygon) if z.polygon else None) for z in cfg.zones),
        )
        return cls(settings, package_ids, person_ids, model_sha256)

    def set_model(
        self, package_ids: frozenset[int], person_ids: frozenset[int], model_sha256: str
    ) -> None:
        """A reloaded model: its classes and sha256 from now on; what is present stays."""
        if not package_ids:
            raise ValueError("the model has no class with the role 'package': nothing to track")
        self.package_ids, self.person_ids, self.model_sha256 = (
            package_ids,
            person_ids,
            model_sha256,
        )

    def snapshot(self) -> dict[str, Any]:
        """The whole state as a JSON-able document (see :meth:`restore`)."""
        return {
            "version": STATE_VERSION,
            "seq": self.seq,
            "zones": {name: st.to_json() for name, st in self._zones.items()},
        }

    def restore(self, doc: Any) -> list[str]:
        """Take back a :meth:`snapshot` after a restart; returns the zones resumed.

        Zones are matched by name (a zone added since starts empty, one removed is dropped);
        anything malformed resumes nothing rather than half a state. Times in the document are
        in the same clock as the frames fed after it (the daemon uses Unix time for cameras), so
        a parcel last seen longer ago than ``remove_after_s`` is removed at the next inference
        that does not see it, and kept if it is still there."""
        try:
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                return []
            zones = doc["zones"]
            restored: dict[str, _ZoneState] = {}
            for name in self._zones:
                z = zones.get(name)
                if not isinstance(z, dict):
                    continue
                n = self.settings.arrive_window
                restored[name] = _ZoneState(
                    hits=deque((bool(h) for h in z["hits"]), maxlen=n),
                    present=bool(z["present"]),
                    since=float(z["since"]),
                    last_seen=float(z["last_seen"]),
                    last_reminder=float(z["last_reminder"]),
                    person_during_absence=bool(z["person_during_absence"]),
                    arrival_id=str(z["arrival_id"]),
                    boxes=tuple(_box(b) for b in z["boxes"]),
                    scores=tuple(float(v) for v in z["scores"]),
                )
            seq = int(doc["seq"])
        except (KeyError, TypeError, ValueError):
            return []
        self._zones.update(restored)
        self.seq = max(self.seq, seq)
        return sorted(restored)

    def present(self) -> dict[str, bool]:
        return {name: st.present for name, st in self._zones.items()}

    def count(self) -> int:
        """Parcels last seen in the zones that hold one."""
        return sum(len(st.boxes) for st in self._zones.values() if st.present)

    def since(self) -> float | None:
        """When the longest-present parcel arrived (frame time), or ``None``."""
        times = [st.since for st in self._zones.values() if st.present]
        return min(times) if times else None

    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [b for st in self._zones.values() if st.present for b in st.boxes]

    def update(
        self, t: float, detections: Sequence[Detection], width: int, height: int
    ) -> list[Event]:
        """Feed one inference's detections (boxes in pixels of a ``width`` x ``height`` frame)."""
        persons = [d.box for d in detections if d.class_id in self.person_ids]
        parcels = [
            d
            for d in detections
            if d.class_id in self.package_ids
            and not any(_covered(d.box, p) >= self.settings.person_overlap for p in persons)
        ]
        events: list[Event] = []
        for zone in self.settings.zones:
            st = self._zones[zone.name]
            mine = [
                d
                for d in parcels
                if zone.contains(
                    (d.box[0] + d.box[2]) / 2 / width, (d.box[1] + d.box[3]) / 2 / height
                )
            ]
            seen = bool(mine)
            st.hits.append(seen)
            if seen:
                st.boxes = tuple(d.box for d in mine)
                st.scores = tuple(d.score for d in mine)
            if not st.present:
                if sum(st.hits) >= self.settings.arrive_hits:
                    st.present, st.since, st.last_seen, st.last_reminder = True, t, t, t
                    st.person_during_absence = False
                    st.arrival_id = ""  # the arrival's own id, set by _event
                    events.append(self._event("arrived", t, zone.name, st))
                continue
            if seen:
                st.last_seen = t
                st.person_during_absence = False
            else:
                st.person_during_absence |= bool(persons)
                if t - st.last_seen >= self.settings.remove_after_s:
                    st.present = False
                    st.hits.clear()
                    events.append(
                        self._event("removed", t, zone.name, st, theft=st.person_during_absence)
                    )
                    continue
            every = self.settings.reminder_every_s
            if every and t - st.last_reminder >= every:
                st.last_reminder = t
                events.append(self._event("reminder", t, zone.name, st))
        return events

    def _event(
        self, kind: EventKind, t: float, zone: str, st: _ZoneState, theft: bool = False
    ) -> Event:
        self.seq += 1
        gone = kind == "removed"
        ident = self.new_id()
        if kind == "arrived":
            st.arrival_id = ident
        return Event(
            kind,
            ident,
            self.seq,
            t,
            zone,
            0 if gone else len(st.boxes),
            () if gone else st.boxes,
            () if gone else st.scores,
            self.model_sha256,
            theft,
            st.since,
            st.arrival_id,
        )


def describe_time(t: float) -> str:
    """An event's time for people: the clock time for cameras (Unix time), else the offset
    into the replayed file or folder."""
    if t >= 1e9:  # Unix time: after 2001
        import time

        return "at " + time.strftime("%H:%M:%S", time.localtime(t))
    return f"at t={t:.1f}s"


def _box(value: Any) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in value)
    return (x1, y1, x2, y2)
