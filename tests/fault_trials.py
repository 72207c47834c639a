"""Fault trials: the real daemon killed at random instants, its broker killed, its disk filled.

    python tests/fault_trials.py [--kills 50] [--broker-kills 20] [--seed 1] [--json FILE]
    (or: scripts/run faults)

A still-image "camera" whose scene flips between real photos (a porch with a parcel, without)
at random intervals, a real Mosquitto and a subscriber that de-duplicates by id, as Home
Assistant or a script would. For each fault class it counts the events the daemon raised
(every id any output showed: its log, or the subscriber), delivered, lost, redelivered (the
same id again: allowed, subscribers de-duplicate) and duplicated (a second ``arrived`` for a
parcel already announced, or a ``removed`` that does not name the arrival it ends), and prints
a table. Needs mosquitto and ../shared; the full-disk episode needs root (a tmpfs).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brokers import Mosquitto
from daemonproc import DaemonProc, Scene, porch_scenes
from test_alerts import Listener

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIG = """
device_id: porch-trials
state_dir: {state}
presence: {{arrive_hits: 3, arrive_window: 5, remove_after_s: 2, reminder_every_s: null}}
motion: {{max_idle_s: 0.3}}
telemetry: {{interval_s: 5}}
source: {{type: still, path: {scene}, fps: 10}}
mqtt: {{url: {url}, drain_timeout_s: 20}}
"""


class Flipper:
    """Flips the scene between ``parcel`` and ``empty`` every 2.5-5 s, in its own thread."""

    def __init__(self, scene: Scene, rng: random.Random) -> None:
        self.scene, self.rng = scene, rng
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(2.5, 5.0)):
            self.scene.show("empty" if self.scene.current == "parcel" else "parcel")

    def __enter__(self) -> Flipper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def check(logged: dict[str, dict[str, Any]], listener: Listener, outbox: Path) -> dict[str, Any]:
    """The figures for one fault class, from what was logged and what the subscriber got."""
    received = listener.events()
    unique: dict[str, dict[str, Any]] = {}
    for e in received:
        unique.setdefault(e["id"], e)
    raised = {**unique, **logged}
    left = set()
    if outbox.exists():
        db = sqlite3.connect(outbox)
        try:
            left = {r[0] for r in db.execute("SELECT id FROM outbox")}
        finally:
            db.close()
    lost = sorted(set(logged) - set(unique) - left)  # neither received nor still held
    undelivered = sorted(set(logged) & left)
    present_arrival: str | None = None
    doubles = mismatched = 0
    for e in sorted(raised.values(), key=lambda e: (e["wall_time"], e["seq"])):
        if e["event"] == "arrived":
            doubles += present_arrival is not None
            present_arrival = e["id"]
        elif e["event"] == "removed":
            mismatched += e["arrival_id"] != present_arrival
            present_arrival = None
    return {
        "raised": len(raised),
        "arrived": sum(e["event"] == "arrived" for e in raised.values()),
        "delivered": len(set(raised) & set(unique)),
        "lost": len(lost),
        "undelivered": len(undelivered),
        "redelivered": len(received) - len(unique),
        "duplicated": doubles + mismatched,
        "lost_ids": lost[:10],
    }


def _drain(config: Path, scene: Scene, listener: Listener, logged: dict[str, Any]) -> None:
    """A last, clean run on an empty porch: what is present is removed, the outbox empties."""
    scene.show("empty")
    final = DaemonProc(config)
    try:
        final.record("start", timeout=120)
        time.sleep(4)  # longer than remove_after_s: a parcel left over is removed
        final.stop(60)
    finally:
        final.kill9()
    for r in final.all_records():
        if r.get("log") == "event":
            logged[r["id"]] = r
    listener.wait(lambda li: set(logged) <= {e["id"] for e in li.events()}, 60)


def kill_trials(n: int, rng: random.Random, broker: Mosquitto, work: Path) -> dict[str, Any]:
    """kill -9 at random instants; every other trial the instant an event is logged."""
    work.mkdir(parents=True)
    scene = Scene(work / "scene.png", porch_scenes(SHARED, SHARED / "data" / "coco-samples"))
    scene.show("empty")
    config = work / "device.yaml"
    config.write_text(CONFIG.format(state=work / "state", scene=scene.path, url=broker.url))
    listener = Listener(broker.url, "doorstep/porch-trials/events")
    logged: dict[str, dict[str, Any]] = {}
    at_event = 0
    with Flipper(scene, rng):
        for i in range(n):
            daemon = DaemonProc(config)
            try:
                daemon.record("start", timeout=120)
                if i % 2:
                    try:
                        daemon.record("event", timeout=15)
                        at_event += 1
                    except AssertionError:
                        pass  # no event within 15 s: killed now
                else:
                    time.sleep(rng.uniform(0.0, 6.0))  # the random instant itself
            finally:
                daemon.kill9()
            for r in daemon.all_records():
                if r.get("log") == "event":
                    logged[r["id"]] = r
            print(f"\r  kill -9 trials: {i + 1}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    _drain(config, scene, listener, logged)
    out = check(logged, listener, work / "state" / "outbox.sqlite")
    listener.close()
    return {"fault": f"kill -9 ({n} trials, {at_event} at an event)", **out}


def broker_trials(n: int, rng: random.Random, work: Path) -> dict[str, Any]:
    """The broker killed (-9) and restarted at random instants while parcels come and go.

    The subscriber has a persistent session on a broker with persistence, as Home Assistant
    would: what is published while it reconnects is queued for it. The daemon deletes an event
    from its outbox only on the broker's PUBACK (or when it drops one, which it counts): an
    event neither received nor still in the outbox, with nothing dropped, was acknowledged by
    the broker and lost there (a kill -9 before the broker's autosave). That is counted apart
    (``lost_at_broker``), not as the device's loss."""
    work.mkdir(parents=True)
    broker = Mosquitto(work / "broker", persistence=True)
    broker.start()
    scene = Scene(work / "scene.png", porch_scenes(SHARED, SHARED / "data" / "coco-samples"))
    scene.show("empty")
    config = work / "device.yaml"
    config.write_text(CONFIG.format(state=work / "state", scene=scene.path, url=broker.url))
    listener = Listener(broker.url, "doorstep/porch-trials/events", session="trials-subscriber")
    daemon = DaemonProc(config)
    try:
        daemon.record("start", timeout=120)
        with Flipper(scene, rng):
            for i in range(n):
                time.sleep(rng.uniform(0.5, 4.0))
                assert broker.proc is not None
                broker.proc.kill()
                broker.proc.wait(10)
                time.sleep(rng.uniform(0.0, 3.0))  # down for a while: events wait in the outbox
                broker.start()
                print(f"\r  broker kills: {i + 1}/{n}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        scene.show("empty")
        time.sleep(4)
        daemon.stop(60)
        records = daemon.all_records()
        logged = {r["id"]: r for r in records if r.get("log") == "event"}
        listener.wait(lambda li: set(logged) <= {e["id"] for e in li.events()}, 60)
    finally:
        daemon.kill9()
        listener.close()
        broker.stop()
    out = check(logged, listener, work / "state" / "outbox.sqlite")
    reports = [r for r in records if r.get("log") == "telemetry"]
    dropped = sum(reports[-1]["events_dropped"].values()) if reports else 0
    if not dropped:
        out["lost_at_broker"], out["lost"] = out["lost"], 0
    out["dropped_by_device"] = dropped
    return {"fault": f"broker kill -9 ({n} kills)", **out}


def disk_episode(rng: random.Random, broker: Mosquitto, work: Path) -> dict[str, Any]:
    """The state directory's disk fills mid-run for ~15 s, parcels come and go, then it is freed."""
    import os

    from fsfaults import fill, free, small_tmpfs

    if os.geteuid() != 0:
        return {"fault": "full disk (skipped: mounting a tmpfs needs root)"}
    work.mkdir(parents=True)
    scene = Scene(work / "scene.png", porch_scenes(SHARED, SHARED / "data" / "coco-samples"))
    scene.show("empty")
    with small_tmpfs(work / "state", size_kib=4096) as disk:
        config = work / "device.yaml"
        config.write_text(CONFIG.format(state=disk, scene=scene.path, url=broker.url))
        listener = Listener(broker.url, "doorstep/porch-trials/events")
        daemon = DaemonProc(config)
        try:
            daemon.record("start", timeout=120)
            with Flipper(scene, rng):
                fill(disk)
                time.sleep(15)
                free(disk)
                time.sleep(10)
            scene.show("empty")
            time.sleep(4)
            daemon.stop(60)
        finally:
            daemon.kill9()
        records = daemon.all_records()
        logged = {r["id"]: r for r in records if r.get("log") == "event"}
        listener.wait(lambda li: set(logged) <= {e["id"] for e in li.events()}, 60)
        out = check(logged, listener, disk / "outbox.sqlite")
        out["degraded_episodes"] = sum(r.get("log") == "storage_degraded" for r in records)
        listener.close()
    return {"fault": "full disk (15 s, then freed)", **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--broker-kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument(
        "--only", choices=["kills", "broker", "disk"], action="append", help="run just these"
    )
    args = ap.parse_args(argv)
    if not (SHARED / "data" / "packages-v6").is_dir():
        print(f"fault trials: needs {SHARED}/data (the project's shared data)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="doorstep-trials-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker")
        broker.start()
        try:
            only = set(args.only or ["kills", "broker", "disk"])
            if "kills" in only:
                rows.append(kill_trials(args.kills, rng, broker, root / "kills"))
            if "broker" in only:
                rows.append(broker_trials(args.broker_kills, rng, root / "broker-kills"))
            if "disk" in only:
                rows.append(disk_episode(rng, broker, root / "disk"))
        finally:
            broker.stop()
    cols = ["raised", "arrived", "delivered", "undelivered", "lost", "redelivered", "duplicated", "lost_at_broker"]
    print("| fault | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for row in rows:
        print(f"| {row['fault']} | " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
    for row in rows:
        if row.get("lost_ids"):
            print(f"{row['fault']}: not received: {row['lost_ids']} ({row['undelivered']} still in the outbox)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    bad = any(row.get("lost") or row.get("duplicated") for row in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
