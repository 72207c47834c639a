"""Every JSON payload the daemon publishes, as typed models.

The daemon builds its payloads through these models, and ``doorstep-device schemas`` writes
their JSON Schemas (``device/schemas/*.schema.json``, shipped in the package), so the schemas a
subscriber validates against are generated from the same code that sends the messages.

Topics under ``<prefix>/<device_id>/``:

===============  ======================  =========================================================
topic            payload                 delivery
===============  ======================  =========================================================
availability     ``online``/``offline``  retained, QoS 1; the Last Will says ``offline``
state            :class:`StatePayload`   retained, QoS 1
events           :class:`EventPayload`   QoS 1, not retained, message expiry; via the outbox
snapshot         JPEG bytes              retained while a parcel is there; cleared on removal
telemetry        :class:`TelemetryPayload`  QoS 0, periodic
desired          ``Desired``             retained, QoS 1; written by ``doorstep-host rollout``
update           ``UpdateReport``        retained, QoS 1; the pull agent's progress
===============  ======================  =========================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
EventType = Literal["arrived", "reminder", "removed", "possible_theft"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)  # Home Assistant's event entity: event_types
Box = Annotated[
    list[float],
    Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in main-stream pixels"),
]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventPayload(_Payload):
    """A parcel event. ``id`` is unique: receivers de-duplicate redeliveries by it."""

    model_config = ConfigDict(title="doorstep event", extra="forbid", frozen=True)

    event: Literal["arrived", "reminder", "removed"]
    event_type: EventType = Field(
        description="what Home Assistant's event entity fires: the event, or possible_theft "
        "for a removal while a person was in view"
    )
    id: str = Field(description="unique id (hex uuid4); the same on every redelivery")
    seq: int = Field(ge=1, description="this daemon run's event counter")
    device_id: str
    time: float = Field(description="frame time in seconds (source clock; wall clock for cameras)")
    wall_time: float = Field(description="Unix time when the event was decided")
    zone: str
    count: int = Field(ge=0, description="parcels in the zone (0 once removed)")
    boxes: list[Box]
    scores: list[float]
    model_sha256: str = Field(description="sha256 of the .tflite that decided it")
    possible_theft: bool = Field(description="removed while a person was in view")
    since: float | None = Field(description="frame time the parcel arrived")
    arrival_id: str = Field(
        description="id of this parcel's `arrived` event (the same on its reminders and its "
        "removal, also across a daemon restart)"
    )

    @model_validator(mode="before")
    @classmethod
    def _event_type(cls, data: Any) -> Any:
        """Derived from ``event`` and ``possible_theft`` when absent (payloads built by the
        daemon, and those stored by a doorstep from before the field)."""
        if isinstance(data, dict) and "event_type" not in data and "event" in data:
            theft = data.get("event") == "removed" and data.get("possible_theft") is True
            data = {**data, "event_type": "possible_theft" if theft else data["event"]}
        return data


class ModelInfo(_Payload):
    name: str
    version: str
    sha256: str


class SelfTest(_Payload):
    ok: bool
    ms: float = Field(description="one inference on a synthetic frame, milliseconds")
    time: float = Field(description="Unix time of the test")
    error: str | None = None
    runtime: str | None = Field(default=None, description="the runtime and its version")


class SourceStatus(_Payload):
    """Whether frames are coming."""

    status: Literal["ok", "stalled"] = "ok"
    last_frame_age_s: float | None = Field(
        None, description="seconds since the last frame (null before the first)"
    )
    error: str | None = Field(None, description="why the source is stalled")


class StorageStatus(_Payload):
    """Whether the state directory takes writes (a full disk makes it degraded)."""

    status: Literal["ok", "degraded"] = "ok"
    error: str | None = None
    events_in_memory: int = Field(
        0, ge=0, description="events held only in memory until the disk takes them again"
    )


class DroppedEvents(_Payload):
    """Events given up since the daemon started, by reason."""

    full: int = Field(0, ge=0, description="the outbox bound (mqtt.outbox_max_events) was reached")
    expired: int = Field(0, ge=0, description="older than mqtt.event_expiry_s before delivery")
    memory: int = Field(
        0, ge=0, description="the disk was full and the memory queue (mqtt.memory_queue_events) too"
    )


class StatePayload(_Payload):
    """The device's current state (retained: a new subscriber gets it at once)."""

    model_config = ConfigDict(title="doorstep state", extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    device_id: str
    present: bool = Field(description="a parcel is in any zone")
    zones: dict[str, bool]
    count: int = Field(ge=0, description="parcels seen in the last inference, all zones")
    since: float | None = Field(description="frame time the oldest present parcel arrived")
    model: ModelInfo
    self_test: SelfTest = Field(description="the last self-test inference (start, reload)")
    doorstep_version: str
    runtime: str
    source: SourceStatus = SourceStatus()
    storage: StorageStatus = StorageStatus()
    events_dropped: DroppedEvents = DroppedEvents()
    updated: float = Field(description="Unix time of this state")


class StageStats(_Payload):
    p50: float
    p95: float
    max: float
    n: int = Field(ge=0, description="samples in the window")


class PowerStats(_Payload):
    watts: float
    estimated: bool = Field(description="true when from a board profile, not a meter")
    source: str
    mj_per_inference: float | None


class TelemetryPayload(_Payload):
    """Latency, rates and health over the last window."""

    model_config = ConfigDict(title="doorstep telemetry", extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    device_id: str
    time: float = Field(description="Unix time")
    uptime_s: float
    window_s: float = Field(description="seconds this report covers")
    frames: int
    inferences: int
    fps: float = Field(description="frames handled per second in the window")
    inference_fps: float
    skipped_by_motion: float = Field(
        ge=0, le=1, description="share of frames the motion gate skipped"
    )
    dropped: int = Field(ge=0, description="frames the camera delivered that nobody read (window)")
    stages_ms: dict[str, StageStats] = Field(
        description="capture_wait, motion, preprocess, invoke, decode, presence, publish, "
        "pipeline (all but capture_wait)"
    )
    cpu_percent: float = Field(description="this process, percent of one core")
    rss_mb: float
    cpu_temp_c: float | None
    throttled: dict[str, bool] | None = Field(description="vcgencmd get_throttled flags, Pi only")
    power: PowerStats | None
    outbox: int = Field(ge=0, description="events waiting for the broker's acknowledgement")
    broker: Literal["connected", "disconnected"] | None = Field(
        None, description="the MQTT connection when the report was made (null: no broker)"
    )
    source: SourceStatus = SourceStatus()
    storage: StorageStatus = StorageStatus()
    events_dropped: DroppedEvents = DroppedEvents()


def _pull_messages() -> dict[str, type[BaseModel]]:
    from device.update.messages import Desired, UpdateReport

    return {"desired": Desired, "update": UpdateReport}


PAYLOADS: dict[str, type[BaseModel]] = {
    "event": EventPayload,
    "state": StatePayload,
    "telemetry": TelemetryPayload,
    **_pull_messages(),  # pull mode: written by the rollout / by the device, both retained
}
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def schemas() -> dict[str, dict[str, Any]]:
    """``{file name: JSON Schema}`` for every payload."""
    out = {}
    for name, model in PAYLOADS.items():
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://doorstep.invalid/schemas/{name}.schema.json"
        out[f"{name}.schema.json"] = schema
    out["availability.schema.json"] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://doorstep.invalid/schemas/availability.schema.json",
        "title": "doorstep availability",
        "description": "plain text, retained; the broker sends the Last Will 'offline' if the "
        "daemon dies",
        "type": "string",
        "enum": ["online", "offline"],
    }
    return out


def write_schemas(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = out_dir / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
