"""One frame through the doorbell's pipeline: motion gate -> detector -> presence -> events.

No I/O and no clock of its own: the daemon feeds frames and their time, and stores, logs and
publishes what comes out. Tests drive it with plain frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from device.camera.base import Frame
from device.detect.detector import Detection, Detector
from device.detect.preprocess import Yuv420Frame
from device.motion import MotionGate
from device.presence import Event, PresenceTracker


@dataclass(frozen=True)
class StepResult:
    """What one frame gave: whether the detector ran (else the motion gate skipped it), its
    detections in main-stream pixels, the presence events, and the milliseconds per stage."""

    ran: bool
    detections: list[Detection] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stages_ms: dict[str, float] = field(default_factory=dict)


def scale_detections(dets: list[Detection], sx: float, sy: float) -> list[Detection]:
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


def roles_of(det: Detector) -> tuple[frozenset[int], frozenset[int]]:
    """The class ids a bundle's manifest gives the roles ``package`` and ``person``."""
    roles = det.manifest.labels.roles
    return frozenset(roles.get("package", [])), frozenset(roles.get("person", []))


def model_sha(det: Detector) -> str:
    """sha256 of the bundle's .tflite (what events and the state name as the deciding model)."""
    m = det.manifest
    return m.files[m.model_file].sha256 if m.model_file in m.files else ""


class Pipeline:
    """Motion gate (optional), detector and presence tracker, composed."""

    def __init__(
        self, detector: Detector, tracker: PresenceTracker, gate: MotionGate | None = None
    ) -> None:
        self.detector, self.tracker, self.gate = detector, tracker, gate

    def set_detector(self, detector: Detector) -> None:
        """Serve a reloaded model from the next frame on; the tracker keeps what is present."""
        package, person = roles_of(detector)
        self.tracker.set_model(package, person, model_sha(detector))
        self.detector = detector

    def step(self, frame: Frame, t: float) -> StepResult:
        """Run one frame taken at time ``t`` (the tracker's clock).

        The lores stream, when the camera gives one, is what the model reads; the motion gate
        compares the model-size canvas that preprocessing made anyway."""
        det = self.detector
        src = frame.lores if frame.lores is not None else frame.image
        prepared = det.prepare(src)
        stages: dict[str, float] = {}
        if self.gate is not None:
            t0 = time.perf_counter()
            run = self.gate.should_run(prepared.canvas, t)
            stages["motion"] = (time.perf_counter() - t0) * 1e3
            if not run:
                stages["preprocess"] = prepared.ms
                return StepResult(False, stages_ms=stages)
        dets = det.run(prepared)
        h, w = frame.image.shape[:2]
        lores = frame.lores
        if lores is not None:
            lw, lh = (
                (lores.width, lores.height)
                if isinstance(lores, Yuv420Frame)
                else lores.shape[1::-1]
            )
            dets = scale_detections(dets, w / lw, h / lh)
        st = det.last_times
        stages.update(preprocess=st.preprocess, invoke=st.invoke, decode=st.decode)
        t0 = time.perf_counter()
        events = self.tracker.update(t, dets, w, h)
        stages["presence"] = (time.perf_counter() - t0) * 1e3
        return StepResult(True, dets, events, stages)
