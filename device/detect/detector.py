"""The detector: a bundle loaded once, then frame -> detections in source pixels."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.bundle.build import bare_model_bundle
from device.bundle.store import MANIFEST, Bundle, load_bundle
from device.detect.decoders import DECODERS, Candidates, Output
from device.detect.decoders.base import output_problem
from device.detect.model import tensor_facts
from device.detect.nms import nms
from device.detect.preprocess import Geometry, InputTransform, Yuv420Frame
from device.detect.runtime import first_line, open_interpreter, runtime_version
from device.errors import (
    BrokenOutputsError,
    CollapsedScoresError,
    DetectorError,
    LabelsError,
    ModelError,
)


@dataclass(frozen=True)
class Detection:
    """One detection; ``box`` is ``[x1, y1, x2, y2]`` in source-image pixels."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 4),
            "box": [round(v, 1) for v in self.box],
        }


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds spent in each stage of the last frame."""

    preprocess: float
    invoke: float
    decode: float

    @property
    def total(self) -> float:
        return self.preprocess + self.invoke + self.decode


@dataclass(frozen=True)
class Prepared:
    """A frame preprocessed into the interpreter's input, ready for :meth:`Detector.run`.

    ``canvas`` is the frame at the model's size (uint8), which the daemon's motion gate reads
    instead of touching the full frame again. The interpreter has one input buffer, so a
    ``Prepared`` is good until the next :meth:`Detector.prepare`; ``run`` refuses a stale one.
    """

    geometry: Geometry
    canvas: np.ndarray
    ms: float
    seq: int
    done: float  # perf_counter() when preprocessing ended


def load_model(path: str | Path | None, labels: str | Path | None = None, **options: Any) -> Bundle:
    """A bundle directory/.tar (verified), a bare ``.tflite`` described on the fly, or (``None``)
    the default parcel bundle shipped with doorstep."""
    if path is None:
        from device.models import default_bundle

        if labels is not None:
            raise LabelsError("--labels goes with a bare .tflite --model, not the default bundle")
        return load_bundle(default_bundle())
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix == ".tar"):
        if labels is not None:
            raise LabelsError(
                f"{path} is a bundle: its labels are in its {MANIFEST}; drop --labels"
            )
        return load_bundle(path)
    if not path.exists():
        raise ModelError(f"{path}: not found (expected a bundle directory, a .tar or a .tflite)")
    return bare_model_bundle(path, labels, **options)


class Detector:
    """Runs one bundle's model. Build it once; call :meth:`detect` per frame."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        runtime: str = "auto",
        num_threads: int | None = None,
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.manifest = m
        self.interpreter, self.runtime = open_interpreter(bundle.model_path, runtime, num_threads)
        self.runtime_version = runtime_version(self.runtime)
        self.score_threshold = m.thresholds.score if score_threshold is None else score_threshold
        self.iou_threshold = m.thresholds.iou if iou_threshold is None else iou_threshold
        self.max_detections = (
            m.thresholds.max_detections if max_detections is None else max_detections
        )
        spec = m.input
        self._input_shape = (
            (1, spec.height, spec.width, 3)
            if spec.layout == "NHWC"
            else (1, 3, spec.height, spec.width)
        )
        self._input_dtype = np.dtype(spec.dtype)
        self._input_index = self._check_input()
        self._outputs = self._map_outputs()
        self.transform = InputTransform(m.input)
        decoder_cls = DECODERS[m.decoder.kind]
        self.decoder = decoder_cls(
            m.decoder, (m.input.width, m.input.height), len(m.labels.names), bundle.file
        )
        self.labels = m.labels.names
        self.last_times = StageTimes(0.0, 0.0, 0.0)
        self._seq = 0

    @classmethod
    def open(
        cls, path: str | Path | None, labels: str | Path | None = None, **kwargs: Any
    ) -> Detector:
        """Load ``path`` (bundle, .tflite + labels, or None: the default bundle) and build a detector."""
        det_keys = {"runtime", "num_threads", "score_threshold", "iou_threshold", "max_detections"}
        det_kwargs = {k: v for k, v in kwargs.items() if k in det_keys}
        model_kwargs = {k: v for k, v in kwargs.items() if k not in det_keys}
        if "runtime" in kwargs:
            model_kwargs["runtime"] = kwargs["runtime"]
        return cls(load_model(path, labels, **model_kwargs), **det_kwargs)

    def _check_input(self) -> int:
        details = self.interpreter.get_input_details()
        spec = self.manifest.input
        where = f"{self.bundle.source}"
        if len(details) != 1:
            raise ModelError(
                f"{where}: model has {len(details)} inputs; doorstep runs single-image models"
            )
        t = tensor_facts(details[0])
        expected = self._input_shape
        problems = []
        if t.shape != expected:
            problems.append(
                f"shape {list(t.shape)} but the manifest says {list(expected)} ({spec.layout})"
            )
        if t.dtype != spec.dtype:
            problems.append(f"dtype {t.dtype} but the manifest says {spec.dtype}")
        if spec.dtype != "float32" and (t.scale, t.zero_point) != (spec.scale, spec.zero_point):
            problems.append(
                f"quantization ({t.scale}, {t.zero_point}) but the manifest says ({spec.scale}, {spec.zero_point})"
            )
        if problems:
            raise ModelError(
                f"{where}: input {t.name}: " + "; ".join(problems) + ": manifest and model disagree"
            )
        return t.index

    def _map_outputs(self) -> dict[str, tuple[int, str, float | None, int]]:
        by_name = {str(d["name"]): tensor_facts(d) for d in self.interpreter.get_output_details()}
        mapped = {}
        for role, spec in self.manifest.decoder.outputs.items():
            t = by_name.get(spec.name)
            if t is None:
                raise ModelError(
                    f"{self.bundle.source}: output {spec.name!r} ({role}) named in the manifest is not "
                    f"among the model's outputs {sorted(by_name)}"
                )
            if list(t.shape) != spec.shape:
                raise ModelError(
                    f"{self.bundle.source}: output {spec.name!r} ({role}) has shape {list(t.shape)}, "
                    f"the manifest says {spec.shape}"
                )
            mapped[role] = (t.index, t.name, t.scale, t.zero_point or 0)
        return mapped

    def _outputs_now(self) -> dict[str, Output]:
        outputs = {}
        for role, (index, name, scale, zp) in self._outputs.items():
            data = self.interpreter.get_tensor(index)
            outputs[role] = Output(name, data[0] if data.ndim > 1 else data, scale, zp)
        return outputs

    def set_input(self, tensor: np.ndarray) -> None:
        """Feed a ready input tensor, refusing a wrong shape or dtype with a clear message."""
        spec, expected = self.manifest.input, self._input_shape
        if tensor.shape != expected or tensor.dtype != self._input_dtype:
            raise DetectorError(
                f"input tensor {list(tensor.shape)} {tensor.dtype} does not match the model's "
                f"{list(expected)} {spec.dtype}"
            )
        self.interpreter.set_tensor(self._input_index, tensor)

    def prepare(self, frame: np.ndarray | Yuv420Frame) -> Prepared:
        """Preprocess ``frame`` into the model's input (the first half of :meth:`detect`)."""
        t0 = time.perf_counter()
        buffer = self.interpreter.tensor(self._input_index)()  # the interpreter's own input
        result = None
        try:
            result, geo = self.transform(frame, out=buffer)
            if result is not buffer:
                self.set_input(result)
        finally:
            # No view of the interpreter's memory may outlive this call: invoke() refuses to
            # run while one exists.
            del buffer, result
        self._seq += 1
        t1 = time.perf_counter()
        return Prepared(geo, self.transform.canvas, (t1 - t0) * 1e3, self._seq, t1)

    def infer(self, frame: np.ndarray | Yuv420Frame) -> tuple[dict[str, Output], Geometry]:
        """Preprocess and invoke; return the raw outputs and the frame geometry."""
        geo = self.prepare(frame).geometry
        self._invoke()
        return self._outputs_now(), geo

    def _invoke(self) -> None:
        try:
            self.interpreter.invoke()
        except RuntimeError as exc:  # a kernel refused the (damaged) model's tensors
            raise ModelError(
                f"{self.bundle.source}: the model failed to run: {first_line(exc)}"
            ) from None

    def decode(self, outputs: Mapping[str, Output], geo: Geometry) -> list[Detection]:
        """Threshold, NMS, map boxes back to source pixels."""
        cand: Candidates = self.decoder.decode(outputs, self.score_threshold)
        if not len(cand):
            return []  # the common frame: nothing there
        if self.decoder.needs_nms:
            kept = nms(
                cand.boxes, cand.scores, cand.class_ids, self.iou_threshold, self.max_detections
            )
            if kept.tolist() != list(range(len(cand))):  # else all kept, already best first
                cand = cand.take(kept)
        elif len(cand) > self.max_detections:
            cand = cand.take(np.argsort(-cand.scores, kind="stable")[: self.max_detections])
        names = self.labels
        out = []
        for box, score, cid in zip(
            cand.boxes.tolist(), cand.scores.tolist(), cand.class_ids.tolist(), strict=True
        ):
            if not 0 <= cid < len(names):
                raise LabelsError(
                    f"model predicted class id {cid} but the labels name only {len(names)} classes "
                    f"(0..{len(names) - 1}): wrong label file for {self.bundle.source}"
                )
            x1, y1, x2, y2 = mapped = geo.box_to_source(box)
            if x2 > x1 and y2 > y1:  # zero or negative width or height: never a detection
                out.append(Detection(names[cid], cid, float(score), mapped))
        return out

    def detect(self, frame: np.ndarray | Yuv420Frame) -> list[Detection]:
        """Detections on one frame, best first, with boxes in the frame's pixels."""
        return self.run(self.prepare(frame))

    def run(self, prepared: Prepared) -> list[Detection]:
        """Invoke on what :meth:`prepare` returned, and decode (the second half of detect)."""
        if prepared.seq != self._seq:
            raise DetectorError(
                "run() was given a stale Prepared: another frame was prepared since"
            )
        t1 = time.perf_counter()
        self._invoke()
        t2 = time.perf_counter()
        outputs = self._outputs_now()
        self._last_outputs = outputs
        dets = self.decode(outputs, prepared.geometry)
        t3 = time.perf_counter()
        self.last_times = StageTimes(prepared.ms, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        return dets

    def last_peak_score(self) -> float:
        """The highest class score anywhere in the last frame's outputs, thresholds aside."""
        outputs = getattr(self, "_last_outputs", None)
        return 0.0 if outputs is None else self.decoder.peak_score(outputs)

    def check_last_outputs(self) -> None:
        """Raise ``BrokenOutputsError`` when the last frame's outputs cannot come from a
        working model (see :func:`device.detect.decoders.base.output_problem`)."""
        outputs = getattr(self, "_last_outputs", None)
        problem = None if outputs is None else output_problem(outputs, self.decoder)
        if problem is not None:
            raise BrokenOutputsError(f"{self.bundle.source}: {problem}")

    def peak_score(self, frame: np.ndarray | Yuv420Frame) -> float:
        """The highest class score the model gives anywhere on ``frame``."""
        outputs, _ = self.infer(frame)
        return self.decoder.peak_score(outputs)

    def self_test(self, frames: list[np.ndarray]) -> float:
        """Raise ``CollapsedScoresError`` when no frame raises any score above zero, and
        ``BrokenOutputsError`` when a frame's outputs hold NaN or inf or saturate.

        A full-integer model whose scores were quantized together with large box values (or
        calibrated on the wrong data) gives exactly zero everywhere; this catches it at start.
        """
        peak = 0.0
        for frame in frames:
            outputs, _ = self.infer(frame)
            self._last_outputs = outputs
            self.check_last_outputs()
            peak = max(peak, self.decoder.peak_score(outputs))
        if peak <= 0.0:
            raise CollapsedScoresError(
                f"{self.bundle.source}: every class score is 0 on {len(frames)} test frame(s): the "
                "int8 model's scores collapsed (boxes and scores share one quantized tensor, or "
                "calibration used the wrong data); re-quantize with separate score outputs"
            )
        return peak
