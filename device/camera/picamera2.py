"""The Raspberry Pi camera through picamera2 (from Raspberry Pi OS's apt, not PyPI).

One request gives both streams of the same instant: ``main`` (BGR, for snapshots) and ``lores``
at about the model's size (YUV420 on a Pi 4 and older, RGB888 allowed on a Pi 5), which is what
the detector reads, so the ISP does the resizing for free. A thread captures into a
latest-frame slot. picamera2 is imported here, lazily, and nowhere else.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from device.camera.base import Frame, FrameSource, LatestSlot
from device.detect.preprocess import Yuv420Frame
from device.errors import DoorstepError


class Picamera2Source(FrameSource):
    live = True

    def __init__(
        self,
        main_size: tuple[int, int] = (1280, 720),
        lores_size: tuple[int, int] = (320, 240),
        fps: float = 10.0,
        lores_format: str = "YUV420",
        camera: int = 0,
    ) -> None:
        if lores_format not in ("YUV420", "RGB888"):
            raise DoorstepError(
                f"lores_format {lores_format!r}: choose YUV420 (any Pi) or RGB888 (Pi 5)"
            )
        if lores_size[0] % 2 or lores_size[1] % 2:
            raise DoorstepError(f"lores size {lores_size}: width and height must be even")
        self.main_size, self.lores_size, self.fps = main_size, lores_size, fps
        self.lores_format, self.camera = lores_format, camera
        self._cam: Any = None

    def describe(self) -> str:
        return f"camera {self.camera} (picamera2)"

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError:
            raise DoorstepError(
                "picamera2 is not importable: on Raspberry Pi OS run `sudo apt install python3-picamera2` "
                "and create the venv with --system-site-packages"
            ) from None
        try:
            cam = Picamera2(self.camera)
            config = cam.create_video_configuration(
                main={"size": self.main_size, "format": "RGB888"},
                lores={"size": self.lores_size, "format": self.lores_format},
                controls={"FrameRate": self.fps},
            )
            cam.configure(config)
            cam.start()
        except (RuntimeError, IndexError, OSError) as exc:
            raise DoorstepError(f"camera {self.camera}: cannot start: {exc}") from None
        self._cam = cam
        self._start_capture("picamera2", self._capture)

    def _capture(self, stop: threading.Event, slot: LatestSlot) -> None:
        index = 0
        start = None
        while not stop.is_set():
            request = self._cam.capture_request()
            try:
                main = request.make_array("main")  # RGB888 is B, G, R in memory: OpenCV's order
                lores = request.make_array("lores")
                stamp = request.get_metadata().get("SensorTimestamp")
            finally:
                request.release()  # always: the camera has only a few buffers
            t_ns = stamp if stamp is not None else time.monotonic_ns()
            start = t_ns if start is None else start
            low: Yuv420Frame | np.ndarray = (
                Yuv420Frame(lores, *self.lores_size) if self.lores_format == "YUV420" else lores
            )
            slot.put(Frame(np.ascontiguousarray(main), (t_ns - start) / 1e9, index, low))
            index += 1

    def read(self, timeout: float = 5.0) -> Frame | None:
        return self._read_captured(timeout)

    def close(self) -> None:
        self._stop_capture()
        if self._cam is not None:
            self._cam.stop()
            self._cam.close()
            self._cam = None
