"""A folder of images as a finite source, in name order, stamped at ``fps``."""

from __future__ import annotations

from pathlib import Path

import cv2

from device.camera.base import Frame, FrameSource
from device.errors import DoorstepError

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class FolderSource(FrameSource):
    def __init__(self, path: str | Path, fps: float = 5.0) -> None:
        self.path, self.fps = Path(path), fps
        self._files: list[Path] = []
        self._next = 0

    def describe(self) -> str:
        return f"frame folder {self.path}"

    def open(self) -> None:
        if not self.path.is_dir():
            raise DoorstepError(f"frame folder {self.path} does not exist")
        self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not self._files:
            raise DoorstepError(
                f"frame folder {self.path} holds no images ({', '.join(sorted(SUFFIXES))})"
            )
        self._next = 0

    def read(self, timeout: float = 5.0) -> Frame | None:
        while self._next < len(self._files):
            i = self._next
            self._next += 1
            image = cv2.imread(str(self._files[i]))
            if image is not None:
                return Frame(image, i / self.fps, i)
            self.dropped += 1  # unreadable file: skipped and counted
        self.ended = True
        return None

    def close(self) -> None:
        self._files = []
