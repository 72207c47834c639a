"""Calibration images: found recursively, bad ones skipped and counted, weak sets warned about."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from host.calibration import CalibrationError, gather


def _images(folder: Path, n: int, *, value: int | None = None, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = (
            np.full((48, 64, 3), value, np.uint8)
            if value is not None
            else rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        )
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)


def test_recursive_with_skips_counted(tmp_path: Path) -> None:
    _images(tmp_path / "a" / "deep", 6)
    _images(tmp_path / "b", 4, seed=1)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    cs = gather([tmp_path / "a", tmp_path / "b"], max_images=300)
    assert len(cs.files) == 10
    assert cs.non_images == 1 and len(cs.unreadable) == 1
    assert cs.per_folder == {str(tmp_path / "a"): 6, str(tmp_path / "b"): 5}
    text = " | ".join(cs.warnings)
    assert "skipped 1 unreadable or corrupt image(s)" in text
    assert "only 10 calibration images (100-500 recommended)" in text
    a, b = cs.halves()
    assert not set(a) & set(b) and len(a) + len(b) == 10


def test_sampling_is_capped_and_deterministic(tmp_path: Path) -> None:
    _images(tmp_path, 30)
    first = gather([tmp_path], max_images=12)
    assert len(first.files) == 12
    assert first.files == gather([tmp_path], max_images=12).files


def test_dark_and_uniform_sets_are_warned_about(tmp_path: Path) -> None:
    _images(tmp_path, 5, value=10)
    text = " | ".join(gather([tmp_path]).warnings)
    assert "almost all dark" in text
    assert "very uniform" in text


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="calibration folder .*nope does not exist"):
        gather([tmp_path / "nope"])


def test_no_images_anywhere_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(CalibrationError, match="no calibration images"):
        gather([tmp_path / "empty"])


def test_one_empty_folder_among_others_is_a_warning(tmp_path: Path) -> None:
    _images(tmp_path / "full", 3)
    (tmp_path / "empty").mkdir()
    cs = gather([tmp_path / "full", tmp_path / "empty"])
    assert any("empty" in w and "holds no images" in w for w in cs.warnings)


def test_only_corrupt_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="none of the 1 calibration images could be read"):
        gather([tmp_path])
