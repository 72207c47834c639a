"""The per-frame pipeline on plain frames: motion gate -> real detector -> presence -> events."""

from __future__ import annotations

import numpy as np
import pytest

from device.camera.base import Frame
from device.config import MotionConfig, PresenceConfig
from device.detect.detector import Detector
from device.errors import DetectorError
from device.motion import MotionGate
from device.pipeline import Pipeline, model_sha, roles_of
from device.presence import PresenceTracker
from host.render import render_demo


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.open(None, num_threads=1)  # the shipped parcel model


def _pipeline(det: Detector, gate: bool = True) -> Pipeline:
    package, person = roles_of(det)
    presence = PresenceConfig(arrive_hits=3, arrive_window=5, remove_after_s=2.0)
    tracker = PresenceTracker.from_config(presence, package, person, model_sha(det))
    return Pipeline(det, tracker, MotionGate.from_config(MotionConfig()) if gate else None)


def test_rendered_frames_give_an_arrival_then_a_removal(detector: Detector) -> None:
    pipe = _pipeline(detector, gate=False)
    events = []
    for f in render_demo():  # parcel from frame 8 to 21
        result = pipe.step(Frame(f.image, f.index * 0.5, f.index), f.index * 0.5)
        assert result.ran
        assert {"preprocess", "invoke", "decode", "presence"} <= set(result.stages_ms)
        if f.parcel is not None:
            assert result.detections, f"frame {f.index}: the parcel was not found"
        events += [(e.kind, f.index) for e in result.events]
    assert events == [("arrived", 10), ("removed", 25)]


def test_the_motion_gate_skips_a_frame_that_did_not_change(detector: Detector) -> None:
    pipe = _pipeline(detector)
    image = render_demo(frames=1)[0].image
    first = pipe.step(Frame(image, 0.0, 0), 0.0)
    again = pipe.step(Frame(image.copy(), 0.1, 1), 0.1)
    assert first.ran and not again.ran
    assert set(again.stages_ms) == {"motion", "preprocess"} and again.events == []
    later = pipe.step(Frame(image.copy(), 10.0, 2), 10.0)  # max_idle_s passed: runs anyway
    assert later.ran


def test_run_refuses_a_stale_prepared_frame(detector: Detector) -> None:
    a = detector.prepare(np.zeros((480, 640, 3), np.uint8))
    detector.prepare(np.full((480, 640, 3), 128, np.uint8))
    with pytest.raises(DetectorError, match="stale"):
        detector.run(a)


def test_a_reloaded_detector_keeps_what_is_present(detector: Detector) -> None:
    pipe = _pipeline(detector, gate=False)
    frames = render_demo()
    for f in frames[8:12]:
        pipe.step(Frame(f.image, f.index * 0.5, f.index), f.index * 0.5)
    assert pipe.tracker.present() == {"doorstep": True}
    pipe.set_detector(Detector.open(None, num_threads=1))
    result = pipe.step(Frame(frames[12].image, 6.0, 12), 6.0)
    assert result.ran and result.events == []  # the same parcel, no second arrival
