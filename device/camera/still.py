"""One image delivered as a live camera would: at ``fps``, in real time, newest frame only.

A test pattern for benchmarks and demos (like GStreamer's ``videotestsrc``): it costs no decoding
per frame, as a camera's DMA buffer costs none, so the daemon's own CPU use is what is measured.
The file is read again when it changes (replaced by a rename, as a camera's snapshot dump or a
fault test switching the scene would do); a half-written file keeps the previous image.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from device.camera.base import Frame, FrameSource, LatestSlot
from device.errors import DoorstepError

RECHECK_S = 0.25  # how often the file is looked at for a change


class StillSource(FrameSource):
    live = True

    def __init__(self, path: str | Path, fps: float = 10.0) -> None:
        self.path, self.fps = Path(path), fps
        self._stamp: tuple[int, int, int] | None = None

    def describe(self) -> str:
        return f"still image {self.path}"

    def _load(self) -> np.ndarray | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return None
        image = cv2.imread(str(self.path))
        if image is not None:
            self._stamp = stamp
        return image

    def open(self) -> None:
        image = self._load()
        if image is None:
            raise DoorstepError(f"still source {self.path}: not a readable image")
        self._image = image
        self._start_capture("still", self._capture)

    def _capture(self, stop: threading.Event, slot: LatestSlot) -> None:
        start, index = time.monotonic(), 0
        checked = start
        cached: tuple[np.ndarray, object, Frame] | None = None
        while not stop.is_set():
            now = time.monotonic()
            if now - checked >= RECHECK_S:
                checked = now
                image = self._load()
                if image is not None:
                    self._image = image
            image = self._image
            if cached is None or cached[0] is not image or cached[1] is not self.model_size:
                cached = (image, self.model_size, self._frame(image, 0.0, 0))  # one resize
            slot.put(replace(cached[2], t=now - start, index=index))
            index += 1
            stop.wait(max(0.0, index / self.fps - (time.monotonic() - start)))

    def read(self, timeout: float = 5.0) -> Frame | None:
        return self._read_captured(timeout)

    def close(self) -> None:
        self._stop_capture()
