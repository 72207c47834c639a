"""One frame through the doorbell's pipeline: motion gate -> detector -> presence -> events.

No I/O and no clock of its own: the daemon feeds frames and their time, and stores, logs and
publishes what comes out. Tests drive it with plain frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from device.camera.base import Frame
from device.detect.detector import Detection, Detector, Prepared
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


def model_size_of(det: Detector) -> Callable[[int, int], tuple[int, int] | None]:
    """The size ``det`` reads a WxH frame at: its input (stretched), or the frame scaled to fit
    it (letterboxed, the padding added in preprocessing); what a capture thread prescales to."""
    transform = det.transform
    sizes: dict[tuple[int, int], tuple[int, int]] = {}

    def size(w: int, h: int) -> tuple[int, int]:
        got = sizes.get((w, h))
        if got is None:
            geo = transform.geometry(w, h)
            got = sizes[(w, h)] = (round(w * geo.scale_x), round(h * geo.scale_y))
        return got

    return size


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

        The lores stream, when the source gives one, is what the model reads. The motion gate
        compares thumbnails of the frame at the model's size: made by the capture thread when
        the source makes them (``Frame.motion``; a skipped frame then costs no preprocessing),
        else from the canvas preprocessing made anyway."""
        det, gate = self.detector, self.gate
        src = frame.lores if frame.lores is not None else frame.image
        stages: dict[str, float] = {}
        prepared = None
        if gate is not None:
            if frame.motion is None:
                prepared = det.prepare(src)
            t0 = time.perf_counter()
            thumb = frame.motion if frame.motion is not None else gate.thumbnail(_content(prepared))
            run = gate.decide(thumb, t)
            stages["motion"] = (time.perf_counter() - t0) * 1e3
            if not run:
                if prepared is not None:
                    stages["preprocess"] = prepared.ms
                return StepResult(False, stages_ms=stages)
        dets = det.run(prepared if prepared is not None else det.prepare(src))
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


def _content(prepared: Prepared | None) -> np.ndarray:
    """The part of the model's canvas the frame fills (letterbox padding left out), the same
    picture a capture thread's model-size frame is."""
    assert prepared is not None
    g, canvas = prepared.geometry, prepared.canvas
    nw, nh = round(g.src_w * g.scale_x), round(g.src_h * g.scale_y)
    x, y = int(g.pad_x), int(g.pad_y)
    return (
        canvas
        if (x, y) == (0, 0) and canvas.shape[1::-1] == (nw, nh)
        else canvas[y : y + nh, x : x + nw]
    )
