"""OpenCV capture: USB cameras (an index), RTSP/HTTP streams, video files.

Files are finite and deliver every frame in order, stamped by the container's frame rate (or
``fps``); cameras and streams are live: a thread reads continuously into a latest-frame slot and
reopens a stream that fails, with backoff.
"""

from __future__ import annotations

import threading
import time

import cv2

from device.camera.base import Frame, FrameSource, LatestSlot
from device.errors import DoorstepError


def is_live(uri: int | str) -> bool:
    return isinstance(uri, int) or str(uri).isdigit() or "://" in str(uri)


class OpenCVSource(FrameSource):
    def __init__(
        self,
        uri: int | str,
        fps: float | None = None,
        loop: bool = False,
        live: bool | None = None,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.uri = int(uri) if isinstance(uri, str) and uri.isdigit() else uri
        self.fps = fps
        self.loop = loop
        self.live = is_live(self.uri) if live is None else live
        self.reconnect_max_s = reconnect_max_s
        self._cap: cv2.VideoCapture | None = None
        self._index = 0
        self._rate = 0.0
        self.reconnects = 0

    def describe(self) -> str:
        return f"opencv source {self.uri!r}"

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.uri)
        if not cap.isOpened():
            cap.release()
            raise DoorstepError(
                f"cannot open video source {self.uri!r} (no such camera, file or stream)"
            )
        return cap

    def open(self) -> None:
        self._cap = self._open_capture()
        self._rate = self.fps or self._cap.get(cv2.CAP_PROP_FPS) or 10.0
        self._index = 0
        self.ended = False
        if self.live:
            self._start_capture("capture", self._capture)

    def _capture(self, stop: threading.Event, slot: LatestSlot) -> None:
        backoff = 0.5
        start = time.monotonic()
        while not stop.is_set():
            assert self._cap is not None
            ok, image = self._cap.read()
            if ok:
                backoff = 0.5
                t = time.monotonic() - start
                slot.put(self._frame(image, t, self._index))
                self._index += 1
                if not is_live(self.uri):  # a file run live (tests, demos): pace it by its rate
                    time.sleep(max(0.0, self._index / self._rate - (time.monotonic() - start)))
                continue
            if not is_live(self.uri) and not self.loop:
                break
            self._cap.release()
            if stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.reconnect_max_s)
            try:
                self._cap = (
                    self._open_capture() if is_live(self.uri) else cv2.VideoCapture(self.uri)
                )
                self.reconnects += 1
            except DoorstepError:
                continue

    def read(self, timeout: float = 5.0) -> Frame | None:
        if self._capturer is not None:
            return self._read_captured(timeout)
        assert self._cap is not None
        ok, image = self._cap.read()
        if not ok and self.loop and self._index:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._cap.read()
        if not ok:
            self.ended = True
            return None
        frame = Frame(image, self._index / self._rate, self._index)
        self._index += 1
        return frame

    def close(self) -> None:
        self._stop_capture()
        if self._cap is not None:
            self._cap.release()
            self._cap = None
