"""``--compare-runtimes``: the default bundle on a real photo under tflite-runtime and LiteRT
(each in its own process), and the comparison's verdicts on outputs that do differ."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED

from device.models import DEFAULT_BUNDLE
from host.runtimes import RuntimeRun, compare, installed_runtimes

pytestmark = pytest.mark.host


@pytest.mark.timeout(300)
def test_the_default_bundle_agrees_across_runtimes() -> None:
    if len(installed_runtimes()) < 2:
        pytest.skip("needs tflite-runtime and LiteRT both installed (the main environment)")
    photos = SHARED / "data" / "packages-v6" / "test" / "images"
    if not photos.is_dir():
        pytest.skip(f"needs {photos} (the project's shared data)")
    photo = sorted(photos.iterdir())[0]  # a real doorstep parcel
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "bench", str(DEFAULT_BUNDLE), "--iterations", "3",
         "--threads", "1", "--compare-runtimes", "--frame", str(photo)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "tflite-runtime 2.14" in proc.stdout and "ai-edge-litert" in proc.stdout
    assert "the runtimes agree" in proc.stdout
    assert proc.stdout.count("1 detection(s)") == 2  # the parcel, found under both


def _run(name: str, scores: np.ndarray, dets: list[dict[str, object]]) -> RuntimeRun:
    return RuntimeRun(name, f"{name} 1.0", {"scores": scores}, dets)


def test_outputs_that_differ_are_flagged() -> None:
    box = {"label": "package", "score": 0.9, "box": [10.0, 10.0, 50.0, 50.0]}
    a = np.linspace(0, 1, 100, dtype=np.float32)
    assert compare([_run("x", a, [box]), _run("y", a + 0.001, [box])]).ok
    far = compare([_run("x", a, [box]), _run("y", a * 0.5, [box])])
    assert not far.ok and "differs by up to" in far.problems[0]
    nan = a.copy()
    nan[3] = np.nan
    assert (
        "NaN or inf on one runtime only"
        in compare([_run("x", a, []), _run("y", nan, [])]).problems[0]
    )
    fewer = compare([_run("x", a, [box, box]), _run("y", a, [box])])
    assert fewer.problems == ["x 1.0 vs y 1.0: 2 detection(s) against 1"]
    moved = dict(box, box=[30.0, 30.0, 70.0, 70.0])
    assert "IoU" in compare([_run("x", a, [box]), _run("y", a, [moved])]).problems[0]
    lone = compare([_run("x", a, [box])])
    assert lone.ok and "only one runtime" in lone.text()
