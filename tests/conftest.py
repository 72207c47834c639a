"""Shared fixtures: the real material in ../shared, and the TensorFlow-built test models."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen  # noqa: E402
from brokers import MQTT_USERS, BrokerMissingError, Mosquitto, Pki, make_pki  # noqa: E402
from origin import Nginx, NginxMissingError  # noqa: E402
from pullkit import Bus  # noqa: E402
from sshd import ssh_fleet  # noqa: E402, F401

HAS_TF = importlib.util.find_spec("tensorflow") is not None

# The fleet modules drive devices from the host (asyncssh): host tests, like those marked
# `host`. The device-only environment has no asyncssh, so it does not collect them at all
# (rather than reporting them as skipped); the main environment always has it.
# The same goes for the host's terminal views (rich) and the fleet report.
collect_ignore = (
    []
    if importlib.util.find_spec("asyncssh") is not None
    else ["test_fleet_deploy.py", "test_fleet_ssh.py", "test_progress.py", "test_report.py"]
)

# The longest files first: with parallel workers (scripts/run test), one file per worker, the
# run then ends with short files on every worker rather than one long file on one.
SLOW_FIRST = (
    "test_quantize.py",
    "test_provision.py",
    "test_cli.py",
    "test_ssd_import.py",
    "test_rollout_pull.py",
    "test_export.py",
    "test_bad_model.py",
    "test_train.py",
    "test_fleet_deploy.py",
    "test_daemon.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


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


# ---------------------------------------------------------------- real Mosquitto brokers on loopback
# (the broker, password files and the throwaway CA live in brokers.py)


@pytest.fixture(scope="session")
def mqtt_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server cert for 127.0.0.1/localhost and a client cert (made once)."""
    return make_pki(tmp_path_factory.mktemp("mqtt-pki"))


@pytest.fixture
def make_mosquitto(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start a broker with ``Mosquitto``'s options (users, tls, require_certificate, ...);
    every broker started this way is stopped when the test ends."""
    brokers: list[Mosquitto] = []

    def make(name: str = "mosquitto", **options: Any) -> Mosquitto:
        try:
            broker = Mosquitto(tmp_path / name, **options)
        except BrokerMissingError as exc:
            pytest.skip(str(exc))
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(make_mosquitto: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain broker, anonymous clients allowed: ``.url``, ``.port``, ``.start()``, ``.stop()``."""
    return make_mosquitto()


@pytest.fixture
def mosquitto_password(make_mosquitto: Callable[..., Mosquitto]) -> Mosquitto:
    """A broker that refuses anonymous clients; ``.users`` maps each user to its password."""
    return make_mosquitto("mosquitto-password", users=MQTT_USERS)


@pytest.fixture
def mosquitto_tls(make_mosquitto: Callable[..., Mosquitto], mqtt_pki: Pki) -> Mosquitto:
    """A TLS-only broker (``mqtts://127.0.0.1:port``) whose certificate ``mqtt_pki.ca`` signed."""
    return make_mosquitto("mosquitto-tls", tls=mqtt_pki.server)


@pytest.fixture
def mosquitto_mtls(make_mosquitto: Callable[..., Mosquitto], mqtt_pki: Pki) -> Mosquitto:
    """Like ``mosquitto_tls``, and clients must show a certificate signed by ``mqtt_pki.ca``."""
    return make_mosquitto("mosquitto-mtls", tls=mqtt_pki.server, require_certificate=True)


@pytest.fixture
def porch(tmp_path: Path, coco_samples: Path) -> Any:
    """A still-image "camera" (``daemonproc.Scene``) showing real photos, ``empty`` to start."""
    from daemonproc import Scene, porch_scenes

    scene = Scene(tmp_path / "scene.png", porch_scenes(SHARED, coco_samples))
    scene.show("empty")
    return scene


# ---------------------------------------------------------------- pull mode: a real nginx origin


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh Ed25519 signing key pair: (private, public)."""
    from device.bundle.signing import generate_keypair

    generate_keypair(tmp_path / "signing.key", tmp_path / "signing.pub")
    return tmp_path / "signing.key", tmp_path / "signing.pub"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """nginx serving ``tmp_path/origin`` on a loopback port (Range requests, as any CDN)."""
    root = tmp_path / "origin"
    root.mkdir()
    try:
        server = Nginx(root, tmp_path / "nginx")
    except NginxMissingError as exc:
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bus(mosquitto: Mosquitto) -> Iterator[Bus]:
    """A test client on the broker: writes desired messages, collects update reports."""
    b = Bus(mosquitto)
    yield b
    b.close()
