"""``doorstep-device run`` end to end: rendered and real frames in, MQTT events out (real Mosquitto)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest
from brokers import Mosquitto
from childproc import LineReader, stop
from conftest import SHARED
from test_alerts import Listener
from test_homeassistant import device_schema, event_schema

from device.alerts.payloads import SCHEMA_DIR
from host.render import render_demo, write_frames


def validator(name: str) -> jsonschema.Draft202012Validator:
    """The shipped schema (what a subscriber would use), not one generated now."""
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


CONFIG = """
device_id: porch-test
state_dir: state
presence:
  arrive_hits: 3
  arrive_window: 5
  remove_after_s: 3
  reminder_every_s: null
motion:
  max_idle_s: 0.5
mqtt:
  url: mqtt://127.0.0.1:1
  drain_timeout_s: {drain}
telemetry:
  interval_s: 2
"""


def daemon_cmd(tmp_path: Path, *args: str, drain: float = 30) -> list[str]:
    (tmp_path / "device.yaml").write_text(CONFIG.format(drain=drain))
    return [
        sys.executable,
        "-m",
        "device.cli",
        "run",
        "--config",
        str(tmp_path / "device.yaml"),
        "--log-format",
        "json",
        *args,
    ]


def run_daemon(tmp_path: Path, *args: str, drain: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        daemon_cmd(tmp_path, *args, drain=drain), capture_output=True, text=True, timeout=300
    )


def test_rendered_doorstep_arrival_then_removal_reaches_a_subscriber(
    mosquitto: Any, tmp_path: Path
) -> None:
    write_frames(render_demo(), tmp_path / "frames")  # parcel from frame 8 to 21
    listener = Listener(mosquitto.url)
    proc = run_daemon(
        tmp_path, "--source", str(tmp_path / "frames"), "--fps", "2", "--broker", mosquitto.url
    )
    assert proc.returncode == 0, proc.stderr
    assert listener.wait(lambda li: len(li.events()) >= 2)
    events = listener.events()
    assert [e["event"] for e in events] == ["arrived", "removed"]
    assert events[0]["time"] == 5.0  # the third sighting: frames 8, 9, 10 at 2 fps
    assert events[1]["time"] == 13.5  # last seen at frame 21 (10.5 s), gone 3 s later
    assert len({e["id"] for e in events}) == 2 and events[0]["model_sha256"] and events[0]["boxes"]
    states = [json.loads(p) for t, p, _ in listener.messages if t.endswith("/state")]
    assert states[-1]["present"] is False and states[-1]["model"]["name"] == "doorstep-parcel-ssd"
    logs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert logs[-1]["log"] == "stop" and logs[-1]["frames"] == 30 and logs[-1]["undelivered"] == 0
    assert not [
        t for t, _, _ in listener.messages if t.endswith("/events") and "porch-test" not in t
    ]
    listener.close()


def test_a_sequence_of_real_parcel_photos(
    mosquitto: Any, tmp_path: Path, coco_samples: Path
) -> None:
    """A fixed camera's view made of real photos: no parcel (owl.jpg), a real doorstep parcel
    (packages-v6/test) for 6 frames, then no parcel again: arrived, then removed."""
    parcels = SHARED / "data" / "packages-v6" / "test" / "images"
    if not parcels.is_dir():
        pytest.skip(f"needs {parcels} (the project's shared data)")
    empty = cv2.resize(cv2.imread(str(coco_samples / "owl.jpg")), (640, 480))
    parcel = cv2.resize(cv2.imread(str(sorted(parcels.glob("*.jpg"))[0])), (640, 480))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate([empty] * 3 + [parcel] * 6 + [empty] * 8):
        cv2.imwrite(str(frames / f"{i:03d}.png"), image)
    listener = Listener(mosquitto.url)
    proc = run_daemon(tmp_path, "--source", str(frames), "--fps", "2", "--broker", mosquitto.url)
    assert proc.returncode == 0, proc.stderr
    assert listener.wait(lambda li: len(li.events()) >= 2)
    events = listener.events()
    assert [e["event"] for e in events] == ["arrived", "removed"]
    assert events[0]["time"] == 2.5  # the third parcel frame (index 5) at 2 fps
    assert events[1]["time"] == 7.0  # last seen at index 8 (4.0 s), gone 3 s later
    x1, y1, x2, y2 = events[0]["boxes"][0]
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480 and events[0]["scores"][0] >= 0.5
    listener.close()


def test_payloads_snapshot_and_home_assistant_discovery(mosquitto: Any, tmp_path: Path) -> None:
    """Every payload validates against the shipped schema; the snapshot is a JPEG of the main
    stream while the parcel is there and cleared once it is gone; discovery describes it all."""
    write_frames(render_demo(), tmp_path / "frames")
    listener = Listener(mosquitto.url, topic="#")
    proc = run_daemon(
        tmp_path, "--source", str(tmp_path / "frames"), "--fps", "2", "--broker", mosquitto.url
    )
    assert proc.returncode == 0, proc.stderr
    assert listener.wait(lambda li: len(li.events()) >= 2)
    msgs = listener.messages
    for topic, payload, _ in msgs:
        kind = topic.split("/")[-1]
        if topic.startswith("doorstep/") and kind in ("events", "state", "telemetry"):
            validator({"events": "event"}.get(kind, kind)).validate(json.loads(payload))
        if topic.endswith("/availability"):
            validator("availability").validate(payload.decode())
    snaps = [p for t, p, _ in msgs if t == "doorstep/porch-test/snapshot"]
    assert len(snaps) == 2 and snaps[1] == b""  # one image at arrival, then cleared
    image = cv2.imdecode(np.frombuffer(snaps[0], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (480, 640)  # the main stream's size
    telemetry = [json.loads(p) for t, p, _ in msgs if t.endswith("/telemetry")]
    assert telemetry and telemetry[-1]["stages_ms"]["invoke"]["n"] > 0
    assert telemetry[-1]["rss_mb"] > 10
    # Home Assistant: one device config, in the documented form (tests/test_homeassistant.py),
    # and every event one its event entity fires on.
    configs = {t: json.loads(p) for t, p, _ in msgs if t.startswith("homeassistant/") and p}
    assert list(configs) == ["homeassistant/device/doorstep_porch_test/config"]
    (config,) = configs.values()
    device_schema().validate(config)
    cmps = config["cmps"]
    assert config["availability_topic"] == "doorstep/porch-test/availability"
    assert cmps["parcel"]["state_topic"] == "doorstep/porch-test/state"
    assert cmps["snapshot"]["image_topic"] == "doorstep/porch-test/snapshot"
    event_entity = cmps["parcel_event"]
    assert event_entity["state_topic"] == "doorstep/porch-test/events"
    for payload in listener.events():
        event_schema().validate(payload)
        assert payload["event_type"] in event_entity["event_types"]
    assert [e["event_type"] for e in listener.events()] == ["arrived", "removed"]
    # the update entity: installed from the state, latest from a pull rollout's desired
    model = cmps["model"]
    assert model["state_topic"] == "doorstep/porch-test/state"
    assert model["latest_version_topic"] == "doorstep/porch-test/desired"
    state = next(json.loads(p) for t, p, _ in msgs if t == "doorstep/porch-test/state")
    assert model["value_template"] == "{{ value_json.model.version }}" and state["model"]["version"]
    listener.close()


def test_broker_down_during_the_run_loses_no_event(
    make_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """The broker is gone while the parcel comes and goes; it returns while the daemon drains:
    both events arrive, each id once."""
    write_frames(render_demo(), tmp_path / "frames")
    broker = make_mosquitto(persistence=True)
    # A persistent session, kept across the broker's restart: the listener gets the events
    # whenever it is back, however soon the daemon reconnects.
    Listener(broker.url, session="porch-listener").close()
    broker.stop()
    proc = subprocess.Popen(
        daemon_cmd(
            tmp_path, "--source", str(tmp_path / "frames"), "--fps", "2", "--broker", broker.url
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = LineReader(proc.stderr, "daemon stderr")
    out = LineReader(proc.stdout, "daemon stdout", also=err)  # a failure shows both
    try:
        # wait until both events were decided, with no broker
        seen = [out.record_until(lambda r: r["log"] == "event", timeout=120)["id"] for _ in "12"]
        broker.start()
        rest = out.rest(timeout=120)  # the daemon drains its outbox, then stops
    finally:
        code = stop(proc)
    assert code == 0, err.text()
    stop_record = json.loads(rest[-1])
    assert stop_record["log"] == "stop" and stop_record["undelivered"] == 0
    listener = Listener(broker.url, session="porch-listener")
    assert listener.wait(lambda li: {e["id"] for e in li.events()} >= set(seen))
    assert sorted({e["id"] for e in listener.events()}) == sorted(seen)
    listener.close()


def test_a_restarted_daemon_delivers_what_the_last_run_could_not(
    mosquitto: Any, tmp_path: Path
) -> None:
    frames = render_demo()
    write_frames(frames, tmp_path / "frames")
    mosquitto.stop()
    first = run_daemon(
        tmp_path,
        "--source",
        str(tmp_path / "frames"),
        "--fps",
        "2",
        "--broker",
        mosquitto.url,
        drain=1,
    )
    assert first.returncode == 0, first.stderr
    stop = json.loads(first.stdout.splitlines()[-1])
    assert stop["undelivered"] == 2  # arrived and removed wait in the outbox on disk
    ids = [json.loads(line)["id"] for line in first.stdout.splitlines() if '"event"' in line]
    mosquitto.start()
    listener = Listener(mosquitto.url)
    write_frames(frames[:1], tmp_path / "empty")  # one frame, no parcel: no new event
    second = run_daemon(tmp_path, "--source", str(tmp_path / "empty"), "--broker", mosquitto.url)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.splitlines()[-1])["undelivered"] == 0
    assert listener.wait(lambda li: len(li.events()) >= 2)
    assert [e["id"] for e in listener.events()] == ids
    listener.close()


def test_jsonl_log_rotates(tmp_path: Path) -> None:
    from device.logsink import LogSink

    sink = LogSink(tmp_path / "log" / "d.jsonl", max_bytes=2000, backups=2, stdout_format="human")
    for i in range(200):
        sink.emit("telemetry", None, i=i, pad="x" * 50)
    sink.close()
    files = sorted(p.name for p in (tmp_path / "log").iterdir())
    assert files == ["d.jsonl", "d.jsonl.1", "d.jsonl.2"]
    last = [json.loads(line) for line in (tmp_path / "log" / "d.jsonl").read_text().splitlines()]
    assert last[-1]["i"] == 199 and all(e["log"] == "telemetry" for e in last)
    assert (tmp_path / "log" / "d.jsonl").stat().st_size <= 2000


def test_a_real_video_runs_to_its_end_and_every_event_is_well_formed(
    mosquitto: Any, tmp_path: Path, traffic_video: Path
) -> None:
    """Highway traffic: the parcel model mistakes some vehicles for parcels (0.53-0.62; see the
    model card), so events may come; the run must still end cleanly with every frame processed."""
    listener = Listener(mosquitto.url)
    proc = run_daemon(tmp_path, "--source", str(traffic_video), "--broker", mosquitto.url)
    assert proc.returncode == 0, proc.stderr
    logs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert logs[0]["log"] == "start" and logs[-1]["log"] == "stop" and logs[-1]["frames"] == 20
    for entry in (e for e in logs if e["log"] == "event"):
        assert entry["event"] in ("arrived", "reminder", "removed") and entry["model_sha256"]
        for x1, y1, x2, y2 in entry["boxes"]:
            assert 0 <= x1 < x2 <= 960 and 0 <= y1 < y2 <= 540
    assert listener.wait(
        lambda li: any(t.endswith("/availability") and p == b"offline" for t, p, _ in li.messages)
    )
    listener.close()


def test_no_source_is_a_config_error(tmp_path: Path) -> None:
    proc = run_daemon(tmp_path)
    assert proc.returncode == 2
    assert "no `source` configured" in proc.stderr


def test_shipped_schemas_match_the_code(tmp_path: Path) -> None:
    """`doorstep-device schemas` regenerates them; the repo's copies must not drift."""
    from device.alerts.payloads import write_schemas

    for path in write_schemas(tmp_path):
        shipped = SCHEMA_DIR / path.name
        assert shipped.exists(), (
            f"{shipped} missing: run doorstep-device schemas --out {SCHEMA_DIR}"
        )
        assert json.loads(path.read_text()) == json.loads(shipped.read_text()), (
            f"{shipped} is stale: run doorstep-device schemas --out device/schemas"
        )
