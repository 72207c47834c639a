"""``device.yaml``: loaded into typed, validated objects before anything starts.

Every problem is reported with the file, the key path, the offending value and the reason;
unknown keys are refused (a typo must not silently fall back to a default). Relative paths are
resolved against the directory of the config file.

Every field has bounds that make sense on a doorbell, a unit in its name or description, and a
description (``doorstep-device check-config --schema`` prints them as a JSON Schema). Floats
must be finite. Values that are well-typed but cannot work are refused here too: a broker URL
paho cannot connect to, an odd or oversized camera size, a zone outside the frame, a "public
key" file that holds no key, an empty path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from device.config_fields import (
    TOPIC_PATTERN,
    NonEmptyPath,
    Section,
    beside_config,
    check_broker_url,
    has_area,
    not_empty,
    public_key_file,
    resolve_existing,
)
from device.config_source import FolderSourceConfig as FolderSourceConfig
from device.config_source import OpenCVSourceConfig as OpenCVSourceConfig
from device.config_source import Picamera2SourceConfig as Picamera2SourceConfig
from device.config_source import SourceConfig as SourceConfig
from device.config_source import StillSourceConfig as StillSourceConfig
from device.errors import ConfigError, format_validation_error
from device.power import PowerConfig
from device.yamlfile import read_yaml_mapping as read_yaml_mapping

# ------------------------------------------------------------------------------------ model


class ModelConfig(Section):
    """Which model to run and how."""

    path: NonEmptyPath | None = Field(
        None,
        description="model bundle directory or .tar (or a bare .tflite with `labels`); "
        "null runs the active bundle, else the default parcel model shipped with doorstep",
    )
    labels: NonEmptyPath | None = Field(
        None, description="label file (one name per line), only for a bare .tflite"
    )
    runtime: Literal["auto", "ai_edge_litert", "tflite_runtime"] = Field(
        "auto", description="auto prefers ai_edge_litert (LiteRT), then tflite_runtime"
    )
    num_threads: Annotated[int, Field(ge=1, le=64)] | None = Field(
        None, description="interpreter threads, 1..64; null uses every core"
    )
    score_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None,
        description="minimum score (0..1) of a detection; null uses the bundle's recommendation",
    )
    iou_threshold: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None,
        description="NMS overlap (intersection over union, (0..1]) above which the weaker box "
        "is dropped; null uses the bundle's",
    )
    max_detections: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="detections kept per frame, 1..1000; null uses the bundle's"
    )

    _check_paths = field_validator("path", "labels")(resolve_existing)

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


# ------------------------------------------------------------------------------------ mqtt


class MqttConfig(Section):
    """The broker, the topics, and how events wait for it."""

    url: Annotated[str, Field(max_length=512), AfterValidator(check_broker_url)] = Field(
        "mqtt://127.0.0.1:1883",
        description="mqtt://host[:port] (default port 1883), or mqtts://host[:port] for TLS "
        "(default 8883); port 1..65535; no credentials in it",
    )
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    username: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="broker user name (at most 256 characters); null: anonymous"
    )
    password_file: NonEmptyPath | None = Field(
        None, description="file holding the password (never logged)"
    )
    password_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] | None = Field(
        None, description="environment variable holding the password (instead of password_file)"
    )
    ca_file: NonEmptyPath | None = Field(
        None, description="CA certificates (PEM) the broker's certificate is checked against"
    )
    cert_file: NonEmptyPath | None = Field(
        None, description="client certificate (PEM) for brokers that require one; needs TLS"
    )
    key_file: NonEmptyPath | None = Field(
        None, description="the client certificate's private key (PEM); needs cert_file"
    )
    event_expiry_s: Annotated[int, Field(ge=60, le=2_592_000)] = Field(
        86_400,
        description="seconds (60 .. 30 days) after which an undelivered event is dropped "
        "(counted) rather than delivered late",
    )
    drain_timeout_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        30.0,
        description="seconds (0..3600) to wait on stop for the broker to acknowledge stored "
        "events (what is left stays in the outbox for the next start)",
    )
    prefix: Annotated[str, Field(pattern=TOPIC_PATTERN, max_length=64)] = Field(
        "doorstep",
        description="first topic level(s): <prefix>/<device_id>/...; letters, digits, _ - "
        "and single /, at most 64 characters",
    )
    home_assistant: bool = Field(
        True,
        description="publish Home Assistant's device discovery config (false: clear it, and "
        "Home Assistant removes the device)",
    )
    discovery_prefix: Annotated[str, Field(pattern=TOPIC_PATTERN, max_length=64)] = Field(
        "homeassistant", description="Home Assistant's discovery topic prefix"
    )
    support_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=300)] | None = (
        Field(
            None,
            description="a page about this fleet (http/https), linked from the device in Home "
            "Assistant (the discovery origin's support_url)",
        )
    )
    snapshot: bool = Field(True, description="retain a JPEG of the main stream at arrival")
    snapshot_quality: Annotated[int, Field(ge=10, le=100)] = Field(
        85, description="JPEG quality of the snapshot, 10..100"
    )
    outbox_max_events: Annotated[int, Field(ge=10, le=1_000_000)] = Field(
        10_000,
        description="events (10..1000000) kept on disk while the broker is away; past it the "
        "oldest reminders go first, then the oldest events (counted as dropped)",
    )
    memory_queue_events: Annotated[int, Field(ge=10, le=100_000)] = Field(
        1_000,
        description="events (10..100000) held in memory while the state directory cannot be "
        "written (full disk); the newest are kept and written out when space returns",
    )
    max_inflight: Annotated[int, Field(ge=1, le=1_000)] = Field(
        20, description="events (1..1000) sent and not yet acknowledged by the broker, at most"
    )

    _check_files = field_validator("password_file", "ca_file", "cert_file", "key_file")(
        resolve_existing
    )

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the certificate it belongs to)")
        if self.cert_file is not None and self.ca_file is None and not self.url.startswith("mqtts"):
            raise ValueError("cert_file is only used over TLS: use an mqtts:// url (or ca_file)")
        return self


# ------------------------------------------------------------------------------------ presence

Unit = Annotated[float, Field(ge=0, le=1)]


class ZoneConfig(Section):
    """A part of the frame where parcels are watched."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        description="zone name (letters, digits, - and _, at most 64); used in topics and state"
    )
    polygon: (
        Annotated[
            list[tuple[Unit, Unit]], Field(min_length=3, max_length=64), AfterValidator(has_area)
        ]
        | None
    ) = Field(
        None,
        description="3..64 corners [x, y] in 0..1 frame coordinates (0,0 top left); "
        "null is the whole frame",
    )


