"""A hand-built Keras detector that finds the one red box in view: quantization's test subject.

It is no parcel detector; it exists so that Keras -> full-integer int8 TFLite with calibration
-> bundle -> device detector can be tested in seconds, with a known answer, and (its *fragile*
twin) so that the quality gate and ``--fix`` have a model they must catch. Its weights are set,
not trained:

* a 1x1 convolution scores each pixel's redness, ``R - (G + B) / 2``, clipped to 0..1;
* max-pooling a whole column (row) gives the column (row) profile of the red mask;
* a triangular fully-connected layer turns a profile into running sums, clipped at 1; their
  sum counts the columns before the first (after the last) red one: the box edges;
* the box's score is the mask's maximum.

Output: ``[1, 1, 6]`` = x1, y1, x2, y2 (0..1), score, class 0, the end-to-end YOLO layout.
Every op has an int8 kernel. Run as ``python -m support.redbox OUT.tflite`` from ``tests/``
(TensorFlow is loaded in that child process only: it must not share a process with
tflite-runtime), or ``python -m support.redbox OUT.keras [--fragile]`` for the float Keras model; the fragile variant
carries an outlier activation that wrecks naive int8 quantization (the quality gate's test).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 160
THRESHOLD, GAIN = 0.25, 2.5  # redness -> mask: clip((redness - THRESHOLD) * GAIN, 0, 1)
OUTLIER = 450.0  # the fragile variant's constant channel


def synthetic_scene(
    rng: np.random.Generator, width: int = 640, height: int = 480, red: bool = True
) -> tuple[np.ndarray, list[int] | None]:
    """A porch-like BGR scene (wall, door, step, mat) with, optionally, one red-brown box."""
    import cv2

    img = np.empty((height, width, 3), np.uint8)
    wall = rng.integers(120, 200, 3)
    img[:] = wall
    noise = rng.normal(0, 6, (height, width, 1))
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    dx = int(rng.integers(width // 5, width // 2))
    cv2.rectangle(
        img,
        (dx, height // 8),
        (dx + width // 4, height * 3 // 4),
        tuple(int(v) for v in rng.integers(40, 110, 3)),
        -1,
    )
    cv2.rectangle(
        img,
        (0, height * 3 // 4),
        (width, height),
        tuple(int(v) for v in rng.integers(90, 150, 3)),
        -1,
    )
    cv2.rectangle(
        img,
        (dx - 20, height * 3 // 4 + 10),
        (dx + width // 4 + 20, height * 3 // 4 + 40),
        (60, 70, 80),
        -1,
    )
    if not red:
        return img, None
    bw, bh = int(rng.integers(width // 8, width // 4)), int(rng.integers(height // 10, height // 5))
    x1 = int(rng.integers(10, width - bw - 10))
    y1 = int(rng.integers(height // 2, height - bh - 5))
    colour = (int(rng.integers(20, 60)), int(rng.integers(40, 80)), int(rng.integers(170, 230)))
    cv2.rectangle(img, (x1, y1), (x1 + bw - 1, y1 + bh - 1), colour, -1)
    cv2.line(
        img, (x1 + bw // 2, y1), (x1 + bw // 2, y1 + bh - 1), (150, 170, 190), max(2, bw // 20)
    )
    return img, [x1, y1, x1 + bw, y1 + bh]


def build_keras_model(fragile: bool = False) -> Any:
    import tensorflow as tf

    k = tf.keras
    inp = k.Input((SIZE, SIZE, 3), name="image")
    if fragile:
        # A second, constant channel of OUTLIER beside the redness: one int8 scale must now span
        # 0..OUTLIER, so moderately red pixels round to zero. The float model is unchanged.
        both = k.layers.Conv2D(2, 1, name="redness")(inp)
        redness = k.layers.Conv2D(1, 1, name="select")(both)
    else:
        redness = k.layers.Conv2D(1, 1, name="redness")(inp)
    mask = k.layers.ReLU(max_value=1.0, name="mask")(redness)

    def edges(profile: Any, name: str) -> tuple[Any, Any]:
        flat = k.layers.Flatten(name=f"{name}_profile")(profile)
        before = k.layers.ReLU(max_value=1.0)(
            k.layers.Dense(SIZE, use_bias=False, name=f"{name}_running")(flat)
        )
        after = k.layers.ReLU(max_value=1.0)(
            k.layers.Dense(SIZE, use_bias=False, name=f"{name}_reverse")(flat)
        )
        start = k.layers.Dense(1, name=f"{name}_start")(before)
        end = k.layers.Dense(1, name=f"{name}_end")(after)
        return start, end

    x1, x2 = edges(k.layers.MaxPool2D((SIZE, 1), name="columns")(mask), "x")
    y1, y2 = edges(k.layers.MaxPool2D((1, SIZE), name="rows")(mask), "y")
    score = k.layers.GlobalMaxPool2D(name="score")(mask)
    cls = k.layers.Dense(1, name="class")(score)
    out = k.layers.Reshape((1, 6), name="detections")(
        k.layers.Concatenate()([x1, y1, x2, y2, score, cls])
    )
    model = k.Model(inp, out, name="redbox")

    kernel = np.array([1.0, -0.5, -0.5], np.float32).reshape(1, 1, 3, 1) * GAIN
    bias = np.array([-THRESHOLD * GAIN], np.float32)
    if fragile:
        zeros = np.zeros_like(kernel)
        model.get_layer("redness").set_weights(
            [np.concatenate([kernel, zeros], axis=3), np.array([bias[0], OUTLIER], np.float32)]
        )
        model.get_layer("select").set_weights(
            [np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1), np.zeros(1, np.float32)]
        )
    else:
        model.get_layer("redness").set_weights([kernel, bias])
    upper = np.triu(np.ones((SIZE, SIZE), np.float32))  # running[j] = sum of profile[i <= j]
    for axis in ("x", "y"):
        model.get_layer(f"{axis}_running").set_weights([upper])
        model.get_layer(f"{axis}_reverse").set_weights([upper.T])
        # first red index / SIZE = 1 - (columns whose running sum reached 1) / SIZE
        model.get_layer(f"{axis}_start").set_weights(
            [np.full((SIZE, 1), -1.0 / SIZE, np.float32), np.ones(1, np.float32)]
        )
        model.get_layer(f"{axis}_end").set_weights(
            [np.full((SIZE, 1), 1.0 / SIZE, np.float32), np.zeros(1, np.float32)]
        )
    model.get_layer("class").set_weights([np.zeros((1, 1), np.float32), np.zeros(1, np.float32)])
    return model


def convert_int8(model: Any, calibration: list[np.ndarray]) -> bytes:
    """Full-integer post-training quantization: int8 weights and activations, uint8 input."""
    import cv2
    import tensorflow as tf

    def representative() -> Iterator[list[np.ndarray]]:
        for bgr in calibration:
            rgb = cv2.cvtColor(cv2.resize(bgr, (SIZE, SIZE)), cv2.COLOR_BGR2RGB)
            yield [rgb[None].astype(np.float32) / 255.0]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
    return bytes(converter.convert())


def main(argv: list[str]) -> int:
    """``OUT.tflite``: the int8 demo model; ``OUT.keras [--fragile]``: the float Keras model."""
    out = Path(argv[0])
    if out.suffix == ".keras":
        build_keras_model(fragile="--fragile" in argv).save(out)
        return 0
    rng = np.random.default_rng(2026)
    calibration = [synthetic_scene(rng, red=bool(i % 4))[0] for i in range(120)]
    # Black and white frames pin the input's quantization range to the full 0..255.
    calibration += [np.zeros((480, 640, 3), np.uint8), np.full((480, 640, 3), 255, np.uint8)]
    out.write_bytes(convert_int8(build_keras_model(), calibration))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
