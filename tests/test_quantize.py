"""``doorstep-host quantize``/``evaluate``/``bench`` on small real Keras detectors built here.

The detectors are tests/support/redbox.py's: a hand-built Keras model that finds red boxes (real
int8 conversion, real calibration), and a *fragile* twin with an outlier activation that naive
int8 quantization wrecks, to prove the quality gate fails when it should and ``--fix`` repairs
it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import HAS_TF, SHARED

from device.bundle.store import load_bundle
from device.detect.detector import Detector
from device.detect.nms import box_iou

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(
        not HAS_TF, reason="quantization needs TensorFlow (host side; main environment)"
    ),
    # TensorFlow in child processes; the first test to run also builds the module's models.
    pytest.mark.timeout(300),
]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def host(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration scenes, a labeled evaluation set, and the two Keras models."""
    from support.redbox import synthetic_scene

    root = tmp_path_factory.mktemp("quantize")
    rng = np.random.default_rng(1)
    (root / "calib").mkdir()
    for i in range(100):
        cv2.imwrite(str(root / "calib" / f"c{i:03d}.jpg"), synthetic_scene(rng, red=bool(i % 4))[0])
    for sub in ("images", "labels"):
        (root / "eval" / sub).mkdir(parents=True)
    for i in range(40):
        img, box = synthetic_scene(rng, red=bool(i % 5))
        cv2.imwrite(str(root / "eval" / "images" / f"e{i:03d}.jpg"), img)
        line = ""
        if box:
            (x1, y1, x2, y2), (h, w) = box, img.shape[:2]
            line = f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"
        (root / "eval" / "labels" / f"e{i:03d}.txt").write_text(line)
    (root / "eval" / "classes.txt").write_text("parcel\n")
    (root / "labels.txt").write_text("parcel\n")
    for name, extra in (("redbox.keras", []), ("fragile.keras", ["--fragile"])):
        subprocess.run(
            [sys.executable, "-m", "support.redbox", str(root / name), *extra],
            check=True,
            cwd=Path(__file__).parent,  # `-m support.redbox` is found from tests/
            env=ENV,
            capture_output=True,
            timeout=300,
        )
    return root