class PresenceConfig(Section):
    """When a parcel counts as arrived, and when as gone."""

    arrive_hits: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="inferences (1..100) that must see the parcel ..."
    )
    arrive_window: Annotated[int, Field(ge=1, le=100)] = Field(
        5, description="... within this many recent inferences (1..100)"
    )
    remove_after_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        10.0, description="seconds (0 .. 1 day] unseen before a parcel counts as removed"
    )
    reminder_every_s: Annotated[float, Field(ge=1, le=604_800)] | None = Field(
        1800.0, description="seconds (1 .. 7 days) between reminders while it stays; null: none"
    )
    person_overlap: Annotated[float, Field(gt=0, le=1)] = Field(
        0.3,
        description="share (0..1] of a parcel box under a person box above which it does not "
        "count (a parcel being carried)",
    )
    zones: Annotated[list[ZoneConfig], Field(min_length=1, max_length=16)] = Field(
        default_factory=lambda: [ZoneConfig(name="doorstep")],
        description="1..16 zones with distinct names, watched separately",
    )

    @field_validator("zones")
    @classmethod
    def _distinct_names(cls, zones: list[ZoneConfig]) -> list[ZoneConfig]:
        names = [z.name for z in zones]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"zone name(s) used twice: {', '.join(twice)}")
        return zones

    @model_validator(mode="after")
    def _hits_fit_window(self) -> PresenceConfig:
        if self.arrive_hits > self.arrive_window:
            raise ValueError(
                f"arrive_hits ({self.arrive_hits}) cannot exceed arrive_window ({self.arrive_window})"
            )
        return self


class MotionConfig(Section):
    """Run the detector only when the scene changes, and every ``max_idle_s`` anyway."""

    enabled: bool = Field(True, description="false runs the detector on every frame")
    min_changed: Annotated[float, Field(gt=0, le=1)] = Field(
        0.01, description="share (0..1] of a 64x48 grey thumbnail that must change"
    )
    max_idle_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        5.0, description="seconds (0..3600] after which the detector runs without motion"
    )


# ------------------------------------------------------------------------------------ telemetry


class TelemetryConfig(Section):
    """Latency, rate and health reports, and the JSON-lines log."""

    interval_s: Annotated[float, Field(ge=0.5, le=86_400)] = Field(
        60.0, description="seconds (0.5 .. 1 day) between telemetry reports (topic, log)"
    )
    window: Annotated[int, Field(ge=10, le=100_000)] = Field(
        600, description="samples (10..100000) per stage kept for p50/p95/max"
    )
    log_file: NonEmptyPath | None = Field(
        None,
        description="JSON-lines log; null: $LOGS_DIRECTORY/doorstep.jsonl under systemd, "
        "else <state_dir>/log/doorstep.jsonl",
    )
    log_max_mb: Annotated[float, Field(gt=0, le=1000)] = Field(
        10.0, description="megabytes (0..1000] at which the log is rotated"
    )
    log_backups: Annotated[int, Field(ge=0, le=100)] = Field(
        5, description="rotated log files kept, 0..100"
    )
    power_sample_s: Annotated[float, Field(ge=0.1, le=3600)] = Field(
        5.0, description="seconds (0.1..3600) between power meter readings (integrated per report)"
    )
    snapshots_keep: Annotated[int, Field(ge=0, le=1000)] = Field(
        20,
        description="JPEGs of the last N arrivals (0..1000) kept in <state_dir>/snapshots for "
        "doorstep-host report; 0: none",
    )

    @field_validator("log_file")
    @classmethod
    def _log_beside_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else beside_config(value, info)


