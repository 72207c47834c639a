"""The wheel is what a Pi installs: device code, the int8 bundle, the shipped template and unit;
never the host's code, its 12.8 MB float Keras model or its training assets, however the tree
was built."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from device.errors import DoorstepError
from host.wheel import build_device_wheel, check_device_wheel, device_pyproject

pytestmark = pytest.mark.host  # builds with the host's tools
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_device_wheel_holds_only_what_a_pi_runs(tmp_path: Path) -> None:
    assert (ROOT / "host" / "models").is_dir()  # in the checkout: the build must leave it
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "wheel", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("doorstep-*.whl")
    assert f"{wheel}: " in proc.stdout and "MB" in proc.stdout
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("host/") or n.endswith(".keras")]
    assert "device/models/parcel-ssd/model.tflite" in names  # the device's own bundle is there
    assert "device/models/parcel-ssd/manifest.json" in names
    # what `doorstep-device init` and `unit` write on a Pi that has only the wheel
    assert {"device/share/device.yaml", "device/share/doorstep-device.service"} <= set(names)
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
        points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "License-Expression: Apache-2.0" in metadata  # SPDX (PEP 639)
    assert 'opencv-python-headless<6,>=4.12; python_version >= "3.12"' in metadata
    assert "Provides-Extra: device" in metadata and "Provides-Extra: host" not in metadata
    assert "doorstep-device = device.cli:main" in points and "doorstep-host" not in points
    assert wheel.stat().st_size < 5_000_000, f"{wheel.stat().st_size:,} bytes"


def test_a_wheel_with_host_code_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "doorstep-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("host/models/parcel-ssd.keras", b"float model")
        zf.writestr("device/cli.py", b"")
    with pytest.raises(DoorstepError, match="not a device wheel: host/models/parcel-ssd.keras"):
        check_device_wheel(wheel)


def test_a_pyproject_the_cut_down_does_not_recognise_fails_loudly() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    cut = device_pyproject(text)
    settings = [
        line for line in cut.split("[tool.pytest")[0].splitlines() if not line.startswith("#")
    ]
    assert not [line for line in settings if "host" in line.replace("localhost", "")]
    with pytest.raises(DoorstepError, match="update host/wheel.py"):
        device_pyproject(text.replace('include = ["device*", "host*"]', 'include = ["*"]'))


def test_variants_for_tests_are_built_the_same_way(tmp_path: Path) -> None:
    def bump(src: Path) -> None:
        path = src / "pyproject.toml"
        path.write_text(path.read_text().replace('version = "0.1.0"', 'version = "0.1.9"'))

    wheel = build_device_wheel(ROOT, tmp_path, edit=bump)
    assert wheel.name == "doorstep-0.1.9-py3-none-any.whl"


@pytest.mark.timeout(300)
def test_the_full_wheel_leaves_the_float_model_out_even_with_a_stale_egg_info(
    tmp_path: Path,
) -> None:
    """The checkout's own wheel (host and device, for a workstation) is built in place, where
    an egg-info from an older build may list host/models/: it still carries no float model."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("device", "host"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert (src / "host" / "models" / "parcel-ssd.keras").is_file()
    stale = src / "doorstep.egg-info"
    stale.mkdir()
    (stale / "SOURCES.txt").write_text(
        "".join(f"host/models/{p.name}\n" for p in (src / "host" / "models").iterdir())
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("doorstep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "host/cli.py" in names  # the full wheel: host code is in it
    assert not [n for n in names if n.startswith("host/models/") or n.endswith(".keras")]
