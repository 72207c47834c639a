"""NanoDet / NanoDet-Plus heads: one row per grid point, class scores then distance bins.

``[1, N, nc + 4 * (reg_max + 1)]``: N grid points over the strides (finest first, each level
row-major), per point ``nc`` sigmoid class scores, then for each side (left, top, right,
bottom) ``reg_max + 1`` logits of the distance from the point's centre, in strides
(distribution focal loss): the distance is the expectation of their softmax, times the stride.
Centres lie at ``(i + center_offset) * stride``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from device.bundle.manifest import DecoderSpec, NanoDetParams
from device.detect.decoders.base import Candidates, Decoder, Output, require_finite
from device.errors import BundleError


class NanoDetDecoder(Decoder):
    kind = "nanodet"

    def __init__(
        self,
        spec: DecoderSpec,
        input_size: tuple[int, int],
        num_classes: int,
        file: Callable[[str], Path],
    ) -> None:
        super().__init__(spec, input_size, num_classes, file)
        self.params = spec.nanodet or NanoDetParams()
        self.bins = self.params.reg_max + 1
        centres, strides = [], []
        for s in self.params.strides:
            gw, gh = math.ceil(self.width / s), math.ceil(self.height / s)
            ys, xs = np.mgrid[0:gh, 0:gw]
            off = self.params.center_offset
            centres.append(np.stack([(xs.ravel() + off) * s, (ys.ravel() + off) * s], axis=1))
            strides.append(np.full(gw * gh, s, np.float32))
        self.centres = np.concatenate(centres).astype(np.float32)
        self.strides = np.concatenate(strides)
        out = spec.outputs.get("predictions")
        if out is not None and len(out.shape) == 3:
            rows, cols = out.shape[1], out.shape[2]
            if rows != len(self.centres) or cols != num_classes + 4 * self.bins:
                raise BundleError(
                    f"NanoDet output {list(out.shape)}: expected [1, {len(self.centres)}, "
                    f"{num_classes} + 4 x {self.bins}] for a {self.width}x{self.height} input, "
                    f"strides {list(self.params.strides)} and {num_classes} classes"
                )
        self._weights = np.arange(self.bins, dtype=np.float32)

    def _rows(self, pred: Output) -> np.ndarray:
        return pred.data.reshape(-1, pred.data.shape[-1])

    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        pred = outputs["predictions"]
        scores = pred.real(self._rows(pred)[:, : self.num_classes])
        require_finite(scores, pred)
        best: np.ndarray = scores.max(axis=1)
        return best

    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        pred = outputs["predictions"]
        rows = self._rows(pred)
        cls = rows[:, : self.num_classes]
        best = cls.argmax(axis=1)
        best_raw = np.take_along_axis(cls, best[:, None], axis=1)[:, 0]
        keep = np.flatnonzero(best_raw >= pred.raw_threshold(score_threshold))
        if not keep.size:
            return Candidates.empty()
        scores = pred.real(best_raw[keep])
        logits = pred.real(rows[keep, self.num_classes :]).reshape(-1, 4, self.bins)
        require_finite(logits, pred)
        e = np.exp(logits - logits.max(axis=2, keepdims=True))
        dist = (e * self._weights).sum(axis=2) / e.sum(axis=2) * self.strides[keep, None]
        c = self.centres[keep]
        boxes = np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1)
        ok = scores >= score_threshold  # rounding of the raw threshold can admit a hair below
        return Candidates(
            boxes[ok].astype(np.float32),
            scores[ok].astype(np.float32),
            best[keep][ok].astype(np.int64),
        )
