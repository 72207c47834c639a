"""``--compare-runtimes``: one frame through the model on every installed runtime, compared.

tflite-runtime and LiteRT are two builds of TFLite's kernels; a model can run differently on
them (a broken export gave NaN on one and saturated scores on the other). Each runtime runs in
its own child process (two copies of TFLite in one process clash), writes the raw output
tensors and the decoded detections, and :func:`compare` says whether they differ materially:
an output tensor whose largest difference exceeds :data:`TENSOR_TOLERANCE` of its range, a
different number of detections, or a matched pair of detections with IoU below
:data:`MIN_IOU` or scores further apart than :data:`SCORE_TOLERANCE`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.detect.runtime import RUNTIMES
from device.errors import DoorstepError

TENSOR_TOLERANCE = 0.05
SCORE_TOLERANCE = 0.05
MIN_IOU = 0.9


@dataclass
class RuntimeRun:
    runtime: str
    version: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    detections: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Comparison:
    runs: list[RuntimeRun]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = ["runtime comparison on one frame:"]
        for r in self.runs:
            what = r.error or f"{len(r.detections)} detection(s)"
            lines.append(f"  {r.version or r.runtime:<24} {what}")
        if len(self.runs) < 2:
            lines.append("  only one runtime is installed here: nothing to compare")
        lines += [f"  DIFFERS: {p}" for p in self.problems]
        if len(self.runs) >= 2 and not self.problems:
            lines.append("  the runtimes agree")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": [
                {"runtime": r.version or r.runtime, "detections": r.detections, "error": r.error}
                for r in self.runs
            ],
            "problems": self.problems,
        }


def installed_runtimes() -> list[str]:
    return [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]


def run_on(model: str | Path, frame: Path, runtime: str, labels: str | Path | None) -> RuntimeRun:
    """The model on ``frame`` under ``runtime``, in a child process."""
    with tempfile.TemporaryDirectory(prefix="doorstep-runtime-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "host.runtimes", str(model), str(frame), runtime, str(out)]
        if labels is not None:
            cmd.append(str(labels))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return RuntimeRun(runtime, error=f"failed: {last}")
        meta = json.loads((out.with_suffix(".json")).read_text())
        with np.load(out.with_suffix(".npz"), allow_pickle=False) as npz:
            outputs = {k: npz[k] for k in npz.files}
    return RuntimeRun(runtime, meta["version"], outputs, meta["detections"], meta.get("error"))


def compare_runtimes(
    model: str | Path, frame: Path, labels: str | Path | None = None
) -> Comparison:
    return compare([run_on(model, frame, r, labels) for r in installed_runtimes()])


def compare(runs: list[RuntimeRun]) -> Comparison:
    """What differs materially between the first run and each other one."""
    problems: list[str] = []
    ran = [r for r in runs if r.error is None]
    problems += [f"{r.runtime}: {r.error}" for r in runs if r.error is not None and len(runs) > 1]
    if len(ran) < 2:
        return Comparison(runs, problems)
    base = ran[0]
    for other in ran[1:]:
        pair = f"{base.version} vs {other.version}"
        for role, a in base.outputs.items():
            b = other.outputs.get(role)
            if b is None or a.shape != b.shape:
                problems.append(f"{pair}: output {role} missing or shaped differently")
                continue
            fa, fb = a.astype(np.float64), b.astype(np.float64)
            finite = np.isfinite(fa) & np.isfinite(fb)
            if not np.array_equal(np.isfinite(fa), np.isfinite(fb)):
                problems.append(f"{pair}: output {role} is NaN or inf on one runtime only")
                continue
            if not finite.any():
                continue
            span = float(np.ptp(fa[finite])) or 1.0
            worst = float(np.abs(fa[finite] - fb[finite]).max())
            if worst > TENSOR_TOLERANCE * span:
                problems.append(
                    f"{pair}: output {role} differs by up to {worst:.4g} "
                    f"({worst / span:.0%} of its range)"
                )
        problems += _compare_detections(pair, base.detections, other.detections)
    return Comparison(runs, problems)


def _compare_detections(pair: str, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    if len(a) != len(b):
        return [f"{pair}: {len(a)} detection(s) against {len(b)}"]
    from device.detect.nms import box_iou

    problems = []
    for i, (da, db) in enumerate(zip(a, b, strict=True)):
        iou = float(box_iou(np.array(da["box"]), np.array([db["box"]]))[0])
        if da["label"] != db["label"] or iou < MIN_IOU:
            problems.append(
                f"{pair}: detection {i}: {da['label']} IoU {iou:.2f} with {db['label']}"
            )
        elif abs(da["score"] - db["score"]) > SCORE_TOLERANCE:
            problems.append(
                f"{pair}: detection {i}: score {da['score']:.3f} against {db['score']:.3f}"
            )
    return problems


def _child(model: str, frame: str, runtime: str, out: str, labels: str | None = None) -> int:
    import cv2

    from device.detect.detector import Detector

    image = cv2.imread(frame)
    if image is None:
        raise DoorstepError(f"{frame}: not an image")
    det = Detector.open(model, labels, runtime=runtime, num_threads=1)
    outputs, geometry = det.infer(image)  # one invoke: the raw tensors, then their decoding
    error = None
    try:
        dets = [d.to_json() for d in det.decode(outputs, geometry)]
    except DoorstepError as exc:
        dets, error = [], str(exc)
    np.savez(Path(out).with_suffix(".npz"), **{role: o.data for role, o in outputs.items()})
    meta = {"version": det.runtime_version, "detections": dets, "error": error}
    Path(out).with_suffix(".json").write_text(json.dumps(meta))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child(*sys.argv[1:]))
    except DoorstepError as exc:
        print(f"doorstep: {exc}", file=sys.stderr)
        sys.exit(2)
