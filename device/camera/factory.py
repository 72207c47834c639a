"""The frame source a config section names: one module per kind, imported only when used."""

from __future__ import annotations

from device.camera.base import FrameSource
from device.config import (
    FolderSourceConfig,
    OpenCVSourceConfig,
    SourceConfig,
    StillSourceConfig,
)


def open_source(cfg: SourceConfig) -> FrameSource:
    """Build (not yet open) the source ``cfg`` describes."""
    if isinstance(cfg, FolderSourceConfig):
        from device.camera.folder import FolderSource

        return FolderSource(cfg.path, cfg.fps)
    if isinstance(cfg, OpenCVSourceConfig):
        from device.camera.opencv import OpenCVSource

        return OpenCVSource(cfg.uri, cfg.fps, cfg.loop, cfg.live)
    if isinstance(cfg, StillSourceConfig):
        from device.camera.still import StillSource

        return StillSource(cfg.path, cfg.fps)
    from device.camera.picamera2 import Picamera2Source

    return Picamera2Source(cfg.main_size, cfg.lores_size, cfg.fps, cfg.lores_format)
