"""Frame sources on real video and photos; the latest-frame slot; motion gating."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from brokers import wait_until

from device.camera.base import Frame, LatestSlot
from device.camera.folder import FolderSource
from device.camera.opencv import OpenCVSource
from device.errors import DoorstepError
from device.motion import MotionGate


def test_video_file_delivers_every_frame_in_order_stamped_by_its_rate(traffic_video: Path) -> None:
    with OpenCVSource(str(traffic_video)) as src:
        assert not src.live
        frames = []
        while (f := src.read()) is not None:
            frames.append(f)
    assert len(frames) == 20
    assert [f.index for f in frames] == list(range(20))
    assert frames[3].t == pytest.approx(3 / 30)
    assert frames[0].image.shape == (540, 960, 3)


def test_fps_override_and_loop(traffic_video: Path) -> None:
    with OpenCVSource(str(traffic_video), fps=10, loop=True) as src:
        frames = [src.read() for _ in range(25)]
    assert all(f is not None for f in frames)
    assert frames[24].t == pytest.approx(2.4)  # type: ignore[union-attr]


def test_live_capture_keeps_only_the_newest_frame_and_counts_drops(traffic_video: Path) -> None:
    with OpenCVSource(str(traffic_video), live=True) as src:  # a file paced at 30 fps in a thread
        # A slow consumer: it reads only once the camera has replaced two unread frames.
        capturer = src._capturer
        assert capturer is not None
        assert wait_until(lambda: capturer.slot.dropped >= 2, timeout=30)
        first = src.read(timeout=10)
        assert first is not None and first.index >= 2  # not the first frame: the newest
        assert src.dropped >= 2
        rest = []
        while (f := src.read(timeout=10)) is not None:
            rest.append(f.index)
    assert rest == sorted(rest) and first.index not in rest  # never the same frame twice


def test_unopenable_source_says_so(tmp_path: Path) -> None:
    with pytest.raises(DoorstepError, match="cannot open video source"):
        OpenCVSource(str(tmp_path / "none.mp4")).open()


def test_folder_source_in_name_order(coco_samples: Path, tmp_path: Path) -> None:
    with FolderSource(coco_samples, fps=2) as src:
        frames = []
        while (f := src.read()) is not None:
            frames.append(f)
    assert len(frames) == 7 and frames[1].t == 0.5
    (tmp_path / "a.jpg").write_bytes(b"broken")
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 8, 3), np.uint8))
    with FolderSource(tmp_path) as src:
        assert src.read() is not None and src.read() is None
        assert src.dropped == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DoorstepError, match="holds no images"):
        FolderSource(tmp_path / "empty").open()


def test_slot_get_waits_and_close_wakes() -> None:
    slot = LatestSlot()
    img = np.zeros((2, 2, 3), np.uint8)
    threading.Timer(0.05, lambda: slot.put(Frame(img, 0.0, 0))).start()
    got = slot.get(timeout=30)
    assert got is not None and got.index == 0
    assert slot.get(timeout=0.05) is None  # nothing newer
    threading.Timer(0.05, slot.close).start()
    assert slot.get(timeout=30) is None  # woken by close (the timeout is only the backstop)


def test_motion_gate_skips_a_static_scene_but_runs_every_few_seconds(traffic_video: Path) -> None:
    gate = MotionGate(max_idle_s=2.0)
    still = np.full((480, 640, 3), 120, np.uint8)
    runs = [gate.should_run(still, t * 0.1) for t in range(50)]  # 5 s of a still scene at 10 fps
    assert runs[0] and sum(runs) == 3  # first frame, then every 2 s
    assert gate.skipped_fraction == pytest.approx(47 / 50)
    moved = still.copy()
    cv2.rectangle(moved, (100, 100), (300, 300), (255, 255, 255), -1)
    assert gate.should_run(moved, 5.05)
    with OpenCVSource(str(traffic_video)) as src:  # real traffic moves: every frame runs
        traffic = MotionGate()
        results = [traffic.should_run(f.image, f.t) for f in iter(src.read, None)]
    assert all(results)


@pytest.fixture
def standin(coco_samples: Path) -> object:
    import sys

    import picamera2_standin

    calls = picamera2_standin.install(cv2.imread(str(coco_samples / "pets.jpg")))
    yield calls
    sys.modules.pop("picamera2", None)


@pytest.mark.parametrize("lores_format", ["YUV420", "RGB888"])
def test_picamera2_adapter_gives_both_streams_of_one_request(
    standin: list[str], lores_format: str, ssd_model: Path, ssd_labels: Path
) -> None:
    from device.camera.picamera2 import Picamera2Source
    from device.detect.detector import Detector

    src = Picamera2Source(
        main_size=(1024, 860), lores_size=(320, 270), fps=10, lores_format=lores_format
    )
    with src:
        frame = src.read(timeout=30)
        nxt = src.read(timeout=30)
    assert frame is not None and nxt is not None and nxt.index > frame.index and nxt.t > frame.t
    assert frame.image.shape == (860, 1024, 3)
    det = Detector.open(ssd_model, ssd_labels)
    dogs = [d for d in det.detect(frame.lores) if d.label == "dog"]  # type: ignore[arg-type]
    assert len(dogs) == 2  # the detector reads the lores stream (YUV420 with padded rows, or BGR)
    assert max(d.box[2] for d in dogs) <= 320
    assert standin[:3] == ["init", "configure", "start"] and standin[-2:] == ["stop", "close"]
    assert (
        standin.count("release") >= standin.count("capture_request") - 1
    )  # every request given back


def test_picamera2_missing_says_how_to_install() -> None:
    import sys

    from device.camera.picamera2 import Picamera2Source

    sys.modules["picamera2"] = None  # type: ignore[assignment]  # makes the import fail
    try:
        with pytest.raises(DoorstepError, match="apt install python3-picamera2"):
            Picamera2Source().open()
    finally:
        sys.modules.pop("picamera2", None)
