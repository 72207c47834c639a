"""The shipped default parcel detector: loads, verifies, finds parcels, ignores parcel-free photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SHARED

from device.bundle.store import load_bundle
from device.config import load_config
from device.detect.detector import Detector
from device.detect.nms import box_iou
from device.models import DEFAULT_BUNDLE, default_bundle

ROOT = Path(__file__).resolve().parent.parent


def test_default_bundle_is_shipped_small_and_verifies() -> None:
    bundle = load_bundle(default_bundle())  # verifies every file's size and sha256
    m = bundle.manifest
    assert m.labels.names == ["package"] and m.labels.roles == {"package": [0]}
    assert (m.input.dtype, m.decoder.kind) == ("uint8", "ssd_raw")
    ev = m.evaluation or {}
    assert ev["int8"]["ap50"] >= 0.90
    assert ev["ap50_drop_points"] <= 1.0
    shipped = sum(p.stat().st_size for p in DEFAULT_BUNDLE.iterdir())
    shipped += sum(p.stat().st_size for p in (ROOT / "host" / "models").iterdir())
    assert shipped < 25e6
    assert not any(
        "/" in str(f) and str(f).startswith("/") for f in (m.calibration or {}).get("folders", {})
    )


def test_finds_the_parcel_in_each_packages_v6_test_photo() -> None:
    photos = sorted((SHARED / "data" / "packages-v6" / "test" / "images").glob("*.jpg"))
    if not photos:
        pytest.skip("needs ../shared/data/packages-v6/test")
    det = Detector.open(None)
    for photo in photos:
        found = det.detect(cv2.imread(str(photo)))
        assert [d.label for d in found][:1] == ["package"], photo.name


def test_no_parcel_above_the_operating_threshold_on_parcel_free_photos(coco_samples: Path) -> None:
    det = Detector.open(None)
    for photo in sorted(coco_samples.iterdir()):
        image = cv2.imread(str(photo))
        if image is not None:
            assert det.detect(image) == [], photo.name


def test_detect_without_model_and_a_config_without_path_use_it(
    tmp_path: Path, coco_samples: Path
) -> None:
    photo = SHARED / "data" / "packages-v6" / "test" / "images"
    images = sorted(photo.glob("*.jpg")) if photo.exists() else []
    target = str(images[0]) if images else str(coco_samples / "pets.jpg")
    proc = subprocess.run(
        [sys.executable, "-m", "device.cli", "detect", target, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"]["name"] == "doorstep-parcel-ssd"
    cfg = load_config(ROOT / "configs" / "device.yaml")
    assert cfg.model.path is None
    det = Detector.open(cfg.model.path, cfg.model.labels, **cfg.model.detector_options())
    assert det.bundle.source == DEFAULT_BUNDLE


@pytest.mark.timeout(300)  # renders and detects the whole demo (15 s on a quiet machine)
def test_rendered_demo_parcel_is_found_only_while_it_is_there() -> None:
    from host.render import render_demo

    det = Detector.open(None)
    frames = render_demo()
    assert sum(f.parcel is not None for f in frames) == 14
    for frame in frames:
        found = det.detect(frame.image)
        if frame.parcel is None:
            assert found == [], frame.index
        else:
            assert found, frame.index
            assert box_iou(np.array(frame.parcel, float), np.array([found[0].box]))[0] > 0.7
