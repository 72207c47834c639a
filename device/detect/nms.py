"""Class-aware non-maximum suppression in numpy."""

from __future__ import annotations

import numpy as np


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against ``[N, 4]`` boxes."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


# Up to this many candidates (a doorbell frame has a handful), plain Python on floats beats
# numpy, whose every call on a tiny array costs microseconds, more with the caches cold after an
# inference. Both paths give the same indices (tests/test_nms.py checks them against each other).
SMALL = 32


def _nms_small(
    boxes: list[list[float]],
    scores: list[float],
    classes: list[int],
    iou_threshold: float,
    max_detections: int,
) -> list[int]:
    """Greedy NMS one pair at a time: a box is kept unless a kept box of its class overlaps it
    by more than ``iou_threshold``."""
    keep: list[int] = []
    if max_detections <= 0:
        return keep
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable, like the numpy path
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        area = (x2 - x1) * (y2 - y1)
        for k in keep:
            if classes[k] != classes[i]:
                continue
            kx1, ky1, kx2, ky2 = boxes[k]
            inter = max(min(x2, kx2) - max(x1, kx1), 0.0) * max(min(y2, ky2) - max(y1, ky1), 0.0)
            union = area + (kx2 - kx1) * (ky2 - ky1) - inter
            if union > 0 and inter / max(union, 1e-12) > iou_threshold:
                break
        else:
            keep.append(i)
            if len(keep) == max_detections:
                break
    return keep


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou_threshold: float,
    max_detections: int,
) -> np.ndarray:
    """Indices of the boxes kept, best first; boxes of different classes never suppress each other.

    Classes are separated by shifting each class's boxes to its own region of the plane, so one
    greedy pass handles every class; each step compares the best remaining box with all others
    at once, so the Python loop runs once per *kept* box.
    """
    if len(boxes) <= 1:  # nothing to suppress (the common case with one parcel in view)
        return np.arange(min(len(boxes), max_detections), dtype=np.int64)
    if len(boxes) <= SMALL:
        return np.asarray(
            _nms_small(
                boxes.tolist(), scores.tolist(), class_ids.tolist(), iou_threshold, max_detections
            ),
            dtype=np.int64,
        )
    boxes = boxes.astype(np.float32, copy=False)
    span = float(boxes.max() - min(0.0, float(boxes.min()))) + 1.0
    shifted = boxes + (class_ids.astype(np.float32) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_detections:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        if not rest.size:
            break
        order = rest[box_iou(shifted[best], shifted[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
