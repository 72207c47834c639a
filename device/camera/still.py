"""One image delivered as a live camera would: at ``fps``, in real time, newest frame only.

A test pattern for benchmarks and demos (like GStreamer's ``videotestsrc``): it costs no decoding
per frame, as a camera's DMA buffer costs none, so the daemon's own CPU use is what is measured.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2

from device.camera.base import Frame, FrameSource, LatestSlot
from device.errors import DoorstepError


class StillSource(FrameSource):
    live = True

    def __init__(self, path: str | Path, fps: float = 10.0) -> None:
        self.path, self.fps = Path(path), fps

    def open(self) -> None:
        image = cv2.imread(str(self.path))
        if image is None:
            raise DoorstepError(f"still source {self.path}: not a readable image")
        self._image = image
        self._start_capture("still", self._capture)

    def _capture(self, stop: threading.Event, slot: LatestSlot) -> None:
        start, index = time.monotonic(), 0
        while not stop.is_set():
            slot.put(Frame(self._image, time.monotonic() - start, index))
            index += 1
            stop.wait(max(0.0, index / self.fps - (time.monotonic() - start)))

    def read(self, timeout: float = 5.0) -> Frame | None:
        return self._read_captured(timeout)

    def close(self) -> None:
        self._stop_capture()
