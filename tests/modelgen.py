"""Small real TFLite detectors, built with TensorFlow, that emit each supported output layout.

Each model's outputs are fixed tensors we choose (plus a tiny dependence on the input so the
converter cannot fold the graph away), so a test knows exactly which boxes, classes and scores
the decoder must recover. Quantized variants go through TensorFlow's real full-integer
post-training quantization with a representative dataset, so each output carries its own
scale and zero point, as in real exports.

Models are cached under ``.cache/test-models/<hash of this file>/`` so that the device-only
test environment (no TensorFlow) runs the same detector tests on the very same files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = (
    ROOT / ".cache" / "test-models" / hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
)

INPUT = 64  # model input is INPUT x INPUT
SOURCE_W, SOURCE_H = 128, 96  # source frames are 4:3, so letterbox padding is exercised
NC = 4


@dataclass(frozen=True)
class Truth:
    """What the decoder must find, in *source* pixels."""

    boxes: list[list[float]]
    classes: list[int]
    scores: list[float]


@dataclass(frozen=True)
class Case:
    name: str
    layout: str
    quantized: bool = False
    nchw: bool = False
    input_type: str = "uint8"  # of quantized models: uint8 or int8
    pixels: bool = False  # boxes in input pixels rather than 0..1
    resize: str = "letterbox"
    extra: dict[str, object] = field(default_factory=dict)


CASES = [
    Case("yolo_v8_float", "yolo_v8", pixels=True),
    Case("yolo_v8_int8", "yolo_v8", quantized=True),
    Case("yolo_v8_int8_in_int8", "yolo_v8", quantized=True, input_type="int8"),
    Case("yolo_v8_float_nchw", "yolo_v8", nchw=True),
    Case("yolo_v5_float", "yolo_v5"),
    Case("yolo_v5_int8", "yolo_v5", quantized=True),
    Case("yolo_e2e_float", "yolo_e2e", pixels=True),
    Case("yolo_e2e_int8", "yolo_e2e", quantized=True),
    Case("ssd_raw_float", "ssd_raw", resize="stretch"),
    Case("ssd_raw_int8", "ssd_raw", quantized=True, resize="stretch"),
    # Boxes in the pixels of a 640-wide model share one int8 tensor with the scores: the
    # scores round to zero, the classic collapse the detector must report.
    Case(
        "yolo_v8_int8_collapsed", "yolo_v8", quantized=True, pixels=True, extra={"box_gain": 10.0}
    ),
    # NanoDet: NCHW float input (BGR, mean/std), class scores then distance bins per point.
    Case("nanodet_float", "nanodet", nchw=True, resize="stretch"),
    Case("nanodet_int8", "nanodet", quantized=True, nchw=True, resize="stretch"),
    # A float model whose scores are NaN, as a broken conversion yields.
    Case("yolo_v8_float_nan", "yolo_v8", extra={"nan": True}),
    # NaN only in the boxes of anchors that score low: invisible to the decoding of survivors.
    Case("yolo_v8_float_nan_boxes", "yolo_v8", extra={"nan_boxes": True}),
    # A broken export as seen in the field: most anchors at score 1.0, many with zero width.
    Case("yolo_v8_float_saturated", "yolo_v8", pixels=True, extra={"saturate": True}),
]

TRUTH = Truth(
    boxes=[[20.0, 16.0, 60.0, 56.0], [70.0, 30.0, 118.0, 90.0]],
    classes=[1, 2],
    scores=[0.9, 0.8],
)


def _canvas_boxes(resize: str) -> np.ndarray:
    """TRUTH's source boxes as they lie on the model's input canvas (xyxy pixels)."""
    src = np.array(TRUTH.boxes, dtype=np.float64)
    if resize == "stretch":
        sx, sy, px, py = INPUT / SOURCE_W, INPUT / SOURCE_H, 0.0, 0.0
    else:
        scale = min(INPUT / SOURCE_W, INPUT / SOURCE_H)
        nw, nh = round(SOURCE_W * scale), round(SOURCE_H * scale)
        sx, sy, px, py = nw / SOURCE_W, nh / SOURCE_H, (INPUT - nw) // 2, (INPUT - nh) // 2
    out = src.copy()
    out[:, [0, 2]] = src[:, [0, 2]] * sx + px
    out[:, [1, 3]] = src[:, [1, 3]] * sy + py
    return out


def _cells() -> int:
    return sum(math.ceil(INPUT / s) ** 2 for s in (8, 16, 32))


def ssd_anchors() -> np.ndarray:
    """A small SSD anchor grid: 8x8 and 4x4 cells, two aspect ratios each (yc, xc, h, w)."""
    rows = []
    for cells, size in ((8, 0.2), (4, 0.45)):
        for i in range(cells):
            for j in range(cells):
                for aspect in (1.0, 2.0):
                    rows.append(
                        [
                            (i + 0.5) / cells,
                            (j + 0.5) / cells,
                            size / math.sqrt(aspect),
                            size * math.sqrt(aspect),
                        ]
                    )
    return np.array(rows, dtype=np.float32)


def head_outputs(case: Case) -> dict[str, np.ndarray]:
    """The exact output tensors (without batch axis) a model of ``case`` must emit."""
    rng = np.random.default_rng(7)
    boxes = _canvas_boxes(case.resize)
    unit = 1.0 if case.pixels else 1.0 / INPUT
    xyxy = boxes * unit
    cxcywh = np.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ],
        axis=1,
    )
    span = INPUT * unit
    if case.layout == "yolo_v8":
        n = _cells()
        out = np.zeros((4 + NC, n), np.float32)
        out[:4] = rng.uniform(0.1, 0.3, (4, n)) * span
        out[4:] = rng.uniform(0.0, 0.05, (NC, n))
        for k, slot in enumerate((10, 50)):
            out[:4, slot] = cxcywh[k]
            out[4:, slot] = 0.02
            out[4 + TRUTH.classes[k], slot] = TRUTH.scores[k]
        out[:4] *= float(case.extra.get("box_gain", 1.0))  # type: ignore[arg-type]
        if case.extra.get("nan"):
            out[4:, ::3] = np.nan
        if case.extra.get("nan_boxes"):
            out[:4, 4::7] = np.nan  # the truth's slots (10, 50) are not among them
        if case.extra.get("saturate"):
            sure = np.arange(n) % 5 != 0  # 80 % of the anchors
            out[4, sure] = 1.0
            out[2, sure & (np.arange(n) % 2 == 0)] = 0.0  # zero width
        return {"predictions": out}
    if case.layout == "yolo_v5":
        n = 3 * _cells()
        out = np.zeros((n, 5 + NC), np.float32)
        out[:, :4] = rng.uniform(0.1, 0.3, (n, 4)) * span
        out[:, 4] = rng.uniform(0.0, 0.05, n)
        out[:, 5:] = rng.uniform(0.0, 1.0, (n, NC))
        for k, slot in enumerate((30, 200)):
            out[slot, :4] = cxcywh[k]
            out[slot, 4] = 1.0
            out[slot, 5:] = 0.05
            out[slot, 5 + TRUTH.classes[k]] = TRUTH.scores[k]
        return {"predictions": out}
    if case.layout == "yolo_e2e":
        out = np.zeros((300, 6), np.float32)
        out[:, :4] = rng.uniform(0.1, 0.3, (300, 4)) * span
        out[:, 4] = rng.uniform(0.0, 0.05, 300)
        for k in range(2):
            out[k, :4] = xyxy[k]
            out[k, 4] = TRUTH.scores[k]
            out[k, 5] = TRUTH.classes[k]
        return {"detections": out}
    if case.layout == "ssd_raw":
        anchors = ssd_anchors()
        n = len(anchors)
        enc = rng.normal(0, 0.5, (n, 4)).astype(np.float32)
        logits = np.full((n, NC + 1), -6.0, np.float32)
        logits[:, 0] = 4.0  # background
        norm = boxes / INPUT
        for k, slot in enumerate((27, 140)):
            x1, y1, x2, y2 = norm[k]
            yc, xc, h, w = anchors[slot]
            enc[slot] = [
                ((y1 + y2) / 2 - yc) / h * 10,
                ((x1 + x2) / 2 - xc) / w * 10,
                math.log((y2 - y1) / h) * 5,
                math.log((x2 - x1) / w) * 5,
            ]
            logits[slot, 0] = -4.0
            logits[slot, 1 + TRUTH.classes[k]] = math.log(TRUTH.scores[k] / (1 - TRUTH.scores[k]))
        return {"box_encodings": enc, "class_predictions": logits}
    if case.layout == "nanodet":
        return {"predictions": _nanodet_rows(boxes, rng)}
    raise ValueError(case.layout)


NANODET_REG_MAX = 7


def _nanodet_rows(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NanoDet rows whose decoding gives exactly ``boxes`` (canvas xyxy) at two grid points of
    the stride-8 level: each side's distance d (in strides) is a softmax that puts about 1 - f
    on bin floor(d) and f on the next, so its expectation is about d."""
    bins = NANODET_REG_MAX + 1
    n = _cells()
    out = np.zeros((n, NC + 4 * bins), np.float32)
    out[:, :NC] = rng.uniform(0.0, 0.05, (n, NC))
    out[:, NC:] = rng.normal(0, 0.5, (n, 4 * bins))
    grid = math.ceil(INPUT / 8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        i, j = int((x1 + x2) / 2 // 8), int((y1 + y2) / 2 // 8)
        cx, cy = (i + 0.5) * 8, (j + 0.5) * 8
        row = j * grid + i
        out[row, :NC] = 0.02
        out[row, TRUTH.classes[k]] = TRUTH.scores[k]
        for side, d in enumerate(((cx - x1) / 8, (cy - y1) / 8, (x2 - cx) / 8, (y2 - cy) / 8)):
            assert 0 <= d < NANODET_REG_MAX, d
            lo, f = int(d), d - int(d)
            # Bins kept within -6..0: the int8 variant shares one tensor with the scores (as
            # real exports do), so a wide logit range would cost the scores their precision.
            logits = np.full(bins, -6.0)
            logits[lo] = max(math.log(max(1 - f, 1e-12)), -6.0)
            logits[lo + 1] = max(math.log(max(f, 1e-12)), -6.0)
            out[row, NC + side * bins : NC + (side + 1) * bins] = logits
    return out


def build_tflite(case: Case) -> bytes:
    """Convert a model that emits ``head_outputs(case)`` (float or full-integer int8)."""
    import tensorflow as tf

    consts = {k: tf.constant(v) for k, v in head_outputs(case).items()}
    shape = [1, 3, INPUT, INPUT] if case.nchw else [1, INPUT, INPUT, 3]

    class Head(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
        def __call__(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            # A dependence on the input small enough not to move any value we check.
            tiny = tf.reduce_mean(images) * 1e-4
            return {k: c[None] + tiny for k, c in consts.items()}

    head = Head()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [head.__call__.get_concrete_function()], head
    )
    if case.quantized:
        rng = np.random.default_rng(0)

        def representative():  # type: ignore[no-untyped-def]
            for _ in range(8):
                yield [rng.uniform(0, 1, shape).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8 if case.input_type == "uint8" else tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def labels_text() -> str:
    return "parcel\nperson\ndog\ncat\n"


def build_missing() -> None:
    """Build every case's model that is not cached yet (imports TensorFlow)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        target = CACHE / f"{case.name}.tflite"
        if not target.exists():
            part = target.with_suffix(".part")
            part.write_bytes(build_tflite(case))
            part.replace(target)
    np.save(CACHE / "anchors.part.npy", ssd_anchors())
    (CACHE / "anchors.part.npy").replace(CACHE / "anchors.npy")
    for name, text in (("labels.txt", labels_text()), ("truth.json", json.dumps(TRUTH.__dict__))):
        (CACHE / f"{name}.part").write_text(text)
        (CACHE / f"{name}.part").replace(CACHE / name)


def ensure_models(build: bool) -> Path | None:
    """Return the cache folder with every case's model, building what is missing if ``build``.

    TensorFlow runs in a child process: loaded beside tflite_runtime in one process, the two
    copies of TFLite clash (the runtime then fails to load models with ``vector::reserve``).
    """

    def missing() -> bool:
        names = [f"{c.name}.tflite" for c in CASES] + ["anchors.npy", "labels.txt", "truth.json"]
        return not all((CACHE / n).exists() for n in names)

    if not missing():
        return CACHE
    if not build:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test workers share the cache); the others wait, then find
    # the models built. The lock is released if the builder dies.
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if missing():
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            code = "import modelgen; modelgen.build_missing()"
            # Bounded like every wait in the tests: a stuck TensorFlow child must not hang it.
            subprocess.run(
                [sys.executable, "-c", code],
                cwd=Path(__file__).parent,
                env=env,
                check=True,
                timeout=600,
            )
    return CACHE
