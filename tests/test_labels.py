from __future__ import annotations

from pathlib import Path

import pytest

from device.errors import LabelsError
from device.labels import read_labels


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "labels.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_plain_lines_with_trailing_blank_lines(tmp_path: Path) -> None:
    assert read_labels(_write(tmp_path, "package\nperson\n\n\n")) == ["package", "person"]


def test_background_first_line_is_dropped(tmp_path: Path) -> None:
    assert read_labels(_write(tmp_path, "???\nperson\nbicycle\n")) == ["person", "bicycle"]


def test_numbered_lines(tmp_path: Path) -> None:
    assert read_labels(_write(tmp_path, "1 person\n0: package\n2  dog walker\n")) == [
        "package",
        "person",
        "dog walker",
    ]


def test_real_coco_label_map(ssd_labels: Path) -> None:
    names = read_labels(ssd_labels)
    assert len(names) == 90 and names[0] == "person" and names[17] == "dog"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("package\n\nperson\n", "labels.txt:2: empty line"),
        ("0 a\n0 b\n", "labels.txt:2: class id 0 appears twice"),
        ("0 a\n2 b\n", "missing [1]"),
        (b"\xff\xfe\x00bad", "not a UTF-8 text file"),
        ("???\n", "only a background entry"),
    ],
)
def test_bad_label_files_name_file_and_line(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    with pytest.raises(LabelsError, match="labels.txt") as err:
        read_labels(_write(tmp_path, text))
    assert message in str(err.value)


def test_missing_label_file(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="label file not found"):
        read_labels(tmp_path / "nope.txt")
