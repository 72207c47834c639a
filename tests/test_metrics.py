"""The metric code: a hand-checked case, and agreement with pycocotools' own summary."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

from host.datasets import Dataset, Sample
from host.evaluate import EvaluationError, _coco_objects, class_mapping, score

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(
        importlib.util.find_spec("pycocotools") is None,
        reason="evaluation is host-side: pycocotools is in the main environment",
    ),
]


def _dataset(boxes: list[list[list[float]]], classes: list[list[int]], names: list[str]) -> Dataset:
    samples = [
        Sample(image=Path(f"{i}.jpg"), boxes=np.array(b, float).reshape(-1, 4), classes=tuple(c))
        for i, (b, c) in enumerate(zip(boxes, classes, strict=True))
    ]
    return Dataset(root=Path("."), format="test", names=names, samples=samples)


def _det(image: int, cls: int, box: list[float], s: float) -> dict[str, object]:
    x1, y1, x2, y2 = box
    return {"image_id": image, "category_id": cls, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}


def test_hand_checked_case() -> None:
    """Two parcels; detections ranked: hit (0.9), false alarm (0.8), hit (0.7).

    Precision is 1 up to recall 0.5, then 2/3 up to recall 1; COCO's 101-point interpolation
    gives AP@0.5 = (51 * 1 + 50 * 2/3) / 101 = 0.8350. At threshold 0.75: one hit, one false
    alarm: P = R = F1 = 0.5.
    """
    ds = _dataset([[[10, 10, 50, 50]], [[100, 100, 140, 160]]], [[0], [0]], ["package"])
    gt = _coco_objects(ds, [(200, 200), (200, 200)])
    dets = [
        _det(0, 0, [10, 10, 50, 50], 0.9),
        _det(1, 0, [0, 0, 20, 20], 0.8),
        _det(1, 0, [102, 101, 140, 160], 0.7),
    ]
    s = score(dets, gt, ds.names, 0.75, "m")
    assert s.overall.ap50 == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-4)
    assert (s.overall.precision, s.overall.recall, s.overall.f1) == (0.5, 0.5, 0.5)
    assert s.classes[0].ground_truth == 2
    s2 = score(dets, gt, ds.names, 0.6, "m")  # every detection counts: 2 hits, 1 false alarm
    assert s2.overall.precision == pytest.approx(2 / 3)
    assert s2.overall.recall == 1.0


def test_matches_pycocotools_summary_on_random_cases() -> None:
    rng = np.random.default_rng(4)
    boxes, classes, dets = [], [], []
    for i in range(12):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 150, (n, 2))
        b = np.concatenate([xy, xy + rng.uniform(10, 50, (n, 2))], axis=1)
        c = rng.integers(0, 2, n)
        boxes.append(b.tolist())
        classes.append(c.tolist())
        for box, cls in zip(b, c, strict=True):
            if rng.uniform() < 0.8:
                noisy = (box + rng.normal(0, 3, 4)).tolist()
                dets.append(_det(i, int(cls), noisy, float(rng.uniform(0.3, 1))))
        for _ in range(int(rng.integers(0, 3))):
            xy = rng.uniform(0, 150, 2)
            dets.append(
                _det(i, int(rng.integers(0, 2)), [*xy, *(xy + 20)], float(rng.uniform(0, 0.6)))
            )
    ds = _dataset(boxes, classes, ["package", "person"])
    gt = _coco_objects(ds, [(200, 200)] * 12)
    ours = score(dets, gt, ds.names, 0.5, "m")
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours.overall.ap50 == pytest.approx(ev.stats[1])
    assert ours.overall.ap == pytest.approx(ev.stats[0])
    assert np.mean([c.ap for c in ours.classes]) == pytest.approx(ev.stats[0])


def test_no_detections_scores_zero() -> None:
    ds = _dataset([[[10, 10, 50, 50]]], [[0]], ["package"])
    s = score([], _coco_objects(ds, [(100, 100)]), ds.names, 0.5, "m")
    assert s.overall.ap50 == 0.0
    assert s.overall.recall == 0.0


def test_class_mapping_and_mismatch_message() -> None:
    ds = _dataset([[]], [[]], ["package"])
    assert class_mapping(["person", "suitcase"], ds, {"suitcase": "package"}) == {1: 0}
    with pytest.raises(EvaluationError, match=r"include none of the evaluation set's \(package\)"):
        class_mapping(["person", "suitcase"], ds, {})
    with pytest.raises(EvaluationError, match="not one of the model's labels"):
        class_mapping(["person"], ds, {"suitcase": "package"})
