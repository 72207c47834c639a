"""The zoo SSD rebuilt as a float Keras model, then quantized by doorstep: a real detector end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import HAS_TF, SHARED
from support.tflite_edit import strip_signatures

from device.bundle.store import load_bundle
from device.detect.detector import Detector
from device.detect.nms import box_iou

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(
        not HAS_TF, reason="rebuilding and quantizing need TensorFlow (main environment)"
    ),
    # TensorFlow in child processes; the first test to run also rebuilds the real SSD.
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = SHARED / "models" / "ssd_mobilenet_v1_coco_quant" / "detect.tflite"
    if not model.exists():
        pytest.skip("needs ../shared/models/ssd_mobilenet_v1_coco_quant")
    from host.ssd_import import extract_ssd
    from host.tfjobs import run_job

    root = tmp_path_factory.mktemp("ssd")
    graph = extract_ssd(model, root / "graph")
    answer = run_job("build_ssd", graph=str(graph), out=str(root / "ssd.keras"))
    assert answer["parameters"] > 3_000_000
    run_job("float", model=str(root / "ssd.keras"), out=str(root / "float.tflite"))
    return root


def quantize(
    rebuilt: Path, model: str, labels: Path, coco_samples: Path, out: Path
) -> subprocess.CompletedProcess[str]:
    """``quantize`` the rebuilt SSD, calibrated on the real photos of packages-v6 and coco-samples."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "quantize",
            str(rebuilt / model),
            "--labels",
            str(labels),
            "--anchors",
            str(rebuilt / "graph" / "anchors.npy"),
            "--iou",
            "0.6",
            "--calib",
            str(SHARED / "data" / "packages-v6"),
            str(coco_samples),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _dogs(det: Detector, coco_samples: Path) -> list[tuple[float, tuple[float, ...]]]:
    found = det.detect(cv2.imread(str(coco_samples / "pets.jpg")))
    return sorted((d.score, d.box) for d in found if d.label == "dog")


def test_rebuilt_float_model_matches_the_zoo_model(
    rebuilt: Path, ssd_model: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    zoo = Detector.open(ssd_model, ssd_labels, iou_threshold=0.6)
    fl = Detector.open(
        rebuilt / "float.tflite",
        ssd_labels,
        anchors=rebuilt / "graph" / "anchors.npy",
        iou_threshold=0.6,
    )
    assert fl.manifest.decoder.kind == "ssd_raw"
    assert fl.manifest.input.dtype == "float32"
    want, got = _dogs(zoo, coco_samples), _dogs(fl, coco_samples)
    assert len(want) == len(got) == 2
    for (ws, wb), (gs, gb) in zip(want, got, strict=True):
        assert gs == pytest.approx(ws, abs=0.05)
        assert box_iou(np.array(wb), np.array([gb]))[0] > 0.9


@pytest.mark.timeout(600)  # rebuilds and quantizes the real SSD (25 s on a quiet machine)
def test_quantized_rebuilt_ssd_finds_the_same_objects_on_real_photos(
    rebuilt: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    out = rebuilt / "int8"
    proc = quantize(rebuilt, "ssd.keras", ssd_labels, coco_samples, out)
    assert proc.returncode == 0, proc.stderr
    assert "only 33 calibration images" in proc.stderr  # warned, not refused
    m = load_bundle(out).manifest
    assert (m.input.dtype, m.decoder.kind) == ("uint8", "ssd_raw")
    assert "anchors.npy" in m.files
    fl = Detector.open(
        rebuilt / "float.tflite",
        ssd_labels,
        anchors=rebuilt / "graph" / "anchors.npy",
        iou_threshold=0.6,
    )
    q = Detector(load_bundle(out))
    for name in ("pets.jpg", "kite_and_cold.jpg", "grace_hopper.bmp", "owl.jpg"):
        image = cv2.imread(str(coco_samples / name))
        want = [d for d in fl.detect(image) if d.score >= 0.6]
        got = q.detect(image)
        assert want, name
        for d in want:  # every confident float detection has an int8 twin
            twins = [
                g
                for g in got
                if g.label == d.label and box_iou(np.array(d.box), np.array([g.box]))[0] > 0.7
            ]
            assert twins, f"{name}: int8 lost {d.label} {d.score:.2f}"
            assert abs(twins[0].score - d.score) < 0.12
    assert (rebuilt / "float.tflite").stat().st_size * 0.3 > (out / "model.tflite").stat().st_size


def test_float_tflite_route_uses_ai_edge_quantizer(
    rebuilt: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    """A float .tflite (no Keras source) is quantized by ai-edge-quantizer, input included."""
    out = rebuilt / "int8-aq"
    proc = quantize(rebuilt, "float.tflite", ssd_labels, coco_samples, out)
    assert proc.returncode == 0, proc.stderr
    m = load_bundle(out).manifest
    assert m.tools["converter"].startswith("ai-edge-quantizer")
    assert m.input.dtype == "int8" and m.input.normalization.mean == (127.5, 127.5, 127.5)
    dogs = _dogs(Detector(load_bundle(out)), coco_samples)
    assert len(dogs) == 2 and min(s for s, _ in dogs) > 0.6


@pytest.mark.timeout(900)
def test_an_fp16_tflite_without_signature_is_quantized(
    rebuilt: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    """The real SSD exported with float16 weights (DEQUANTIZE ops, TF's own converter) and no
    SignatureDef: `quantize` widens the weights and adds the signature in a working copy, and
    the int8 result finds what the float model finds."""
    from ai_edge_litert.interpreter import Interpreter

    from device.detect.model import read_model_facts
    from host.tfjobs import run_job

    run_job(
        "float", model=str(rebuilt / "ssd.keras"), out=str(rebuilt / "fp16-sig.tflite"), fp16=True
    )
    strip_signatures(rebuilt / "fp16-sig.tflite", rebuilt / "fp16.tflite")
    fp16 = rebuilt / "fp16.tflite"
    assert Interpreter(model_path=str(fp16)).get_signature_list() == {}
    assert read_model_facts(fp16).ops.get("DEQUANTIZE", 0) > 10
    before = fp16.read_bytes()
    out = rebuilt / "int8-fp16"
    proc = quantize(rebuilt, "fp16.tflite", ssd_labels, coco_samples, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "DEQUANTIZE folded" in proc.stderr
        and "no signature: added 'serving_default'" in proc.stderr
    )
    assert fp16.read_bytes() == before  # the user's file is never changed
    m = load_bundle(out).manifest
    assert m.tools["converter"].startswith("ai-edge-quantizer")
    fl = Detector.open(
        fp16, ssd_labels, anchors=rebuilt / "graph" / "anchors.npy", iou_threshold=0.6
    )
    q = Detector(load_bundle(out))
    want, got = _dogs(fl, coco_samples), _dogs(q, coco_samples)
    assert len(want) == len(got) == 2, (want, got)
    for (ws, wb), (gs, gb) in zip(want, got, strict=True):
        assert abs(gs - ws) < 0.12 and box_iou(np.array(wb), np.array([gb]))[0] > 0.8
    assert out.joinpath("model.tflite").stat().st_size < fp16.stat().st_size
