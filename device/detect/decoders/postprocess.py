"""The TFLite_Detection_PostProcess op's outputs: boxes, classes, scores, count (NMS done)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from device.detect.decoders.base import Candidates, Decoder, Output, require_finite


class PostprocessDecoder(Decoder):
    kind = "tflite_postprocess"
    needs_nms = False

    def _valid(self, outputs: Mapping[str, Output]) -> tuple[int, np.ndarray]:
        scores = outputs["scores"].real().reshape(-1)
        require_finite(scores, outputs["scores"])
        count = int(outputs["count"].real().reshape(-1)[0])
        return max(0, min(count, scores.size)), scores

    def decode(self, outputs: Mapping[str, Output], score_threshold: float) -> Candidates:
        n, scores = self._valid(outputs)
        scores = scores[:n]
        keep = np.flatnonzero(scores >= score_threshold)
        if not keep.size:
            return Candidates.empty()
        boxes = outputs["boxes"].real().reshape(-1, 4)[keep]
        require_finite(boxes, outputs["boxes"])
        classes = outputs["classes"].real().reshape(-1)[keep]
        # ymin, xmin, ymax, xmax (0..1) -> xyxy canvas pixels
        xyxy = boxes[:, [1, 0, 3, 2]] * self._scale
        return Candidates(xyxy.astype(np.float32), scores[keep], np.rint(classes).astype(np.int64))

    def best_scores(self, outputs: Mapping[str, Output]) -> np.ndarray:
        n, scores = self._valid(outputs)
        return scores[:n]
