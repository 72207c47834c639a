from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from device import config as device_config
from device.cli import main as cli_main
from device.config import DeviceConfig, load_config, read_yaml_mapping
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


# ------------------------------------------------------------- values that cannot work (issue 10)

KEY_LINE = "doorstep-ed25519 " + base64.b64encode(bytes(range(32))).decode("ascii") + " test\n"


def _refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, text))
    return str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the broker URL is parsed at load
        ("mqtt:\n  url: not a url at all\n", ["mqtt.url", "mqtt://host[:port]"]),
        ("mqtt:\n  url: mqtt://broker:99999\n", ["mqtt.url", "port", "1..65535"]),
        ("mqtt:\n  url: mqtt://broker:0\n", ["mqtt.url", "port", "1..65535"]),
        ("mqtt:\n  url: mqtt://broker:http\n", ["mqtt.url", "port"]),
        ("mqtt:\n  url: http://broker:1883\n", ["mqtt.url", "scheme"]),
        ("mqtt:\n  url: 'mqtt://:1883'\n", ["mqtt.url", "host"]),
        ("mqtt:\n  url: mqtt://bro ker:1883\n", ["mqtt.url", "host"]),
        ("mqtt:\n  url: mqtt://u:secret@broker\n", ["mqtt.url", "username", "password_file"]),
        ("mqtt:\n  url: mqtt://broker/topic\n", ["mqtt.url", "path"]),
        ("mqtt:\n  drain_timeout_s: .inf\n", ["mqtt.drain_timeout_s", "finite"]),
        ("mqtt:\n  drain_timeout_s: 7200\n", ["mqtt.drain_timeout_s", "3600"]),
        ("mqtt:\n  event_expiry_s: 1.0e+12\n", ["mqtt.event_expiry_s"]),
        ("mqtt:\n  prefix: a//b\n", ["mqtt.prefix"]),
        ("mqtt:\n  password_env: 'X Y'\n", ["mqtt.password_env"]),
        ("mqtt:\n  outbox_max_events: 5\n", ["mqtt.outbox_max_events", "10"]),
        ("mqtt:\n  outbox_max_events: 1.0e+12\n", ["mqtt.outbox_max_events", "1000000"]),
        ("mqtt:\n  memory_queue_events: 0\n", ["mqtt.memory_queue_events"]),
        ("mqtt:\n  memory_queue_events: 1000000000\n", ["mqtt.memory_queue_events"]),
        ("mqtt:\n  max_inflight: 0\n", ["mqtt.max_inflight"]),
        ("mqtt:\n  max_inflight: 5000\n", ["mqtt.max_inflight"]),
        # camera sizes: positive, even, bounded, lores within main
        ("source:\n  type: picamera2\n  main_size: [-1280, 720]\n", ["source.picamera2.main_size"]),
        ("source:\n  type: picamera2\n  main_size: [0, 0]\n", ["source.picamera2.main_size"]),
        ("source:\n  type: picamera2\n  lores_size: [321, 240]\n", ["lores_size", "multiple of 2"]),
        ("source:\n  type: picamera2\n  main_size: [9000, 720]\n", ["main_size", "4608"]),
        ("source:\n  type: picamera2\n  main_size: [1280, 720, 3]\n", ["main_size"]),
        (
            "source:\n  type: picamera2\n  main_size: [320, 240]\n  lores_size: [640, 480]\n",
            ["source.picamera2", "lores_size", "larger than main_size"],
        ),
        ("source:\n  type: picamera2\n  fps: .nan\n", ["source.picamera2.fps"]),
        # the new stall key, on every source type
        ("source:\n  type: picamera2\n  stall_s: 0\n", ["source.picamera2.stall_s"]),
        ("source:\n  type: picamera2\n  stall_s: .inf\n", ["source.picamera2.stall_s"]),
        ("source:\n  type: opencv\n  uri: 0\n  stall_s: 1.0e+9\n", ["source.opencv.stall_s"]),
        ("source:\n  type: opencv\n  uri: -1\n", ["source.opencv.uri"]),
        ("source:\n  type: opencv\n  uri: ''\n", ["source.opencv.uri"]),
        # zones: at least 3 corners inside the frame, distinct names
        (
            "presence:\n  zones:\n    - name: z\n      polygon: [[0, 0], [1.5, 0], [0, 1]]\n",
            ["presence.zones.0.polygon", "less than or equal to 1"],
        ),
        (
            "presence:\n  zones:\n    - name: z\n      polygon: [[0, 0], [-0.1, 0], [0, 1]]\n",
            ["presence.zones.0.polygon", "greater than or equal to 0"],
        ),
        (
            "presence:\n  zones:\n    - name: z\n      polygon: [[0, 0], [1, 1]]\n",
            ["presence.zones.0.polygon", "at least 3"],
        ),
        (
            "presence:\n  zones:\n    - name: z\n      polygon: [[0, 0], [0.5, 0.5], [1, 1]]\n",
            ["presence.zones.0.polygon", "no area"],
        ),
        ("presence:\n  zones:\n    - name: a\n    - name: a\n", ["presence.zones", "twice"]),
        ("presence:\n  zones: []\n", ["presence.zones", "at least 1"]),
        ("presence:\n  arrive_hits: 1000\n  arrive_window: 1000\n", ["presence.arrive_window"]),
        ("presence:\n  remove_after_s: .inf\n", ["presence.remove_after_s"]),
        ("presence:\n  reminder_every_s: 1e300\n", ["presence.reminder_every_s"]),
        ("motion:\n  max_idle_s: .inf\n", ["motion.max_idle_s"]),
        ("motion:\n  min_changed: .nan\n", ["motion.min_changed"]),
        # telemetry: bounded memory and disk
        ("telemetry:\n  window: 1000000000000\n", ["telemetry.window", "100000"]),
        ("telemetry:\n  window: 1.0e+12\n", ["telemetry.window", "100000"]),
        ("telemetry:\n  log_max_mb: 1e300\n", ["telemetry.log_max_mb", "1000"]),
        ("telemetry:\n  log_max_mb: .inf\n", ["telemetry.log_max_mb"]),
        ("telemetry:\n  log_backups: 100000\n", ["telemetry.log_backups"]),
        ("telemetry:\n  interval_s: .inf\n", ["telemetry.interval_s"]),
        ("telemetry:\n  power_sample_s: 1e30\n", ["telemetry.power_sample_s"]),
        ("telemetry:\n  log_file: ''\n", ["telemetry.log_file", "empty path"]),
        # paths
        ("state_dir: ''\n", ["state_dir", "empty path"]),
        ("state_dir: device.yaml\n", ["state_dir", "not a directory"]),
        ("model:\n  path: ''\n", ["model.path", "empty path"]),
        ("signing:\n  service: --now\n", ["signing.service"]),
        # power meters
        ("power:\n  type: ina219\n  bus: 1000000000000\n", ["power.ina219.bus"]),
        ("power:\n  type: pi5_pmic\n  calibration_factor: .nan\n", ["calibration_factor"]),
        ("power:\n  type: estimate\n  idle_w: .nan\n  full_w: 5\n", ["power.estimate.idle_w"]),
        ("power:\n  type: pi5_pmic\n  vcgencmd: ''\n", ["power.pi5_pmic.vcgencmd"]),
    ],
)
def test_values_that_cannot_work_are_refused(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    message = _refused(tmp_path, "device_id: d1\n" + text)
    assert "device.yaml: " in message
    for part in expected:
        assert part in message


def test_the_broker_url_accepts_what_paho_can_reach(tmp_path: Path) -> None:
    for url in ("mqtt://127.0.0.1:1", "mqtts://broker.lan", "mqtt://[::1]:1883", "mqtt://b:65535/"):
        cfg = load_config(_cfg(tmp_path, f"device_id: d1\nmqtt:\n  url: '{url}'\n"))
        assert cfg.mqtt is not None and cfg.mqtt.url == url


def test_public_keys_are_parsed_at_load(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "empty.pub").write_text("# nothing here\n")
    (tmp_path / "binary.pub").write_bytes(bytes(range(256)))
    (tmp_path / "good.pub").write_text(KEY_LINE)
    for name in ("passwd", "empty.pub", "binary.pub"):
        message = _refused(
            tmp_path, f"device_id: d1\nsigning:\n  public_keys: [good.pub, {name}]\n"
        )
        assert "signing.public_keys.1" in message
        assert f"{tmp_path / name}: not an Ed25519 public key file" in message
        assert "root:x" not in message  # the line is named, not quoted
    cfg = load_config(_cfg(tmp_path, "device_id: d1\nsigning:\n  public_keys: [good.pub]\n"))
    assert cfg.signing.public_keys == [tmp_path / "good.pub"]
    assert isinstance(cfg.signing.public_keys[0], Path)


@pytest.mark.skipif(not Path("/etc/passwd").is_file(), reason="needs a Unix /etc/passwd")
def test_etc_passwd_is_not_a_signing_key(tmp_path: Path) -> None:
    message = _refused(tmp_path, "device_id: d1\nsigning:\n  public_keys: [/etc/passwd]\n")
    assert "signing.public_keys.0" in message
    assert "/etc/passwd: not an Ed25519 public key file (line 1 is not" in message


def test_a_key_file_that_is_a_device_or_huge_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "huge.pub").write_text(KEY_LINE + "#" * 200_000 + "\n")
    message = _refused(tmp_path, "device_id: d1\nsigning:\n  public_keys: [huge.pub, /dev/zero]\n")
    assert "signing.public_keys.0" in message and "larger than" in message
    assert "signing.public_keys.1" in message and "not a regular file" in message


