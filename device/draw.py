"""Annotated images: boxes, labels and scores drawn on the source frame."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from device.detect.detector import Detection


def _colour(class_id: int) -> tuple[int, int, int]:
    hue = (class_id * 47) % 180
    bgr = cv2.cvtColor(np.array([[[hue, 200, 255]]], dtype=np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def annotate(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of ``image`` with every detection drawn on it."""
    out = image.copy()
    thick = max(1, round(min(out.shape[:2]) / 300))
    for det in detections:
        x1, y1, x2, y2 = (round(v) for v in det.box)
        colour = _colour(det.class_id)
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        text = f"{det.label} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, thick)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), colour, -1)
        cv2.putText(
            out, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0), thick
        )
    return out


def parcel_snapshot(
    image: np.ndarray, boxes: Sequence[Sequence[float]], quality: int = 85
) -> bytes | None:
    """A JPEG of ``image`` with the parcel ``boxes`` outlined (the retained MQTT snapshot)."""
    out = image.copy()
    for x1, y1, x2, y2 in boxes:
        cv2.rectangle(out, (round(x1), round(y1)), (round(x2), round(y2)), (0, 200, 255), 3)
    ok, jpeg = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return jpeg.tobytes() if ok else None
