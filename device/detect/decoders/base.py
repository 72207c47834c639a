"""What every decoder shares: dequantizing outputs and the candidate boxes it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from device.bundle.manifest import DecoderSpec
from device.errors import DetectorError


@dataclass(frozen=True)
class Output:
    """One output tensor (batch axis removed) with its own quantization parameters."""

    name: str
    data: np.ndarray
    scale: float | None = None
    zero_point: int = 0

    def real(self, values: np.ndarray | None = None) -> np.ndarray:
        """Dequantize ``values`` (default: the whole tensor) with this tensor's parameters."""
        raw = self.data if values is None else values
        if self.scale is None:
            return raw.astype(np.float32, copy=False)
        return (raw.astype(np.float32) - self.zero_point) * np.float32(self.scale)

    def raw_threshold(self, value: float) -> float:
        """``value`` expressed in this tensor's stored (possibly quantized) units."""
        return value if self.scale is None else value / self.scale + self.zero_point


@dataclass(frozen=True)
class Candidates:
    """Detections before NMS: xyxy boxes in input-canvas pixels, scores, class ids."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    @staticmethod
    def empty() -> Candidates:
        return Candidates(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        )

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(self.boxes[idx], self.scores[idx], self.class_ids[idx])

    def __len__(self) -> int:
        return len(self.scores)


def require_finite(values: np.ndarray, output: Output) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DetectorError(
            f"model output {output.name!r} holds NaN or inf values: the model is broken "
            "(a failed conversion or quantization); re-export it"
        )


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    return np.stack(
        [b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], axis=1
    )


class Decoder(ABC):
    """Turns a model's raw outputs into candidate boxes on the input canvas."""

    kind: ClassVar[str]
    needs_nms: ClassVar[bool] = True

    def __init__(
        self,
        spec: DecoderSpec,
        input_size: tuple[int, int],
        num_classes: int,
        file: Callable[[str], Path],
    ) -> None:
        self.spec = spec
        self.width, self.height = input_size
        self.num_classes = num_classes
        self._scale = np.array([self.width, self.height, self.width, self.height], dtype=np.float32)

    def to_pixels(self, boxes: np.ndarray) -> np.ndarray:
        """Scale normalized boxes to canvas pixels (``box_units``; ``auto`` looks at the values)."""
        units = self.spec.box_units
        if units == "auto":
            units = "pixels" if boxes.size and float(np.abs(boxes).max()) > 2.0 else "normalized"
        return boxes * self._scale if units == "normalized" else boxes

    @abstractmethod
    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        """Candidates scoring at least ``score_threshold``."""

    @abstractmethod
    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        """Every candidate's best class score (dequantized and activated, 0..1 for a sound
        model), threshold aside: what the output checks look at."""

    def peak_score(self, outputs: Mapping[str, Output]) -> float:
        """The highest class score anywhere in the outputs (a collapsed model gives 0)."""
        best = self.best_scores(outputs)
        return float(best.max()) if best.size else 0.0


SATURATED_SCORE = 0.99
SATURATED_SHARE = 0.25  # of the candidates on one frame: a sound detector is sure of a few at most
SATURATED_MIN = 20  # candidates needed to call it (a post-processed top-10 may all be sure)


def output_problem(outputs: Mapping[str, Output], decoder: Decoder) -> str | None:
    """Why these outputs cannot come from a working model, or None: NaN or inf anywhere in a
    float output tensor (not only among the detections), or scores that saturate (most
    candidates at the maximum, as a broken export gives on any frame)."""
    for out in outputs.values():
        if out.data.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(out.data)))
            if bad:
                return (
                    f"output {out.name!r} holds NaN or inf in {bad} of {out.data.size} values: "
                    "the model is broken (a failed conversion or quantization); re-export it"
                )
    best = decoder.best_scores(outputs)
    if best.size >= SATURATED_MIN:
        sure = int(np.count_nonzero(best >= SATURATED_SCORE))
        if sure > SATURATED_SHARE * best.size:
            return (
                f"{sure} of {best.size} candidates score {SATURATED_SCORE} or more on one frame: "
                "the model's scores saturate (a broken export, or the wrong output taken for the "
                "scores); check it against its source model"
            )
    return None
