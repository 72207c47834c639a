"""Shared fixtures: the real material in ../shared, and the TensorFlow-built test models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(
            f"needs ../shared/{rel} (the project's shared data, laid beside the clone in CI)"
        )
    return path


@pytest.fixture(scope="session")
def ssd_model() -> Path:
    """The real pretrained COCO SSD MobileNet v1 (uint8, TFLite_Detection_PostProcess)."""
    return _shared("models/ssd_mobilenet_v1_coco_quant/detect.tflite")


@pytest.fixture(scope="session")
def ssd_labels() -> Path:
    return _shared("models/ssd_mobilenet_v1_coco_quant/labels.txt")


@pytest.fixture(scope="session")
def coco_samples() -> Path:
    return _shared("data/coco-samples")


@pytest.fixture(scope="session")
def traffic_video() -> Path:
    return _shared("data/video/traffic_frames.mp4")


@pytest.fixture(scope="session")
def testmodels() -> Path:
    """Folder of the small layout models (built with TensorFlow, or cached by a run that had it)."""
    folder = modelgen.ensure_models(build=HAS_TF)
    if folder is None:
        pytest.skip(
            "the TensorFlow-built layout models are not cached and TensorFlow is not installed here: "
            "run the main environment's tests first (`make test` does both, in that order)"
        )
    return folder
