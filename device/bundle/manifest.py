"""The bundle manifest: everything needed to run a model correctly, so nothing is guessed.

The schema is versioned; a device refuses a manifest of a newer major schema than it knows.
Output tensors are mapped to roles by *name and shape*, never by index, because converter
versions order outputs differently.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

DecoderKind = Literal["tflite_postprocess", "yolo_v8", "yolo_v5", "yolo_e2e", "ssd_raw", "nanodet"]
DECODER_KINDS: tuple[str, ...] = DecoderKind.__args__  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]


class Normalization(_Strict):
    """``real = (pixel - mean) / std`` per channel, in the model's channel order."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @model_validator(mode="after")
    def _nonzero_std(self) -> Normalization:
        if any(s == 0 for s in self.std):
            raise ValueError("std must not be zero")
        return self


class InputSpec(_Strict):
    """How a frame becomes the model's input tensor."""

    name: str
    height: Annotated[int, Field(gt=0)]
    width: Annotated[int, Field(gt=0)]
    layout: Literal["NHWC", "NCHW"]
    channel_order: Literal["RGB", "BGR"] = "RGB"
    dtype: Literal["uint8", "int8", "float32"]
    scale: float | None = Field(None, description="quantization scale read from the model")
    zero_point: int | None = Field(None, description="quantization zero point read from the model")
    resize: Literal["letterbox", "stretch"]
    pad_value: Annotated[int, Field(ge=0, le=255)] = 114
    normalization: Normalization = Field(
        description="pixel to the real value the model was trained on; quantized inputs then "
        "apply the model's own scale and zero point to that real value"
    )


class TensorSpec(_Strict):
    name: str
    shape: list[int]
    dtype: str


class SsdParams(_Strict):
    """Parameters of raw SSD box decoding (anchors in ``anchors_file``, rows yc, xc, h, w)."""

    anchors_file: str = "anchors.npy"
    scale_factors: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    background_class: bool = True


class NanoDetParams(_Strict):
    """NanoDet / NanoDet-Plus heads: per grid point, sigmoid class scores then 4 x (reg_max+1)
    distance bins (left, top, right, bottom; softmax, expectation x stride)."""

    reg_max: Annotated[int, Field(ge=1, le=64)] = 7
    strides: tuple[int, ...] = Field((8, 16, 32), description="one level per stride, finest first")
    center_offset: Annotated[float, Field(ge=0, le=1)] = Field(
        0.5, description="grid point centres at (i + offset) x stride (NanoDet-Plus exports: 0)"
    )


class DecoderSpec(_Strict):
    kind: DecoderKind
    outputs: dict[str, TensorSpec] = Field(description="role -> output tensor, by name and shape")
    box_units: Literal["auto", "normalized", "pixels"] = "auto"
    ssd: SsdParams | None = None
    nanodet: NanoDetParams | None = None
    detected_as: str = Field("", description="how the layout was recognised")


class Labels(_Strict):
    names: list[str]
    roles: dict[str, list[int]] = Field(
        default_factory=dict, description="role (package, person) -> class ids"
    )

    @model_validator(mode="after")
    def _roles_in_range(self) -> Labels:
        for role, ids in self.roles.items():
            bad = [i for i in ids if not 0 <= i < len(self.names)]
            if bad:
                raise ValueError(
                    f"role {role!r} names class ids {bad} outside 0..{len(self.names) - 1}"
                )
        return self


class Thresholds(_Strict):
    score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    iou: Annotated[float, Field(gt=0.0, le=1.0)] = 0.45
    max_detections: Annotated[int, Field(gt=0)] = 100


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created: str
    model_file: str = "model.tflite"
    files: dict[str, FileEntry] = Field(default_factory=dict)
    input: InputSpec
    decoder: DecoderSpec
    labels: Labels
    thresholds: Thresholds = Thresholds()
    calibration: dict[str, object] | None = None
    evaluation: dict[str, object] | None = None
    tools: dict[str, str] = Field(default_factory=dict, description="converter/runtime versions")
    ops: dict[str, int] = Field(default_factory=dict, description="op name -> count")
