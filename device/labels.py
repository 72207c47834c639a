"""Label files: one class name per line, or ``ID NAME`` / ``ID: NAME`` lines.

A first line of ``???`` or ``background`` is the background slot of TF Object Detection API
label maps (line ``class_id + 1`` is the name), and is dropped so that index 0 is the first
real class, as the TFLite detection post-process op and YOLO models number them.
"""

from __future__ import annotations

import re
from pathlib import Path

from device.errors import LabelsError

_BACKGROUND = {"???", "background", "__background__"}
_ID_LINE = re.compile(r"^(\d+)\s*[:\s]\s*(\S.*)$")


def read_labels(path: str | Path) -> list[str]:
    """Read a label file into a list indexed by class id; raise ``LabelsError`` naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelsError(f"{path}: label file not found") from None
    except UnicodeDecodeError as exc:
        raise LabelsError(
            f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read label file: {exc.strerror}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise LabelsError(f"{path}: label file is empty: expected one class name per line")

    numbered = [_ID_LINE.match(line.strip()) for line in lines]
    if all(numbered):
        return _numbered(path, lines, numbered)  # type: ignore[arg-type]

    names: list[str] = []
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise LabelsError(
                f"{path}:{lineno}: empty line inside the label list: every line up to the last "
                "must name a class (class ids are line numbers)"
            )
        names.append(name)
    if names[0].lower() in _BACKGROUND:
        names = names[1:]
    if not names:
        raise LabelsError(f"{path}: holds only a background entry, no class names")
    return names


def _numbered(path: Path, lines: list[str], matches: list[re.Match[str]]) -> list[str]:
    by_id: dict[int, str] = {}
    for lineno, match in enumerate(matches, 1):
        class_id, name = int(match.group(1)), match.group(2).strip()
        if class_id in by_id:
            raise LabelsError(f"{path}:{lineno}: class id {class_id} appears twice")
        by_id[class_id] = name
    size = max(by_id) + 1
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise LabelsError(
            f"{path}: class ids must run from 0 without gaps; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    names = [by_id[i] for i in range(size)]
    if names[0].lower() in _BACKGROUND:
        names = names[1:]
    return names
