"""Opening the daemon's model, checked: signature, a ``package`` class, a self-test inference.

Start-up, the fallback after a bad deployment and a SIGHUP reload all go through
:func:`open_detector`, so a model that serves has passed the same checks however it came.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device.detect.detector import Detector
from device.detect.runtime import release_model_pages
from device.errors import DoorstepError
from device.install import Store, load_checked, trusted_keys

if TYPE_CHECKING:
    from device.config import ModelConfig


def self_test(det: Detector) -> dict[str, Any]:
    """One inference on a synthetic frame: the model loads, runs, gives finite outputs, scores
    that neither saturate (a broken export) nor are all zero (a collapsed int8 model); which
    runtime ran it is part of the result."""
    from device.bench import synthetic_frame

    runtime = det.runtime_version  # "ai-edge-litert 2.3.0", "tflite-runtime 2.14.0"
    t0 = time.perf_counter()
    try:
        det.detect(synthetic_frame(640, 480, seed=7))
        det.check_last_outputs()
        if det.last_peak_score() <= 0.0:
            raise DoorstepError("every class score is 0: the model's scores collapsed")
    except DoorstepError as exc:
        return {"ok": False, "ms": 0.0, "time": round(time.time(), 3), "error": str(exc),
                "runtime": runtime}  # fmt: skip
    ms = (time.perf_counter() - t0) * 1e3
    return {"ok": True, "ms": round(ms, 2), "time": round(time.time(), 3), "error": None,
            "runtime": runtime}  # fmt: skip


def model_candidates(model: ModelConfig, state_dir: Path) -> list[Path | None]:
    """What to load, in order: ``model.path`` if set; else the deployed ``current``, then
    ``previous``, then the shipped model (None), so a bad deployment never leaves a doorbell
    without a model after a restart."""
    if model.path is not None:
        return [model.path]
    store = Store(state_dir)
    links = [link.resolve() for link in (store.current, store.previous) if link.exists()]
    return [*links, None]


def open_detector(
    model: ModelConfig, public_keys: list[Path], state_dir: Path, fallback: bool = False
) -> tuple[Detector, Path | None, dict[str, Any]]:
    """The configured model, checked: its signature when ``public_keys`` are given, a
    ``package`` class, and a passing self-test inference (returned). With ``fallback``, the
    first candidate (see :func:`model_candidates`) that passes all of it."""
    candidates = model_candidates(model, state_dir)
    if not fallback:
        candidates = candidates[:1]
    problems: list[str] = []
    for i, path in enumerate(candidates):
        try:
            det = _open_one(model, public_keys, path)
            if not det.manifest.labels.roles.get("package"):
                raise DoorstepError(
                    f"{det.bundle.source}: no class has the role 'package': nothing to track"
                )
            test = self_test(det)
            if not test["ok"]:
                raise DoorstepError(f"self-test inference failed: {test['error']}")
            release_model_pages(det.bundle.model_path)  # the weights are packed by now
            if i:
                print(
                    f"doorstep: fell back to {path or 'the shipped model'}: " + "; ".join(problems),
                    file=sys.stderr,
                )
            return det, path, test
        except DoorstepError as exc:
            if i == len(candidates) - 1:
                raise DoorstepError("; ".join([*problems, str(exc)])) from None
            problems.append(f"{path}: {exc}")
    raise AssertionError("unreachable")


def _open_one(model: ModelConfig, public_keys: list[Path], path: Path | None) -> Detector:
    opts = model.detector_options()
    if public_keys and path is not None:
        if path.suffix == ".tflite":
            raise DoorstepError(
                f"{path}: signing.public_keys is set, and a bare .tflite carries no signature: "
                "bundle and sign it (doorstep-host sign)"
            )
        return Detector(load_checked(path, trusted_keys(public_keys)), **opts)
    return Detector.open(path, model.labels, **opts)
