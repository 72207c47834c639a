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

from device.bundle.store import format_validation_error
from device.errors import ConfigError


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


class DeviceConfig(_Section):
    """The doorbell's whole configuration."""

    device_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")] = Field(
        description="unique name of this doorbell; used in MQTT topics, so letters, digits, - and _"
    )
    state_dir: Path = Field(
        Path("/var/lib/doorstep"), description="where models, the outbox and state are kept"
    )
    model: ModelConfig = ModelConfig()

    @field_validator("state_dir")
    @classmethod
    def _state_dir_beside_config(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        path = value.expanduser()
        return path if path.is_absolute() or base is None else Path(base) / path


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


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DeviceConfig:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
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
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return DeviceConfig.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
