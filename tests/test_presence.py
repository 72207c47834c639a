"""The presence state machine on plain data: arrival, persistence, reminders, removal, theft, zones."""

from __future__ import annotations

import pytest

from device.detect.detector import Detection
from device.presence import PresenceSettings, PresenceTracker, Zone

PARCEL = Detection("package", 0, 0.8, (100.0, 300.0, 200.0, 380.0))
PERSON = Detection("person", 1, 0.9, (80.0, 100.0, 260.0, 470.0))
OTHER_PARCEL = Detection("package", 0, 0.7, (500.0, 300.0, 600.0, 380.0))


def tracker(**kw: object) -> PresenceTracker:
    ids = iter(f"id{i}" for i in range(1000))
    settings = PresenceSettings(
        **{
            "arrive_hits": 3,
            "arrive_window": 5,
            "remove_after_s": 10.0,
            "reminder_every_s": 60.0,
            **kw,
        }
    )  # type: ignore[arg-type]
    return PresenceTracker(
        settings, frozenset({0}), frozenset({1}), "sha", new_id=lambda: next(ids)
    )


def run(
    t: PresenceTracker, frames: list[tuple[float, list[Detection]]]
) -> list[tuple[str, float, bool]]:
    out = []
    for time, dets in frames:
        out += [(e.kind, e.time, e.possible_theft) for e in t.update(time, dets, 640, 480)]
    return out


def test_arrives_after_m_of_n_and_one_flicker_is_ignored() -> None:
    frames = [(0.0, [PARCEL]), (1.0, []), (2.0, [])] + [
        (3.0 + i, [PARCEL] if i % 2 == 0 else []) for i in range(5)
    ]  # seen at 0, then 3, 5, 7: the third hit inside a window of five comes at 7
    assert run(tracker(), frames) == [("arrived", 7.0, False)]


def test_stays_with_reminders_then_removed_after_absence() -> None:
    t = tracker()
    frames = [(float(i), [PARCEL]) for i in range(130)] + [(130.0 + i, []) for i in range(12)]
    events = run(t, frames)
    assert events == [
        ("arrived", 2.0, False),
        ("reminder", 62.0, False),
        ("reminder", 122.0, False),
        ("removed", 139.0, False),
    ]


def test_short_gaps_do_not_remove() -> None:
    frames = [(float(i), [PARCEL] if i % 7 else []) for i in range(60)]
    assert [k for k, _, _ in run(tracker(reminder_every_s=None), frames)] == ["arrived"]


def test_parcel_under_a_person_does_not_count_and_removal_with_a_person_is_possible_theft() -> None:
    carried = [(float(i), [PARCEL, PERSON]) for i in range(10)]
    assert run(tracker(), carried) == []  # someone carrying a box is no delivery
    t = tracker()
    frames = [(float(i), [PARCEL]) for i in range(5)] + [(5.0 + i, [PERSON]) for i in range(3)]
    frames += [(8.0 + i, []) for i in range(10)]
    assert run(t, frames) == [("arrived", 2.0, False), ("removed", 14.0, True)]


def test_zones_track_separately() -> None:
    left = Zone("left", ((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)))
    right = Zone("right", ((0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)))
    t = tracker(zones=(left, right))
    events = []
    for i in range(4):
        events += t.update(float(i), [PARCEL], 640, 480)
    for i in range(4, 8):
        events += t.update(float(i), [PARCEL, OTHER_PARCEL], 640, 480)
    assert [(e.kind, e.zone) for e in events] == [("arrived", "left"), ("arrived", "right")]
    assert t.present() == {"left": True, "right": True}


def test_events_carry_ids_sequence_boxes_and_model() -> None:
    t = tracker()
    events = [e for i in range(3) for e in t.update(float(i), [PARCEL], 640, 480)]
    e = events[0].to_json()
    assert e["event"] == "arrived" and e["id"] == "id0" and e["seq"] == 1
    assert e["boxes"] == [[100.0, 300.0, 200.0, 380.0]] and e["scores"] == [0.8]
    assert e["model_sha256"] == "sha" and e["count"] == 1


def test_a_model_without_a_package_class_is_refused() -> None:
    with pytest.raises(ValueError, match="no class with the role 'package'"):
        PresenceTracker(PresenceSettings(), frozenset())


def test_a_restored_tracker_keeps_the_parcel_and_names_its_arrival() -> None:
    """snapshot -> JSON -> restore (a restart): no second arrival; the removal carries the
    arrival's id; sequence numbers go on."""
    import json

    first = tracker(reminder_every_s=None)
    (arrived,) = [e for t in (0.0, 1.0, 2.0) for e in first.update(t, [PARCEL], 640, 480)]
    doc = json.loads(json.dumps(first.snapshot()))
    second = tracker(reminder_every_s=None)
    assert second.restore(doc) == ["doorstep"]
    assert second.present() == {"doorstep": True} and second.count() == 1
    assert second.update(3.0, [PARCEL], 640, 480) == []  # the same parcel, still there
    assert second.update(20.0, [], 640, 480)[0].kind == "removed"
    third = tracker(reminder_every_s=None)
    third.new_id = lambda: "after-restart"
    third.restore(doc)
    (gone,) = third.update(30.0, [], 640, 480)  # long after: last seen at 2.0
    assert (gone.kind, gone.arrival_id, gone.seq) == ("removed", arrived.id, arrived.seq + 1)
    assert arrived.arrival_id == arrived.id and gone.id == "after-restart"


@pytest.mark.parametrize(
    "doc",
    [None, [], {"version": 99, "seq": 1, "zones": {}}, {"version": 1, "seq": "x", "zones": {}},
     {"version": 1, "seq": 1, "zones": {"doorstep": {"present": True}}}],
)
def test_a_malformed_state_resumes_nothing(doc: object) -> None:
    t = tracker()
    assert t.restore(doc) == []
    assert t.present() == {"doorstep": False} and t.seq == 0
