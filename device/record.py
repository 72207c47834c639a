"""The daemon record (``<state_dir>/daemon.json``) and ``doorstep-device status --json``, typed.

One document, written by the device and read by everyone with these models: the daemon writes
:class:`DaemonRecord`; ``doorstep-device status`` and ``activate`` read it back; the host's
facts, ``status`` and deploy health gate parse the device's answers with the same classes (the
status document :class:`StoreStatus` embeds the record as ``daemon``).

The record lives in a group-writable directory and travels from a device the host does not
trust, so parsing is strict: JSON types as written (``true`` is no pid, ``"1"`` is no number),
bounded nesting (pydantic's JSON parser stops at a fixed depth instead of recursing without
end), finite numbers. Unknown keys are ignored, so a newer daemon's record still parses here.
Fields added after the first version have defaults, so an older daemon's record parses too.

Reading the file itself (no links, no FIFOs, a size cap) is :mod:`device.safefile`'s job; the
functions that do both are in :mod:`device.install`.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device.errors import DoorstepError
from device.install import RECORD_MAX_BYTES

STATUS_MAX_BYTES = 1 << 20
"""``status --json`` lists the stored bundles too; still far below this (a record is capped
at :data:`device.install.RECORD_MAX_BYTES`)"""

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]
Text = Annotated[str, Field(max_length=4096)]
UnixTime = Annotated[float, Field(ge=0, description="Unix time, seconds (device clock)")]


class RecordError(DoorstepError):
    """A daemon record (or status document) that is unsafe to read or does not validate."""


class _Doc(BaseModel):
    # Built on first use (``status`` validates a record, never a status document).
    model_config = ConfigDict(
        strict=True, extra="ignore", frozen=True, allow_inf_nan=False, defer_build=True
    )


class ModelRef(_Doc):
    """The model the daemon serves, as its manifest names it."""

    name: Text
    version: Text


class SelfTestResult(_Doc):
    """The self-test inference on a synthetic frame, at start and after each reload."""

    ok: bool
    ms: float = Field(ge=0, description="duration of the test inference, milliseconds")
    time: UnixTime
    error: Text | None = None
    runtime: Text | None = Field(default=None, description="the runtime and its version")


class ReloadResult(_Doc):
    """How the last reload (SIGHUP / ``systemctl reload``) went."""

    ok: bool
    error: Text | None = None
    time: UnixTime


class LastEvent(_Doc):
    """The last parcel event the daemon raised."""

    event: Literal["arrived", "reminder", "removed"]
    id: Text
    zone: Text
    wall_time: UnixTime


class SourceHealth(_Doc):
    """Whether the camera delivers frames."""

    status: Literal["ok", "stalled", "failed"] = "ok"
    last_frame_age_s: float | None = Field(
        default=None, ge=0, description="seconds since the source last delivered a frame"
    )
    error: Text | None = None


class OutboxStats(_Doc):
    """The durable event outbox: what waits for the broker and what was given up."""

    depth: int = Field(default=0, ge=0, description="events on disk waiting for delivery")
    in_memory: int = Field(
        default=0, ge=0, description="events held in memory while storage is degraded"
    )
    dropped_full: int = Field(default=0, ge=0, description="dropped: the outbox bound was reached")
    dropped_expired: int = Field(default=0, ge=0, description="dropped: past their expiry")
    dropped_memory: int = Field(
        default=0, ge=0, description="dropped: the disk was full and the memory queue too"
    )


class DaemonRecord(_Doc):
    """``<state_dir>/daemon.json``: what the running daemon serves and how it is doing.

    ``state`` is what the daemon wrote; readers on the device replace it by whether the pid is
    alive (:func:`device.install.read_daemon_record` via ``status``).
    """

    model_config = ConfigDict(title="doorstep daemon record")

    pid: int = Field(gt=0, lt=1 << 31, description="the daemon's process id")
    state: Literal["running", "stopped"]
    systemd: bool = Field(default=False, description="started by systemd (NOTIFY_SOCKET set)")
    model_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = Field(
        description="sha256 of the .tflite it serves ('' if its manifest does not list it)"
    )
    bundle_id: Sha256 | None = Field(
        default=None, description="the store bundle it serves; None for a model from elsewhere"
    )
    model: ModelRef
    self_test: SelfTestResult
    last_reload: ReloadResult | None = None
    last_event: LastEvent | None = None
    started: UnixTime
    updated: UnixTime = Field(description="when this record was written")
    # Since the reliability work: defaults keep older records valid.
    source: SourceHealth | None = Field(
        default=None, description="the camera's health; None from a daemon that did not say"
    )
    storage: Literal["ok", "degraded"] = Field(
        default="ok", description="degraded: the state directory cannot be written"
    )
    storage_error: Text | None = None
    outbox: OutboxStats | None = None
    log_file: Text | None = Field(
        default=None, description="the JSON-lines log this daemon writes (what report fetches)"
    )
    # Since the hostile-input work: lets activate tell the daemon from a process that reused
    # its pid (device.daemon_proc.daemon_mismatch).
    pid_start_ticks: int | None = Field(
        default=None,
        ge=0,
        description="the daemon's start time, clock ticks since boot "
        "(field 22 of /proc/<pid>/stat); None from a daemon that did not say",
    )

    @staticmethod
    def own_start_ticks() -> int | None:
        """This process's start time, for the record it writes about itself."""
        from device.daemon_proc import process_start_ticks

        return process_start_ticks()


