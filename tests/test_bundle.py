"""Bundles: written by the host's code, verified by the device's, tampering refused."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import pytest

from device.bundle.build import describe_model
from device.bundle.store import load_bundle, pack_bundle, write_bundle
from device.detect.detector import Detector
from device.errors import BundleError


@pytest.fixture
def bundle_dir(tmp_path: Path, ssd_model: Path, ssd_labels: Path) -> Path:
    manifest, files = describe_model(ssd_model, ssd_labels, roles=["package=suitcase,book"])
    write_bundle(tmp_path / "ssd", manifest, files)
    return tmp_path / "ssd"


def test_manifest_holds_the_contract(bundle_dir: Path, ssd_model: Path) -> None:
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    assert raw["schema_version"] == 1
    assert raw["files"]["model.tflite"]["size"] == ssd_model.stat().st_size
    assert len(raw["files"]["model.tflite"]["sha256"]) == 64
    assert raw["input"]["scale"] == 1 / 128 and raw["input"]["zero_point"] == 128
    assert raw["decoder"]["outputs"]["boxes"] == {
        "name": "TFLite_Detection_PostProcess",
        "shape": [1, 10, 4],
        "dtype": "float32",
    }
    names = raw["labels"]["names"]
    assert {names[i] for i in raw["labels"]["roles"]["package"]} == {"suitcase", "book"}
    assert [names[i] for i in raw["labels"]["roles"]["person"]] == ["person"]
    assert raw["thresholds"]["score"] == 0.5
    assert raw["tools"]["runtime"].split()[0] in ("tflite-runtime", "ai-edge-litert")
    assert raw["ops"]["CONV_2D"] == 34


def test_bundle_and_its_tar_detect_like_the_bare_model(
    bundle_dir: Path, ssd_model: Path, ssd_labels: Path, coco_samples: Path, tmp_path: Path
) -> None:
    image = cv2.imread(str(coco_samples / "pets.jpg"))
    bare = Detector.open(ssd_model, ssd_labels).detect(image)
    tar = pack_bundle(bundle_dir, tmp_path / "ssd.tar")
    for source in (bundle_dir, tar):
        assert Detector.open(source).detect(image) == bare


def test_tar_holds_only_the_manifest_and_its_files(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "notes").mkdir()
    (bundle_dir / "README.txt").write_text("not part of the bundle")
    tar = pack_bundle(bundle_dir, tmp_path / "b.tar")
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == ["manifest.json", "model.tflite"]
    assert load_bundle(tar).manifest.name == "detect"
    assert not (tmp_path / "b.tar.part").exists()


def test_a_changed_byte_is_refused(bundle_dir: Path) -> None:
    model = bundle_dir / "model.tflite"
    data = bytearray(model.read_bytes())
    data[5000] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.tflite: sha256 .* does not match the manifest"):
        load_bundle(bundle_dir)


def test_a_truncated_model_is_refused(bundle_dir: Path) -> None:
    model = bundle_dir / "model.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="size 1000 bytes, manifest says"):
        load_bundle(bundle_dir)


def test_a_missing_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "model.tflite").unlink()
    with pytest.raises(BundleError, match="listed in the manifest but missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(schema_version=9), "schema_version 9 is newer than this doorstep"),
        (
            lambda m: m["input"].update(layout="NWHC"),
            "input.layout: Input should be 'NHWC' or 'NCHW'",
        ),
        (
            lambda m: m["thresholds"].update(score=1.5),
            "thresholds.score: Input should be less than or equal to 1",
        ),
        (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (
            lambda m: m["labels"]["roles"].update(package=[500]),
            "role 'package' names class ids [500]",
        ),
        (
            lambda m: m["files"].update({"../etc": m["files"]["model.tflite"]}),
            "is not a plain file name",
        ),
    ],
)
def test_a_bad_manifest_is_refused_with_the_key(
    bundle_dir: Path, edit: object, message: str
) -> None:
    path = bundle_dir / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)  # type: ignore[operator]
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert message in str(err.value)


def test_manifest_that_is_not_json(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(bundle_dir)


def test_a_tar_with_a_path_outside_the_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(bundle_dir / "manifest.json", arcname="../manifest.json")
    with pytest.raises(BundleError, match="a bundle tar holds plain files only"):
        load_bundle(evil)


def test_an_existing_bundle_is_not_overwritten_without_force(
    bundle_dir: Path, ssd_model: Path, ssd_labels: Path
) -> None:
    manifest, files = describe_model(ssd_model, ssd_labels, version="2.0.0")
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(bundle_dir, manifest, files)
    assert load_bundle(bundle_dir).manifest.version == "0.0.0"
    assert write_bundle(bundle_dir, manifest, files, overwrite=True).manifest.version == "2.0.0"


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, ssd_model: Path, ssd_labels: Path
) -> None:
    manifest, files = describe_model(ssd_model, ssd_labels)
    files["notes.txt"] = tmp_path / "does-not-exist.txt"
    with pytest.raises(FileNotFoundError):
        write_bundle(tmp_path / "out", manifest, files)
    assert list(tmp_path.iterdir()) == []


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json: missing: not a doorstep bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
