"""What every frame source shares: the frame, the interface, the latest-frame slot.

A source's ``read(timeout)`` returns the next frame, or ``None`` when none came within
``timeout`` (a live camera that is slow or stalled) or the source has ended (``ended`` is then
true: a file or folder played to its end, a live replay of a file at its end). A source whose
capture failed for good raises :class:`SourceError` from ``read``, naming the source and the
error, so the daemon can stop with a non-zero exit and let systemd restart it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import cv2
import numpy as np

from device.detect.preprocess import Yuv420Frame
from device.errors import DoorstepError


class SourceError(DoorstepError):
    """The frame source failed for good (its capture thread died, the camera is gone)."""


@dataclass(frozen=True)
class Frame:
    """One captured frame: ``image`` is BGR (the main stream); ``lores`` the model-size stream
    where the camera delivers one; ``t`` seconds (frame timestamps, not the wall clock, for files)."""

    image: np.ndarray
    t: float
    index: int
    lores: Yuv420Frame | np.ndarray | None = None
    motion: np.ndarray | None = None  # the motion gate's thumbnail, made on the capture thread


ModelSize = Callable[[int, int], tuple[int, int] | None]


class FrameSource(ABC):
    """Open, then ``read()`` until it returns ``None`` (a finite source has ended)."""

    live: bool = False
    dropped: int = 0
    ended: bool = False
    _capturer: CaptureThread | None = None
    # The size the model reads a WxH frame at (set by the daemon from the model's input). A live
    # source's capture thread then delivers the frame at that size too (``Frame.lores``), as
    # picamera2's ISP delivers a lores stream: the resize runs beside the inference of the
    # frame before, not in front of it.
    model_size: ModelSize | None = None
    # The motion gate's thumbnail of a model-size frame (``MotionGate.thumbnail``), made there
    # too: a frame the gate skips then costs the main loop no image work at all.
    motion_thumbnail: Callable[[np.ndarray], np.ndarray] | None = None

    def _frame(self, image: np.ndarray, t: float, index: int) -> Frame:
        """A captured frame, with its model-size copy and motion thumbnail where the daemon
        asked for them (``model_size``, ``motion_thumbnail``)."""
        size_of, thumb_of = self.model_size, self.motion_thumbnail
        if size_of is None:
            return Frame(image, t, index)
        h, w = image.shape[:2]
        size = size_of(w, h)
        if size is None:
            return Frame(image, t, index)
        lores = image if size == (w, h) else cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        motion = thumb_of(lores) if thumb_of is not None else None
        return Frame(image, t, index, None if lores is image else lores, motion)

    def describe(self) -> str:
        """How the source is named in log lines and errors."""
        return type(self).__name__

    # -- for live sources: a capture thread feeding a latest-frame slot
    def _start_capture(
        self, name: str, loop: Callable[[threading.Event, LatestSlot], None]
    ) -> None:
        self._capturer = CaptureThread(name, loop)
        self._capturer.start()

    def _read_captured(self, timeout: float) -> Frame | None:
        """The newest captured frame; ``None`` on timeout or at a clean end (``ended``); raises
        :class:`SourceError` once the capture thread died of an error."""
        if self._capturer is None:
            return None
        frame, self.dropped = self._capturer.read(timeout)
        if frame is None and self._capturer.finished:
            if self._capturer.error is not None:
                raise SourceError(f"{self.describe()}: capture failed: {self._capturer.error}")
            self.ended = True
        return frame

    def _stop_capture(self) -> None:
        if self._capturer is not None:
            self._capturer.stop()
            self._capturer = None

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self, timeout: float = 5.0) -> Frame | None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LatestSlot:
    """A one-frame mailbox between a capture thread and the consumer.

    ``put`` replaces an unread frame (counting it as dropped); ``get`` waits for a frame newer
    than the last one taken, so the detector never sees the same or a stale frame twice.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, timeout: float) -> Frame | None:
        """The newest unread frame, or ``None`` on timeout or once closed and drained."""
        with self._cond:
            self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout)
            frame, self._frame = self._frame, None
            return frame


class CaptureThread:
    """A background capture loop feeding a :class:`LatestSlot`, stopped and joined on demand."""

    def __init__(self, name: str, loop: Callable[[threading.Event, LatestSlot], None]) -> None:
        self.slot = LatestSlot()
        self.error: str | None = None  # why the loop died, when it did not end cleanly
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=name, daemon=True)

    def _run(self, loop: Callable[[threading.Event, LatestSlot], None]) -> None:
        try:
            loop(self._stop, self.slot)
        except Exception as exc:  # any camera library error: the consumer must hear of it
            self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            self.slot.close()

    @property
    def finished(self) -> bool:
        """The loop has returned (or died) and every frame it delivered was taken."""
        return self.slot.closed

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def read(self, timeout: float) -> tuple[Frame | None, int]:
        """The newest frame (or None) and how many frames were dropped so far."""
        return self.slot.get(timeout), self.slot.dropped
