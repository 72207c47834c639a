"""Every supported output layout, float and int8, on small real TFLite models with known boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import modelgen
import numpy as np
import pytest

from device.detect.detector import Detector
from device.detect.nms import box_iou
from device.errors import BrokenOutputsError, CollapsedScoresError, DetectorError, LabelsError

GOOD = [c for c in modelgen.CASES if not c.extra]


def _frame() -> np.ndarray:
    return np.full((modelgen.SOURCE_H, modelgen.SOURCE_W, 3), 90, np.uint8)


def _open(folder: Path, case: modelgen.Case, **kw: object) -> Detector:
    if case.layout == "ssd_raw":
        kw.setdefault("anchors", folder / "anchors.npy")
    return Detector.open(
        folder / f"{case.name}.tflite", folder / "labels.txt", resize=case.resize, **kw
    )


@pytest.mark.parametrize("case", GOOD, ids=[c.name for c in GOOD])
def test_decoder_recovers_the_known_boxes(testmodels: Path, case: modelgen.Case) -> None:
    det = _open(testmodels, case)
    assert det.manifest.decoder.kind == case.layout
    assert det.manifest.input.layout == ("NCHW" if case.nchw else "NHWC")
    assert det.manifest.input.dtype == ("float32" if not case.quantized else case.input_type)
    found = det.detect(_frame())
    truth = modelgen.TRUTH
    assert len(found) == len(truth.boxes), found
    for want_box, want_cls, want_score in zip(
        truth.boxes, truth.classes, truth.scores, strict=True
    ):
        match = max(found, key=lambda d: box_iou(np.array(want_box), np.array([d.box]))[0])
        assert box_iou(np.array(want_box), np.array([match.box]))[0] > 0.9
        assert match.class_id == want_cls
        assert match.label == ["parcel", "person", "dog", "cat"][want_cls]
        assert match.score == pytest.approx(want_score, abs=0.02)


def test_quantized_outputs_have_their_own_parameters(testmodels: Path) -> None:
    case = next(c for c in modelgen.CASES if c.name == "ssd_raw_int8")
    det = _open(testmodels, case)
    params = {role: (scale, zp) for role, (_, _, scale, zp) in det._outputs.items()}
    assert params["boxes"] != params["scores"]
    assert all(scale is not None for scale, _ in params.values())


def test_wrong_label_count_is_refused(testmodels: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("parcel\nperson\n")
    with pytest.raises(
        LabelsError, match=r"labels list 2 classes but yolo_v8_float.tflite read as yolo_v8 has 4"
    ):
        Detector.open(testmodels / "yolo_v8_float.tflite", labels)


def test_ssd_raw_without_anchors_says_what_is_missing(testmodels: Path) -> None:
    with pytest.raises(Exception, match=r"raw SSD head; pass --anchors FILE.npy \(160 rows\)"):
        Detector.open(testmodels / "ssd_raw_float.tflite", testmodels / "labels.txt")


def test_collapsed_int8_scores_are_reported(testmodels: Path) -> None:
    case = next(c for c in modelgen.CASES if c.name == "yolo_v8_int8_collapsed")
    det = _open(testmodels, case)
    assert det.detect(_frame()) == []
    with pytest.raises(CollapsedScoresError, match="every class score is 0 on 1 test frame"):
        det.self_test([_frame()])


def test_nan_outputs_are_reported(testmodels: Path) -> None:
    case = next(c for c in modelgen.CASES if c.name == "yolo_v8_float_nan")
    det = _open(testmodels, case)
    with pytest.raises(DetectorError, match="holds NaN or inf values"):
        det.detect(_frame())


def test_healthy_model_passes_self_test(testmodels: Path) -> None:
    det = _open(testmodels, GOOD[1])
    assert det.self_test([_frame()]) == pytest.approx(0.9, abs=0.02)


def _host_bundle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", "bundle", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_host_bundle_float_yolo_with_normalisation_option(testmodels: Path, tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    proc = _host_bundle(
        str(testmodels / "yolo_v8_float.tflite"),
        "--labels",
        str(testmodels / "labels.txt"),
        "--out",
        str(out),
        "--normalization",
        "0,255",
        "--resize",
        "letterbox",
    )
    assert proc.returncode == 0, proc.stderr
    assert "detected layout: yolo_v8" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["normalization"] == {"mean": [0.0] * 3, "std": [255.0] * 3}
    assert manifest["input"]["dtype"] == "float32"
    assert manifest["labels"]["roles"] == {"package": [0], "person": [1]}
    found = Detector.open(out).detect(_frame())
    assert sorted(d.class_id for d in found) == [1, 2]


def test_host_bundle_ssd_family_default_is_minus_one_to_one(
    testmodels: Path, tmp_path: Path
) -> None:
    proc = _host_bundle(
        str(testmodels / "ssd_raw_float.tflite"),
        "--labels",
        str(testmodels / "labels.txt"),
        "--anchors",
        str(testmodels / "anchors.npy"),
        "--out",
        str(tmp_path / "ssd"),
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "ssd" / "manifest.json").read_text())
    assert manifest["input"]["normalization"]["mean"] == [127.5] * 3
    assert manifest["input"]["resize"] == "stretch"
    assert set(manifest["files"]) == {"model.tflite", "anchors.npy"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--decoder", "yolo_v5"],
            "read as yolo_v5 has 79 (from output PartitionedCall:0 [1, 8, 84])",
        ),
        (
            ["--decoder", "ssd_raw"],
            "cannot map its outputs (PartitionedCall:0 [1, 8, 84]) to ssd_raw",
        ),
        (["--normalization", "zero"], "expected yolo, ssd, MEAN,STD"),
        (["--role", "package=box"], "no class named 'box' in the labels"),
        (["--threshold", "3"], "--threshold/--iou"),
    ],
)
def test_host_bundle_bad_options(
    testmodels: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = _host_bundle(
        str(testmodels / "yolo_v8_float.tflite"),
        "--labels",
        str(testmodels / "labels.txt"),
        "--out",
        str(tmp_path / "b"),
        *args,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "b").exists()


def test_nan_anywhere_in_an_output_fails_the_self_test(testmodels: Path) -> None:
    """NaN in the boxes of anchors below the threshold: decoding the survivors never sees it,
    the output check does (and the daemon's self-test fails with it)."""
    from device.detect.checked import self_test

    case = next(c for c in modelgen.CASES if c.name == "yolo_v8_float_nan_boxes")
    det = _open(testmodels, case)
    assert len(det.detect(_frame())) == 2  # the truth is still found
    with pytest.raises(BrokenOutputsError, match=r"holds NaN or inf in \d+ of \d+ values"):
        det.self_test([_frame()])
    test = self_test(det)
    assert (
        not test["ok"] and "NaN or inf" in test["error"] and test["runtime"] == det.runtime_version
    )


def test_saturated_scores_and_zero_width_boxes(testmodels: Path, tmp_path: Path) -> None:
    """A broken export: most anchors at score 1.0, many of them zero-width. No degenerate box
    is returned as a detection; the self-test, `inspect` and `bundle` refuse the model."""
    case = next(c for c in modelgen.CASES if c.name == "yolo_v8_float_saturated")
    det = _open(testmodels, case, max_detections=1000)
    dets = det.detect(_frame())
    assert dets, "the saturated anchors with a width are returned (they are boxes)"
    assert all(d.box[2] > d.box[0] and d.box[3] > d.box[1] for d in dets)
    with pytest.raises(BrokenOutputsError, match="scores saturate"):
        det.self_test([_frame()])
    model, labels = testmodels / f"{case.name}.tflite", testmodels / "labels.txt"
    inspect = subprocess.run(
        [sys.executable, "-m", "device.cli", "inspect", str(model), "--labels", str(labels)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert inspect.returncode == 1 and "self-test FAILED" in inspect.stdout
    assert "scores saturate" in inspect.stderr
    out = tmp_path / "bundle"
    made = _host_bundle(str(model), "--labels", str(labels), "--out", str(out))
    assert made.returncode == 2 and "not bundled: the self-test failed" in made.stderr
    assert "scores saturate" in made.stderr and not out.exists()


def test_nanodet_is_recognised_with_its_own_input_conventions(
    testmodels: Path, tmp_path: Path
) -> None:
    case = next(c for c in modelgen.CASES if c.name == "nanodet_float")
    det = _open(testmodels, case)
    spec = det.manifest.decoder
    assert spec.kind == "nanodet" and "NanoDet output" in spec.detected_as
    assert spec.nanodet is not None and spec.nanodet.reg_max == modelgen.NANODET_REG_MAX
    assert spec.nanodet.strides == (8, 16, 32)
    i = det.manifest.input
    assert (i.channel_order, i.layout, i.dtype) == ("BGR", "NCHW", "float32")
    assert i.normalization.mean == (103.53, 116.28, 123.675)
    labels = tmp_path / "labels.txt"
    labels.write_text("parcel\nperson\ndog\n")  # 3 classes: 4 + 4 x (reg_max + 1) columns remain
    with pytest.raises(LabelsError, match=r"not 3 \+ 4 x \(reg_max \+ 1\)"):
        Detector.open(testmodels / f"{case.name}.tflite", labels, resize="stretch")
