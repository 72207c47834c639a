"""``doorstep-host demo``: the whole path on a fresh machine, with nothing downloaded.

It renders the synthetic doorstep sequence (host/render.py: a parcel appears, stays, is taken),
quantizes the shipped float parcel detector to a full-integer int8 bundle with those frames as
calibration, runs the device's detector on every frame, and writes an annotated contact sheet
(PNG) and an HTML page with the figures. Last, it runs the doorbell daemon on those frames with an
embedded MQTT broker (host/broker.py) and prints the alerts as a subscriber receives them, then
the per-stage latency.
"""

from __future__ import annotations

import html
import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np

from device.detect.detector import Detection, Detector
from device.detect.nms import box_iou
from device.draw import annotate
from device.errors import DoorstepError
from host.render import DemoFrame, render_demo, write_frames

MODELS = Path(__file__).resolve().parent / "models"
FLOAT_MODEL = MODELS / "parcel-ssd.keras"


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", file=sys.stderr, flush=True)


def contact_sheet(
    frames: list[DemoFrame], found: list[list[Detection]], path: Path, cols: int = 6
) -> Path:
    """A grid of annotated thumbnails, each captioned with truth and verdict (green right, red wrong)."""
    tiles = []
    for frame, dets in zip(frames, found, strict=True):
        tile = cv2.resize(annotate(frame.image, dets), (320, 240), interpolation=cv2.INTER_AREA)
        ok = bool(dets) == (frame.parcel is not None)
        colour = (60, 170, 60) if ok else (40, 40, 210)
        caption = f"{frame.index:02d} {'parcel' if frame.parcel else 'empty'}: " + (
            f"found {dets[0].score:.2f}" if dets else "nothing"
        )
        bar = np.full((26, 320, 3), colour, np.uint8)
        cv2.putText(
            bar, caption, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA
        )
        tiles.append(
            cv2.copyMakeBorder(
                np.vstack([tile, bar]), 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=colour
            )
        )
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]
    banner = np.full((36, rows[0].shape[1], 3), 30, np.uint8)
    cv2.putText(
        banner,
        "SYNTHETIC demo frames (rendered by doorstep) - int8 parcel detector",
        (10, 24),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.7,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    cv2.imwrite(str(path), np.vstack([banner, *rows]))
    return path


def run_demo(out_dir: str | Path) -> int:
    from device.bundle.store import load_bundle
    from host.quantize import quantize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _step(
        1,
        "rendering the synthetic doorstep: 30 frames, a parcel arrives at frame 8 and is taken at 22",
    )
    frames = render_demo()
    write_frames(frames, out / "frames")
    print(
        f"      {out / 'frames'}/ (synthetic: drawn by host/render.py, not photographed)",
        file=sys.stderr,
    )

    _step(
        2,
        f"doorstep-host quantize {FLOAT_MODEL.name}: full-integer int8, calibrated on those frames",
    )
    if not FLOAT_MODEL.is_file():
        raise DoorstepError(
            f"{FLOAT_MODEL}: the float parcel model is not here. It ships in the source tree, "
            "not in the wheel (a Pi installs only the int8 bundle): run the demo from a checkout "
            "(scripts/run demo)"
        )
    args = Namespace(
        model=str(FLOAT_MODEL),
        labels=str(MODELS / "labels.txt"),
        anchors=str(MODELS / "anchors.npy"),
        calib=[str(out / "frames")],
        out=str(out / "parcel-int8"),
        decoder="auto",
        input_type="uint8",
        max_images=300,
        normalization=None,
        resize=None,
        channel_order="RGB",
        role=[],
        threshold=0.5,
        iou=0.45,
        eval=None,
        label_map=[],
        max_drop=1.0,
        fix=False,
        name="doorstep-parcel-ssd-demo",
        model_version="demo",
        force=True,
    )
    quantize(args)

    _step(3, f"doorstep-device detect {out / 'frames'}/ --model {out / 'parcel-int8'}")
    det = Detector(load_bundle(out / "parcel-int8"))
    found = [det.detect(f.image) for f in frames]
    times = []
    for f in frames[:10]:
        det.detect(f.image)
        times.append(det.last_times.total)
    present = [i for i, f in enumerate(frames) if f.parcel]
    absent = [i for i, f in enumerate(frames) if not f.parcel]
    hits = [i for i in present if found[i]]
    alarms = [i for i in absent if found[i]]
    ious = [
        box_iou(np.array(frames[i].parcel, float), np.array([found[i][0].box]))[0] for i in hits
    ]
    figures = {
        "frames with the parcel": len(present),
        "found in": len(hits),
        "frames without it": len(absent),
        "false alarms": len(alarms),
        "mean box IoU": round(float(np.mean(ious)), 3) if ious else 0.0,
        "ms per frame (p50, preprocess+invoke+decode)": round(float(np.median(times)), 2),
        "runtime": det.runtime_version,
    }

    _step(4, "writing the contact sheet and the page")
    sheet = contact_sheet(frames, found, out / "contact_sheet.png")
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in figures.items()
    )
    (out / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>doorstep demo</title>"
        "<h1>doorstep demo: <em>synthetic</em> doorstep, int8 parcel detector</h1>"
        "<p>Frames are rendered by code (no photo ships with doorstep). The parcel arrives at frame 8 "
        "and is taken at frame 22. Green: right, red: wrong.</p>"
        f"<table border=1 cellpadding=4>{rows}</table><p><img src='{sheet.name}' width=100%></p>\n"
    )
    print("\n".join(f"  {k}: {v}" for k, v in figures.items()))
    print(f"open {out / 'index.html'} (or {sheet}) to see every frame")
    ok = len(hits) == len(present) and not alarms
    return run_daemon_demo(out, out / "parcel-int8") if ok else 1


