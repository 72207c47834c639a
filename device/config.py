"""``device.yaml``: loaded into typed, validated objects before anything starts.

Every problem is reported with the file, the key path, the offending value and the reason;
unknown keys are refused (a typo must not silently fall back to a default). Relative paths are
resolved against the directory of the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from device.errors import ConfigError, format_validation_error
from device.power import PowerConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


def _beside_config(value: Path, info: ValidationInfo) -> Path:
    """A path that need not exist yet, relative to the config file's directory."""
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


class ModelConfig(_Section):
    """Which model to run and how."""

    path: Path | None = Field(
        None,
        description="model bundle directory or .tar (or a bare .tflite with `labels`); "
        "null runs the default parcel model shipped with doorstep",
    )
    labels: Path | None = Field(None, description="label file, only for a bare .tflite")
    runtime: Literal["auto", "ai_edge_litert", "tflite_runtime"] = Field(
        "auto", description="auto prefers ai_edge_litert (LiteRT), then tflite_runtime"
    )
    num_threads: Annotated[int, Field(ge=1, le=64)] | None = Field(
        None, description="interpreter threads; null uses every core"
    )
    score_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="minimum score of a detection; null uses the bundle's recommendation"
    )
    iou_threshold: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="NMS overlap above which the weaker box is dropped"
    )
    max_detections: Annotated[int, Field(ge=1, le=1000)] | None = None

    _check_paths = field_validator("path", "labels")(_resolve)

    @field_validator("labels")
    @classmethod
    def _labels_only_for_tflite(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        path = info.data.get("path")
        if value is not None and path is not None and path.suffix != ".tflite":
            raise ValueError("labels is only for a bare .tflite model; a bundle carries its own")
        return value

    @model_validator(mode="after")
    def _bare_model_needs_labels(self) -> ModelConfig:
        if self.path is not None and self.path.suffix == ".tflite" and self.labels is None:
            raise ValueError(
                "a bare .tflite model needs `labels` (or wrap it: doorstep-host bundle)"
            )
        return self

    def detector_options(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`device.detect.detector.Detector.open`."""
        return {
            "runtime": self.runtime,
            "num_threads": self.num_threads,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "max_detections": self.max_detections,
        }


class FolderSourceConfig(_Section):
    """A folder of images, in name order (replays, tests)."""

    type: Literal["folder"]
    path: Path
    fps: Annotated[float, Field(gt=0, le=120)] = 5.0

    _check_path = field_validator("path")(_resolve)
    stall_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        10.0,
        description="seconds without a frame after which a live source is reported stalled "
        "(state, telemetry, log); the systemd watchdog then restarts the daemon",
    )


class OpenCVSourceConfig(_Section):
    """A USB camera (index), an RTSP/HTTP stream, or a video file."""

    type: Literal["opencv"]
    uri: int | str = Field(
        description="camera index, rtsp://... or http://... URL, or a video file"
    )
    fps: Annotated[float, Field(gt=0, le=120)] | None = Field(
        None, description="file frame rate override"
    )
    loop: bool = False
    live: bool | None = Field(
        None,
        description="null: cameras and streams are live, files are not; true replays a file as "
        "a camera would deliver it (in real time, newest frame only, drops counted)",
    )
    stall_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        10.0,
        description="seconds without a frame after which a live source is reported stalled "
        "(state, telemetry, log); the systemd watchdog then restarts the daemon",
    )


class StillSourceConfig(_Section):
    """One image delivered as a live camera at ``fps`` (benchmarks, demos)."""

    type: Literal["still"]
    path: Path
    fps: Annotated[float, Field(gt=0, le=120)] = 10.0

    _check_path = field_validator("path")(_resolve)
    stall_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        10.0,
        description="seconds without a frame after which a live source is reported stalled "
        "(state, telemetry, log); the systemd watchdog then restarts the daemon",
    )


class Picamera2SourceConfig(_Section):
    """The Raspberry Pi camera: main stream for snapshots, lores stream for the model."""

    type: Literal["picamera2"]
    main_size: tuple[int, int] = (1280, 720)
    lores_size: tuple[int, int] = (320, 240)
    lores_format: Literal["YUV420", "RGB888"] = "YUV420"
    fps: Annotated[float, Field(gt=0, le=120)] = 10.0
    stall_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        10.0,
        description="seconds without a frame after which a live source is reported stalled "
        "(state, telemetry, log); the systemd watchdog then restarts the daemon",
    )


SourceConfig = Annotated[
    FolderSourceConfig | OpenCVSourceConfig | StillSourceConfig | Picamera2SourceConfig,
    Field(discriminator="type"),
]


class MqttConfig(_Section):
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port, or mqtts:// for TLS")
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password_file: Path | None = Field(None, description="file holding the password (never logged)")
    password_env: str | None = Field(None, description="environment variable holding the password")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    event_expiry_s: Annotated[int, Field(ge=60)] = 86_400
    drain_timeout_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="on stop, how long to wait for the broker to acknowledge stored events "
        "(what is left stays in the outbox for the next start)",
    )
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_/-]+$")] = "doorstep"
    home_assistant: bool = Field(True, description="publish Home Assistant discovery configs")
    discovery_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_/-]+$")] = "homeassistant"
    snapshot: bool = Field(True, description="retain a JPEG of the main stream at arrival")
    snapshot_quality: Annotated[int, Field(ge=10, le=100)] = 85
    outbox_max_events: Annotated[int, Field(ge=10, le=1_000_000)] = Field(
        10_000,
        description="events kept on disk while the broker is away; past it the oldest reminders "
        "go first, then the oldest events (counted as dropped)",
    )
    memory_queue_events: Annotated[int, Field(ge=10, le=100_000)] = Field(
        1_000,
        description="events held in memory while the state directory cannot be written "
        "(full disk); the newest are kept and written out when space returns",
    )
    max_inflight: Annotated[int, Field(ge=1, le=1_000)] = Field(
        20, description="events sent and not yet acknowledged by the broker, at most"
    )

    _check_files = field_validator("password_file", "ca_file", "cert_file", "key_file")(_resolve)


class ZoneConfig(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    polygon: list[tuple[float, float]] | None = Field(
        None, description="corners in 0..1 frame coordinates"
    )


class PresenceConfig(_Section):
    arrive_hits: Annotated[int, Field(ge=1)] = 3
    arrive_window: Annotated[int, Field(ge=1)] = 5
    remove_after_s: Annotated[float, Field(gt=0)] = 10.0
    reminder_every_s: Annotated[float, Field(gt=0)] | None = 1800.0
    person_overlap: Annotated[float, Field(gt=0, le=1)] = 0.3
    zones: list[ZoneConfig] = Field(default_factory=lambda: [ZoneConfig(name="doorstep")])

    @model_validator(mode="after")
    def _hits_fit_window(self) -> PresenceConfig:
        if self.arrive_hits > self.arrive_window:
            raise ValueError(
                f"arrive_hits ({self.arrive_hits}) cannot exceed arrive_window ({self.arrive_window})"
            )
        return self


class MotionConfig(_Section):
    enabled: bool = True
    min_changed: Annotated[float, Field(gt=0, le=1)] = 0.01
    max_idle_s: Annotated[float, Field(gt=0)] = 5.0


class TelemetryConfig(_Section):
    """Latency, rate and health reports, and the JSON-lines log."""

    interval_s: Annotated[float, Field(gt=0)] = Field(
        60.0, description="seconds between telemetry reports (topic, log)"
    )
    window: Annotated[int, Field(ge=10)] = Field(
        600, description="samples per stage kept for p50/p95/max"
    )
    log_file: Path | None = Field(
        None,
        description="JSON-lines log; null: $LOGS_DIRECTORY/doorstep.jsonl under systemd, "
        "else <state_dir>/log/doorstep.jsonl",
    )
    log_max_mb: Annotated[float, Field(gt=0)] = Field(10.0, description="rotate at this size")
    log_backups: Annotated[int, Field(ge=0)] = Field(5, description="rotated files kept")
    power_sample_s: Annotated[float, Field(gt=0)] = Field(
        5.0, description="seconds between power meter readings (integrated per report)"
    )

    @field_validator("log_file")
    @classmethod
    def _log_beside_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _beside_config(value, info)


class SigningConfig(_Section):
    """Which keys may sign the bundles this device runs."""

    public_keys: list[Path] = Field(
        default_factory=list,
        description="public key files (doorstep-host keygen); when set, unsigned or badly "
        "signed bundles are refused by install, activate and the daemon",
    )
    service: str = Field(
        "doorstep-device", description="systemd unit reloaded after activate / rollback"
    )

    @field_validator("public_keys")
    @classmethod
    def _keys_exist(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        return [p for p in (_resolve(v, info) for v in value) if p is not None]


class DeviceConfig(_Section):
    """The doorbell's whole configuration."""

    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")] = Field(
        description="unique name of this doorbell; used in MQTT topics, so letters, digits, - and _"
    )
    state_dir: Path = Field(
        Path("/var/lib/doorstep"), description="where models, the outbox and state are kept"
    )
    model: ModelConfig = ModelConfig()
    source: SourceConfig | None = Field(
        None, description="where frames come from (needed by `run`)"
    )
    mqtt: MqttConfig | None = Field(
        None, description="the broker; null publishes nothing (events are logged)"
    )
    presence: PresenceConfig = PresenceConfig()
    motion: MotionConfig = MotionConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    signing: SigningConfig = SigningConfig()
    power: PowerConfig | None = Field(
        None, description="power meter (by `type`); null reports no power"
    )

    @field_validator("state_dir")
    @classmethod
    def _state_dir_beside_config(cls, value: Path, info: ValidationInfo) -> Path:
        return _beside_config(value, info)


# Without types-PyYAML (a dev extra) ``yaml.SafeLoader`` is ``Any``; with it, this ignore is unused.
class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """A SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml_mapping(path: Path, what: str = "config file", keys: str = "keys") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: ``{}``), duplicate keys refused; every
    problem is a ``ConfigError`` naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of {keys}, got {type(data).__name__}"
        )
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DeviceConfig:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem found."""
    path = Path(path)
    data = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    try:
        return DeviceConfig.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


def source_config(data: dict[str, Any]) -> SourceConfig:
    """A ``source`` section on its own (``--source`` without a config file)."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(SourceConfig).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "--source")) from None
