"""``doorstep-device inspect``: what a model or bundle holds, read from the model itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.bundle.manifest import DecoderSpec, Manifest
from device.bundle.store import load_bundle
from device.detect.layout import detect_layout
from device.detect.model import ModelFacts, TensorFacts, read_model_facts
from device.errors import DoorstepError
from device.labels import read_labels


@dataclass(frozen=True)
class Report:
    facts: ModelFacts
    layout: DecoderSpec | None
    layout_error: str | None
    manifest: Manifest | None
    self_test: dict[str, Any] | None = None
    """one inference on a synthetic frame (checks the outputs), when the layout is known"""

    def to_json(self) -> dict[str, Any]:
        def tensor(t: TensorFacts) -> dict[str, Any]:
            return {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "scale": t.scale,
                "zero_point": t.zero_point,
                "per_channel": t.per_channel,
            }

        f = self.facts
        return {
            "model": str(f.path),
            "size": f.size,
            "sha256": f.sha256,
            "runtime": f.runtime,
            "inputs": [tensor(t) for t in f.inputs],
            "outputs": [tensor(t) for t in f.outputs],
            "ops": f.ops,
            "tensors": f.tensor_count,
            "layout": self.layout.model_dump(mode="json") if self.layout else None,
            "layout_error": self.layout_error,
            "manifest": self.manifest.model_dump(mode="json") if self.manifest else None,
            "self_test": self.self_test,
        }

    def to_text(self) -> str:
        f = self.facts
        lines = [
            f"model     {f.path}",
            f"size      {f.size:,} bytes   sha256 {f.sha256}",
            f"runtime   {f.runtime}",
            "inputs",
            *(f"  {t.describe()}" for t in f.inputs),
            "outputs",
            *(f"  {t.describe()}" for t in f.outputs),
            f"ops       {sum(f.ops.values())} in all, {f.tensor_count} tensors",
            *(f"  {n:<32} {c}" for n, c in f.ops.items()),
        ]
        if self.layout:
            lines.append(f"layout    {self.layout.kind}: {self.layout.detected_as}")
            lines.extend(
                f"  {role:<12} {t.name} {t.shape}" for role, t in self.layout.outputs.items()
            )
        elif self.layout_error:
            lines.append(f"layout    not recognised: {self.layout_error}")
        if self.self_test is not None:
            t = self.self_test
            verdict = f"ok, {t['ms']:.1f} ms" if t["ok"] else f"FAILED: {t['error']}"
            lines.append(f"self-test {verdict} ({t.get('runtime') or 'runtime unknown'})")
        if self.manifest:
            lines.append("manifest")
            body = json.dumps(self.manifest.model_dump(mode="json"), indent=2)
            lines.extend(f"  {line}" for line in body.splitlines())
        return "\n".join(lines)


def inspect_model(
    path: str | Path, labels: str | Path | None = None, runtime: str = "auto"
) -> Report:
    """Read a bundle (verified) or a bare .tflite and report on it."""
    path = Path(path)
    manifest = None
    model_path = path
    if path.is_dir() or (path.is_file() and path.suffix == ".tar"):
        bundle = load_bundle(path)
        manifest, model_path = bundle.manifest, bundle.model_path
    facts = read_model_facts(model_path, runtime)
    if manifest is not None:
        return Report(facts, manifest.decoder, None, manifest, _self_test(path, None, runtime))
    names = read_labels(labels) if labels else None
    layout, error = None, None
    try:
        layout = detect_layout(facts, len(names) if names is not None else None)
    except DoorstepError as exc:
        if labels:  # the user asked for the class check: its failure is the answer
            raise
        error = str(exc)
    # A bare model needs its labels to build a detector: without them, no self-test.
    test = _self_test(path, labels, runtime) if layout is not None and labels else None
    return Report(facts, layout, error, None, test)


def _self_test(path: Path, labels: str | Path | None, runtime: str) -> dict[str, Any]:
    """The daemon's own self-test (:func:`device.detect.checked.self_test`) on this model."""
    from device.detect.checked import self_test
    from device.detect.detector import Detector

    try:
        det = Detector.open(path, labels, runtime=runtime)
    except DoorstepError as exc:
        return {"ok": False, "ms": 0.0, "error": str(exc), "runtime": None}
    return self_test(det)
