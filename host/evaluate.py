"""``doorstep-host evaluate``: COCO-style accuracy of one or more models on a labeled set.

Detections come from the device's own :class:`~device.detect.detector.Detector` (its
preprocessing, decoding and NMS), so what is measured is what the doorbell runs. Matching and
AP come from pycocotools; precision/recall/F1 at the operating threshold are counted from the
library's own per-image matches at IoU 0.5.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.detect.detector import Detector
from device.errors import DoorstepError
from host.datasets import Dataset


class EvaluationError(DoorstepError):
    """The model and the evaluation set cannot be compared."""


@dataclass
class ClassScore:
    name: str
    ap50: float
    ap: float
    precision: float
    recall: float
    f1: float
    ground_truth: int


@dataclass
class ModelScore:
    """One model's figures on one set; ``curves`` are (recall, precision) per class at IoU 0.5."""

    model: str
    threshold: float
    overall: ClassScore
    classes: list[ClassScore]
    images: int
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def c(s: ClassScore) -> dict[str, Any]:
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.__dict__.items()}

        return {
            "model": self.model,
            "threshold": self.threshold,
            "images": self.images,
            "overall": c(self.overall),
            "classes": [c(s) for s in self.classes],
        }


def parse_label_map(items: Sequence[str]) -> dict[str, str]:
    """``suitcase=package`` (model label = dataset class), repeatable or comma separated."""
    mapping: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            model_name, sep, data_name = pair.partition("=")
            if not sep or not model_name.strip() or not data_name.strip():
                raise EvaluationError(
                    f"--label-map {pair!r}: expected MODEL_LABEL=DATASET_CLASS, e.g. suitcase=package"
                )
            mapping[model_name.strip()] = data_name.strip()
    return mapping


def class_mapping(
    model_labels: Sequence[str], dataset: Dataset, label_map: dict[str, str]
) -> dict[int, int]:
    """Model class id -> dataset class id; refuse a model that predicts none of the set's classes."""
    for model_name in label_map:
        if model_name not in model_labels:
            raise EvaluationError(
                f"--label-map names {model_name!r}, which is not one of the model's labels"
            )
    for data_name in label_map.values():
        if data_name not in dataset.names:
            raise EvaluationError(
                f"--label-map maps to {data_name!r}, not a class of {dataset.root} ({dataset.names})"
            )
    mapping = {}
    for i, name in enumerate(model_labels):
        target = label_map.get(name, name)
        if target in dataset.names:
            mapping[i] = dataset.names.index(target)
    if not mapping:
        raise EvaluationError(
            f"the model's classes ({', '.join(model_labels[:8])}{'…' if len(model_labels) > 8 else ''}) "
            f"include none of the evaluation set's ({', '.join(dataset.names)}): "
            "map them with --label-map MODEL_LABEL=DATASET_CLASS"
        )
    return mapping


