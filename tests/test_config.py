from __future__ import annotations

from pathlib import Path

import pytest

from device.config import load_config
from device.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "device.yaml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid() -> None:
    cfg = load_config(ROOT / "configs" / "device.yaml")
    assert cfg.device_id == "front-door"
    assert cfg.model.runtime == "auto"
    assert cfg.model.num_threads is None


def test_relative_model_paths_resolve_against_the_config(tmp_path: Path) -> None:
    (tmp_path / "m.tflite").write_bytes(b"x")
    (tmp_path / "l.txt").write_text("a\n")
    cfg = load_config(
        _cfg(
            tmp_path, "device_id: d1\nstate_dir: state\nmodel:\n  path: m.tflite\n  labels: l.txt\n"
        )
    )
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.model.path == tmp_path / "m.tflite"
    assert cfg.model.labels == tmp_path / "l.txt"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device_id: d1\nmodle: {}\n", "device.yaml: modle: Extra inputs are not permitted"),
        ("device_id: d1\nmodel:\n  threads: 2\n", "model.threads: Extra inputs are not permitted"),
        (
            "device_id: d1\nmodel:\n  num_threads: many\n",
            "model.num_threads: Input should be a valid integer",
        ),
        (
            "device_id: d1\nmodel:\n  score_threshold: -0.2\n",
            "model.score_threshold: Input should be greater than or equal to 0 (got -0.2)",
        ),
        (
            "device_id: d1\nmodel:\n  iou_threshold: 0\n",
            "model.iou_threshold: Input should be greater than 0",
        ),
        (
            "device_id: d1\nmodel:\n  path: missing/model-bundle\n",
            "model.path: Value error, path does not exist",
        ),
        ("device_id: front door\n", "device_id: String should match pattern"),
        ("model: {}\n", "device_id: Field required"),
        ("device_id: d1\nmodel:\n  runtime: tensorflow\n", "model.runtime: Input should be 'auto'"),
        ("- a\n- b\n", "the top level must be a mapping"),
        (
            "device_id: d1\ndevice_id: d2\n",
            "device.yaml:2:1: invalid YAML: duplicate key 'device_id'",
        ),
        ("device_id: [d1\n", "invalid YAML"),
        ("device_id: d1\npower:\n  type: ina999\n", "power: Input tag 'ina999' found using 'type'"),
        ("device_id: d1\npower:\n  type: ina219\n  address: 0x10\n", "power.ina219.address"),
        ("device_id: d1\ntelemetry:\n  interval_s: 0\n", "telemetry.interval_s"),
        ("device_id: d1\nsigning:\n  public_keys: [nope.pub]\n", "signing.public_keys"),
        ("device_id: d1\nmqtt:\n  snapshot_quality: 101\n", "mqtt.snapshot_quality"),
        ("device_id: d1\nsource:\n  type: still\n  path: nope.png\n", "source.still.path"),
    ],
)
def test_bad_configs_are_refused_with_key_path_and_reason(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, text))
    assert expected in str(err.value)


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            _cfg(tmp_path, "device_id: d1\nmodel:\n  num_threads: 0\n  max_detections: -1\n")
        )
    lines = str(err.value).splitlines()
    assert any("model.num_threads" in line for line in lines)
    assert any("model.max_detections" in line for line in lines)


def test_bare_tflite_without_labels_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(ConfigError, match="needs `labels`"):
        load_config(_cfg(tmp_path, "device_id: d1\nmodel:\n  path: m.tflite\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_before_validation(tmp_path: Path) -> None:
    path = _cfg(tmp_path, "device_id: d1\n")
    assert load_config(path, {"model.num_threads": 3}).model.num_threads == 3
    with pytest.raises(ConfigError, match="model.num_threads"):
        load_config(path, {"model.num_threads": -3})
