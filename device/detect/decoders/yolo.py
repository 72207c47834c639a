"""YOLO outputs as Ultralytics exports them to TFLite.

* ``yolo_v8``: ``[1, 4+nc, N]`` (v8, 11): cx, cy, w, h, then one score per class.
* ``yolo_v5``: ``[1, N, 5+nc]``: cx, cy, w, h, objectness, class probabilities.
* ``yolo_e2e``: ``[1, N, 6]``: x1, y1, x2, y2, score, class, NMS already inside the model.

Boxes may be normalized (0..1) or in input pixels; quantized outputs are dequantized with the
output's own scale and zero point. Thresholding happens on the stored values so only the few
surviving anchors are dequantized.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device.detect.decoders.base import (
    Candidates,
    Decoder,
    Output,
    cxcywh_to_xyxy,
    require_finite,
)


class YoloV8Decoder(Decoder):
    kind = "yolo_v8"

    def _best(self, pred: Output) -> tuple[np.ndarray, np.ndarray]:
        cls = pred.data.reshape(pred.data.shape[-2], -1)[4:]
        best = cls.argmax(axis=0)
        best_raw = np.take_along_axis(cls, best[None], axis=0)[0]
        require_finite(best_raw, pred)
        return best, best_raw

    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        pred = outputs["predictions"]
        data = pred.data.reshape(pred.data.shape[-2], -1)
        best, best_raw = self._best(pred)
        keep = np.flatnonzero(best_raw >= pred.raw_threshold(score_threshold))
        if not keep.size:
            return Candidates.empty()
        boxes = pred.real(data[:4, keep]).T
        require_finite(boxes, pred)
        scores = pred.real(best_raw[keep])
        ok = scores >= score_threshold  # rounding of the raw threshold can admit a hair below
        return Candidates(
            self.to_pixels(cxcywh_to_xyxy(boxes))[ok], scores[ok], best[keep][ok].astype(np.int64)
        )

    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        pred = outputs["predictions"]
        return pred.real(self._best(pred)[1])


class YoloV5Decoder(Decoder):
    kind = "yolo_v5"

    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        pred = outputs["predictions"]
        data = pred.data.reshape(-1, pred.data.shape[-1])
        obj_raw = data[:, 4]
        require_finite(obj_raw, pred)
        # score = objectness * class probability <= objectness: filter on objectness first.
        keep = np.flatnonzero(obj_raw >= pred.raw_threshold(score_threshold))
        if not keep.size:
            return Candidates.empty()
        rows = pred.real(data[keep])
        require_finite(rows, pred)
        cls = rows[:, 5:]
        best = cls.argmax(axis=1)
        scores = rows[:, 4] * cls[np.arange(len(best)), best]
        ok = scores >= score_threshold
        boxes = self.to_pixels(cxcywh_to_xyxy(rows[ok, :4]))
        return Candidates(boxes, scores[ok], best[ok].astype(np.int64))

    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        pred = outputs["predictions"]
        rows = pred.real(pred.data.reshape(-1, pred.data.shape[-1]))
        require_finite(rows, pred)
        best: np.ndarray = rows[:, 4] * rows[:, 5:].max(axis=1)
        return best


class YoloE2EDecoder(Decoder):
    kind = "yolo_e2e"
    needs_nms = False

    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        det = outputs["detections"]
        rows = det.real().reshape(-1, 6)
        require_finite(rows, det)
        keep = rows[:, 4] >= score_threshold
        rows = rows[keep]
        return Candidates(
            self.to_pixels(rows[:, :4]), rows[:, 4], np.rint(rows[:, 5]).astype(np.int64)
        )

    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        det = outputs["detections"]
        rows = det.real().reshape(-1, 6)
        require_finite(rows, det)
        return rows[:, 4]
