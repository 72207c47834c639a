"""Non-maximum suppression and SSD box decoding, both of which take a plain-Python path for
the few candidates of a doorbell frame and numpy for many."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.bundle.manifest import DecoderSpec, SsdParams, TensorSpec
from device.detect.decoders.base import Output
from device.detect.decoders.ssd_raw import SsdRawDecoder, decode_ssd_boxes
from device.detect.nms import SMALL, _nms_small, box_iou, nms
from device.errors import DetectorError


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


@pytest.mark.parametrize("n", [2, 5, SMALL, SMALL + 1, 70])
def test_python_and_numpy_paths_keep_the_same_boxes(n: int) -> None:
    """Up to ``SMALL`` candidates NMS runs in plain Python, above in numpy: same answer."""
    rng = np.random.default_rng(n)
    for _ in range(30):
        xy = rng.uniform(0, 60, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], axis=1).astype(np.float32)
        scores, classes = rng.uniform(0, 1, n), rng.integers(0, 2, n)
        small = _nms_small(boxes.tolist(), scores.tolist(), classes.tolist(), 0.45, 1000)
        assert small == _reference_nms(boxes, scores, classes, 0.45)
        assert nms(boxes, scores, classes, 0.45, 1000).tolist() == small
        assert _nms_small(boxes.tolist(), scores.tolist(), classes.tolist(), 0.45, 2) == small[:2]
        assert _nms_small(boxes.tolist(), scores.tolist(), classes.tolist(), 0.45, 0) == []


def test_ssd_box_decoding_in_python_matches_numpy(tmp_path: Path) -> None:
    """The SSD decoder decodes up to ``SMALL`` boxes in plain Python, more in numpy."""
    rng = np.random.default_rng(5)
    n = 3 * SMALL
    anchors = np.concatenate(
        [rng.uniform(0, 1, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))], axis=1
    ).astype(np.float32)
    np.save(tmp_path / "anchors.npy", anchors)
    spec = DecoderSpec(
        kind="ssd_raw",
        outputs={
            "boxes": TensorSpec(name="b", shape=[1, n, 4], dtype="float32"),
            "scores": TensorSpec(name="s", shape=[1, n, 2], dtype="float32"),
        },
        ssd=SsdParams(score_activation="sigmoid", background_class=True),
    )
    decoder = SsdRawDecoder(spec, (320, 240), 1, lambda name: tmp_path / name)
    enc = rng.normal(0, 2, (n, 4)).astype(np.float32)
    logits = rng.normal(0, 2, (n, 2)).astype(np.float32)
    outputs = {"boxes": Output("b", enc), "scores": Output("s", logits)}
    for count in (3, SMALL, SMALL + 1, n):  # the best `count` anchors pass the threshold
        cut = float(np.sort(logits[:, 1])[-count])
        cand = decoder.decode(outputs, 1 / (1 + np.exp(-cut)) - 1e-6)
        keep = np.flatnonzero(logits[:, 1] >= cut)
        assert len(cand) == count == len(keep)
        expected = decode_ssd_boxes(enc[keep], anchors[keep], (10.0, 10.0, 5.0, 5.0))
        np.testing.assert_allclose(
            cand.boxes, expected * [320, 240, 320, 240], rtol=1e-5, atol=1e-3
        )
        np.testing.assert_allclose(cand.scores, 1 / (1 + np.exp(-logits[keep, 1])), rtol=1e-5)
    nothing = decoder.decode(outputs, 0.9999999)
    assert len(nothing) == 0 and nothing.boxes.shape == (0, 4)
    broken = logits.copy()
    broken[7, 1] = np.nan
    with pytest.raises(DetectorError, match="NaN or inf"):
        decoder.decode({"boxes": outputs["boxes"], "scores": Output("s", broken)}, 0.5)
