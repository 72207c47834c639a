"""`doorstep-device capture`, `doorstep-host watch` and the demo's embedded broker, for real."""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest
from childproc import LineReader, stop

from device.alerts.mqtt import BrokerSettings, Publisher
from device.alerts.outbox import Outbox


def device_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device.cli", *args], capture_output=True, text=True, timeout=120
    )


def event(ident: str, device_id: str, **changes: Any) -> dict[str, Any]:
    """A complete, valid ``events`` payload (watch skips anything else)."""
    return {
        "event": "arrived",
        "id": ident,
        "seq": 1,
        "device_id": device_id,
        "time": 1.0,
        "wall_time": 0.0,
        "zone": "doorstep",
        "count": 1,
        "boxes": [[1.0, 2.0, 3.0, 4.0]],
        "scores": [0.9],
        "model_sha256": "e" * 64,
        "possible_theft": False,
        "since": 1.0,
        "arrival_id": ident,
        **changes,
    }


def test_capture_saves_frames_of_the_source(traffic_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "calib"
    proc = device_cli("capture", "--source", str(traffic_video), "--count", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.jpg"))
    assert len(files) == 5
    first = cv2.imread(str(files[0]))
    ok, frame0 = cv2.VideoCapture(str(traffic_video)).read()
    assert ok and first is not None and first.shape == frame0.shape
    # the same picture as the video's first frame, up to JPEG loss
    assert float(cv2.absdiff(first, frame0).mean()) < 3.0


def test_capture_every_spaces_frames_and_says_when_the_source_ends(
    traffic_video: Path, tmp_path: Path
) -> None:
    out = tmp_path / "spaced"
    rate = cv2.VideoCapture(str(traffic_video)).get(cv2.CAP_PROP_FPS)
    proc = device_cli(
        "capture",
        "--source",
        str(traffic_video),
        "--count",
        "100",
        "--every",
        str(4 / rate),
        "--out",
        str(out),
        "--format",
        "png",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 5  # 20 frames, every 4th
    assert "source ended after 5 of 100" in proc.stderr


def test_capture_bad_input(tmp_path: Path) -> None:
    proc = device_cli(
        "capture",
        "--source",
        str(tmp_path / "nope.mp4"),
        "--count",
        "3",
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "cannot open video source" in proc.stderr
    proc = device_cli("capture", "--source", "x.mp4", "--count", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "at least one frame" in proc.stderr


def test_watch_prints_events_once_each(mosquitto: Any, tmp_path: Path) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "watch", "--broker", mosquitto.url, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = LineReader(watch.stderr, "watch stderr")
    out = LineReader(watch.stdout, "watch stdout", also=err)  # a failure shows both
    try:
        # Publish only once the broker acknowledged watch's subscription: before that the
        # broker would drop the event (not retained), and watch would wait for it for ever.
        said = err.until(lambda line: "subscribed" in line, timeout=60)
        assert said.startswith(f"watching {mosquitto.url} doorstep/+/{{events,")
        pub = Publisher("door7", BrokerSettings(url=mosquitto.url), Outbox(tmp_path / "o.sqlite"))
        pub.start()
        assert pub.connected.wait(30)
        ev = event("abc", "door7")
        pub.publish_event(ev)
        pub.outbox.add("abc", f"{pub.base}/events", ev, "arrived")  # a redelivery, same id
        pub.kick()
        assert pub.drain(30)
        pub.stop()
        # online, the event (once: the redelivery is dropped), then offline
        lines = [json.loads(out.next(timeout=30)) for _ in range(3)]
    finally:
        stop(watch)
    kinds = [
        (m["kind"], m["payload"] if m["kind"] == "availability" else m["payload"]["id"])
        for m in lines
    ]
    assert kinds == [("availability", "online"), ("events", "abc"), ("availability", "offline")]
    assert out.rest(timeout=30) == []  # nothing more, after it was stopped


@pytest.mark.host
@pytest.mark.parametrize(
    "kind",
    [
        # amqtt 0.12 leaves its side of a disconnected client's socket to the garbage collector
        pytest.param(
            "amqtt",
            marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
        ),
        "mosquitto",
    ],
)
def test_embedded_broker_carries_events(kind: str, tmp_path: Path) -> None:
    from host.broker import EmbeddedBroker, find_mosquitto
    from host.watch import Watcher

    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    with EmbeddedBroker(prefer=kind) as broker:
        assert broker.kind == kind
        watcher = Watcher(BrokerSettings(broker.url, broker.protocol)).start()
        assert watcher.subscribed.wait(30)
        pub = Publisher(
            "door8", BrokerSettings(broker.url, broker.protocol), Outbox(tmp_path / "o.sqlite")
        )
        pub.start()
        pub.publish_event(event("e1", "door8"))
        assert pub.drain(30)
        assert watcher.wait(lambda w: [e["id"] for e in w.events()] == ["e1"], timeout=30)
        pub.stop()
        watcher.stop()
    port = broker.port
    with socket.socket() as s:  # stopped: nothing listens any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # What the broker left to the garbage collector goes now, under this test's warning
    # filter: otherwise it outlives the test (the locals still hold the broker) and is
    # collected in whichever test runs next (seen: the mosquitto variant, failed by it).
    del broker, watcher, pub
    gc.collect()
