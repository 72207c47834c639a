from __future__ import annotations

import numpy as np

from device.detect.nms import box_iou, nms


def _reference_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float
) -> list[int]:
    """Textbook greedy NMS, one pair at a time, per class."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(
            classes[i] != classes[k] or box_iou(boxes[k], boxes[i : i + 1])[0] <= thr for k in keep
        ):
            keep.append(i)
    return keep


def test_iou_hand_computed() -> None:
    a = np.array([0, 0, 10, 10], np.float32)
    b = np.array([[5, 5, 15, 15], [10, 10, 20, 20], [0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [25 / 175, 0.0, 1.0], rtol=1e-6)


def test_overlapping_same_class_box_is_suppressed_other_class_kept() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, classes, 0.5, 100).tolist() == [0, 2, 3]


def test_max_detections_and_empty() -> None:
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(5)], np.float32)
    assert nms(boxes, np.linspace(0.9, 0.5, 5), np.zeros(5, int), 0.5, 2).tolist() == [0, 1]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, int), 0.5, 10).size == 0


def test_matches_textbook_nms_on_random_boxes() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 80))
        xy = rng.uniform(0, 100, (n, 2))
        wh = rng.uniform(5, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        scores = rng.uniform(0, 1, n)
        classes = rng.integers(0, 3, n)
        got = nms(boxes, scores, classes, 0.45, 1000).tolist()
        assert got == _reference_nms(boxes, scores, classes, 0.45)
