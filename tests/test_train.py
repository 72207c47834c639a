"""Training: scene grouping (plain data) and a short real run on real photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_TF, SHARED

from host.datasets import load_dataset
from host.train import group_scenes, scene_key, split_by_scene


def test_scene_keys_from_timestamps_and_counters() -> None:
    assert scene_key(Path("a/IMG_20221104_224626.jpg")) == ("20221104", 22 * 3600 + 46 * 60 + 26)
    assert scene_key(Path("x/PXL_20201103_181906837_jpg.rf.abc.jpg"))[1] == 18 * 3600 + 19 * 60 + 6
    assert scene_key(Path("train/images/IMG_6817_jpg.rf.1234.jpg")) == ("IMG#", 6817)


def test_bursts_group_across_folders() -> None:
    paths = [
        Path(p)
        for p in (
            "t/IMG_20221104_224626.jpg",
            "v/IMG_20221104_224700.jpg",
            "t/IMG_20221104_231000.jpg",
            "train/IMG_6817_jpg.rf.a.jpg",
            "valid/IMG_6819_jpg.rf.b.jpg",
            "train/IMG_6830_jpg.rf.c.jpg",
        )
    ]
    groups = sorted(sorted(p.name for p in g) for g in group_scenes(paths))
    assert groups == [
        ["IMG_20221104_224626.jpg", "IMG_20221104_224700.jpg"],
        ["IMG_20221104_231000.jpg"],
        ["IMG_6817_jpg.rf.a.jpg", "IMG_6819_jpg.rf.b.jpg"],
        ["IMG_6830_jpg.rf.c.jpg"],
    ]


def test_real_split_holds_whole_scenes_out() -> None:
    porch = SHARED / "data" / "porch-2211"
    if not porch.exists():
        pytest.skip("needs ../shared/data/porch-2211")
    samples = load_dataset(porch).samples
    train, val, scenes = split_by_scene(samples, 0.2, seed=0)
    assert len(train) + len(val) == len(samples)
    val_names = {s.image.name for s in val}
    for group in group_scenes([s.image for s in samples]):
        names = {p.name for p in group}
        assert names <= val_names or not names & val_names  # never split a burst
    assert 0.1 * len(samples) <= len(val) <= 0.4 * len(samples)
    assert split_by_scene(samples, 0.2, seed=0)[2] == scenes  # seeded


@pytest.mark.host
@pytest.mark.skipif(not HAS_TF, reason="training needs TensorFlow (main environment)")
@pytest.mark.timeout(600)  # TensorFlow training steps (20 s on a quiet machine)
def test_a_few_steps_on_two_real_photos_lower_the_loss(tmp_path: Path, ssd_model: Path) -> None:
    porch = SHARED / "data" / "porch-2211"
    data = tmp_path / "two"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    for name in ("IMG_20221104_224626", "IMG_20221104_231118"):
        (data / "images" / f"{name}.jpg").symlink_to(porch / "images" / f"{name}.jpg")
        (data / "labels" / f"{name}.txt").write_text((porch / "labels" / f"{name}.txt").read_text())
    (data / "classes.txt").write_text("package\n")
    out = tmp_path / "model"

    def train(epochs: int, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "host.cli",
                "train",
                "--data",
                str(data),
                "--val-data",
                str(data),
                "--init",
                str(ssd_model),
                "--out",
                str(out),
                "--epochs",
                str(epochs),
                "--head-epochs",
                "2",
                "--batch",
                "2",
                "--synthetic-negatives",
                "0",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )

    proc = train(6)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 6/6 [all layers]" in proc.stderr and "val AP@0.5" in proc.stderr
    log = json.loads((out / "training.json").read_text())
    assert len(log["history"]) == 6
    assert (
        log["clean_loss"]["after"] < 0.8 * log["clean_loss"]["before"]
    )  # it learned the two photos
    assert (out / "model.keras").is_file() and (out / "anchors.npy").is_file()
    assert len(list((out / "val" / "images").iterdir())) == 2  # held-out set, ready for --eval
    assert (out / "train" / "classes.txt").read_text() == "package\n"
    # resuming continues after the last epoch and keeps the history
    again = train(7, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed from epoch 6" in again.stderr and "epoch 7/7" in again.stderr
    assert len(json.loads((out / "training.json").read_text())["history"]) == 7
