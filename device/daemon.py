"""``doorstep-device run``: frames -> motion gate -> detector -> presence -> MQTT, until stopped.

Finite sources (a video file, an image folder) end the run after their last frame, once the
outbox has drained, with exit code 0. SIGTERM and SIGINT stop cleanly: the frame in hand is
finished, events are flushed as far as the broker allows, availability turns offline. Logs are
JSON lines on stdout (the journal's human lines go to stderr).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device.camera.base import FrameSource
from device.config import DeviceConfig, FolderSourceConfig, OpenCVSourceConfig, SourceConfig
from device.detect.detector import Detection, Detector
from device.detect.preprocess import Yuv420Frame
from device.errors import ConfigError, DoorstepError
from device.motion import MotionGate
from device.presence import PresenceSettings, PresenceTracker, Zone
from device.sdnotify import Notifier


def open_source(cfg: SourceConfig) -> FrameSource:
    """The frame source a config names (one module per kind, imported only when used)."""
    if isinstance(cfg, FolderSourceConfig):
        from device.camera.folder import FolderSource

        return FolderSource(cfg.path, cfg.fps)
    if isinstance(cfg, OpenCVSourceConfig):
        from device.camera.opencv import OpenCVSource

        return OpenCVSource(cfg.uri, cfg.fps, cfg.loop)
    from device.camera.picamera2 import Picamera2Source

    return Picamera2Source(cfg.main_size, cfg.lores_size, cfg.fps, cfg.lores_format)


def log(kind: str, **fields: Any) -> None:
    print(json.dumps({"t": round(time.time(), 3), "log": kind, **fields}), flush=True)


def _scale(dets: list[Detection], sx: float, sy: float) -> list[Detection]:
    """Boxes found on the lores stream, in main-stream pixels (same field of view)."""
    return [
        Detection(
            d.label,
            d.class_id,
            d.score,
            (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy),
        )
        for d in dets
    ]


def run(
    cfg: DeviceConfig,
    stop: threading.Event | None = None,
    reload: threading.Event | None = None,
    reload_config: Callable[[], DeviceConfig] | None = None,
) -> int:
    """Run until a finite source ends or ``stop`` is set; ``reload`` (SIGHUP) reloads the model
    through ``reload_config``, keeping the running model if the new one fails."""
    stop = stop or threading.Event()
    reload = reload or threading.Event()
    notify = Notifier()
    if cfg.source is None:
        raise ConfigError("no `source` configured: say where frames come from (or pass --source)")
    det = Detector.open(cfg.model.path, cfg.model.labels, **cfg.model.detector_options())
    m = det.manifest
    roles = m.labels.roles
    sha = m.files[m.model_file].sha256 if m.model_file in m.files else ""
    p = cfg.presence
    tracker = PresenceTracker(
        PresenceSettings(
            p.arrive_hits,
            p.arrive_window,
            p.remove_after_s,
            p.reminder_every_s,
            p.person_overlap,
            tuple(Zone(z.name, tuple(z.polygon) if z.polygon else None) for z in p.zones),
        ),
        frozenset(roles.get("package", [])),
        frozenset(roles.get("person", [])),
        sha,
    )
    publisher = None
    if cfg.mqtt is not None:
        from device.alerts.mqtt import BrokerSettings, Publisher
        from device.alerts.outbox import Outbox

        q = cfg.mqtt
        broker = BrokerSettings(
            q.url,
            q.protocol,
            q.username,
            q.password_file,
            q.password_env,
            q.ca_file,
            q.cert_file,
            q.key_file,
            q.event_expiry_s,
        )
        publisher = Publisher(
            cfg.device_id, broker, Outbox(Path(cfg.state_dir) / "outbox.sqlite"), q.prefix
        )
        publisher.start()
    gate = MotionGate(min_changed=cfg.motion.min_changed, max_idle_s=cfg.motion.max_idle_s)
    log(
        "start",
        device_id=cfg.device_id,
        model=m.name,
        version=m.version,
        sha256=sha,
        runtime=det.runtime_version,
    )
    print(
        f"doorstep: {cfg.device_id} running {m.name} {m.version} on {det.runtime_version}",
        file=sys.stderr,
    )
    frames = inferences = 0
    source = open_source(cfg.source)
    last_status = 0.0
    try:
        with source:
            notify.ready(f"{m.name} {m.version} on {det.runtime_version}")
            while not stop.is_set():
                if reload.is_set():
                    reload.clear()
                    det, sha = _reload(det, sha, reload_config, notify)
                    tracker.model_sha256 = sha
                    m = det.manifest
                frame = source.read(timeout=5.0)
                notify.watchdog()  # from the frame loop: no frames, no petting
                if frame is None:
                    if source.live:
                        continue  # a live camera that paused: keep waiting
                    break
                frames += 1
                if frame.t - last_status >= 10:
                    last_status = frame.t
                    notify.status(
                        f"{frames} frames, {inferences} inferences, present: {tracker.present()}"
                    )
                if cfg.motion.enabled and not gate.should_run(frame.image, frame.t):
                    continue
                inferences += 1
                h, w = frame.image.shape[:2]
                if frame.lores is not None:
                    lores = frame.lores
                    lw, lh = (
                        (lores.width, lores.height)
                        if isinstance(lores, Yuv420Frame)
                        else lores.shape[1::-1]
                    )
                    dets = _scale(det.detect(lores), w / lw, h / lh)
                else:
                    dets = det.detect(frame.image)
                for event in tracker.update(frame.t, dets, w, h):
                    payload = event.to_json()
                    log("event", **payload)
                    print(
                        f"doorstep: {event.kind} in {event.zone} at t={event.time:.1f}s"
                        f"{' (possible theft)' if event.possible_theft else ''}",
                        file=sys.stderr,
                    )
                    if publisher is not None:
                        publisher.publish_event(payload)
                        publisher.publish_state(
                            {
                                "present": any(tracker.present().values()),
                                "zones": tracker.present(),
                                "since": event.since,
                                "model": {"name": m.name, "version": m.version, "sha256": sha},
                            }
                        )
    finally:
        notify.stopping()
        drained = True
        if publisher is not None:
            drained = publisher.drain(timeout=30.0)
            publisher.stop()
        log(
            "stop",
            frames=frames,
            inferences=inferences,
            skipped_by_motion=round(gate.skipped_fraction, 3),
            dropped=source.dropped,
            undelivered=0 if drained else -1,
        )
    return 0


def _reload(
    det: Detector, sha: str, reload_config: Callable[[], DeviceConfig] | None, notify: Notifier
) -> tuple[Detector, str]:
    """Load the configured model again; on any failure keep serving the current one."""
    if reload_config is None:
        return det, sha
    notify.reloading()
    try:
        cfg = reload_config()
        new = Detector.open(cfg.model.path, cfg.model.labels, **cfg.model.detector_options())
    except DoorstepError as exc:
        log("reload_failed", error=str(exc), keeping=det.manifest.name, sha256=sha)
        print(f"doorstep: reload failed, keeping the running model: {exc}", file=sys.stderr)
        notify.ready("reload failed; old model kept")
        return det, sha
    m = new.manifest
    new_sha = m.files[m.model_file].sha256 if m.model_file in m.files else ""
    log("reloaded", model=m.name, version=m.version, sha256=new_sha)
    notify.ready(f"{m.name} {m.version}")
    return new, new_sha


def install_signal_handlers(stop: threading.Event, reload: threading.Event | None = None) -> None:
    def handler(signum: int, frame: Any) -> None:
        print(f"doorstep: {signal.Signals(signum).name}: stopping", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
