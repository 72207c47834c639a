"""A raw SSD head: box encodings and class scores over a fixed set of anchors.

Box encodings are ``(ty, tx, th, tw)`` relative to anchors ``(yc, xc, h, w)`` with the usual
scale factors (10, 10, 5, 5), as the TF Object Detection API and TFLite's post-process op use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from device.bundle.manifest import DecoderSpec, SsdParams
from device.detect.decoders.base import Candidates, Decoder, Output, require_finite
from device.detect.nms import SMALL
from device.errors import BundleError


def decode_ssd_boxes(enc: np.ndarray, anchors: np.ndarray, scales: tuple[float, ...]) -> np.ndarray:
    """Encodings ``[N, 4]`` + anchors ``[N, 4]`` -> normalized xyxy boxes ``[N, 4]``."""
    e = enc / np.asarray(scales, dtype=np.float32)
    size = anchors[:, 2:]  # (h, w)
    centre = e[:, :2] * size + anchors[:, :2]  # (yc, xc)
    half = np.exp(e[:, 2:]) * size / 2  # (h/2, w/2)
    # (y1, x1, y2, x2) -> (x1, y1, x2, y2)
    boxes: np.ndarray = np.concatenate([centre - half, centre + half], axis=1)[:, [1, 0, 3, 2]]
    return boxes


class SsdRawDecoder(Decoder):
    kind = "ssd_raw"

    def __init__(
        self,
        spec: DecoderSpec,
        input_size: tuple[int, int],
        num_classes: int,
        file: Callable[[str], Path],
    ) -> None:
        super().__init__(spec, input_size, num_classes, file)
        self.params = spec.ssd or SsdParams()
        path = file(self.params.anchors_file)
        try:
            self.anchors = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: cannot read anchors: {exc}") from None
        if self.anchors.ndim != 2 or self.anchors.shape[1] != 4:
            raise BundleError(f"{path}: anchors must be [N, 4], got {list(self.anchors.shape)}")
        self._first = 1 if self.params.background_class else 0
        self._raw_thresholds: dict[tuple[float, float | None, int], float] = {}
        boxes = spec.outputs.get("boxes")
        predicted = (
            boxes.shape[-2] if boxes is not None and len(boxes.shape) >= 2 else len(self.anchors)
        )
        if predicted != len(self.anchors):  # checked once here, not per frame
            raise BundleError(
                f"{path}: {len(self.anchors)} anchors but the model predicts {predicted} boxes"
            )

    def _class_scores(self, scores: Output) -> tuple[np.ndarray, np.ndarray]:
        """Best class id and score per anchor (background column excluded)."""
        raw = scores.data.reshape(-1, scores.data.shape[-1])
        act = self.params.score_activation
        if act == "softmax":
            real = scores.real(raw)
            require_finite(real, scores)
            e = np.exp(real - real.max(axis=1, keepdims=True))
            probs = (e / e.sum(axis=1, keepdims=True))[:, self._first :]
            best = probs.argmax(axis=1)
            return best, probs[np.arange(len(best)), best]
        cls = raw[:, self._first :]
        if cls.shape[1] == 1:  # one class (the parcel model): no argmax, no gather
            best = np.zeros(len(cls), dtype=np.int64)
            best_real = scores.real(cls[:, 0])
        else:
            best = cls.argmax(axis=1)
            best_real = scores.real(cls[np.arange(len(best)), best])
        require_finite(best_real, scores)
        if act == "sigmoid":
            best_real = 1.0 / (1.0 + np.exp(-best_real))
        return best, best_real

    def _keep_monotonic(
        self, scores: Output, score_threshold: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sigmoid or no activation: threshold the stored values (the activation and the
        dequantization are monotonic), so only the survivors are dequantized and activated."""
        data, first = scores.data, self._first
        best: np.ndarray | None = None
        if data.ndim == 2 and data.shape[1] == first + 1:  # one class (the parcel model)
            best_raw = data[:, first]  # a view: no reshape, no argmax, no gather
        else:
            raw = data.reshape(-1, data.shape[-1])[:, first:]
            best = raw.argmax(axis=1)
            best_raw = np.take_along_axis(raw, best[:, None], axis=1)[:, 0]
        threshold = self._raw_thresholds.get((score_threshold, scores.scale, scores.zero_point))
        if threshold is None:
            threshold = scores.raw_threshold(self._stored_threshold(score_threshold))
            self._raw_thresholds[(score_threshold, scores.scale, scores.zero_point)] = threshold
        # One pass over the scores answers both questions of the common frame: NaN or inf (a
        # broken float model) reach the max, and a max below the threshold means nothing is there.
        top = float(best_raw.max()) if best_raw.size else -math.inf
        if scores.scale is None and best_raw.size and not math.isfinite(top):
            require_finite(best_raw, scores)
        if not top >= threshold:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.float32)
        keep = np.flatnonzero(best_raw >= threshold)
        sigmoid = self.params.score_activation == "sigmoid"
        if keep.size <= SMALL:  # a few survivors: plain floats (see device.detect.nms.SMALL)
            values = best_raw[keep].tolist()
            if scores.scale is not None:
                zp, sc = scores.zero_point, scores.scale
                values = [(v - zp) * sc for v in values]
            if sigmoid:  # exp(-v) overflows only far below any threshold but 0
                values = [1.0 / (1.0 + math.exp(min(-v, 700.0))) for v in values]
            real = np.array(values, dtype=np.float32)
        else:
            real = scores.real(best_raw[keep])
            if sigmoid:
                real = 1.0 / (1.0 + np.exp(-real))
        classes = np.zeros(len(keep), dtype=np.int64) if best is None else best[keep]
        return keep, classes, real

    def _stored_threshold(self, t: float) -> float:
        """The score threshold before the activation (the logit for a sigmoid)."""
        if self.params.score_activation != "sigmoid":
            return t
        return -np.inf if t <= 0 else np.inf if t >= 1 else float(np.log(t / (1 - t)))

    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        enc_out, score_out = outputs["boxes"], outputs["scores"]
        if self.params.score_activation == "softmax":
            best, best_score = self._class_scores(score_out)
            keep = np.flatnonzero(best_score >= score_threshold)
            best, best_score = best[keep], best_score[keep]
        else:
            keep, best, best_score = self._keep_monotonic(score_out, score_threshold)
        if not keep.size:
            return Candidates.empty()
        if keep.size <= SMALL:
            boxes = self._decode_small(enc_out, keep)
        else:
            enc = enc_out.real(enc_out.data.reshape(-1, 4)[keep])
            require_finite(enc, enc_out)
            boxes = decode_ssd_boxes(enc, self.anchors[keep], self.params.scale_factors)
            boxes = (boxes * self._scale).astype(np.float32)
        return Candidates(
            boxes, best_score.astype(np.float32, copy=False), best.astype(np.int64, copy=False)
        )

    def _decode_small(self, enc_out: Output, keep: np.ndarray) -> np.ndarray:
        """:func:`decode_ssd_boxes` and the scaling to canvas pixels, for a few boxes in plain
        Python (see ``device.detect.nms.SMALL``)."""
        rows = enc_out.data.reshape(-1, 4)[keep]
        enc = rows.tolist()
        if enc_out.scale is not None:
            zp, sc = enc_out.zero_point, enc_out.scale
            enc = [[(v - zp) * sc for v in row] for row in enc]
        elif not all(math.isfinite(v) for row in enc for v in row):
            require_finite(rows, enc_out)
        sy, sx, sh, sw = self.params.scale_factors
        width, height = float(self.width), float(self.height)
        out = []
        for (ty, tx, th, tw), (ya, xa, ha, wa) in zip(
            enc, self.anchors[keep].tolist(), strict=True
        ):
            yc, xc = ty / sy * ha + ya, tx / sx * wa + xa
            # exp() past ~709 overflows where numpy gives inf; either way the box is clipped
            # to the frame later.
            hh, hw = math.exp(min(th / sh, 80.0)) * ha / 2, math.exp(min(tw / sw, 80.0)) * wa / 2
            out.append(
                ((xc - hw) * width, (yc - hh) * height, (xc + hw) * width, (yc + hh) * height)
            )
        return np.array(out, dtype=np.float32)

    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        return self._class_scores(outputs["scores"])[1]
