"""``doorstep-host export --format ssd-postprocess``: the parcel model as Frigate and the picamera2
examples load it, checked the way they read it: a plain Interpreter, raw RGB pixels stretched to
the input, the four outputs by their fixed indices (0 boxes, 1 classes, 2 scores, 3 count)."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import ROOT, SHARED, _shared

from device.bundle.manifest import InputSpec
from device.bundle.store import load_bundle, write_bundle
from device.detect.detector import Detector
from host.export import ExportError, export_ssd_postprocess

pytestmark = [pytest.mark.host, pytest.mark.timeout(300)]

DEFAULT = ROOT / "device" / "models" / "parcel-ssd"
RUNTIMES = [
    name
    for name in ("tflite_runtime", "ai_edge_litert")
    if importlib.util.find_spec(name) is not None
]


def plain_interpreter(path: Path, runtime: str) -> Any:
    """What Frigate (tflite_runtime) and the picamera2 examples (ai_edge_litert) construct."""
    if runtime == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    return interpreter


def tool_detect(interpreter: Any) -> Callable[[np.ndarray], list[tuple[int, float, tuple]]]:
    """Detections as those tools read them, in the photo's pixels."""
    (inp,) = interpreter.get_input_details()
    out = interpreter.get_output_details()
    height, width = int(inp["shape"][1]), int(inp["shape"][2])

    def detect(bgr: np.ndarray) -> list[tuple[int, float, tuple]]:
        h, w = bgr.shape[:2]
        rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (width, height))
        interpreter.set_tensor(inp["index"], rgb[None])  # raw uint8 pixels, no normalisation
        interpreter.invoke()
        boxes = interpreter.get_tensor(out[0]["index"])[0]
        classes = interpreter.get_tensor(out[1]["index"])[0]
        scores = interpreter.get_tensor(out[2]["index"])[0]
        count = int(interpreter.get_tensor(out[3]["index"])[0])
        found = []
        for i in range(count):
            y1, x1, y2, x2 = (float(v) for v in boxes[i])
            found.append((int(classes[i]), float(scores[i]), (x1 * w, y1 * h, x2 * w, y2 * h)))
        return found

    return detect


def iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def real_photos() -> list[Path]:
    porch = _shared("data/porch-2211/images")
    packages = _shared("data/packages-v6")
    return sorted(porch.glob("*.jpg")) + sorted(packages.glob("*/images/*.jpg"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    result = export_ssd_postprocess(DEFAULT, out)
    assert result.model == out / "detect.tflite" and result.input_size == (300, 300)
    return out


def assert_agrees(bundle: Path, model: Path, runtime: str) -> int:
    """Every detection doorstep's own decoder finds on the bundle (at its threshold) is in the
    export's rows (IoU >= 0.9, score within 0.05), and the export finds nothing more."""
    det = Detector.open(bundle, runtime=runtime, num_threads=2)
    detect = tool_detect(plain_interpreter(model, runtime))
    threshold, checked, worst_iou, worst_score = det.score_threshold, 0, 1.0, 0.0
    photos = real_photos()
    for photo in photos:
        image = cv2.imread(str(photo))
        ours = det.detect(image)
        theirs = detect(image)
        for d in ours:
            match = max(theirs, key=lambda t: iou(d.box, t[2]), default=None)
            assert match is not None, f"{photo.name}: {d} missing from the export"
            assert match[0] == d.class_id
            assert iou(d.box, match[2]) >= 0.9, (photo.name, d, match)
            assert abs(match[1] - d.score) <= 0.05, (photo.name, d, match)
            checked += 1
            worst_iou = min(worst_iou, iou(d.box, match[2]))
            worst_score = max(worst_score, abs(match[1] - d.score))
        for t in theirs:
            if t[1] >= threshold + 0.05:
                assert any(iou(d.box, t[2]) >= 0.9 for d in ours), f"{photo.name}: extra {t}"
    print(
        f"{runtime}: {len(photos)} photos, {checked} bundle detections found in the export; "
        f"worst IoU {worst_iou:.4f}, worst score difference {worst_score:.4f}"
    )
    return checked


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_export_reads_as_the_tools_read_it_and_agrees_with_the_bundle(
    exported: Path, runtime: str
) -> None:
    interpreter = plain_interpreter(exported / "detect.tflite", runtime)
    (inp,) = interpreter.get_input_details()
    assert list(inp["shape"]) == [1, 300, 300, 3] and inp["dtype"] == np.uint8
    out = interpreter.get_output_details()
    assert [list(d["shape"]) for d in out] == [[1, 20, 4], [1, 20], [1, 20], [1]]
    assert all(d["dtype"] == np.float32 for d in out)
    ops = {d["op_name"] for d in interpreter._get_ops_details()}
    assert "TFLite_Detection_PostProcess" in ops and "LOGISTIC" in ops
    assert (exported / "labelmap.txt").read_text() == "0 package\n"  # "id name", as both read
    checked = assert_agrees(DEFAULT, exported / "detect.tflite", runtime)
    assert checked >= 50  # the real photos hold parcels the bundle finds


def _held_out() -> Any:
    """The default model's validation scenes, as `doorstep-host train` held them out."""
    from host.datasets import load_dataset
    from host.train import split_by_scene

    data = SHARED / "data"
    samples = []
    for folder in ("packages-v6/train", "packages-v6/valid", "porch-2211"):
        samples += load_dataset(_shared(f"data/{folder}")).samples
    _, val, _ = split_by_scene(samples, 0.2, seed=0)
    dataset = load_dataset(data / "porch-2211")
    assert len(val) == 18  # the 18 photos in 4 scenes of the model card
    return dataclasses.replace(dataset, samples=val)


@pytest.mark.parametrize("size", [None, 320])
def test_export_ap_on_held_out_scenes_within_one_point(tmp_path: Path, size: int | None) -> None:
    from host.evaluate import evaluate_detector, evaluate_function

    dataset = _held_out()
    result = export_ssd_postprocess(DEFAULT, tmp_path, size=size)
    side = size or 300
    assert result.input_size == (side, side)
    bundle = evaluate_detector(
        Detector.open(DEFAULT), dataset, threshold=0.5, show_progress=False, name="bundle"
    )
    interpreter = plain_interpreter(result.model, RUNTIMES[0])
    export = evaluate_function(
        tool_detect(interpreter), ["package"], dataset, None, 0.5, "export", False
    )
    print(f"AP@0.5 bundle {bundle.overall.ap50:.4f}, export {side}: {export.overall.ap50:.4f}")
    assert bundle.overall.ap50 > 0.9  # the bundle finds the parcels: a meaningful comparison
    assert abs(export.overall.ap50 - bundle.overall.ap50) <= 0.01


def test_int8_input_bundle_gets_a_quantize_in_front(tmp_path: Path) -> None:
    """An int8-input SSD (what `quantize` makes from a .tflite) is exported taking uint8
    pixels, and computes exactly what the uint8 bundle does."""
    from support.tflite_edit import int8_input_variant

    src = load_bundle(DEFAULT)
    m = src.manifest
    model = tmp_path / "int8-in.tflite"
    scale, zero = int8_input_variant(src.model_path, model)
    assert zero == -1
    from ai_edge_litert.tools import flatbuffer_utils

    graph = flatbuffer_utils.read_model(str(model)).subgraphs[0]
    name = graph.tensors[int(graph.inputs[0])].name.decode()
    # (p - 127) * scale is what the uint8 model's own QUANTIZE feeds the network: as int8
    # with zero point -1 that is p - 128, a flip of the top bit
    spec = InputSpec.model_validate(
        {
            **m.input.model_dump(),
            "name": name,
            "dtype": "int8",
            "scale": scale,
            "zero_point": zero,
            "normalization": {"mean": [127.0] * 3, "std": [1 / scale] * 3},
        }
    )
    bundle = tmp_path / "int8-bundle"
    write_bundle(
        bundle,
        m.model_copy(update={"input": spec}),
        {"model.tflite": model, "anchors.npy": src.file("anchors.npy")},
    )
    result = export_ssd_postprocess(bundle, tmp_path / "out")
    assert any("QUANTIZE in front" in n for n in result.notes)
    assert assert_agrees(DEFAULT, result.model, RUNTIMES[0]) >= 50


def test_cli_export_and_what_it_refuses(tmp_path: Path, testmodels: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "export", str(DEFAULT), "--out", str(tmp_path / "f")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "detect.tflite" in proc.stdout and (tmp_path / "f" / "labelmap.txt").exists()

    def bundle(name: str, *extra: str) -> Path:
        out = tmp_path / name
        args = [str(testmodels / f"{name}.tflite"), "--labels", str(testmodels / "labels.txt")]
        done = subprocess.run(
            [sys.executable, "-m", "host.cli", "bundle", *args, *extra, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return out

    with pytest.raises(ExportError, match="decoder 'yolo_v8'.*TFLite_Detection_PostProcess"):
        export_ssd_postprocess(bundle("yolo_v8_int8"), tmp_path / "x")
    anchors = str(testmodels / "anchors.npy")
    with pytest.raises(ExportError, match="float32 input.*quantize it first"):
        export_ssd_postprocess(bundle("ssd_raw_float", "--anchors", anchors), tmp_path / "x")
    with pytest.raises(ExportError, match="--max-detections 0"):
        export_ssd_postprocess(DEFAULT, tmp_path / "x", max_detections=0)
    assert not (tmp_path / "x" / "detect.tflite").exists()  # nothing written on a refusal
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "export", str(tmp_path / "nothing"), "--out", "o"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "nothing" in proc.stderr and "Traceback" not in proc.stderr
