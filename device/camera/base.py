"""What every frame source shares: the frame, the interface, the latest-frame slot."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from device.detect.preprocess import Yuv420Frame


@dataclass(frozen=True)
class Frame:
    """One captured frame: ``image`` is BGR (the main stream); ``lores`` the model-size stream
    where the camera delivers one; ``t`` seconds (frame timestamps, not the wall clock, for files)."""

    image: np.ndarray
    t: float
    index: int
    lores: Yuv420Frame | np.ndarray | None = None


class FrameSource(ABC):
    """Open, then ``read()`` until it returns ``None`` (a finite source has ended)."""

    live: bool = False
    dropped: int = 0
    _capturer: CaptureThread | None = None

    # -- for live sources: a capture thread feeding a latest-frame slot
    def _start_capture(
        self, name: str, loop: Callable[[threading.Event, LatestSlot], None]
    ) -> None:
        self._capturer = CaptureThread(name, loop)
        self._capturer.start()

    def _read_captured(self, timeout: float) -> Frame | None:
        if self._capturer is None:
            return None
        frame, self.dropped = self._capturer.read(timeout)
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=name, daemon=True)

    def _run(self, loop: Callable[[threading.Event, LatestSlot], None]) -> None:
        try:
            loop(self._stop, self.slot)
        finally:
            self.slot.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def read(self, timeout: float) -> tuple[Frame | None, int]:
        """The newest frame (or None) and how many frames were dropped so far."""
        return self.slot.get(timeout), self.slot.dropped
