"""``doorstep-device run``: the composition root, the frame loop, signals and reload.

Each component is built from its own config section; :class:`device.pipeline.Pipeline` does
the per-frame work (motion gate -> detector -> presence). What the daemon adds is the order
that keeps the promises:

* **No alert is lost.** Events, and the tracker's state after them, are committed to the
  outbox in one transaction *before* anything announces them (log line, MQTT, state), so a
  kill -9 at any instant loses nothing any output has shown. The tracker's state is resumed at
  start, so a parcel that was there before a restart is the same parcel after it.
* **A dead doorbell is noticed.** The systemd watchdog is petted only after a frame was really
  handled. A live source that delivers nothing for ``source.stall_s`` is reported stalled
  (state, telemetry, log) and, after ``STALL_EXIT_FACTOR`` times that, the run ends with exit
  status 1 so that systemd restarts it; a capture thread that dies ends the run at once, exit 1.
* **A full disk is a fault that passes.** Events wait in memory, the log and the daemon record
  are skipped, detection goes on; all is written again when space returns.

Finite sources (a video file, an image folder, a live replay of a file) end the run after
their last frame, once the outbox has drained, with exit status 0. SIGTERM and SIGINT stop
cleanly; SIGHUP reloads config and model, keeping the running one if the new one fails.
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
from device.alerts.announce import Announcer
from device.alerts.outbox import Outbox
from device.alerts.payloads import EventPayload, ModelInfo, SelfTest, StatePayload, TelemetryPayload
from device.camera.base import Frame, SourceError
from device.camera.factory import open_source
from device.conditions import Conditions
from device.config import DeviceConfig
from device.detect.checked import open_detector
from device.detect.detector import Detector
from device.draw import parcel_snapshot
from device.errors import ConfigError, DoorstepError
from device.health import Health
from device.install import RecordWriteError, Store, write_daemon_record
from device.logsink import LogSink, default_log_file
from device.motion import MotionGate
from device.persist import TrackerStore
from device.pipeline import Pipeline, model_sha, model_size_of, roles_of
from device.presence import Event, PresenceTracker, describe_time
from device.record import DaemonRecord
from device.sdnotify import Notifier
from device.snapshots import SnapshotStore
from device.storage import check_writable
from device.telemetry import StageWindow, Telemetry

if TYPE_CHECKING:  # imported when update.enabled (pull mode) only
    from device.update.agent import UpdateAgent

STALL_EXIT_FACTOR = 3  # a live source silent for this many stall_s ends the run (exit 1)
STATE_DIR_FIX = (
    "give the service user this directory (systemd's StateDirectory= does), "
    "or choose another with --state-dir / state_dir"
)


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
        self.cfg, self.source_cfg = cfg, cfg.source
        self.stop = stop or threading.Event()
        self.reload = reload or threading.Event()
        self.reload_config = reload_config
        self._reloads = threading.Condition()  # notified after each reload (the update agent)
        self._reload_count = 0
        self.update_agent: UpdateAgent | None = None  # with update.enabled
        self.notify = Notifier()
        state_dir = Path(cfg.state_dir)
        short = check_writable(state_dir, "state directory", STATE_DIR_FIX)
        t = cfg.telemetry
        self.log = LogSink(
            t.log_file or default_log_file(state_dir),
            int(t.log_max_mb * 1e6),
            t.log_backups,
            log_format,
        )
        if cfg.model.num_threads is not None:
            import cv2

            # OpenCV's own pool for small per-frame images costs more in hand-offs than it
            # saves; give the whole pipeline the interpreter's thread budget.
            cv2.setNumThreads(cfg.model.num_threads)
        self.store = Store(state_dir)
        det, self.model_dir, self.test = open_detector(
            cfg.model, cfg.signing.public_keys, state_dir, fallback=True
        )
        package, person = roles_of(det)
        tracker = PresenceTracker.from_config(cfg.presence, package, person, model_sha(det))
        gate = MotionGate.from_config(cfg.motion) if cfg.motion.enabled else None
        self.pipeline = Pipeline(det, tracker, gate)
        q = cfg.mqtt
        db = state_dir / "outbox.sqlite"  # with no broker it holds the tracker's state only
        self.outbox = Outbox.from_config(db, q) if q is not None else Outbox(db)
        self.conditions = Conditions(self.outbox, self.log)
        self._started = time.perf_counter()
        self._status_at = (self._started, 0)  # the live status line's last (time, frames)
        if short is not None:
            self.conditions.storage.enter(short)
        self.source = open_source(cfg.source)
        self.source.model_size = model_size_of(det)
        self.source.motion_thumbnail = gate.thumbnail if gate is not None else None
        # Cameras run on Unix time, so the tracker's state means the same after a restart;
        # a file replayed as fast as it decodes runs on its own clock and starts afresh.
        topic = f"{q.prefix}/{cfg.device_id}/events" if q is not None else None
        self.tracker_store = TrackerStore(self.outbox, tracker, topic, self.source.live)
        self.resumed = self.tracker_store.resume()
        self.started = round(time.time(), 3)
        self.last_reload: dict[str, Any] | None = None
        self.last_event: dict[str, Any] | None = None
        self.health = Health(cfg.telemetry, cfg.power)
        self.telemetry = Telemetry(t.interval_s, StageWindow(t.window), self.health)
        self.announce = Announcer(q, cfg.device_id, self.outbox)
        self.snapshots = SnapshotStore(state_dir / "snapshots", t.snapshots_keep)

    @property
    def det(self) -> Detector:
        return self.pipeline.detector

    @property
    def sha(self) -> str:
        return model_sha(self.pipeline.detector)

    def _payloads(self, events: list[Event]) -> list[dict[str, Any]]:
        now = round(time.time(), 3)
        return [
            EventPayload(**e.to_json(), device_id=self.cfg.device_id, wall_time=now).model_dump(
                mode="json"
            )
            for e in events
        ]

    # -- what the device says about itself
    def state(self) -> dict[str, Any]:
        m, tracker = self.det.manifest, self.pipeline.tracker
        return StatePayload(
            device_id=self.cfg.device_id,
            present=any(tracker.present().values()),
            zones=tracker.present(),
            count=tracker.count(),
            since=tracker.since(),
            model=ModelInfo(name=m.name, version=m.version, sha256=self.sha),
            self_test=SelfTest(**self.test),
            doorstep_version=__version__,
            runtime=self.det.runtime_version,
            **self.conditions.payload_fields(),
            updated=round(time.time(), 3),
        ).model_dump(mode="json")

    def _record(self, state: str = "running") -> None:
        """``<state_dir>/daemon.json``: what ``doorstep-device status`` (and deploy) reads.
        Never worth the daemon's life: a failed write is reported as degraded storage."""
        m = self.det.manifest
        ident = None
        if self.model_dir is not None and self.model_dir.parent.name == "models":
            ident = self.model_dir.name
        record = DaemonRecord.model_validate(
            {
                "pid": os.getpid(),
                "pid_start_ticks": DaemonRecord.own_start_ticks(),
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
                "log_file": str(self.log.path) if self.log.path is not None else None,
                **self.conditions.record_fields(),
            }
        )
        storage = self.conditions.storage
        try:
            write_daemon_record(self.store, record)
        except RecordWriteError as exc:
            if storage.enter(str(exc)):
                self.log.emit("storage_degraded", f"storage degraded: {exc}", error=str(exc))
            return
        if storage.leave():
            self.log.emit("storage_ok", "the state directory takes writes again")

    def _publish_state(self) -> None:
        self.announce.state(self.state())

    def _check_storage(self) -> None:
        if self.conditions.check_outbox():
            self._publish_state()

    # -- the loop
    def run(self) -> int:
        cfg, det, m = self.cfg, self.det, self.det.manifest
        self.log.emit(
            "start",
            f"{cfg.device_id} running {m.name} {m.version} on {det.runtime_version} "
            f"(self-test {self.test['ms']:.1f} ms); log {self.log.path}"
            + (f"; resumed a parcel in {', '.join(self.resumed)}" if self.resumed else ""),
            device_id=cfg.device_id,
            model=m.name,
            version=m.version,
            sha256=self.sha,
            runtime=det.runtime_version,
            self_test=self.test,
            doorstep_version=__version__,
            resumed=self.resumed,
        )
        self._record()
        status = 0
        try:
            self.announce.start(self.det.manifest.name, __version__, self.state())
            self._start_updates()
            with self.source:
                self.notify.ready(f"{m.name} {m.version} on {det.runtime_version}")
                self._loop()
        except SourceError as exc:
            self.log.emit("source_failed", f"stopping: {exc}", error=str(exc))
            status = 1
        finally:
            self._shutdown()
        return status

    def _loop(self) -> None:
        tel, counts = self.telemetry, self.telemetry.total
        stall_s = getattr(self.source_cfg, "stall_s", 10.0)
        offset: float | None = None
        last_status = maintain_at = 0.0
        cond = self.conditions
        cond.last_frame = time.monotonic()  # the stall clock starts when the source opened
        while not self.stop.is_set():
            if self.reload.is_set():
                self.reload.clear()
                self._reload()
            t0 = time.perf_counter()
            frame = self.source.read(timeout=min(1.0, stall_s / 2))
            t1 = time.perf_counter()
            self.health.sample()
            if t1 >= maintain_at:  # retry a full disk, drop expired events, say what changed
                maintain_at = t1 + 1.0
                self.outbox.maintain()
                self._check_storage()
                if self.log.live:
                    self.log.status(self._status_line(t1))
            if tel.due():
                self._report()
            if frame is None:
                if self.source.ended:
                    break
                self._stalled(stall_s)
                continue
            cond.last_frame = time.monotonic()
            if cond.stall.leave():
                self.log.emit("source_ok", f"{self.source.describe()}: frames again")
                self._publish_state()
            if offset is None:
                offset = time.time() - frame.t if self.source.live else 0.0
            tel.stage("capture_wait", (t1 - t0) * 1e3)
            counts.frames += 1
            counts.dropped = self.source.dropped
            if frame.t - last_status >= 10:
                last_status = frame.t
                self.notify.status(
                    f"{counts.frames} frames, {counts.inferences} inferences, "
                    f"present: {self.pipeline.tracker.present()}"
                )
            self._frame(frame, frame.t + offset, t1)
            self.notify.watchdog()  # only after a frame was really handled

    def _status_line(self, now: float) -> str:
        """The terminal's live line: fps since the last one, recent pipeline ms, presence,
        broker, outbox depth."""
        frames = self.telemetry.total.frames
        last_t, last_frames = self._status_at
        self._status_at = (now, frames)
        fps = (frames - last_frames) / (now - last_t) if now > last_t else 0.0
        recent = self.telemetry.window.recent("pipeline", 30)
        pipeline = f"{sorted(recent)[len(recent) // 2]:.1f} ms" if recent else "-"
        zones = [z for z, on in self.pipeline.tracker.present().items() if on]
        parcel = f"yes ({', '.join(zones)})" if zones else "no"
        broker = self._broker_state() or "none"
        stalled = ", source stalled" if self.conditions.stall.active else ""
        return (
            f"doorstep: {fps:4.1f} fps | pipeline {pipeline} | parcel: {parcel} | "
            f"broker: {broker} | outbox {len(self.outbox)}{stalled}"
        )

    def _broker_state(self) -> Literal["connected", "disconnected"] | None:
        publisher = self.announce.publisher
        if publisher is None:
            return None
        return "connected" if publisher.connected.is_set() else "disconnected"

    def _stalled(self, stall_s: float) -> None:
        stall, last = self.conditions.stall, self.conditions.last_frame
        silent = time.monotonic() - (last or 0.0)
        if silent >= STALL_EXIT_FACTOR * stall_s:
            raise SourceError(
                f"{self.source.describe()}: no frame for {silent:.0f} s: giving up so that "
                "the service is restarted"
            )
        if silent >= stall_s and stall.enter(f"no frame for {stall_s:g} s"):
            self.notify.status(
                f"source stalled: {self.source.describe()}, no frame for {silent:.0f} s"
            )
            self.log.emit(
                "source_stalled",
                f"{self.source.describe()}: no frame for {silent:.1f} s",
                source=self.source.describe(),
                silent_s=round(silent, 3),
            )
            self._publish_state()
            self._record()

    def _frame(self, frame: Frame, t: float, t_start: float) -> None:
        tel = self.telemetry
        result = self.pipeline.step(frame, t)
        for name, ms in result.stages_ms.items():
            tel.stage(name, ms)
        if not result.ran:
            tel.total.skipped += 1
            return
        tel.total.inferences += 1
        self.health.inference()
        t_p1 = time.perf_counter()
        if result.events or self.tracker_store.due():
            payloads = self._payloads(result.events)
            self.tracker_store.commit(payloads)  # before anything announces them
            for event, payload in zip(result.events, payloads, strict=True):
                self._announce(frame, event, payload)
            if result.events:
                self._check_storage()
                self._publish_state()
                self._record()
        t_end = time.perf_counter()
        tel.stage("publish", (t_end - t_p1) * 1e3)
        tel.stage("pipeline", (t_end - t_start) * 1e3)

    def _announce(self, frame: Frame, event: Event, payload: dict[str, Any]) -> None:
        """Log and publish an event already committed to the outbox. An arrival's snapshot
        (one JPEG) is kept on disk for reports and retained on MQTT."""
        tracker = self.pipeline.tracker
        jpeg, saved = None, None
        if event.kind == "arrived" and (self.snapshots.keep or self.announce.wants_snapshot()):
            quality = self.cfg.mqtt.snapshot_quality if self.cfg.mqtt is not None else 85
            jpeg = parcel_snapshot(frame.image, tracker.boxes(), quality)
            saved = self.snapshots.save(str(payload["id"]), jpeg)
        theft = " (possible theft)" if event.possible_theft else ""
        self.log.emit(
            "event",
            f"parcel {event.kind} in {event.zone} {describe_time(event.time)}{theft}",
            **payload,
            **({"snapshot": saved} if saved else {}),
        )
        self.last_event = {k: payload[k] for k in ("event", "id", "zone", "wall_time")}
        self.announce.event(event, jpeg, tracker)

    def _start_updates(self) -> None:
        """Pull mode (``update.enabled``): the agent follows the desired topic in its thread;
        the model switch itself is a reload in this loop (detection waits only for that)."""
        publisher = self.announce.publisher
        if not self.cfg.update.enabled or publisher is None:
            return
        from device.install import trusted_keys
        from device.update.agent import UpdateAgent

        self.update_agent = UpdateAgent(
            self.cfg.update,
            self.store,
            trusted_keys(self.cfg.signing.public_keys),
            self.cfg.device_id,
            self._apply_update,
            lambda report: publisher.publish_update(report.model_dump_json()),
        )
        publisher.follow_desired(self.update_agent.offer)
        self.update_agent.start()

    def _apply_update(self, deadline_s: float) -> tuple[bool, str | None]:
        """Reload in the frame loop and wait for it (the update agent's thread)."""
        wanted = self.store.linked(self.store.current)
        with self._reloads:
            seen = self._reload_count
            self.reload.set()
            if not self._reloads.wait_for(lambda: self._reload_count > seen, deadline_s):
                return False, f"no reload within {deadline_s:g} s (the daemon is busy or stopping)"
        last = self.last_reload or {}
        if not last.get("ok"):
            return False, f"reload failed: {last.get('error')}"
        serving = self.model_dir.name if self.model_dir is not None else None
        if serving != wanted:
            return False, f"serving {serving}, not {wanted}"
        return True, None

    def _shutdown(self) -> None:
        if self.update_agent is not None:
            self.update_agent.stop()
        self.notify.stopping()
        counts = self.telemetry.total
        drained = self.announce.drain()
        report = self._report()
        if self.log.live:  # the last word on the terminal: over the whole run
            self._status_at = (self._started, 0)
            self.log.status(self._status_line(time.perf_counter()))
        self.announce.stop()
        self.log.emit(
            "stop",
            f"stopped after {counts.frames} frames, {counts.inferences} inferences"
            + ("" if drained else "; some events were not acknowledged (kept in the outbox)"),
            frames=counts.frames,
            inferences=counts.inferences,
            skipped_by_motion=round(self.pipeline.gate.skipped_fraction, 3)
            if self.pipeline.gate
            else 0.0,
            dropped=self.source.dropped,
            undelivered=len(self.outbox),
            stages_ms=report["stages_ms"],
        )
        self.outbox.close()
        self.log.close()
        self._record("stopped")

    def _report(self) -> dict[str, Any]:
        self._check_storage()
        fields = self.telemetry.report()
        payload = TelemetryPayload(
            device_id=self.cfg.device_id,
            outbox=len(self.outbox) if self.cfg.mqtt is not None else 0,
            broker=self._broker_state(),
            **self.conditions.payload_fields(),
            **fields,
        ).model_dump(mode="json")
        pipe = payload["stages_ms"].get("pipeline", {})
        inv = payload["stages_ms"].get("invoke", {})
        self.log.emit(
            "telemetry",
            f"{payload['fps']:.1f} fps, {payload['inference_fps']:.1f} inferences/s, "
            f"pipeline p50 {pipe.get('p50', 0):.1f} ms (invoke {inv.get('p50', 0):.1f}), "
            f"cpu {payload['cpu_percent']:.0f}%, rss {payload['rss_mb']:.0f} MB",
            **payload,
        )
        self.announce.telemetry(payload)
        return payload

    def _reload(self) -> None:
        try:
            self._reload_model()
        finally:
            with self._reloads:
                self._reload_count += 1
                self._reloads.notify_all()

    def _reload_model(self) -> None:
        """Load the configured model again; on any failure keep serving the current one."""
        if self.reload_config is None and self.update_agent is None:
            return
        self.notify.reloading()
        try:
            cfg = self.reload_config() if self.reload_config is not None else self.cfg
            new, new_dir, test = open_detector(
                cfg.model, cfg.signing.public_keys, Path(cfg.state_dir)
            )
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
        self.pipeline.set_detector(new)
        self.source.model_size = model_size_of(new)
        self.test, self.model_dir = test, new_dir
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
