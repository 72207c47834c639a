"""``fleet.yaml``: the doorbells a deploy reaches, how to log in, and the rollout policy.

Validated like ``device.yaml``: unknown keys and duplicate YAML keys are refused, and every
problem is reported as ``file: key.path: reason (got value)``. Relative key and known_hosts
paths are resolved against the file's directory. An Ansible-style YAML inventory (``all:``
with ``hosts``/``children``/``vars``) is accepted too and converted to the same model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from device.config import read_yaml_mapping
from device.errors import ConfigError, format_validation_error
from host.fleet.ansible import ansible_locations, ansible_to_fleet, is_ansible_inventory

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"  # as device.yaml's device_id
DEFAULT_STATE_DIR = PurePosixPath("/var/lib/doorstep")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
ReloadMethod = Literal["auto", "systemd", "signal"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _local_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Expand ``~`` and resolve a relative path against the fleet file's directory."""
    if value is None:
        return None
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


def _remote_path(value: PurePosixPath | None) -> PurePosixPath | None:
    if value is not None and not value.is_absolute():
        raise ValueError("must be an absolute path on the device")
    return value


class Defaults(_Section):
    """Settings every device gets unless it overrides them."""

    user: str | None = Field(None, description="SSH user; null = the local user name")
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    key_file: Path | None = Field(None, description="SSH private key; null = the SSH agent")
    known_hosts: Path = Field(
        DEFAULT_KNOWN_HOSTS,
        validate_default=True,
        description="host keys are always checked against this file",
    )
    state_dir: PurePosixPath = Field(
        DEFAULT_STATE_DIR, description="the device's state_dir (models live here)"
    )
    config: PurePosixPath | None = Field(
        None,
        description="the device's device.yaml (its signing keys, its service), passed as "
        "--config; null = doorstep-device's own default",
    )
    doorstep: str = Field(
        "doorstep-device", description="the doorstep-device command on the device"
    )
    python: str | None = Field(
        None, description="run `<python> -m device.cli` instead of `doorstep` (e.g. a venv)"
    )
    reload: ReloadMethod = Field(
        "auto",
        description="how `activate` reloads the daemon: auto (systemd if it runs under systemd, "
        "else SIGHUP), systemd (`systemctl reload`), signal (SIGHUP to its pid)",
    )
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0

    _paths = field_validator("key_file", "known_hosts")(_local_path)
    _state = field_validator("state_dir", "config")(_remote_path)


class DeviceEntry(_Section):
    """One doorbell as written in the file; unset settings come from ``defaults``."""

    name: Name
    host: Annotated[str, Field(min_length=1)]
    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)] | None = Field(
        None, description="its device.yaml device_id; null = name"
    )
    groups: list[Name] = Field(default_factory=list)
    user: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    key_file: Path | None = None
    known_hosts: Path | None = None
    state_dir: PurePosixPath | None = None
    config: PurePosixPath | None = None
    doorstep: str | None = None
    python: str | None = None
    reload: ReloadMethod | None = None
    connect_timeout: Annotated[float, Field(gt=0, le=600)] | None = None

    _paths = field_validator("key_file", "known_hosts")(_local_path)
    _state = field_validator("state_dir", "config")(_remote_path)


