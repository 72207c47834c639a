"""The wheel is what a Pi installs: it carries the device's int8 bundle, never the host's
12.8 MB float Keras model or its training assets (host/models/), however the tree was built."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_wheel_leaves_the_host_models_out(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("device", "host"):  # host/models/ comes along: the build must leave it
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert (src / "host" / "models").is_dir() and any((src / "host" / "models").iterdir())
    out = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("doorstep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("host/models/") or n.endswith(".keras")]
    assert "device/models/parcel-ssd/model.tflite" in names  # the device's own bundle is there
    assert "device/models/parcel-ssd/manifest.json" in names
    # what `doorstep-device init` and `unit` write on a Pi that has only the wheel
    assert {"device/share/device.yaml", "device/share/doorstep-device.service"} <= set(names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(meta).decode()
    assert "License-Expression: Apache-2.0" in metadata  # SPDX (PEP 639)
    assert "opencv-python-headless<6,>=4.12; python_version >= \"3.12\"" in metadata
    assert wheel.stat().st_size < 5_000_000, f"{wheel.stat().st_size:,} bytes"
