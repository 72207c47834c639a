"""The per-frame pipeline on plain frames: motion gate -> real detector -> presence -> events."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import SHARED

from device.camera.base import Frame
from device.camera.still import StillSource
from device.config import MotionConfig, PresenceConfig
from device.detect.detector import Detector
from device.detect.runtime import release_model_pages
from device.errors import DetectorError
from device.motion import MotionGate
from device.pipeline import Pipeline, model_sha, model_size_of, roles_of, scale_detections
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


# ---------------------------------------------------------------- frames made on the capture side


def _captured(det: Detector, image: np.ndarray, tmp_path: Path, gate: MotionGate | None) -> Frame:
    """One frame from a real live source (a still image delivered as a camera), asked for the
    model's size and the gate's thumbnail as the daemon asks."""
    path = tmp_path / "view.png"
    cv2.imwrite(str(path), image)
    source = StillSource(path, fps=50)
    source.model_size = model_size_of(det)
    source.motion_thumbnail = gate.thumbnail if gate is not None else None
    with source:
        frame = source.read(timeout=30)
    assert frame is not None
    return frame


def _parcel_photo(size: tuple[int, int]) -> np.ndarray:
    parcels = SHARED / "data" / "packages-v6" / "test" / "images"
    if not parcels.is_dir():
        pytest.skip(f"needs {parcels} (the project's shared data)")
    return cv2.resize(cv2.imread(str(sorted(parcels.glob("*.jpg"))[0])), size)


def _same(a: list[Any], b: list[Any]) -> None:
    assert [d.label for d in a] == [d.label for d in b]
    for x, y in zip(a, b, strict=True):
        assert x.score == pytest.approx(y.score, abs=1e-6)
        assert np.allclose(x.box, y.box, atol=0.05), (x.box, y.box)


def test_a_frame_at_the_models_size_from_the_capture_thread_finds_the_same(
    detector: Detector, tmp_path: Path
) -> None:
    """The stretched default model: the capture thread's 300x300 copy, through the pipeline,
    gives the detections the full 640x480 frame gives (in main-stream pixels)."""
    gate = MotionGate.from_config(MotionConfig())
    frame = _captured(detector, _parcel_photo((640, 480)), tmp_path, gate)
    assert isinstance(frame.lores, np.ndarray) and frame.lores.shape == (300, 300, 3)
    assert frame.motion is not None and np.array_equal(frame.motion, gate.thumbnail(frame.lores))
    prescaled = _pipeline(detector).step(frame, 0.0)
    direct = _pipeline(detector).step(Frame(frame.image, 0.0, 0), 0.0)
    assert prescaled.ran and direct.ran and prescaled.detections
    _same(prescaled.detections, direct.detections)


def test_a_letterboxed_model_gets_the_frame_scaled_to_fit(testmodels: Path, tmp_path: Path) -> None:
    """A letterbox model (64x64 input, 4:3 frames): the capture thread's copy keeps the aspect
    (64x48); the padding is added in preprocessing, and the boxes come back the same."""
    det = Detector.open(
        testmodels / "yolo_v8_int8.tflite", testmodels / "labels.txt", resize="letterbox"
    )
    image = np.full((96, 128, 3), 90, np.uint8)  # the scene the test models were built for
    frame = _captured(det, image, tmp_path, None)
    assert isinstance(frame.lores, np.ndarray) and frame.lores.shape == (48, 64, 3)
    found = scale_detections(det.detect(frame.lores), 128 / 64, 96 / 48)
    assert found
    _same(found, det.detect(image))


def test_a_frame_the_gate_skips_costs_no_preprocessing(detector: Detector, tmp_path: Path) -> None:
    gate = MotionGate.from_config(MotionConfig())
    pipe = Pipeline(detector, _pipeline(detector).tracker, gate)
    frame = _captured(detector, render_demo(frames=1)[0].image, tmp_path, gate)
    assert pipe.step(frame, 0.0).ran
    again = pipe.step(Frame(frame.image, 0.1, 1, frame.lores, frame.motion), 0.1)
    assert not again.ran and set(again.stages_ms) == {"motion"}  # no preprocess at all


def test_the_model_files_pages_are_given_back_and_results_do_not_change(tmp_path: Path) -> None:
    """After the self-test the weights live in XNNPACK's packed buffers: the mapped file's
    resident pages are released (``release_model_pages``) and detections stay the same."""
    det = Detector.open(None, num_threads=1)
    image = _parcel_photo((640, 480))
    before = det.detect(image)
    path = os.path.realpath(det.bundle.model_path)
    assert release_model_pages(path) >= os.path.getsize(path) - 4096
    assert _resident_kb(path) == 0
    _same(det.detect(image), before)


def _resident_kb(path: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = line.rstrip("\n").endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total
