"""``doorstep-device run``: frames -> motion gate -> detector -> presence -> MQTT, until stopped.

Finite sources (a video file, an image folder) end the run after their last frame, once the
outbox has drained, with exit code 0. SIGTERM and SIGINT stop cleanly: the frame in hand is
finished, events are flushed as far as the broker allows, availability turns offline. SIGHUP
reloads the config's model, keeping the running one if the new one fails to load, verify or
pass its self-test inference.

Every record goes to the JSON-lines log (rotated); people get short lines on stdout (the journal
under systemd). Telemetry (per-stage latency, rates, CPU, memory, temperature, power) is logged
and published every ``telemetry.interval_s``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from device import __version__
from device.alerts.payloads import (
    EventPayload,
    ModelInfo,
    SelfTest,
    StatePayload,
    TelemetryPayload,
)
from device.camera.base import Frame, FrameSource
from device.config import (
    DeviceConfig,
    FolderSourceConfig,
    OpenCVSourceConfig,
    SourceConfig,
    StillSourceConfig,
)
from device.detect.detector import Detection, Detector
from device.detect.preprocess import Yuv420Frame
from device.errors import ConfigError, DoorstepError
from device.install import Store, load_checked, trusted_keys, write_daemon_record
from device.logsink import LogSink, default_log_file
from device.motion import MotionGate
from device.presence import Event, PresenceSettings, PresenceTracker, Zone
from device.sdnotify import Notifier
from device.telemetry import StageWindow, Telemetry

if TYPE_CHECKING:  # typing only: paho and the meters are imported when configured
    from device.alerts.mqtt import Publisher
    from device.power import EnergyCounter, PowerMeter


def open_source(cfg: SourceConfig) -> FrameSource:
    """The frame source a config names (one module per kind, imported only when used)."""
    if isinstance(cfg, FolderSourceConfig):
        from device.camera.folder import FolderSource

        return FolderSource(cfg.path, cfg.fps)
    if isinstance(cfg, OpenCVSourceConfig):
        from device.camera.opencv import OpenCVSource

        return OpenCVSource(cfg.uri, cfg.fps, cfg.loop, cfg.live)
    if isinstance(cfg, StillSourceConfig):
        from device.camera.still import StillSource

        return StillSource(cfg.path, cfg.fps)
    from device.camera.picamera2 import Picamera2Source

    return Picamera2Source(cfg.main_size, cfg.lores_size, cfg.fps, cfg.lores_format)


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


def model_sha(det: Detector) -> str:
    m = det.manifest
    return m.files[m.model_file].sha256 if m.model_file in m.files else ""


def self_test(det: Detector) -> dict[str, Any]:
    """One inference on a synthetic frame: the model loads, runs, gives finite outputs and
    scores that are not all zero (a collapsed int8 model)."""
    from device.bench import synthetic_frame

    t0 = time.perf_counter()
    try:
        det.detect(synthetic_frame(640, 480, seed=7))
        if det.last_peak_score() <= 0.0:
            raise DoorstepError("every class score is 0: the model's scores collapsed")
    except DoorstepError as exc:
        return {"ok": False, "ms": 0.0, "time": round(time.time(), 3), "error": str(exc)}
    ms = (time.perf_counter() - t0) * 1e3
    return {"ok": True, "ms": round(ms, 2), "time": round(time.time(), 3), "error": None}


def model_candidates(cfg: DeviceConfig) -> list[Path | None]:
    """What to load, in order: ``model.path`` if set; else the deployed ``current``, then
    ``previous``, then the shipped model (None), so a bad deployment never leaves a doorbell
    without a model after a restart."""
    if cfg.model.path is not None:
        return [cfg.model.path]
    store = Store(Path(cfg.state_dir))
    links = [link.resolve() for link in (store.current, store.previous) if link.exists()]
    return [*links, None]


def open_detector(
    cfg: DeviceConfig, fallback: bool = False
) -> tuple[Detector, Path | None, dict[str, Any]]:
    """The configured model, checked: its signature when ``signing.public_keys`` is set, a
    ``package`` class, and a passing self-test inference (returned). With ``fallback``, the
    first candidate (see :func:`model_candidates`) that passes all of it."""
    candidates = model_candidates(cfg)
    if not fallback:
        candidates = candidates[:1]
    problems: list[str] = []
    for i, path in enumerate(candidates):
        try:
            det = _open_one(cfg, path)
            if not det.manifest.labels.roles.get("package"):
                raise DoorstepError(
                    f"{det.bundle.source}: no class has the role 'package': nothing to track"
                )
            test = self_test(det)
            if not test["ok"]:
                raise DoorstepError(f"self-test inference failed: {test['error']}")
            if i:
                print(
                    f"doorstep: fell back to {path or 'the shipped model'}: " + "; ".join(problems),
                    file=sys.stderr,
                )
            return det, path, test
        except DoorstepError as exc:
            if i == len(candidates) - 1:
                raise DoorstepError("; ".join([*problems, str(exc)])) from None
            problems.append(f"{path}: {exc}")
    raise AssertionError("unreachable")


def _open_one(cfg: DeviceConfig, path: Path | None) -> Detector:
    opts = cfg.model.detector_options()
    if cfg.signing.public_keys and path is not None:
        if path.suffix == ".tflite":
            raise DoorstepError(
                f"{path}: signing.public_keys is set, and a bare .tflite carries no signature: "
                "bundle and sign it (doorstep-host sign)"
            )
        return Detector(load_checked(path, trusted_keys(cfg.signing.public_keys)), **opts)
    return Detector.open(path, cfg.model.labels, **opts)


class Health:
    """CPU, memory, temperature, throttling and power for telemetry reports.

    With a power meter configured, it is read every ``telemetry.power_sample_s`` from the frame
    loop and the readings are integrated (``EnergyCounter``) into mean watts and millijoules per
    inference over the report window."""

    def __init__(self, cfg: DeviceConfig) -> None:
        from device import sysstats

        self._sys = sysstats
        self._cpu = sysstats.ProcessCpu()
        self._meter: PowerMeter | None = None
        self._energy: EnergyCounter | None = None
        self._every = cfg.telemetry.power_sample_s
        self._next = 0.0
        if cfg.power is not None:
            from device.power import EnergyCounter, open_meter

            self._meter = open_meter(cfg.power)
            self._energy = EnergyCounter(window_s=cfg.telemetry.interval_s)

    def inference(self) -> None:
        if self._energy is not None:
            self._energy.inference()

    def sample(self, force: bool = False) -> None:
        """Read the meter if a sample is due (cheap to call every frame)."""
        if self._meter is None or self._energy is None:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._every
        try:
            self._energy.add(self._meter.read())
        except DoorstepError as exc:
            print(f"doorstep: power meter: {exc}", file=sys.stderr)

    def __call__(self) -> dict[str, Any]:
        power = None
        if self._energy is not None:
            self.sample(force=True)
            summary = self._energy.summary()
            power = summary.as_payload() if summary is not None else None
        try:
            flags = self._sys.throttled()
        except DoorstepError:
            flags = None
        return {
            "cpu_percent": round(self._cpu.sample() * 100, 2),
            "rss_mb": round(self._sys.rss_mb(), 1),
            "cpu_temp_c": self._sys.cpu_temp_c(),
            "throttled": flags,
            "power": power,
        }


class Daemon:
    def __init__(
        self,
        cfg: DeviceConfig,
        stop: threading.Event | None = None,
        reload: threading.Event | None = None,
        reload_config: Callable[[], DeviceConfig] | None = None,
        log_format: Literal["human", "json"] = "human",
    ) -> None:
        if cfg.source is None:
            raise ConfigError(
                "no `source` configured: say where frames come from (or pass --source)"
            )
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.reload = reload or threading.Event()
        self.reload_config = reload_config
        self.notify = Notifier()
        t = cfg.telemetry
        self.log = LogSink(
            t.log_file or default_log_file(Path(cfg.state_dir)),
            int(t.log_max_mb * 1e6),
            t.log_backups,
            log_format,
        )
        if cfg.model.num_threads is not None:
            import cv2

            # OpenCV's own pool for small per-frame images costs more in hand-offs than it
            # saves; give the whole pipeline the interpreter's thread budget.
            cv2.setNumThreads(cfg.model.num_threads)
        self.store = Store(Path(cfg.state_dir))
        self.det, self.model_dir, self.test = open_detector(cfg, fallback=True)
        self.sha = model_sha(self.det)
        self.started = round(time.time(), 3)
        self.last_reload: dict[str, Any] | None = None
        self.last_event: dict[str, Any] | None = None
        roles = self.det.manifest.labels.roles
        p = cfg.presence
        self.tracker = PresenceTracker(
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
            self.sha,
        )
        self.gate = MotionGate(min_changed=cfg.motion.min_changed, max_idle_s=cfg.motion.max_idle_s)
        self.health = Health(cfg)
        self.telemetry = Telemetry(t.interval_s, StageWindow(t.window), self.health)
        self.publisher: Publisher | None = None
        self.source = open_source(cfg.source)

    # -- MQTT
    def _start_publisher(self) -> None:
        q = self.cfg.mqtt
        if q is None:
            return
        from device.alerts.homeassistant import discovery_configs
        from device.alerts.mqtt import BrokerSettings, Publisher
        from device.alerts.outbox import Outbox

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
            discovery_prefix=q.discovery_prefix if q.home_assistant else None,
        )
        self.publisher = Publisher(
            self.cfg.device_id,
            broker,
            Outbox(Path(self.cfg.state_dir) / "outbox.sqlite"),
            q.prefix,
        )
        if q.home_assistant:
            self.publisher.set_discovery(
                discovery_configs(
                    self.cfg.device_id,
                    self.publisher.base,
                    self.det.manifest.name,
                    __version__,
                    q.discovery_prefix,
                )
            )
        self._publish_state()
        self.publisher.start()

    def state(self) -> dict[str, Any]:
        m = self.det.manifest
        return StatePayload(
            device_id=self.cfg.device_id,
            present=any(self.tracker.present().values()),
            zones=self.tracker.present(),
            count=self.tracker.count(),
            since=self.tracker.since(),
            model=ModelInfo(name=m.name, version=m.version, sha256=self.sha),
            self_test=SelfTest(**self.test),
            doorstep_version=__version__,
            runtime=self.det.runtime_version,
            updated=round(time.time(), 3),
        ).model_dump(mode="json")

    def _record(self, state: str = "running") -> None:
        """``<state_dir>/daemon.json``: what ``doorstep-device status`` (and deploy) reads."""
        m = self.det.manifest
        ident = None
        if self.model_dir is not None and self.model_dir.parent.name == "models":
            ident = self.model_dir.name
        write_daemon_record(
            self.store,
            {
                "pid": os.getpid(),
                "state": state,
                "systemd": "NOTIFY_SOCKET" in os.environ,
                "model_sha256": self.sha,
                "bundle_id": ident,
                "model": {"name": m.name, "version": m.version},
                "self_test": self.test,
                "last_reload": self.last_reload,
                "last_event": self.last_event,
                "started": self.started,
                "updated": round(time.time(), 3),
            },
        )

    def _publish_state(self) -> None:
        if self.publisher is not None:
            self.publisher.publish_state(self.state())

    def _snapshot(self, frame: Frame, event: Event) -> None:
        q = self.cfg.mqtt
        if self.publisher is None or q is None or not q.snapshot:
            return
        if event.kind == "removed":
            if not any(self.tracker.present().values()):
                self.publisher.publish_snapshot(None)
            return
        if event.kind != "arrived":
            return
        import cv2

        image = frame.image.copy()
        for x1, y1, x2, y2 in self.tracker.boxes():
            cv2.rectangle(image, (round(x1), round(y1)), (round(x2), round(y2)), (0, 200, 255), 3)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q.snapshot_quality])
        if ok:
            self.publisher.publish_snapshot(jpeg.tobytes())

    # -- the loop
    def run(self) -> int:
        cfg, det, m = self.cfg, self.det, self.det.manifest
        self.log.emit(
            "start",
            f"{cfg.device_id} running {m.name} {m.version} on {det.runtime_version} "
            f"(self-test {self.test['ms']:.1f} ms); log {self.log.path}",
            device_id=cfg.device_id,
            model=m.name,
            version=m.version,
            sha256=self.sha,
            runtime=det.runtime_version,
            self_test=self.test,
            doorstep_version=__version__,
        )
        self._record()
        self._start_publisher()
        tel, counts = self.telemetry, self.telemetry.total
        last_status = 0.0
        try:
            with self.source:
                self.notify.ready(f"{m.name} {m.version} on {det.runtime_version}")
                while not self.stop.is_set():
                    if self.reload.is_set():
                        self.reload.clear()
                        self._reload()
                    t0 = time.perf_counter()
                    frame = self.source.read(timeout=5.0)
                    t1 = time.perf_counter()
                    self.notify.watchdog()  # from the frame loop: no frames, no petting
                    self.health.sample()
                    if tel.due():
                        self._report()
                    if frame is None:
                        if self.source.live:
                            continue  # a live camera that paused: keep waiting
                        break
                    tel.stage("capture_wait", (t1 - t0) * 1e3)
                    counts.frames += 1
                    counts.dropped = self.source.dropped
                    if frame.t - last_status >= 10:
                        last_status = frame.t
                        self.notify.status(
                            f"{counts.frames} frames, {counts.inferences} inferences, "
                            f"present: {self.tracker.present()}"
                        )
                    self._frame(frame, t1)
        finally:
            self.notify.stopping()
            drained = True
            if self.publisher is not None and self.cfg.mqtt is not None:
                drained = self.publisher.drain(timeout=self.cfg.mqtt.drain_timeout_s)
            report = self._report()
            if self.publisher is not None:
                self.publisher.stop()
            self.log.emit(
                "stop",
                f"stopped after {counts.frames} frames, {counts.inferences} inferences"
                + ("" if drained else "; some events were not acknowledged (kept in the outbox)"),
                frames=counts.frames,
                inferences=counts.inferences,
                skipped_by_motion=round(self.gate.skipped_fraction, 3),
                dropped=self.source.dropped,
                undelivered=len(self.publisher.outbox) if self.publisher is not None else 0,
                stages_ms=report["stages_ms"],
            )
            self.log.close()
            self._record("stopped")
        return 0

    def _frame(self, frame: Frame, t_start: float) -> None:
        """Preprocess (the lores stream when the camera gives one), gate on motion at the
        model's size, then invoke, decode and track."""
        tel, det = self.telemetry, self.det
        h, w = frame.image.shape[:2]
        src = frame.lores if frame.lores is not None else frame.image
        det.prepare(src)
        if self.cfg.motion.enabled:
            t_gate = time.perf_counter()
            run = self.gate.should_run(det.transform.canvas, frame.t)
            tel.stage("motion", (time.perf_counter() - t_gate) * 1e3)
            if not run:
                tel.stage("preprocess", det.prepared_ms)
                tel.total.skipped += 1
                return
        tel.total.inferences += 1
        self.health.inference()
        dets = det.run()
        if frame.lores is not None:
            lores = frame.lores
            lw, lh = (
                (lores.width, lores.height)
                if isinstance(lores, Yuv420Frame)
                else lores.shape[1::-1]
            )
            dets = _scale(dets, w / lw, h / lh)
        st = det.last_times
        tel.stage("preprocess", st.preprocess)
        tel.stage("invoke", st.invoke)
        tel.stage("decode", st.decode)
        t_p0 = time.perf_counter()
        events = self.tracker.update(frame.t, dets, w, h)
        t_p1 = time.perf_counter()
        tel.stage("presence", (t_p1 - t_p0) * 1e3)
        for event in events:
            payload = EventPayload(
                **event.to_json(), device_id=self.cfg.device_id, wall_time=round(time.time(), 3)
            ).model_dump(mode="json")
            theft = " (possible theft)" if event.possible_theft else ""
            self.log.emit(
                "event",
                f"parcel {event.kind} in {event.zone} at t={event.time:.1f}s{theft}",
                **payload,
            )
            if self.publisher is not None:
                self.publisher.publish_event(payload)
                self._snapshot(frame, event)
            self.last_event = {k: payload[k] for k in ("event", "id", "zone", "wall_time")}
        if events:
            self._publish_state()
            self._record()
        t_end = time.perf_counter()
        tel.stage("publish", (t_end - t_p1) * 1e3)
        tel.stage("pipeline", (t_end - t_start) * 1e3)

    def _report(self) -> dict[str, Any]:
        fields = self.telemetry.report()
        fields["outbox"] = len(self.publisher.outbox) if self.publisher is not None else 0
        payload = TelemetryPayload(device_id=self.cfg.device_id, **fields).model_dump(mode="json")
        pipe = payload["stages_ms"].get("pipeline", {})
        inv = payload["stages_ms"].get("invoke", {})
        self.log.emit(
            "telemetry",
            f"{payload['fps']:.1f} fps, {payload['inference_fps']:.1f} inferences/s, "
            f"pipeline p50 {pipe.get('p50', 0):.1f} ms (invoke {inv.get('p50', 0):.1f}), "
            f"cpu {payload['cpu_percent']:.0f}%, rss {payload['rss_mb']:.0f} MB",
            **payload,
        )
        if self.publisher is not None:
            self.publisher.publish_telemetry(payload)
        return payload

    def _reload(self) -> None:
        """Load the configured model again; on any failure keep serving the current one."""
        if self.reload_config is None:
            return
        self.notify.reloading()
        try:
            cfg = self.reload_config()
            new, new_dir, test = open_detector(cfg)
        except DoorstepError as exc:
            self.last_reload = {"ok": False, "error": str(exc), "time": round(time.time(), 3)}
            self._record()
            self.log.emit(
                "reload_failed",
                f"reload failed, keeping the running model: {exc}",
                error=str(exc),
                keeping=self.det.manifest.name,
                sha256=self.sha,
            )
            self.notify.ready("reload failed; old model kept")
            return
        self.det, self.sha, self.test, self.model_dir = new, model_sha(new), test, new_dir
        self.tracker.model_sha256 = self.sha
        roles = new.manifest.labels.roles
        self.tracker.package_ids = frozenset(roles.get("package", []))
        self.tracker.person_ids = frozenset(roles.get("person", []))
        self.last_reload = {"ok": True, "error": None, "time": round(time.time(), 3)}
        self._record()
        m = new.manifest
        self.log.emit(
            "reloaded",
            f"reloaded: {m.name} {m.version} ({self.sha[:12]})",
            model=m.name,
            version=m.version,
            sha256=self.sha,
            self_test=test,
        )
        self._publish_state()
        self.notify.ready(f"{m.name} {m.version}")


def run(
    cfg: DeviceConfig,
    stop: threading.Event | None = None,
    reload: threading.Event | None = None,
    reload_config: Callable[[], DeviceConfig] | None = None,
    log_format: Literal["human", "json"] = "human",
) -> int:
    """Run until a finite source ends or ``stop`` is set (see :class:`Daemon`)."""
    return Daemon(cfg, stop, reload, reload_config, log_format).run()


def install_signal_handlers(stop: threading.Event, reload: threading.Event | None = None) -> None:
    def handler(signum: int, frame: Any) -> None:
        print(f"doorstep: {signal.Signals(signum).name}: stopping", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
