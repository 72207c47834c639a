"""The ``source`` section of ``device.yaml``: one model per source ``type``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from device.config_fields import NonEmptyPath, Section, resolve_existing

MAIN_MAX = (4608, 2592)  # the largest Raspberry Pi camera mode (Camera Module 3, 12 MP)

Fps = Annotated[float, Field(gt=0, le=120)]
StallSeconds = Annotated[
    float,
    Field(
        gt=0,
        le=3600,
        description="seconds (0..3600] without a frame after which a live source is reported "
        "stalled (state, telemetry, log); the systemd watchdog then restarts the daemon",
    ),
]


class FolderSourceConfig(Section):
    """A folder of images, in name order (replays, tests)."""

    type: Literal["folder"] = Field(description="a folder of images")
    path: NonEmptyPath = Field(description="the folder; its images are replayed in name order")
    fps: Fps = Field(5.0, description="frames per second delivered, (0..120]")
    stall_s: StallSeconds = 10.0

    _check_path = field_validator("path")(resolve_existing)

    @field_validator("path")
    @classmethod
    def _a_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"not a directory: {value} (a `still` source takes one image)")
        return value


class OpenCVSourceConfig(Section):
    """A USB camera (index), an RTSP/HTTP stream, or a video file."""

    type: Literal["opencv"] = Field(description="a camera, stream or video file via OpenCV")
    uri: (
        Annotated[int, Field(ge=0, le=255)] | Annotated[str, Field(min_length=1, max_length=2048)]
    ) = Field(
        description="camera index 0..255 (/dev/video<N>), rtsp://... or http://... URL, or a "
        "video file (at most 2048 characters)"
    )
    fps: Fps | None = Field(
        None, description="frames per second, (0..120]: a file's rate override; null: its own"
    )
    loop: bool = Field(False, description="start a video file again at its end")
    live: bool | None = Field(
        None,
        description="null: cameras and streams are live, files are not; true replays a file as "
        "a camera would deliver it (in real time, newest frame only, drops counted)",
    )
    stall_s: StallSeconds = 10.0


class StillSourceConfig(Section):
    """One image delivered as a live camera at ``fps`` (benchmarks, demos)."""

    type: Literal["still"] = Field(description="one image, delivered as a live camera")
    path: NonEmptyPath = Field(description="the image file")
    fps: Fps = Field(10.0, description="frames per second delivered, (0..120]")
    stall_s: StallSeconds = 10.0

    _check_path = field_validator("path")(resolve_existing)

    @field_validator("path")
    @classmethod
    def _a_file(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"not a file: {value} (a `folder` source takes a directory)")
        return value


Size = tuple[
    Annotated[int, Field(ge=16, le=MAIN_MAX[0], multiple_of=2)],
    Annotated[int, Field(ge=16, le=MAIN_MAX[1], multiple_of=2)],
]


class Picamera2SourceConfig(Section):
    """The Raspberry Pi camera: main stream for snapshots, lores stream for the model."""

    type: Literal["picamera2"] = Field(description="the Raspberry Pi camera via picamera2")
    main_size: Size = Field(
        (1280, 720),
        description="[width, height] in pixels of the snapshot stream: even, "
        f"16..{MAIN_MAX[0]} x 16..{MAIN_MAX[1]}",
    )
    lores_size: Size = Field(
        (320, 240),
        description="[width, height] in pixels of the stream the model sees (about the model's "
        "input size): even, at least 16, not larger than main_size",
    )
    lores_format: Literal["YUV420", "RGB888"] = Field(
        "YUV420", description="lores pixel format: YUV420 on any Pi, RGB888 on a Pi 5"
    )
    fps: Fps = Field(10.0, description="frames per second asked of the camera, (0..120]")
    stall_s: StallSeconds = 10.0

    @model_validator(mode="after")
    def _lores_within_main(self) -> Picamera2SourceConfig:
        (mw, mh), (lw, lh) = self.main_size, self.lores_size
        if lw > mw or lh > mh:
            raise ValueError(
                f"lores_size {lw}x{lh} is larger than main_size {mw}x{mh}: the camera scales "
                "lores down from main"
            )
        return self


SourceConfig = Annotated[
    FolderSourceConfig | OpenCVSourceConfig | StillSourceConfig | Picamera2SourceConfig,
    Field(discriminator="type"),
]
