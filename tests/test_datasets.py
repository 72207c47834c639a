"""Evaluation sets in YOLO, COCO and VOC form, real and made, and their bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from host.datasets import DatasetError, load_dataset

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{rel}")
    return path


def test_real_yolo_sets() -> None:
    porch = load_dataset(_shared("porch-2211"))
    assert porch.format == "yolo" and porch.names == ["package"]
    assert len(porch.samples) == 46
    test = load_dataset(_shared("packages-v6/test"))
    assert test.names == ["package"] and len(test.samples) == 3
    boxes = sum(len(s.classes) for s in test.samples)
    assert boxes == 5
    s = next(s for s in porch.samples if s.classes)
    px = s.pixel_boxes(1280, 960)
    assert (px[:, 2] > px[:, 0]).all() and (px[:, 3] > px[:, 1]).all()


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))


def test_coco_json(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "a.jpg")
    (tmp_path / "ann.json").write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg", "width": 30, "height": 20}],
                "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 5]}],
                "categories": [{"id": 3, "name": "package"}, {"id": 5, "name": "person"}],
            }
        )
    )
    ds = load_dataset(tmp_path / "ann.json")
    assert ds.format == "coco" and ds.names == ["package", "person"]
    assert ds.samples[0].image == tmp_path / "images" / "a.jpg"
    np.testing.assert_allclose(ds.samples[0].pixel_boxes(30, 20), [[1, 2, 11, 7]])


def test_voc_xml(tmp_path: Path) -> None:
    _img(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>package</name>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>11</xmax><ymax>7</ymax></bndbox></object></annotation>"
    )
    ds = load_dataset(tmp_path)
    assert ds.format == "voc" and ds.names == ["package"]
    np.testing.assert_allclose(ds.samples[0].boxes, [[1, 2, 11, 7]])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", "a.txt:2: expected 'class cx cy w h'"),
        ("zero 0.5 0.5 0.2 0.2", "a.txt:2: expected 'class cx cy w h'"),
        ("4 0.5 0.5 0.2 0.2", "a.txt:2: class 4 but the set names 1 classes"),
    ],
)
def test_bad_yolo_label_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    _img(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.1 0.1\n{line}\n")
    (tmp_path / "classes.txt").write_text("package\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path)


def test_bad_voc_and_coco(tmp_path: Path) -> None:
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(
        "<annotation><object><name>x</name></object></annotation>"
    )
    with pytest.raises(DatasetError, match=r"a.xml: <object> without <name> or <bndbox>"):
        load_dataset(tmp_path / "voc")
    (tmp_path / "d.json").write_text(
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "p"}],'
        ' "annotations": [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]}'
    )
    with pytest.raises(
        DatasetError, match=r"d.json: annotation 0 needs image_id, a known category_id"
    ):
        load_dataset(tmp_path / "d.json")
    (tmp_path / "c.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="c.json: not a COCO detection file"):
        load_dataset(tmp_path / "c.json")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "none")


def test_yolo_set_without_class_names(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "a.jpg")
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="without data.yaml or classes.txt"):
        load_dataset(tmp_path)