class RolloutPolicy(_Section):
    """How a deploy proceeds through the fleet (``deploy`` flags override these)."""

    canary: Annotated[int, Field(ge=0)] = Field(1, description="devices in the first wave")
    canary_group: Name | None = Field(
        None, description="pick canaries from this group first (then in file order)"
    )
    batch: int | str = Field(
        "25%", description="devices per later wave: a count, or a percentage of the fleet"
    )
    max_fail: Annotated[int, Field(ge=0)] = Field(
        0, description="stop starting new waves once more devices than this have failed"
    )
    health_deadline: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="seconds for a device to report the new model healthy"
    )
    health_interval: Annotated[float, Field(gt=0, le=60)] = Field(
        1.0, description="seconds between two health polls of a device"
    )
    keep_models: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="models kept on each device (current and previous are never pruned)"
    )
    parallel: Annotated[int, Field(ge=1, le=256)] = Field(
        10, description="devices worked on at once within a wave"
    )

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, value: object) -> int | str:
        if isinstance(value, bool):
            raise ValueError("batch must be a count like 2 or a percentage like '25%'")
        if isinstance(value, int):
            if value < 1:
                raise ValueError("batch must be at least 1 device")
            return value
        if isinstance(value, str):
            if value.strip().isdigit():
                return cls._batch(int(value))
            match = _PERCENT.match(value)
            if match:
                pct = float(match.group(1))
                if not 0 < pct <= 100:
                    raise ValueError("batch percentage must be above 0% and at most 100%")
                return f"{match.group(1)}%"
        raise ValueError("batch must be a count like 2 or a percentage like '25%'")

    def batch_size(self, total: int) -> int:
        """Devices per batch for a fleet of ``total``: a percentage rounds down, minimum 1."""
        if isinstance(self.batch, int):
            return self.batch
        return max(1, math.floor(total * float(self.batch.rstrip("%")) / 100 + 1e-9))

    def with_overrides(self, **changes: Any) -> RolloutPolicy:
        """A copy with command-line overrides (None = keep), validated like the file."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        try:
            return RolloutPolicy.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "command line")) from None


class FleetFile(_Section):
    """The top level of ``fleet.yaml``."""

    defaults: Defaults = Defaults()
    devices: Annotated[list[DeviceEntry], Field(min_length=1)]
    rollout: RolloutPolicy = RolloutPolicy()


@dataclass(frozen=True)
class Device:
    """One doorbell with every setting resolved (its own, else the defaults)."""

    name: str
    host: str
    device_id: str
    groups: tuple[str, ...] = ()
    user: str | None = None
    port: int = 22
    key_file: Path | None = None
    known_hosts: Path = DEFAULT_KNOWN_HOSTS
    state_dir: PurePosixPath = DEFAULT_STATE_DIR
    config: PurePosixPath | None = None
    doorstep: str = "doorstep-device"
    python: str | None = None
    reload: ReloadMethod = "auto"
    connect_timeout: float = 10.0

    @property
    def address(self) -> str:
        """``user@host:port`` for messages."""
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{user}{host}:{self.port}"

    def doorstep_argv(self, *args: str) -> list[str]:
        """The command line that runs ``doorstep-device ARGS`` on this device."""
        base = [self.python, "-m", "device.cli"] if self.python else [self.doorstep]
        return [*base, *args]

    def device_command(self, command: str, *args: str, json: bool = True) -> list[str]:
        """``doorstep-device COMMAND ARGS --state-dir S [--config F] [--json]`` for this device."""
        extra = ["--state-dir", str(self.state_dir)]
        if self.config is not None:
            extra += ["--config", str(self.config)]
        return self.doorstep_argv(command, *args, *extra, *(["--json"] if json else []))


@dataclass(frozen=True)
class Fleet:
    """A validated fleet: resolved devices in file order, and the rollout policy."""

    source: Path
    devices: tuple[Device, ...]
    rollout: RolloutPolicy

    @property
    def groups(self) -> list[str]:
        return sorted({g for d in self.devices for g in d.groups})

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise ConfigError(
            f"{self.source}: no device named {name!r} (devices: "
            f"{', '.join(d.name for d in self.devices)})"
        )

    def select(self, group: str | None = None, device: str | None = None) -> list[Device]:
        """The devices in ``group`` (``all`` = every device) and/or named ``device``, in order."""
        chosen = list(self.devices)
        if group is not None and group != "all":
            if group not in self.groups:
                known = ", ".join(self.groups) or "none defined"
                raise ConfigError(f"{self.source}: no group {group!r} (groups: {known})")
            chosen = [d for d in chosen if group in d.groups]
        if device is not None:
            wanted = self.device(device)
            if wanted not in chosen:
                raise ConfigError(f"{self.source}: device {device!r} is not in group {group!r}")
            chosen = [wanted]
        return chosen


# ------------------------------------------------------------------------------------ loading


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a ``fleet.yaml`` or an Ansible YAML inventory; raise ``ConfigError``."""
    path = Path(path)
    data = _read_yaml(path)
    origins: list[str] | None = None
    if is_ansible_inventory(data):
        data, origins = ansible_to_fleet(data, str(path))
    try:
        parsed = FleetFile.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as exc:
        text = format_validation_error(exc, str(path))
        if origins is not None:
            text = ansible_locations(text, origins)
        raise ConfigError(text) from None
    problems: list[str] = []
    names: dict[str, str] = {}
    ids: dict[str, str] = {}
    for i, entry in enumerate(parsed.devices):
        where = origins[i] if origins is not None else f"devices.{i}"
        if entry.name in names:
            problems.append(
                f"{path}: {where}.name: duplicate device name (got {entry.name!r}); "
                f"first at {names[entry.name]}"
            )
            continue
        names[entry.name] = where
        did = entry.device_id or entry.name
        if did in ids:
            problems.append(
                f"{path}: {where}.device_id: duplicate device_id (got {did!r}); first at {ids[did]}"
            )
        ids.setdefault(did, where)
    group = parsed.rollout.canary_group
    if group is not None and not any(group in e.groups for e in parsed.devices):
        problems.append(f"{path}: rollout.canary_group: no device is in this group (got {group!r})")
    if problems:
        raise ConfigError("\n".join(problems))
    return Fleet(
        source=path,
        devices=tuple(_resolve(e, parsed.defaults) for e in parsed.devices),
        rollout=parsed.rollout,
    )


def _resolve(entry: DeviceEntry, defaults: Defaults) -> Device:
    settings = {
        key: value if (value := getattr(entry, key)) is not None else getattr(defaults, key)
        for key in Defaults.model_fields
    }
    return Device(
        name=entry.name,
        host=entry.host,
        device_id=entry.device_id or entry.name,
        groups=tuple(dict.fromkeys(entry.groups)),
        **settings,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "fleet file", "keys (defaults, devices, rollout)")