def quantize_gated(
    work: Path, model: str, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``quantize`` of one of the work models, calibrated and gated on the work sets."""
    return host(
        "quantize",
        str(work / model),
        "--labels",
        str(work / "labels.txt"),
        "--calib",
        str(work / "calib"),
        "--eval",
        str(work / "eval"),
        "--out",
        str(out),
        *extra,
    )


@pytest.fixture(scope="module")
def bundle(work: Path) -> Path:
    proc = quantize_gated(work, "redbox.keras", work / "int8")
    assert proc.returncode == 0, proc.stderr
    assert "quality gate passed" in proc.stderr
    return work / "int8"


def test_bundle_is_full_integer_and_records_how_it_was_made(bundle: Path) -> None:
    m = load_bundle(bundle).manifest
    assert (m.input.dtype, m.input.zero_point) == ("uint8", 0)
    assert m.input.scale == pytest.approx(1 / 255, rel=0.15)  # read from the model, calibrated
    assert m.input.normalization.std == (255.0, 255.0, 255.0)  # the float model's 0..1
    cal = m.calibration or {}
    assert cal["images"] == 100 and cal["input_type"] == "uint8"
    assert cal["stability"]["tensors"] > 10 and "max_percent" in cal["stability"]
    ev = m.evaluation or {}
    assert ev["ap50_drop_points"] <= 1.0
    assert ev["int8"]["ap50"] > 0.8
    assert ev["size_bytes"]["int8"] < 0.4 * ev["size_bytes"]["float"]
    assert ev["latency_ms_1_thread"]["int8"] > 0
    assert m.tools["converter"].startswith("tensorflow ")
    assert m.ops["CONV_2D"] == 1 and m.ops["FULLY_CONNECTED"] >= 4


def test_int8_finds_what_float_finds_on_real_photos(work: Path, bundle: Path) -> None:
    """On real parcel photos the red-box finder fires on brown-red boxes; int8 must agree."""
    photos = sorted((SHARED / "data" / "porch-2211" / "images").glob("*.jpg"))
    if not photos:
        pytest.skip("needs ../shared/data/porch-2211")
    from host.tfjobs import run_job

    run_job("float", model=str(work / "redbox.keras"), out=str(work / "float.tflite"))
    fl, q = Detector.open(work / "float.tflite", work / "labels.txt"), Detector.open(bundle)
    compared = 0
    for photo in photos:
        image = cv2.imread(str(photo))
        confident = [d for d in fl.detect(image) if d.score >= 0.6]
        if not confident:
            continue
        found = q.detect(image)
        assert found, f"{photo.name}: float found {confident[0]}, int8 nothing"
        assert box_iou(np.array(confident[0].box), np.array([found[0].box]))[0] > 0.85, photo.name
        assert found[0].score == pytest.approx(confident[0].score, abs=0.15)
        compared += 1
    assert compared >= 5


def test_gate_fails_on_a_model_built_to_break(work: Path) -> None:
    out = work / "fragile-int8"
    proc = quantize_gated(work, "fragile.keras", out)
    assert proc.returncode == 2
    assert "AP@0.5 of int8 vs float" in proc.stdout  # the table is printed
    assert "quality gate failed: int8 AP@0.5 is" in proc.stderr and "--fix" in proc.stderr
    assert not out.exists()


@pytest.mark.timeout(900)  # quantizes again per candidate layer: 90 s on a quiet machine
def test_fix_keeps_only_the_culprit_layers_in_float(work: Path) -> None:
    out = work / "fragile-fixed"
    proc = quantize_gated(work, "fragile.keras", out, "--fix")
    assert proc.returncode == 0, proc.stderr
    fix = (load_bundle(out).manifest.evaluation or {})["fix"]
    assert fix["drop_before_points"] > 10 >= 1.0 >= fix["drop_after_points"]
    assert len(fix["float_layers"]) == 2  # the outlier conv and the conv that reads it
    assert any("redness" in t for t in fix["float_layers"]) and any(
        "select" in t for t in fix["float_layers"]
    )
    assert fix["latency_ms_after"] > 0


def test_savedmodel_with_int8_input(work: Path, tmp_path: Path) -> None:
    """The SavedModel route, and --input-type int8: the device feeds pixel - 128 through its LUT."""
    export = tmp_path / "sm"
    code = (
        "import sys, tensorflow as tf\n"
        "m = tf.keras.models.load_model(sys.argv[1], compile=False)\n"
        "m.export(sys.argv[2], input_signature=[tf.TensorSpec([1, 160, 160, 3], tf.float32)], verbose=False)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(work / "redbox.keras"), str(export)],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    out = tmp_path / "b"
    proc = host(
        "quantize",
        str(export),
        "--labels",
        str(work / "labels.txt"),
        "--calib",
        str(work / "calib"),
        "--input-type",
        "int8",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "no --eval set: accuracy not measured" in proc.stderr
    m = load_bundle(out).manifest
    assert m.input.dtype == "int8" and m.evaluation is None
    image = cv2.imread(str(sorted((work / "eval" / "images").glob("*.jpg"))[1]))
    labels = sorted((work / "eval" / "labels").glob("*.txt"))[1].read_text().split()
    assert Detector(load_bundle(out)).detect(image), labels  # the parcel drawn there is found


def _saved_model(tmp: Path, body: str) -> Path:
    """A SavedModel whose ``__call__`` on a [1, 64, 64, 3] image runs ``body``."""
    lines = [
        "import sys, numpy as np, tensorflow as tf",
        "class M(tf.Module):",
        "    @tf.function(input_signature=[tf.TensorSpec([1, 64, 64, 3], tf.float32)])",
        "    def __call__(self, x):",
        *("        " + line for line in textwrap.dedent(body).strip().splitlines()),
        "m = M()",
        "tf.saved_model.save(m, sys.argv[1], signatures=m.__call__.get_concrete_function())",
    ]
    script = tmp / "make.py"
    script.write_text("\n".join(lines) + "\n")
    subprocess.run(
        [sys.executable, str(script), str(tmp / "sm")],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    return tmp / "sm"


def quantize_plain(work: Path, model: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """``quantize`` of a SavedModel made in the test, calibrated on the work scenes, no gate."""
    return host(
        "quantize",
        str(model),
        "--labels",
        str(work / "labels.txt"),
        "--calib",
        str(work / "calib"),
        "--out",
        str(out),
    )


def test_pixel_boxes_sharing_a_tensor_with_scores_are_refused(work: Path, tmp_path: Path) -> None:
    model = _saved_model(
        tmp_path,
        """
        boxes = tf.constant(np.random.default_rng(0).uniform(50, 640, (4, 84)).astype(np.float32))
        scores = tf.sigmoid(tf.reduce_mean(x) * tf.ones((1, 84)) - 2.0)
        return tf.concat([boxes, scores], 0)[None]
    """,
    )
    proc = quantize_plain(work, model, tmp_path / "b")
    assert proc.returncode == 2
    assert "holds boxes in pixels" in proc.stderr and "split boxes and scores" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_ops_tflite_cannot_run_are_named(work: Path, tmp_path: Path) -> None:
    model = _saved_model(tmp_path, "return tf.strings.to_number(tf.strings.as_string(x))")
    proc = quantize_plain(work, model, tmp_path / "b")
    assert proc.returncode == 2
    assert "uses TensorFlow ops that TFLite cannot run: AsString, StringToNumber" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calib", "{tmp}/none"], "calibration folder {tmp}/none does not exist"),
        (["--calib", "{tmp}"], "no calibration images (JPEG, PNG, BMP)"),
        (["--labels", "{tmp}/nolabels.txt"], "nolabels.txt: label file not found"),
        (["--eval", "{tmp}"], "no images, and no Annotations (VOC) or .json file (COCO) either"),
    ],
)
def test_bad_input(work: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = {"--calib": str(work / "calib"), "--labels": str(work / "labels.txt")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.format(tmp=tmp_path)
    flat = [x for kv in base.items() for x in kv]
    proc = host("quantize", str(work / "redbox.keras"), *flat, "--out", str(tmp_path / "b"))
    assert proc.returncode == 2, proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_an_fp16_tflite_without_signature_passes_the_quality_gate(work: Path) -> None:
    """The red-box detector exported by TensorFlow's float16 converter, signatures stripped (as
    most float .tflite files people have): quantized through ai-edge-quantizer, it keeps the
    float16 model's AP within the gate."""
    from support.tflite_edit import strip_signatures

    from host.tfjobs import run_job

    run_job(
        "float",
        model=str(work / "redbox.keras"),
        out=str(work / "redbox-fp16-sig.tflite"),
        fp16=True,
    )
    strip_signatures(work / "redbox-fp16-sig.tflite", work / "redbox-fp16.tflite")
    proc = quantize_gated(work, "redbox-fp16.tflite", work / "int8-fp16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEQUANTIZE folded" in proc.stderr and "added 'serving_default'" in proc.stderr
    assert "quality gate passed" in proc.stderr
    m = load_bundle(work / "int8-fp16").manifest
    assert m.tools["converter"].startswith("ai-edge-quantizer")
    ev: dict[str, Any] = m.evaluation or {}
    assert ev["int8"]["ap50"] >= ev["float"]["ap50"] - 0.01, ev
    print(f"redbox float16 .tflite without signature: AP50 float {ev['float']['ap50']}, "
          f"int8 {ev['int8']['ap50']}")  # fmt: skip


@pytest.mark.timeout(900)  # quantizes again per trial: 10 s on a quiet machine
def test_fix_on_an_fp16_tflite_keeps_the_culprits_in_float(work: Path) -> None:
    """--fix without the Keras source: the fragile detector as a float16, signature-less
    .tflite. ai-edge-quantizer's float-vs-int8 comparison ranks the ops, and the outlier conv
    with the conv that reads it stay float (as the Keras route finds)."""
    from support.tflite_edit import strip_signatures

    from host.tfjobs import run_job

    run_job(
        "float", model=str(work / "fragile.keras"), out=str(work / "fragile-sig.tflite"), fp16=True
    )
    strip_signatures(work / "fragile-sig.tflite", work / "fragile-fp16.tflite")
    failed = quantize_gated(work, "fragile-fp16.tflite", work / "fragile-tflite-int8")
    assert failed.returncode == 2 and "quality gate failed" in failed.stderr  # it does break
    out = work / "fragile-tflite-fixed"
    proc = quantize_gated(work, "fragile-fp16.tflite", out, "--fix")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dB lost" in proc.stderr  # the ranking is shown
    m = load_bundle(out).manifest
    assert m.tools["converter"].startswith("ai-edge-quantizer")
    fix = (m.evaluation or {})["fix"]
    assert fix["drop_before_points"] > 10 >= 1.0 >= fix["drop_after_points"]
    layers = fix["float_layers"]
    assert any("redness" in t for t in layers) and any("select" in t for t in layers)
    assert len(layers) <= 4, layers  # the culprits, not the model
    from host.quantize import float_ops

    ops = float_ops(out / "model.tflite")
    assert 0 < sum(ops.values()) <= 12, ops  # most of the model is still int8
    print(f"fragile fp16 .tflite --fix: AP50 drop {fix['drop_before_points']} -> "
          f"{fix['drop_after_points']} points, float: {layers}")  # fmt: skip


@pytest.mark.parametrize("layout", ["v8", "v5"])
def test_fp16_yolo_layout_tflite_quantizes_and_int8_finds_what_float_finds(
    tmp_path: Path, layout: str
) -> None:
    """A real detector (our float parcel model, re-headed in the graph) as a YOLOv8 or YOLOv5
    float16 export without a signature, quantized through the .tflite route: on the real
    photos of ../shared the int8 model finds every parcel the float one finds."""
    from device.bundle.build import parse_normalization

    root = Path(__file__).resolve().parents[1]
    calib = SHARED / "data" / "porch-2211" / "images"
    packages = SHARED / "data" / "packages-v6"
    if not calib.is_dir() or not packages.is_dir():
        pytest.skip("needs ../shared/data/porch-2211 and packages-v6")
    models, labels = root / "host" / "models", root / "host" / "models" / "labels.txt"
    subject = tmp_path / f"yolo{layout}-fp16.tflite"
    subprocess.run(
        [sys.executable, "-m", "support.yolo_wrap", str(models / "parcel-ssd.keras"),
         str(models / "anchors.npy"), str(subject), layout],
        check=True, cwd=Path(__file__).parent, env=ENV, capture_output=True, timeout=300,
    )  # fmt: skip
    # The subject's N is the SSD's 1917 anchors, not a YOLOv5 grid's 3 x cells: name the
    # layout (a one-class YOLOv5 row has the 6 columns of an end-to-end export).
    decoder = {"v8": "yolo_v8", "v5": "yolo_v5"}[layout]
    out = tmp_path / "int8"
    proc = host(
        "quantize", str(subject), "--labels", str(labels), "--calib", str(calib),
        "--decoder", decoder, "--normalization", "ssd", "--resize", "stretch", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEQUANTIZE folded" in proc.stderr and "added 'serving_default'" in proc.stderr
    assert f"layout: {decoder}" in proc.stderr
    q = Detector.open(out)
    assert q.manifest.decoder.kind == decoder and q.manifest.input.dtype == "int8"
    f = Detector.open(
        subject, labels, decoder=decoder, normalization=parse_normalization("ssd"),
        resize="stretch",
    )  # fmt: skip
    photos = sorted(packages.glob("*/images/*.jpg")) + sorted(calib.glob("*.jpg"))
    found, ious, diffs = 0, [], []
    for photo in photos:
        image = cv2.imread(str(photo))
        theirs = q.detect(image)
        for d in f.detect(image):
            iou = max((float(box_iou(np.array(d.box), np.array([t.box]))[0]) for t in theirs),
                      default=0.0)  # fmt: skip
            if iou >= 0.5:
                match = max(
                    theirs, key=lambda t: float(box_iou(np.array(d.box), np.array([t.box]))[0])
                )
                found += 1
                ious.append(iou)
                diffs.append(abs(match.score - d.score))
    floats = sum(len(f.detect(cv2.imread(str(p)))) for p in photos)
    from host.quantize import quick_latency

    ms = quick_latency(subject), quick_latency(q.bundle.model_path)
    print(f"YOLO{layout} fp16 .tflite: {len(photos)} photos, float {floats} detections, int8 found "
          f"{found}; min IoU {min(ious):.3f}, max score difference {max(diffs):.3f}; sizes "
          f"{subject.stat().st_size / 1e6:.2f} -> {q.bundle.model_path.stat().st_size / 1e6:.2f} MB; "
          f"invoke at 1 thread {ms[0]:.1f} -> {ms[1]:.1f} ms")  # fmt: skip
    assert floats >= 50  # the float subject finds the parcels: a meaningful comparison
    assert found >= 0.95 * floats
    assert np.median(ious) >= 0.9 and max(diffs) <= 0.15


def test_a_broken_or_already_quantized_tflite_is_explained(
    work: Path, bundle: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "m.tflite"
    fake.write_bytes(b"x")
    common = [
        "--labels",
        str(work / "labels.txt"),
        "--calib",
        str(work / "calib"),
        "--out",
        str(tmp_path / "b"),
    ]
    proc = host("quantize", str(fake), *common)
    assert proc.returncode == 2 and "not a TFLite model" in proc.stderr
    proc = host("quantize", str(bundle / "model.tflite"), *common)
    assert (
        proc.returncode == 2
        and "already quantized (input uint8); give its float model" in proc.stderr
    )
    proc = host("quantize", str(work / "labels.txt"), *common)
    assert (
        proc.returncode == 2
        and "expected a Keras model (.keras, .h5), a SavedModel folder or a float .tflite"
        in proc.stderr
    )


def test_evaluate_cli_writes_table_json_and_curve(work: Path, bundle: Path, tmp_path: Path) -> None:
    proc = host(
        "evaluate",
        str(bundle),
        "--data",
        str(work / "eval"),
        "--json",
        str(tmp_path / "e.json"),
        "--plot",
        str(tmp_path / "pr.png"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "AP@0.5" in proc.stdout
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc[0]["overall"]["ap50"] > 0.8 and doc[0]["overall"]["ground_truth"] == 32
    png = cv2.imread(str(tmp_path / "pr.png"))
    assert png is not None and png.shape[0] > 100


def test_evaluate_real_ssd_on_real_parcels_with_a_label_map(
    ssd_model: Path, ssd_labels: Path
) -> None:
    porch = SHARED / "data" / "porch-2211"
    proc = host(
        "evaluate",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--data",
        str(porch),
        "--label-map",
        "suitcase=package",
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("detect.tflite"))
    assert 0.05 < float(row.split()[2]) < 0.9  # COCO has no parcels: a suitcase is a weak proxy
    bad = host("evaluate", str(ssd_model), "--labels", str(ssd_labels), "--data", str(porch))
    assert bad.returncode == 2 and "include none of the evaluation set's (package)" in bad.stderr


def test_bench_float_vs_int8(work: Path, bundle: Path, tmp_path: Path) -> None:
    from host.tfjobs import run_job

    run_job("float", model=str(work / "redbox.keras"), out=str(tmp_path / "float.tflite"))
    proc = host(
        "bench",
        str(tmp_path / "float.tflite"),
        str(bundle),
        "--iterations",
        "10",
        "--json",
        str(tmp_path / "b.json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "speed-up" in proc.stdout and "1 thr p50" in proc.stdout
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["input_dtype"] for r in rows] == ["float32", "uint8"]
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"]