class BundleRef(_Doc):
    """A stored bundle as ``status`` describes it (from its manifest, unverified)."""

    id: Text
    name: Text | None = None
    version: Text | None = None
    model_sha256: Text | None = None
    error: Text | None = None


class StoreStatus(_Doc):
    """``doorstep-device status --json``: the store, the links, free space, the daemon."""

    model_config = ConfigDict(title="doorstep-device status")

    doorstep_version: Text
    state_dir: Text
    active: BundleRef | None = None
    previous: BundleRef | None = None
    stored: list[Sha256] = Field(default_factory=list, description="bundle ids, oldest first")
    partials: dict[Text, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="bundle id -> bytes uploaded so far"
    )
    free_bytes: int | None = Field(default=None, ge=0)
    daemon: DaemonRecord | None = None
    daemon_error: Text | None = Field(
        default=None, description="why ``daemon`` is None although a record exists"
    )


def parse_record(data: object, where: str) -> DaemonRecord:
    """A record from JSON text (bytes or str) or an already parsed value; else raise
    :class:`RecordError` ``"<where>: invalid record: <what is wrong>"``."""
    return _parse(DaemonRecord, data, where, "invalid record", RECORD_MAX_BYTES)


def parse_status(data: object, where: str) -> StoreStatus:
    """Validate a ``status --json`` document, or raise :class:`RecordError`."""
    return _parse(StoreStatus, data, where, "invalid status document", STATUS_MAX_BYTES)


_M = TypeVar("_M", bound=_Doc)


def _parse(model: type[_M], data: object, where: str, what: str, limit: int) -> _M:
    try:
        if isinstance(data, bytes | str):
            if len(data) > limit:
                raise RecordError(f"{where}: {what}: more than {limit} bytes")
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecordError(f"{where}: {what}: {describe_errors(exc)}") from None
    except RecursionError:  # an already parsed value nested deeper than Python can walk
        raise RecordError(f"{where}: {what}: nested too deeply") from None


def describe_errors(exc: ValidationError, limit: int = 3) -> str:
    """The first problems of a validation error on one line: ``key.path: reason; ...``."""
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        path = ".".join(str(p) for p in err["loc"])
        loc = f"{path}: " if path else ""
        got, shown = err.get("input"), ""
        scalar = got is None or isinstance(got, bool | int | float | str)
        if scalar and err["type"] not in ("missing", "json_invalid"):  # not the whole document
            text = repr(got)
            shown = f" (got {text[:40]}{'…' if len(text) > 40 else ''})"
        parts.append(f"{loc}{err['msg']}{shown}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
