"""The command lines, run as a user runs them (real processes, real models and photos)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import HAS_TF

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd, *rest = args
    module = {"doorstep-device": "device.cli", "doorstep-host": "host.cli"}[cmd]
    proc = subprocess.run(
        [sys.executable, "-m", module, *rest], capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("cmd", ["doorstep-device", "doorstep-host"])
def test_help_has_examples(cmd: str) -> None:
    out = run(cmd, "--help").stdout
    assert "examples:" in out


@pytest.mark.parametrize(
    "sub", ["inspect", "detect", "bench", "check-config", "init", "unit", "config-path"]
)
def test_device_subcommand_help_has_examples(sub: str) -> None:
    assert "example" in run("doorstep-device", sub, "--help").stdout


def test_inspect_real_ssd(ssd_model: Path, ssd_labels: Path) -> None:
    out = run("doorstep-device", "inspect", str(ssd_model), "--labels", str(ssd_labels)).stdout
    assert (
        "normalized_input_image_tensor  [1, 300, 300, 3]  uint8 scale=0.0078125 zero_point=128"
        in out
    )
    assert re.search(r"CONV_2D\s+34", out)
    assert "layout    tflite_postprocess" in out
    doc = json.loads(run("doorstep-device", "inspect", str(ssd_model), "--json").stdout)
    assert doc["ops"]["TFLite_Detection_PostProcess"] == 1
    assert doc["inputs"][0]["zero_point"] == 128


def test_detect_json_groups_detections_per_image(
    ssd_model: Path, ssd_labels: Path, coco_samples: Path, tmp_path: Path
) -> None:
    out = run(
        "doorstep-device",
        "detect",
        str(coco_samples / "pets.jpg"),
        str(coco_samples / "kite_and_cold.jpg"),
        "--model",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--json",
        "--out",
        str(tmp_path / "ann"),
    ).stdout
    doc = json.loads(out)
    assert [Path(i["image"]).name for i in doc["images"]] == ["pets.jpg", "kite_and_cold.jpg"]
    pets = doc["images"][0]
    assert (pets["width"], pets["height"]) == (512, 430)
    for det in pets["detections"]:
        assert set(det) >= {"label", "class_id", "score", "box"}
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 430
    assert [d["label"] for d in pets["detections"]] == ["dog", "dog"]
    assert len(doc["model"]["sha256"]) == 64
    annotated = cv2.imread(str(tmp_path / "ann" / "pets.jpg"))
    assert annotated is not None and annotated.shape == (430, 512, 3)
    assert (annotated != cv2.imread(str(coco_samples / "pets.jpg"))).any()


def test_detect_a_folder_and_a_threshold(
    ssd_model: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    out = run(
        "doorstep-device",
        "detect",
        str(coco_samples),
        "--model",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--threshold",
        "0.8",
        "--json",
    ).stdout
    doc = json.loads(out)
    assert len(doc["images"]) == 7
    assert all(d["score"] >= 0.8 for i in doc["images"] for d in i["detections"])


def test_host_bundle_then_device_detect(
    ssd_model: Path, ssd_labels: Path, coco_samples: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "ssd-bundle"
    proc = run(
        "doorstep-host",
        "bundle",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--out",
        str(bundle),
        "--role",
        "package=suitcase",
        "--tar",
    )
    assert "detected layout: tflite_postprocess" in proc.stderr
    assert "roles: person=['person'], package=['suitcase']" in proc.stderr
    assert (tmp_path / "ssd-bundle.tar").is_file()
    again = run(
        "doorstep-host",
        "bundle",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--out",
        str(bundle),
        check=False,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    doc = json.loads(
        run(
            "doorstep-device",
            "detect",
            str(coco_samples / "pets.jpg"),
            "--model",
            str(bundle),
            "--json",
        ).stdout
    )
    assert [d["label"] for d in doc["images"][0]["detections"]] == ["dog", "dog"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["detect", "nope.jpg", "--model", "x.tflite"], "nope.jpg: image not found"),
        (
            ["detect", "{pets}", "--model", "{tmp}/missing.tflite", "--labels", "{labels}"],
            "missing.tflite: not found",
        ),
        (["detect", "{pets}", "--model", "{pets}", "--labels", "{labels}"], "not a TFLite model"),
        (["inspect", "{tmp}"], "manifest.json: missing: not a doorstep bundle"),
        (
            ["bench", "--model", "{model}", "--labels", "{labels}", "--frame-size", "big"],
            "expected WIDTHxHEIGHT",
        ),
        (["check-config", "{tmp}/none.yaml"], "config file not found"),
        (
            ["bench", "--model", "{model}", "--labels", "{labels}", "--iterations", "0"],
            "time at least one frame",
        ),
        (
            ["bench", "--model", "{model}", "--labels", "{labels}", "--threads", "a"],
            "expected numbers like 1,4",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    args: list[str],
    message: str,
    ssd_model: Path,
    ssd_labels: Path,
    coco_samples: Path,
    tmp_path: Path,
) -> None:
    subs = {
        "pets": str(coco_samples / "pets.jpg"),
        "tmp": str(tmp_path),
        "labels": str(ssd_labels),
        "model": str(ssd_model),
    }
    proc = run("doorstep-device", *[a.format(**subs) for a in args], check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("doorstep-device: error: ")
        or "doorstep-device: error: " in proc.stderr
    )
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_annotated_images_with_the_same_name_do_not_overwrite(
    ssd_model: Path, ssd_labels: Path, coco_samples: Path, tmp_path: Path
) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.jpg").symlink_to(coco_samples / "pets.jpg")
    run(
        "doorstep-device",
        "detect",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--model",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--out",
        str(tmp_path / "out"),
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-1.jpg", "x.jpg"]


def test_detect_skips_unreadable_images_and_says_so(
    ssd_model: Path, ssd_labels: Path, coco_samples: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    proc = run(
        "doorstep-device",
        "detect",
        str(bad),
        str(coco_samples / "pets.jpg"),
        "--model",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--json",
    )
    assert "broken.jpg: not a readable image, skipped" in proc.stderr
    assert json.loads(proc.stdout)["unreadable"] == [str(bad)]


def test_bench_prints_a_table(
    ssd_model: Path, ssd_labels: Path, coco_samples: Path, tmp_path: Path
) -> None:
    out = run(
        "doorstep-device",
        "bench",
        "--model",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--source",
        str(coco_samples / "pets.jpg"),
        "--iterations",
        "5",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "b.json"),
    ).stdout
    for stage in ("preprocess", "invoke", "decode", "total", "fps"):
        assert re.search(rf"^\s+1\s+{stage}\s", out, re.M), out
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[0]["threads"] == 1 and rows[0]["invoke_ms"]["p50"] > 0


def test_bench_on_a_real_video(ssd_model: Path, ssd_labels: Path, traffic_video: Path) -> None:
    out = run(
        "doorstep-device",
        "bench",
        "--model",
        str(ssd_model),
        "--labels",
        str(ssd_labels),
        "--source",
        str(traffic_video),
        "--iterations",
        "3",
        "--threads",
        "1",
    )
    assert "20 frame(s) of 640x480" in out.stderr


def test_check_config_prints_the_validated_config() -> None:
    proc = run("doorstep-device", "check-config", str(ROOT / "configs" / "device.yaml"))
    assert json.loads(proc.stdout)["device_id"] == "front-door"
    assert "valid" in proc.stderr


@pytest.mark.host
@pytest.mark.skipif(
    not HAS_TF, reason="the demo builds its model with TensorFlow (host side; main environment)"
)
@pytest.mark.timeout(900)  # the whole demo: quantize, detect, daemon (40 s on a quiet machine)
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "found in: 14" in proc.stdout and "false alarms: 0" in proc.stdout
    page = (tmp_path / "demo" / "index.html").read_text()
    assert "synthetic" in page and "contact_sheet.png" in page
    sheet = cv2.imread(str(tmp_path / "demo" / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] == 6 * 324
    assert (tmp_path / "demo" / "parcel-int8" / "manifest.json").is_file()
    assert len(list((tmp_path / "demo" / "frames").glob("*.png"))) == 30