def test_the_new_keys_load_with_their_values(tmp_path: Path) -> None:
    cfg = load_config(
        _cfg(
            tmp_path,
            "device_id: d1\nsource:\n  type: opencv\n  uri: 0\n  stall_s: 2.5\n"
            "mqtt:\n  outbox_max_events: 50\n  memory_queue_events: 20\n  max_inflight: 3\n",
        )
    )
    assert cfg.source is not None and cfg.source.stall_s == 2.5
    assert cfg.mqtt is not None
    assert (cfg.mqtt.outbox_max_events, cfg.mqtt.memory_queue_events, cfg.mqtt.max_inflight) == (
        50,
        20,
        3,
    )
    defaults = load_config(_cfg(tmp_path, "device_id: d1\nmqtt: {}\n")).mqtt
    assert defaults is not None
    assert (defaults.outbox_max_events, defaults.memory_queue_events, defaults.max_inflight) == (
        10_000,
        1_000,
        20,
    )


def _field_schemas(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (model, field, field schema) in the JSON Schema, nested models included."""
    models = [("DeviceConfig", schema), *schema.get("$defs", {}).items()]
    return [
        (model, name, prop)
        for model, body in models
        for name, prop in body.get("properties", {}).items()
    ]


def _leaves(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """The scalar schemas a field may take (through unions, tuples and lists)."""
    out: list[dict[str, Any]] = []
    for key in ("anyOf", "oneOf", "prefixItems"):
        for sub in prop.get(key, []):
            out += _leaves(sub)
    if isinstance(prop.get("items"), dict):
        out += _leaves(prop["items"])
    return [*out, prop]


def test_every_field_is_described_and_bounded() -> None:
    problems = []
    for model, name, prop in _field_schemas(DeviceConfig.model_json_schema()):
        where = f"{model}.{name}"
        if not prop.get("description"):
            problems.append(f"{where}: no description")
        for leaf in _leaves(prop):
            kind = leaf.get("type")
            if kind in ("integer", "number"):
                if "minimum" not in leaf and "exclusiveMinimum" not in leaf:
                    problems.append(f"{where}: no lower bound")
                if "maximum" not in leaf and "exclusiveMaximum" not in leaf:
                    problems.append(f"{where}: no upper bound")
            elif kind == "string" and leaf.get("format") != "path":
                if not any(k in leaf for k in ("maxLength", "pattern", "enum", "const")):
                    problems.append(f"{where}: unbounded string")
            elif kind == "array" and "maxItems" not in leaf:
                problems.append(f"{where}: unbounded list")
    assert problems == []


def test_every_float_must_be_finite() -> None:
    from device import config_fields, config_source
    from device.power import config as power_config

    sections = [
        obj
        for module in (device_config, config_fields, config_source, power_config)
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == module.__name__
    ]
    assert len(sections) > 15
    assert [s.__name__ for s in sections if s.model_config.get("allow_inf_nan") is not False] == []


def test_the_shipped_config_documents_every_key() -> None:
    text = (ROOT / "configs" / "device.yaml").read_text()
    sections: dict[str, type[BaseModel]] = {
        "": DeviceConfig,
        "model": device_config.ModelConfig,
        "source": device_config.Picamera2SourceConfig,
        "mqtt": device_config.MqttConfig,
        "presence": device_config.PresenceConfig,
        "motion": device_config.MotionConfig,
        "telemetry": device_config.TelemetryConfig,
        "signing": device_config.SigningConfig,
    }
    missing = [
        f"{section}.{name}".lstrip(".")
        for section, model in sections.items()
        for name in model.model_fields
        if not re.search(rf"^\s*#?\s*{name}:", text, re.MULTILINE)
    ]
    assert missing == []
    cfg = load_config(ROOT / "configs" / "device.yaml")
    assert cfg.source is not None and cfg.source.stall_s == 10
    assert cfg.mqtt is not None and cfg.mqtt.outbox_max_events == 10_000


# ------------------------------------------------------------- hostile documents


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 20_000 + "]" * 20_000,
        "{a: " * 20_000 + "1" + "}" * 20_000,
        "\n" + "- " * 20_000 + "x",
    ],
    ids=["flow-list", "flow-map", "block-list"],
)
def test_a_pathologically_nested_document_is_refused(tmp_path: Path, nested: str) -> None:
    path = _cfg(tmp_path, f"device_id: d1\nmodel: {nested}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "nested deeper than 32 levels" in message
    # the fleet file reader is the same one
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        read_yaml_mapping(path, "fleet file")


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    path = _cfg(tmp_path, "a: " + "[" * 31 + "]" * 31 + "\n")
    data = read_yaml_mapping(path)
    depth, node = 1, data["a"]
    while node:
        depth, node = depth + 1, node[0]
    assert depth == 31


def test_aliases_that_expand_past_the_limit_are_refused(tmp_path: Path) -> None:
    lines = ["l0: &l0 [" + ", ".join(["x"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="expands to more than"):
        read_yaml_mapping(_cfg(tmp_path, "\n".join(lines) + "\n"))
    deep = ["d0: &d0 " + "[" * 30 + "]" * 30]
    deep += [f"d{i}: &d{i} " + "[" * 10 + f"*d{i - 1}" + "]" * 10 for i in range(1, 4)]
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        read_yaml_mapping(_cfg(tmp_path, "\n".join(deep) + "\n"))


def test_ordinary_anchors_still_work(tmp_path: Path) -> None:
    data = read_yaml_mapping(_cfg(tmp_path, "base: &b {user: pi, port: 22}\nother: *b\n"))
    assert data["other"] == {"user": "pi", "port": 22}


def test_a_huge_document_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = _cfg(tmp_path, "device_id: d1\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"larger than 1 MiB"):
        load_config(path)


def test_check_config_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check-config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    mqtt = schema["$defs"]["MqttConfig"]["properties"]
    assert "1..65535" in mqtt["url"]["description"]
    assert schema["$defs"]["TelemetryConfig"]["properties"]["window"]["maximum"] == 100_000
    with pytest.raises(SystemExit):
        cli_main(["check-config", "--help"])
    assert "--schema" in capsys.readouterr().out


def test_check_config_without_a_file_says_where_it_looked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from device import configpath

    monkeypatch.delenv("DOORSTEP_CONFIG", raising=False)
    monkeypatch.setattr(configpath, "SYSTEM_CONFIG", tmp_path / "etc" / "device.yaml")
    assert cli_main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "no --config FILE" in err and "$DOORSTEP_CONFIG" in err and "doorstep-device init" in err
    assert str(tmp_path / "etc" / "device.yaml") in err


def test_check_config_reports_a_hostile_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _cfg(tmp_path, "device_id: d1\nx: " + "[" * 20_000 + "\n")
    assert cli_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nested deeper than 32 levels" in err and "Traceback" not in err


def test_a_huge_value_is_shown_shortened(tmp_path: Path) -> None:
    message = _refused(tmp_path, "device_id: " + "x" * 500_000 + "\n")
    assert "device_id: String should match pattern" in message
    assert "(500002 characters)" in message and len(message) < 500