DAEMON_CONFIG = """\
# Written by `doorstep-host demo`: the daemon on the rendered frames, 2 frames a second.
device_id: demo-porch
state_dir: state
model:
  path: {model}
  num_threads: 1
source:
  type: folder
  path: frames
  fps: 2
mqtt:
  url: {url}
  protocol: "{protocol}"
presence:
  arrive_hits: 3
  arrive_window: 5
  remove_after_s: 3
  reminder_every_s: null
motion:
  max_idle_s: 0.5
telemetry:
  log_file: daemon.jsonl
"""


def run_daemon_demo(out: Path, model: Path) -> int:
    """`doorstep-device run` on the frames, alerts shown as a subscriber receives them."""
    from device.alerts.mqtt import BrokerSettings
    from device.config import load_config
    from device.daemon import Daemon
    from host.broker import EmbeddedBroker
    from host.watch import Message, Watcher, describe

    # DOORSTEP_DEMO_BROKER=amqtt|mosquitto picks one (default: mosquitto when installed)
    with EmbeddedBroker(prefer=os.environ.get("DOORSTEP_DEMO_BROKER", "auto")) as broker:
        _step(
            5,
            f"doorstep-device run on those frames, publishing to an embedded {broker.kind} broker "
            f"at {broker.url}; a subscriber prints what arrives",
        )
        conf = out / "device.yaml"
        conf.write_text(
            DAEMON_CONFIG.format(model=model.resolve(), url=broker.url, protocol=broker.protocol)
        )
        cfg = load_config(conf)

        def show(msg: Message) -> None:
            line = describe(msg)
            if line is not None:
                print(f"      subscriber: {line}", flush=True)

        watcher = Watcher(BrokerSettings(broker.url, broker.protocol), on_message=show).start()
        watcher.subscribed.wait(10)
        daemon = Daemon(cfg, log_format="human")
        daemon.run()
        watcher.wait(lambda w: len(w.events()) >= 2, timeout=10)
        watcher.stop()
    kinds = [e["event"] for e in watcher.events()]
    stop = [
        json.loads(line)
        for line in (out / "daemon.jsonl").read_text().splitlines()
        if '"log": "stop"' in line
    ][-1]
    print("\nlatency per stage over the run (ms, 1 thread):")
    print(f"  {'stage':<13}{'p50':>8}{'p95':>8}{'max':>8}{'n':>6}")
    for stage, st in stop["stages_ms"].items():
        print(f"  {stage:<13}{st['p50']:>8.2f}{st['p95']:>8.2f}{st['max']:>8.2f}{st['n']:>6}")
    print(f"alerts received: {', '.join(kinds) or 'none'}; log: {out / 'daemon.jsonl'}")
    return 0 if kinds == ["arrived", "removed"] else 1
