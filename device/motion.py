"""Motion gating: run the detector only when the scene changed, and every few seconds anyway.

A cheap difference of small grayscale frames; with no motion the detector still runs every
``max_idle_s``, so a parcel that arrived unseen is caught and one that stays is re-confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from device.config import MotionConfig


@dataclass
class MotionGate:
    width: int = 64
    height: int = 48
    pixel_threshold: int = 12  # grey levels of change that count for a pixel
    min_changed: float = 0.01  # share of pixels that must change
    max_idle_s: float = 5.0
    _last: np.ndarray | None = None
    _last_run: float | None = None
    frames: int = 0
    skipped: int = 0

    @classmethod
    def from_config(cls, cfg: MotionConfig) -> MotionGate:
        return cls(min_changed=cfg.min_changed, max_idle_s=cfg.max_idle_s)

    def should_run(self, image: np.ndarray, t: float) -> bool:
        """Whether to run the detector on this frame (BGR), at frame time ``t``."""
        return self.decide(self.thumbnail(image), t)

    def thumbnail(self, image: np.ndarray) -> np.ndarray:
        """The small grey picture of ``image`` (BGR) that frames are compared by. Depends on
        the image only, so a capture thread can make it (``FrameSource.motion_thumbnail``)."""
        # The model-size frame is small enough to area-average directly. A full camera frame
        # is first sampled (nearest neighbour) to twice the target size, so only a fraction of
        # its memory is read; the averaging and the blur steady the sensor noise.
        h, w = image.shape[:2]
        if w > self.width * 8 or h > self.height * 8:
            image = cv2.resize(
                image, (self.width * 2, self.height * 2), interpolation=cv2.INTER_NEAREST
            )
            h, w = image.shape[:2]
        # Grey first (one byte a pixel for the averaging), then whole blocks of pixels per
        # output pixel, so OpenCV's area average takes its fast integer-factor path; the few
        # rows and columns past the last whole block are left out.
        fx, fy = max(1, round(w / self.width)), max(1, round(h / self.height))
        ow, oh = w // fx, h // fy
        grey = cv2.cvtColor(image[: oh * fy, : ow * fx], cv2.COLOR_BGR2GRAY)
        small = cv2.resize(grey, (ow, oh), interpolation=cv2.INTER_AREA)
        blurred: np.ndarray = cv2.GaussianBlur(small, (3, 3), 0)
        return blurred

    def decide(self, small: np.ndarray, t: float) -> bool:
        """Whether to run the detector on the frame whose :meth:`thumbnail` is ``small``."""
        self.frames += 1
        moved = self._last is None or self._last.shape != small.shape or (
            np.count_nonzero(cv2.absdiff(small, self._last) > self.pixel_threshold)
            >= self.min_changed * small.size
        )
        self._last = small
        due = self._last_run is None or t - self._last_run >= self.max_idle_s
        if moved or due:
            self._last_run = t
            return True
        self.skipped += 1
        return False

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / self.frames if self.frames else 0.0