class SigningConfig(Section):
    """Which keys may sign the bundles this device runs."""

    public_keys: Annotated[
        list[Annotated[Path, BeforeValidator(not_empty), AfterValidator(public_key_file)]],
        Field(max_length=16),
    ] = Field(
        default_factory=list,
        description="public key files (doorstep-host keygen), at most 16, each parsed at load; "
        "when set, unsigned or badly signed bundles are refused by install, activate and the "
        "daemon",
    )
    service: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9:_.@-]{0,254}$")] = Field(
        "doorstep-device", description="systemd unit reloaded after activate / rollback"
    )


class UpdateConfig(Section):
    """Pull-mode updates: the device follows the bundle a rollout names on its retained
    ``<prefix>/<device_id>/desired`` topic, downloads it over HTTP(S) and switches to it."""

    enabled: bool = Field(False, description="follow the desired topic (needs mqtt and signing)")
    allowed_url_prefixes: Annotated[
        list[Annotated[str, Field(min_length=8, max_length=512, pattern=r"^https?://[^/]+/")]],
        Field(max_length=16),
    ] = Field(
        default_factory=list,
        description="a desired bundle URL must start with one of these, and so must any "
        "redirect (each with a / after the host, e.g. https://models.example.com/doorstep/); "
        "at least one when enabled",
    )
    max_bundle_mb: Annotated[float, Field(gt=0, le=4096)] = Field(
        200, description="a desired bundle larger than this (MB) is refused before download"
    )
    rate_limit_kbps: Annotated[float, Field(gt=0, le=10_000_000)] | None = Field(
        None, description="download rate limit in kilobytes per second; null: none"
    )
    ca_file: NonEmptyPath | None = Field(
        None, description="CA certificate(s) (PEM) for an https origin; null: the system's"
    )
    timeout_s: Annotated[float, Field(ge=1, le=3600)] = Field(
        30, description="a download that receives nothing for this long is dropped (and resumed)"
    )
    retry_min_s: Annotated[float, Field(ge=0.1, le=3600)] = Field(
        5, description="first wait after a failed download; doubled per failure"
    )
    retry_max_s: Annotated[float, Field(ge=1, le=86_400)] = Field(
        600, description="the longest wait between download attempts"
    )

    @field_validator("ca_file")
    @classmethod
    def _ca_beside_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else beside_config(value, info)


class DeviceConfig(Section):
    """The doorbell's whole configuration."""

    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")] = Field(
        description="unique name of this doorbell, 1..64 characters; used in MQTT topics, so "
        "letters, digits, - and _"
    )
    state_dir: NonEmptyPath = Field(
        Path("/var/lib/doorstep"),
        description="directory (created if missing) where models, the outbox and state are kept",
    )
    model: ModelConfig = Field(ModelConfig(), description="which model to run and how")
    source: SourceConfig | None = Field(
        None, description="where frames come from, by `type` (needed by `run`)"
    )
    mqtt: MqttConfig | None = Field(
        None, description="the broker; null publishes nothing (events are logged)"
    )
    presence: PresenceConfig = Field(
        PresenceConfig(), description="when a parcel counts as arrived, and when as gone"
    )
    motion: MotionConfig = Field(MotionConfig(), description="the motion gate before the detector")
    telemetry: TelemetryConfig = Field(
        TelemetryConfig(), description="telemetry reports and the JSON-lines log"
    )
    signing: SigningConfig = Field(
        SigningConfig(), description="which keys may sign the bundles this device runs"
    )
    power: PowerConfig | None = Field(
        None, description="power meter (by `type`); null reports no power"
    )
    update: UpdateConfig = Field(
        UpdateConfig(), description="pull-mode updates announced over MQTT (off by default)"
    )

    @model_validator(mode="after")
    def _update_needs_broker_and_keys(self) -> DeviceConfig:
        if self.update.enabled:
            missing = [
                what
                for what, ok in (
                    ("an mqtt section (the desired topic comes from the broker)", self.mqtt),
                    ("signing.public_keys (only signed bundles are pulled)",
                     self.signing.public_keys),
                    ("update.allowed_url_prefixes", self.update.allowed_url_prefixes),
                )
                if not ok
            ]  # fmt: skip
            if missing:
                raise ValueError("update.enabled needs " + "; ".join(missing))
        return self

    @field_validator("state_dir")
    @classmethod
    def _state_dir_beside_config(cls, value: Path, info: ValidationInfo) -> Path:
        path = beside_config(value, info)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        return path


def config_schema() -> dict[str, Any]:
    """The JSON Schema of ``device.yaml``: every key with its type, bounds and description."""
    schema = DeviceConfig.model_json_schema()
    schema["title"] = "doorstep device.yaml"
    return schema


def config_from_text(text: str, where: str) -> DeviceConfig:
    """Validate a config held in memory (``doorstep-device init`` checks what it writes)."""
    with tempfile.TemporaryDirectory(prefix="doorstep-config-") as tmp:
        path = Path(tmp) / "device.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(path), where)) from None


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
    try:
        return TypeAdapter(SourceConfig).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "--source")) from None
