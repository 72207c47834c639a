"""Shared fixtures: the real material in ../shared, and the TensorFlow-built test models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- a real Mosquitto on loopback


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A real mosquitto broker on 127.0.0.1, started and stopped by the tests."""

    def __init__(self, workdir: Path) -> None:
        import shutil

        exe = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if exe is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.exe, self.port = exe, _free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket
        import subprocess
        import time

        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Any:
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()
