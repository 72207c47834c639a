"""Calibration images: found, checked, sampled, split into halves for the stability check."""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.errors import DoorstepError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
RECOMMENDED = (100, 500)


class CalibrationError(DoorstepError):
    """The calibration set cannot be used."""


@dataclass
class CalibrationSet:
    files: list[Path]
    per_folder: dict[str, int]
    unreadable: list[str] = field(default_factory=list)
    non_images: int = 0
    warnings: list[str] = field(default_factory=list)
    brightness: tuple[float, float] = (0.0, 0.0)  # mean of image means, spread across images

    def halves(self) -> tuple[list[Path], list[Path]]:
        """Two disjoint halves of the (already shuffled) set."""
        return self.files[0::2], self.files[1::2]

    def facts(self) -> dict[str, Any]:
        """What the manifest records about calibration."""
        return {
            "images": len(self.files),
            "folders": self.per_folder,
            "skipped_unreadable": len(self.unreadable),
            "skipped_non_images": self.non_images,
            "brightness_mean": round(self.brightness[0], 1),
            "brightness_spread": round(self.brightness[1], 1),
            "warnings": self.warnings,
        }


def gather(folders: Sequence[str | Path], max_images: int = 300, seed: int = 0) -> CalibrationSet:
    """Find images under ``folders`` (recursively), read each once, keep at most ``max_images``.

    Missing folders and a set with no readable image are errors; an empty folder among others,
    too few images, or a set too uniform to calibrate well are warnings.
    """
    import cv2

    candidates: list[Path] = []
    per_folder: dict[str, int] = {}
    warnings: list[str] = []
    non_images = 0
    for folder in folders:
        root = Path(folder)
        if not root.exists():
            raise CalibrationError(f"calibration folder {root} does not exist")
        if not root.is_dir():
            raise CalibrationError(f"calibration path {root} is not a folder")
        found = []
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES:
                found.append(p)
            else:
                non_images += 1
        per_folder[str(root)] = len(found)
        if not found:
            warnings.append(f"calibration folder {root} holds no images (JPEG, PNG, BMP)")
        candidates.extend(found)
    if not candidates:
        raise CalibrationError(
            f"no calibration images (JPEG, PNG, BMP) in {', '.join(str(f) for f in folders)}"
        )
    random.Random(seed).shuffle(candidates)

    files: list[Path] = []
    unreadable: list[str] = []
    means: list[float] = []
    for i, path in enumerate(candidates):
        if len(files) >= max_images:
            break
        image = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_4)
        if image is None or image.size == 0:
            unreadable.append(str(path))
            continue
        files.append(path)
        means.append(float(image.mean()))
        if (i + 1) % 100 == 0:
            print(f"  checked {i + 1} calibration images", file=sys.stderr, flush=True)
    if not files:
        raise CalibrationError(f"none of the {len(candidates)} calibration images could be read")
    if unreadable:
        warnings.append(
            f"skipped {len(unreadable)} unreadable or corrupt image(s), e.g. {unreadable[0]}"
        )
    lo, hi = RECOMMENDED
    if len(files) < lo:
        warnings.append(
            f"only {len(files)} calibration images ({lo}-{hi} recommended): activation ranges may "
            "not cover what the camera sees"
        )
    mean, spread = float(np.mean(means)), float(np.std(means))
    if mean < 40:
        warnings.append(
            f"calibration images are almost all dark (mean brightness {mean:.0f}/255): add daytime frames"
        )
    elif mean > 215:
        warnings.append(
            f"calibration images are almost all bright (mean brightness {mean:.0f}/255)"
        )
    if spread < 4 and len(files) > 1:
        warnings.append(
            f"calibration images are very uniform (brightness varies by {spread:.1f}/255): "
            "use frames of different scenes, times of day and weather"
        )
    return CalibrationSet(files, per_folder, unreadable, non_images, warnings, (mean, spread))
