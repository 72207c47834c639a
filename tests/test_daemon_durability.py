"""No alert is lost and no parcel is forgotten: kill -9 at the worst instants, then restart.

Real daemons in child processes on a still-image "camera" whose scene the test switches
between real photos, a real Mosquitto, the real outbox on disk.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProc, Scene, porch_config, unique_events, wait_file
from test_alerts import Listener


def _config(tmp_path: Path, url: str, scene: Scene, remove: float = 2.0) -> Path:
    return porch_config(
        tmp_path / "device.yaml",
        state=tmp_path / "state",
        scene=scene.path,
        url=url,
        device_id="porch-durable",
        remove=remove,
    )


@pytest.fixture
def listener(mosquitto: Any) -> Iterator[Listener]:
    li = Listener(mosquitto.url)
    yield li
    li.close()


_unique = unique_events


def _kinds(li: Listener) -> list[str]:
    return [e["event"] for e in _unique(li)]


def _stored_presence(state: Path) -> dict[str, Any]:
    db = sqlite3.connect(state / "outbox.sqlite")
    try:
        (raw,) = db.execute("SELECT value FROM kv WHERE key = 'presence'").fetchone()
    finally:
        db.close()
    return json.loads(raw)  # type: ignore[no-any-return]


def test_a_parcel_survives_kill9_and_its_removal_names_its_arrival(
    tmp_path: Path, mosquitto: Any, listener: Listener, porch: Scene
) -> None:
    config = _config(tmp_path, mosquitto.url, porch)
    porch.show("parcel")
    first = DaemonProc(config)
    try:
        first.record("event", timeout=120, event="arrived")
        first.kill9()  # mid-stay
        second = DaemonProc(config)
        start = second.record("start", timeout=120)
        assert start["resumed"] == ["doorstep"]
        # it keeps seeing the same parcel: several inferences, and no second arrival
        second.record("telemetry", timeout=60)
        tele = second.record("telemetry", timeout=60)
        assert tele["inferences"] >= 1
        porch.show("empty")
        second.record("event", timeout=60, event="removed")
        assert listener.wait(lambda li: "removed" in _kinds(li), 30)
        assert second.stop() == 0
    finally:
        first.kill9()
    events = _unique(listener)
    assert _kinds(listener) == ["arrived", "removed"], events
    arrived, removed = events
    assert removed["arrival_id"] == arrived["id"] == arrived["arrival_id"]
    assert removed["id"] != arrived["id"] and removed["seq"] > arrived["seq"]


def test_a_restart_long_after_removes_what_is_gone(
    tmp_path: Path, mosquitto: Any, listener: Listener, porch: Scene
) -> None:
    """Down for longer than remove_after_s, and the parcel went meanwhile: the first
    inference after the restart removes it (with its arrival's id)."""
    config = _config(tmp_path, mosquitto.url, porch, remove=1.0)
    porch.show("parcel")
    first = DaemonProc(config)
    try:
        first.record("event", timeout=120, event="arrived")
        first.kill9()
        porch.show("empty")
        last_seen = max(z["last_seen"] for z in _stored_presence(tmp_path / "state")["zones"].values())
        assert wait_file(tmp_path, lambda _: time.time() > last_seen + 1.0, 30)
        second = DaemonProc(config)
        second.record("event", timeout=120, event="removed")
        assert second.stop() == 0
    finally:
        first.kill9()
    assert listener.wait(lambda li: len(_unique(li)) >= 2, 30)
    arrived, removed = _unique(listener)
    assert (arrived["event"], removed["event"]) == ("arrived", "removed")
    assert removed["arrival_id"] == arrived["id"]


def test_kill9_right_after_an_event_is_logged_loses_nothing(
    tmp_path: Path, mosquitto: Any, listener: Listener, porch: Scene
) -> None:
    """The event's log line is the first output; a kill the instant it appears must still
    find the event on disk, and the next start delivers it."""
    config = _config(tmp_path, "mqtt://127.0.0.1:1", porch)  # no broker: nothing leaves
    porch.show("parcel")
    first = DaemonProc(config)
    try:
        logged = first.record("event", timeout=120, event="arrived")
        first.kill9()
    finally:
        first.kill9()
    db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite")
    try:
        ids = [r[0] for r in db.execute("SELECT id FROM outbox")]
    finally:
        db.close()
    assert logged["id"] in ids
    config.write_text(config.read_text().replace("mqtt://127.0.0.1:1", mosquitto.url))
    second = DaemonProc(config)
    try:
        assert listener.wait(lambda li: logged["id"] in [e["id"] for e in li.events()], 120)
        assert second.stop() == 0
    finally:
        second.kill9()
    assert _kinds(listener).count("arrived") == 1
