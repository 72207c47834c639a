"""Bad models and mismatches: each refused with a message that names the file and the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device.bundle.build import describe_model
from device.bundle.store import write_bundle
from device.detect.detector import Detector
from device.errors import DetectorError, LabelsError, ModelError


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.tflite: not found"):
        Detector.open(tmp_path / "nope.tflite", None)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "m.tflite").write_bytes(b"")
    with pytest.raises(ModelError, match="file is 0 bytes long: not a TFLite model"):
        Detector.open(tmp_path / "m.tflite", None)


def test_not_a_tflite_file(tmp_path: Path, coco_samples: Path) -> None:
    fake = tmp_path / "photo.tflite"
    shutil.copyfile(coco_samples / "pets.jpg", fake)
    with pytest.raises(
        ModelError, match=r"photo.tflite: not a TFLite model \(no 'TFL3' identifier"
    ):
        Detector.open(fake, None)


def test_truncated_model(tmp_path: Path, ssd_model: Path, ssd_labels: Path) -> None:
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(ssd_model.read_bytes()[: ssd_model.stat().st_size // 2])
    with pytest.raises(
        ModelError, match=r"cut.tflite: corrupt or truncated TFLite model: .* runs past the end"
    ):
        Detector.open(cut, ssd_labels)


@pytest.mark.timeout(600)
def test_mutated_models_are_refused_or_run_never_crash(tmp_path: Path, ssd_model: Path) -> None:
    """tflite-runtime 2.14 does not verify a model: a damaged table crashed the process, and a
    name that is not UTF-8 raised a traceback from LiteRT. 150 seeded mutants of each real model
    (mostly in the flatbuffer's structure), each inspected and run in its own forked child by
    ``model_mutants.py``: every one must be refused with a one-line error or run."""
    out = tmp_path / "mutants.json"
    child = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("model_mutants.py")),
            "--mutants",
            "150",
            "--seed",
            "3",
            "--jobs",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.exists(), f"the campaign did not finish: {child.returncode} {child.stderr[-1500:]}"
    results = json.loads(out.read_text())
    assert len(results) == 300
    bad = [r for r in results if r["outcome"] not in ("refused", "ran")]
    assert not bad, f"{len(bad)} mutants broke the runtime or leaked a traceback: {bad[:5]}"
    refused = [r for r in results if r["outcome"] == "refused"]
    assert len(refused) > 100, child.stdout  # the damage is real: most mutants are refused
    assert any("corrupt or truncated TFLite model" in r["error"] for r in refused)
    assert all(".tflite" in r["error"] for r in refused if "TFLite model" in r["error"])
    assert child.returncode == 0, child.stdout


def test_label_count_not_matching_the_model(tmp_path: Path, ssd_model: Path) -> None:
    labels = tmp_path / "three.txt"
    labels.write_text("package\nperson\ndog\n")
    with pytest.raises(
        LabelsError,
        match=r"labels list 3 classes but detect.tflite read as tflite_postprocess has 90 \(from the post",
    ):
        Detector.open(ssd_model, labels)


def test_bare_model_needs_labels(ssd_model: Path) -> None:
    with pytest.raises(LabelsError, match="no labels given: pass --labels FILE"):
        Detector.open(ssd_model, None)


def test_manifest_disagreeing_with_the_model_input(
    tmp_path: Path, ssd_model: Path, ssd_labels: Path
) -> None:
    manifest, files = describe_model(ssd_model, ssd_labels)
    bad = manifest.model_copy(
        update={"input": manifest.input.model_copy(update={"height": 320, "dtype": "int8"})}
    )
    write_bundle(tmp_path / "b", bad, files)
    with pytest.raises(ModelError) as err:
        Detector.open(tmp_path / "b")
    msg = str(err.value)
    assert "shape [1, 300, 300, 3] but the manifest says [1, 320, 300, 3]" in msg
    assert "dtype uint8 but the manifest says int8" in msg


def test_manifest_naming_an_output_the_model_lacks(
    tmp_path: Path, ssd_model: Path, ssd_labels: Path
) -> None:
    manifest, files = describe_model(ssd_model, ssd_labels)
    outputs = dict(manifest.decoder.outputs)
    outputs["scores"] = outputs["scores"].model_copy(update={"name": "scores_v2"})
    bad = manifest.model_copy(
        update={"decoder": manifest.decoder.model_copy(update={"outputs": outputs})}
    )
    write_bundle(tmp_path / "b", bad, files)
    with pytest.raises(
        ModelError, match="output 'scores_v2' \\(scores\\) named in the manifest is not among"
    ):
        Detector.open(tmp_path / "b")


def test_input_tensor_of_wrong_shape_or_dtype(ssd_model: Path, ssd_labels: Path) -> None:
    det = Detector.open(ssd_model, ssd_labels)
    with pytest.raises(
        DetectorError,
        match=r"input tensor \[1, 320, 320, 3\] uint8 does not match .* \[1, 300, 300, 3\] uint8",
    ):
        det.set_input(np.zeros((1, 320, 320, 3), np.uint8))
    with pytest.raises(DetectorError, match="float32 does not match"):
        det.set_input(np.zeros((1, 300, 300, 3), np.float32))


def test_unknown_runtime(ssd_model: Path, ssd_labels: Path) -> None:
    with pytest.raises(ModelError, match="unknown runtime 'tensorflow'"):
        Detector.open(ssd_model, ssd_labels, runtime="tensorflow")


def test_predicted_class_beyond_labels(
    tmp_path: Path, ssd_model: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    """A bundle whose label list was cut short: refused at the first out-of-range class id."""
    import cv2

    manifest, files = describe_model(ssd_model, ssd_labels)
    raw = json.loads(manifest.model_dump_json())
    raw["labels"] = {"names": raw["labels"]["names"][:10], "roles": {}}
    short = type(manifest).model_validate(raw)
    write_bundle(tmp_path / "b", short, files)
    det = Detector.open(tmp_path / "b")
    with pytest.raises(
        LabelsError, match="predicted class id 17 but the labels name only 10 classes"
    ):
        det.detect(cv2.imread(str(coco_samples / "pets.jpg")))
