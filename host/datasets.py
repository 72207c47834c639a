"""Labeled evaluation sets: YOLO txt, COCO json, Pascal VOC xml.

Every loader yields the same thing: image paths with ground-truth boxes (xyxy pixels once the
image size is known) and class names. Errors name the file and line.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from device.errors import DoorstepError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class DatasetError(DoorstepError):
    """An evaluation set that cannot be read."""


@dataclass(frozen=True)
class Sample:
    image: Path
    boxes: np.ndarray  # [N, 4]: xyxy pixels, or cx cy w h normalized when ``normalized``
    classes: tuple[int, ...]
    normalized: bool = False

    def pixel_boxes(self, width: int, height: int) -> np.ndarray:
        if not self.normalized:
            return self.boxes
        b = self.boxes
        out: np.ndarray = np.stack(
            [
                (b[:, 0] - b[:, 2] / 2) * width,
                (b[:, 1] - b[:, 3] / 2) * height,
                (b[:, 0] + b[:, 2] / 2) * width,
                (b[:, 1] + b[:, 3] / 2) * height,
            ],
            axis=1,
        ).reshape(-1, 4)
        return out


@dataclass(frozen=True)
class Dataset:
    root: Path
    format: str
    names: list[str]
    samples: list[Sample]


def load_dataset(path: str | Path, names: list[str] | None = None) -> Dataset:
    """Detect the format of ``path`` and load it."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"evaluation set {root} does not exist")
    if root.is_file() and root.suffix == ".json":
        return _coco(root)
    if root.is_file():
        raise DatasetError(f"{root}: expected a folder (YOLO or VOC) or a COCO .json file")
    if (root / "Annotations").is_dir() or any(root.glob("*.xml")):
        return _voc(root)
    return _yolo(root, names)


def _yolo_names(root: Path) -> list[str] | None:
    for cand in (root / "data.yaml", root.parent / "data.yaml"):
        if cand.is_file():
            data = yaml.safe_load(cand.read_text()) or {}
            names = data.get("names")
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
    for cand in (root / "classes.txt", root.parent / "classes.txt"):
        if cand.is_file():
            return [line.strip() for line in cand.read_text().splitlines() if line.strip()]
    return None


def _yolo(root: Path, names: list[str] | None) -> Dataset:
    images_dir = root / "images" if (root / "images").is_dir() else root
    labels_dir = root / "labels" if (root / "labels").is_dir() else images_dir
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(
            f"{root}: no images, and no Annotations (VOC) or .json file (COCO) either"
        )
    names = names or _yolo_names(root)
    if names is None:
        raise DatasetError(
            f"{root}: YOLO set without data.yaml or classes.txt: add a classes.txt, one class name per line"
        )
    samples = []
    for img in images:
        rel = img.relative_to(images_dir).with_suffix(".txt")
        label = labels_dir / rel
        rows: list[list[float]] = []
        classes: list[int] = []
        if label.is_file():
            for lineno, line in enumerate(label.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) != 5:
                        raise ValueError
                    cls, values = int(parts[0]), [float(v) for v in parts[1:]]
                except ValueError:
                    raise DatasetError(
                        f"{label}:{lineno}: expected 'class cx cy w h' (detection labels), got {line!r}"
                    ) from None
                if not 0 <= cls < len(names):
                    raise DatasetError(
                        f"{label}:{lineno}: class {cls} but the set names {len(names)} classes"
                    )
                rows.append(values)
                classes.append(cls)
        samples.append(
            Sample(img, np.array(rows, np.float64).reshape(-1, 4), tuple(classes), normalized=True)
        )
    return Dataset(root, "yolo", names, samples)


def _coco(path: Path) -> Dataset:
    try:
        data = json.loads(path.read_text())
        cats = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: im for im in data["images"]}
        annotations = data.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a COCO detection file ({exc})") from None
    names = [cats[k] for k in sorted(cats)]
    index = {k: i for i, k in enumerate(sorted(cats))}
    per_image: dict[int, list[tuple[list[float], int]]] = {k: [] for k in images}
    for n, ann in enumerate(annotations):
        try:
            x, y, w, h = ann["bbox"]
            cls = index[ann["category_id"]]
            image_id = ann["image_id"]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"{path}: annotation {n} needs image_id, a known category_id and bbox [x, y, w, h]"
            ) from None
        per_image.setdefault(image_id, []).append(([x, y, x + w, y + h], cls))
    samples = []
    for image_id, im in images.items():
        anns = per_image.get(image_id, [])
        img = path.parent / im["file_name"]
        if not img.exists() and (path.parent / "images" / im["file_name"]).exists():
            img = path.parent / "images" / im["file_name"]
        boxes = np.array([a[0] for a in anns], np.float64).reshape(-1, 4)
        samples.append(Sample(img, boxes, tuple(a[1] for a in anns)))
    return Dataset(path, "coco", names, samples)


def _voc(root: Path) -> Dataset:
    ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    img_dir = root / "JPEGImages" if (root / "JPEGImages").is_dir() else root
    objects: list[tuple[Path, list[list[float]], list[str]]] = []
    for xml in sorted(ann_dir.glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            raise DatasetError(f"{xml}: invalid XML ({exc})") from None
        fname = tree.findtext("filename") or f"{xml.stem}.jpg"
        boxes, labels = [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            name = obj.findtext("name")
            if bb is None or name is None:
                raise DatasetError(f"{xml}: <object> without <name> or <bndbox>")
            try:
                boxes.append(
                    [float(bb.findtext(k) or "x") for k in ("xmin", "ymin", "xmax", "ymax")]
                )
            except ValueError:
                raise DatasetError(
                    f"{xml}: <bndbox> of {name!r} has a missing or non-numeric corner"
                ) from None
            labels.append(name.strip())
        objects.append((img_dir / fname, boxes, labels))
    if not objects:
        raise DatasetError(f"{ann_dir}: no VOC .xml annotations")
    names = sorted({n for _, _, labels in objects for n in labels})
    samples = [
        Sample(img, np.array(b, np.float64).reshape(-1, 4), tuple(names.index(n) for n in labels))
        for img, b, labels in objects
    ]
    return Dataset(root, "voc", names, samples)
