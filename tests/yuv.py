"""Test helper: lay out I420 frames with row padding, as picamera2 does."""

from __future__ import annotations

import numpy as np


def pad_i420(i420: np.ndarray, w: int, h: int, stride: int) -> np.ndarray:
    """An I420 image laid out as picamera2 returns it: every plane's rows padded to ``stride``."""
    buf = np.full((h * 3 // 2, stride), 99, np.uint8)
    buf[:h, :w] = i420[:h]
    flat_src = i420[h:].reshape(-1)
    flat_dst = buf[h:].reshape(-1)
    n = (h // 2) * (w // 2)
    for p in range(2):
        rows = flat_src[p * n : (p + 1) * n].reshape(h // 2, w // 2)
        dst = flat_dst[p * (h // 2) * (stride // 2) : (p + 1) * (h // 2) * (stride // 2)]
        dst.reshape(h // 2, stride // 2)[:, : w // 2] = rows
    return buf