def _coco_objects(dataset: Dataset, sizes: list[tuple[int, int]]) -> Any:
    from pycocotools.coco import COCO

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, (sample, (w, h)) in enumerate(zip(dataset.samples, sizes, strict=True)):
        images.append({"id": i, "width": w, "height": h, "file_name": str(sample.image)})
        for box, cls in zip(sample.pixel_boxes(w, h), sample.classes, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": cls,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k, "name": n} for k, n in enumerate(dataset.names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def score(
    detections: list[dict[str, Any]], gt: Any, names: list[str], threshold: float, model: str
) -> ModelScore:
    """COCO AP via pycocotools, plus P/R/F1 at ``threshold`` from its IoU-0.5 matches."""
    from pycocotools.cocoeval import COCOeval

    ids = list(range(len(names)))
    per_class_gt = [len(gt.getAnnIds(catIds=[k], iscrowd=False)) for k in ids]
    if not detections:
        zero = [
            ClassScore(n, 0.0, 0.0, 0.0, 0.0, 0.0, g)
            for n, g in zip(names, per_class_gt, strict=True)
        ]
        return ModelScore(
            model,
            threshold,
            ClassScore("all", 0.0, 0.0, 0.0, 0.0, 0.0, sum(per_class_gt)),
            zero,
            len(gt.getImgIds()),
        )
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T, R, K, A, M]; A=0 all areas, M=-1 the largest maxDets
    recall_thresholds = ev.params.recThrs

    def ap(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else 0.0

    tp = np.zeros(len(ids))
    fp = np.zeros(len(ids))
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:
            continue
        k = e["category_id"]
        matched = np.asarray(e["dtMatches"])[0] > 0
        ignored = np.asarray(e["dtIgnore"])[0].astype(bool)
        keep = (np.asarray(e["dtScores"]) >= threshold) & ~ignored
        tp[k] += np.count_nonzero(matched & keep)
        fp[k] += np.count_nonzero(~matched & keep)

    def prf(t: float, f: float, g: int) -> tuple[float, float, float]:
        p = t / (t + f) if t + f else 0.0
        r = t / g if g else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    classes, curves = [], {}
    for k, name in enumerate(names):
        p, r, f1 = prf(tp[k], fp[k], per_class_gt[k])
        classes.append(
            ClassScore(
                name,
                ap(precision[0, :, k, 0, -1]),
                ap(precision[:, :, k, 0, -1]),
                p,
                r,
                f1,
                per_class_gt[k],
            )
        )
        curve = np.clip(precision[0, :, k, 0, -1], 0, 1)
        reached = int(np.flatnonzero(curve > 0).max()) + 1 if (curve > 0).any() else 0
        curves[name] = (
            recall_thresholds[:reached].tolist(),
            curve[:reached].tolist(),
        )  # to max recall
    p, r, f1 = prf(tp.sum(), fp.sum(), sum(per_class_gt))
    overall = ClassScore("all", float(ev.stats[1]), float(ev.stats[0]), p, r, f1, sum(per_class_gt))
    return ModelScore(model, threshold, overall, classes, len(gt.getImgIds()), curves)


def evaluate_detector(
    detector: Detector,
    dataset: Dataset,
    label_map: dict[str, str] | None = None,
    threshold: float | None = None,
    name: str | None = None,
    show_progress: bool = True,
) -> ModelScore:
    """Run ``detector`` over ``dataset`` and score it (AP at all scores, P/R/F1 at the threshold)."""
    operating = detector.score_threshold if threshold is None else threshold
    detector.score_threshold = min(0.01, operating)  # AP needs the low-scoring detections too
    detector.max_detections = 100

    def detect(image: np.ndarray) -> list[tuple[int, float, tuple[float, ...]]]:
        return [(d.class_id, d.score, d.box) for d in detector.detect(image)]

    return evaluate_function(
        detect,
        detector.labels,
        dataset,
        label_map,
        operating,
        name or str(detector.bundle.source),
        show_progress,
    )


def evaluate_function(
    detect: Callable[[np.ndarray], Iterable[tuple[int, float, Sequence[float]]]],
    labels: Sequence[str],
    dataset: Dataset,
    label_map: dict[str, str] | None,
    threshold: float,
    name: str,
    show_progress: bool = True,
) -> ModelScore:
    """Score any detector given as ``detect(bgr_image) -> [(class_id, score, xyxy pixels)]``
    over ``labels`` (a model outside doorstep's decoders, such as an exported file)."""
    import cv2

    mapping = class_mapping(list(labels), dataset, label_map or {})
    detections: list[dict[str, Any]] = []
    sizes = []
    for i, sample in enumerate(dataset.samples):
        image = cv2.imread(str(sample.image))
        if image is None:
            raise EvaluationError(
                f"{sample.image}: missing or unreadable image of the evaluation set"
            )
        sizes.append((image.shape[1], image.shape[0]))
        for class_id, det_score, box in detect(image):
            if class_id in mapping:
                x1, y1, x2, y2 = (float(v) for v in box)
                detections.append(
                    {
                        "image_id": i,
                        "category_id": mapping[class_id],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(det_score),
                    }
                )
        if show_progress and ((i + 1) % 10 == 0 or i + 1 == len(dataset.samples)):
            print(
                f"  {Path(name).name or name}: {i + 1}/{len(dataset.samples)} images",
                file=sys.stderr,
                flush=True,
            )
    gt = _coco_objects(dataset, sizes)
    return score(detections, gt, dataset.names, threshold, name)


def format_table(scores: Sequence[ModelScore]) -> str:
    head = f"{'model':<28} {'class':<12} {'AP@0.5':>7} {'AP@.5:.95':>9} {'P':>6} {'R':>6} {'F1':>6} {'GT':>5}"
    lines = [head, "-" * len(head)]
    for s in scores:
        rows = [s.overall] + (s.classes if len(s.classes) > 1 else [])
        for c in rows:
            lines.append(
                f"{Path(s.model).name[:28]:<28} {c.name[:12]:<12} {c.ap50:>7.3f} {c.ap:>9.3f} "
                f"{c.precision:>6.3f} {c.recall:>6.3f} {c.f1:>6.3f} {c.ground_truth:>5}"
            )
    if len(scores) > 1:
        base = scores[0].overall.ap50
        for s in scores[1:]:
            lines.append(
                f"AP@0.5 of {Path(s.model).name} vs {Path(scores[0].model).name}: "
                f"{(s.overall.ap50 - base) * 100:+.2f} points"
            )
    return "\n".join(lines)


def plot_curves(scores: Sequence[ModelScore], path: str | Path) -> Path:
    """Precision-recall curves at IoU 0.5, one line per model and class, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for s in scores:
        for cls, (rec, prec) in s.curves.items():
            ax.plot(
                rec,
                prec,
                label=f"{Path(s.model).name} {cls} (AP@0.5 {dict((c.name, c.ap50) for c in s.classes)[cls]:.3f})",
            )
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="precision-recall at IoU 0.5",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_json(scores: Sequence[ModelScore], path: str | Path) -> None:
    Path(path).write_text(json.dumps([s.to_json() for s in scores], indent=2) + "\n")
