"""``doorstep-host train``: fine-tune an SSD parcel detector from YOLO-labeled photos.

The parent process gathers the photos, splits them into training and validation *by scene*
(photos come in bursts of the same spot; a random split would leak), and hands the work to a
TensorFlow child process (``host/train_tf.py``): transfer from a pretrained SSD's weights, a new
class head, augmentation, focal loss, validation AP each epoch, checkpoints to resume from.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.errors import DoorstepError
from host.datasets import Sample, load_dataset

_TIMESTAMP = re.compile(r"(20\d{6})[_-]?(\d{6})")
_COUNTER = re.compile(r"^([A-Za-z]*)[_-]?(\d{3,6})")


class TrainError(DoorstepError):
    """Training cannot start or continue."""


def scene_key(path: Path) -> tuple[str, int]:
    """A sortable (series, position) for grouping photos into bursts of one scene.

    ``IMG_20221104_224626.jpg`` -> seconds of the day; ``IMG_6817_jpg.rf.<hash>.jpg`` (a
    Roboflow export of IMG_6817) -> the camera's counter 6817.
    """
    name = path.name.split(".rf.")[0]
    ts = _TIMESTAMP.search(name)
    if ts:
        hh, mm, ss = int(ts.group(2)[:2]), int(ts.group(2)[2:4]), int(ts.group(2)[4:])
        return ts.group(
            1
        ), hh * 3600 + mm * 60 + ss  # folders aside: train/ and valid/ share bursts
    counter = _COUNTER.search(name)
    if counter:
        return f"{counter.group(1)}#", int(counter.group(2))
    return f"{path}", 0


def group_scenes(
    paths: Sequence[Path], max_gap_seconds: int = 90, max_gap_count: int = 3
) -> list[list[Path]]:
    """Photos of one burst (timestamps within ``max_gap_seconds``, counters within
    ``max_gap_count``) form one scene."""
    keyed = sorted((scene_key(p), p) for p in paths)
    groups: list[list[Path]] = []
    last: tuple[str, int] | None = None
    for (series, pos), path in keyed:
        gap = max_gap_seconds if not series.endswith("#") else max_gap_count
        if last is None or series != last[0] or pos - last[1] > gap:
            groups.append([])
        groups[-1].append(path)
        last = (series, pos)
    return groups


def split_by_scene(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[list[str]]]:
    """Whole scenes go to validation until about ``val_fraction`` of the photos are there."""
    by_path = {s.image: s for s in samples}
    groups = group_scenes(list(by_path))
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    target = val_fraction * len(samples)
    val: list[Sample] = []
    val_groups: list[list[str]] = []
    for gi in order:
        if len(val) >= target:
            break
        if len(val) + len(groups[gi]) > 1.6 * target:
            continue  # a burst this large would unbalance the split; try the next scene
        val.extend(by_path[p] for p in groups[gi])
        val_groups.append([p.name for p in groups[gi]])
    if not val:  # every scene is large: hold out the smallest one
        smallest = min(groups, key=len)
        val = [by_path[p] for p in smallest]
        val_groups = [[p.name for p in smallest]]
    val_set = {s.image for s in val}
    train = [s for s in samples if s.image not in val_set]
    if not train or not val:
        raise TrainError(
            f"cannot split {len(samples)} photos in {len(groups)} scene(s) into training and validation"
        )
    return train, val, val_groups


def export_yolo(samples: Sequence[Sample], names: Sequence[str], folder: Path) -> Path:
    """Write ``samples`` as a YOLO set (images linked, labels written) for evaluate --data."""
    import shutil

    import cv2

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    for i, s in enumerate(samples):
        name = f"{i:04d}_{s.image.name}"
        (folder / "images" / name).symlink_to(s.image.resolve())
        boxes = s.boxes
        if not s.normalized:
            h, w = cv2.imread(str(s.image)).shape[:2]
            b = boxes / [w, h, w, h]
            boxes = np.stack(
                [
                    (b[:, 0] + b[:, 2]) / 2,
                    (b[:, 1] + b[:, 3]) / 2,
                    b[:, 2] - b[:, 0],
                    b[:, 3] - b[:, 1],
                ],
                1,
            )
        lines = [
            f"{c} {' '.join(f'{v:.6f}' for v in box)}"
            for c, box in zip(s.classes, boxes.reshape(-1, 4), strict=True)
        ]
        (folder / "labels" / f"{Path(name).stem}.txt").write_text(
            "".join(line + "\n" for line in lines)
        )
    return folder


def train(args: argparse.Namespace) -> dict[str, Any]:
    from host.tfjobs import run_job

    samples: list[Sample] = []
    names: list[str] | None = None
    for folder in args.data:
        ds = load_dataset(folder)
        if names is None:
            names = ds.names
        elif ds.names != names:
            raise TrainError(f"{folder}: classes {ds.names} differ from {names} of {args.data[0]}")
        samples.extend(ds.samples)
    assert names is not None
    labeled = [s for s in samples if s.classes]
    if len(labeled) < 2:
        raise TrainError(
            f"only {len(labeled)} labeled photo(s) in {', '.join(args.data)}: need at least 2"
        )
    if args.val_data:
        val = [s for folder in args.val_data for s in load_dataset(folder).samples]
        train_set, val_groups = samples, [["--val-data"]]
    else:
        train_set, val, val_groups = split_by_scene(samples, args.val_fraction, args.seed)
    print(
        f"{len(train_set)} training photos, {len(val)} validation photos in {len(val_groups)} scene(s) "
        f"held out whole; classes {names}",
        file=sys.stderr,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("\n".join(names) + "\n")
    export_yolo(val, names, out / "val")  # the held-out scenes, ready for evaluate/quantize --eval
    export_yolo(train_set, names, out / "train")  # what it learned from: calibrate quantize on this
    (out / "split.json").write_text(
        json.dumps(
            {
                "train": [str(s.image) for s in train_set],
                "val": [str(s.image) for s in val],
                "val_scenes": val_groups,
            },
            indent=1,
        )
    )

    def pack(ss: Sequence[Sample]) -> list[dict[str, Any]]:
        return [
            {
                "image": str(s.image),
                "boxes": s.boxes.tolist(),
                "classes": list(s.classes),
                "normalized": s.normalized,
            }
            for s in ss
        ]

    from host.ssd_import import extract_ssd

    graph = extract_ssd(args.init, out / "base")  # with the device's runtime, here: not beside TF
    if args.synthetic_negatives:
        from host.render import render_negatives

        folder = out / "synthetic-negatives"
        folder.mkdir(exist_ok=True)
        for i, image in enumerate(render_negatives(args.synthetic_negatives)):
            path = folder / f"negative_{i:03d}.png"
            cv2.imwrite(str(path), image)
            train_set = [*train_set, Sample(path, np.zeros((0, 4)), ())]
        print(
            f"added {args.synthetic_negatives} rendered parcel-free doorsteps (SYNTHETIC) as negatives",
            file=sys.stderr,
        )
    answer = run_job(
        "train",
        train=pack(train_set),
        val=pack(val),
        names=names,
        out=str(out),
        graph=str(graph),
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        resume=args.resume,
    )
    print(
        f"wrote {out / 'model.keras'} (float; {answer.get('parameters', 0):,} parameters), "
        f"{out / 'anchors.npy'}, {out / 'labels.txt'}; best validation AP@0.5 {answer.get('best_ap50', 0):.3f}"
    )
    return answer
