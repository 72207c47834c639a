"""``doorstep-host wheel``: the wheel a Pi installs, built from this checkout's device code only.

One ``pyproject.toml`` describes the whole checkout (device and host, for the editable installs
of development). A Pi runs only ``device/``, so the device wheel is built from a copy of
``device/`` with that file cut down to it: no ``host`` package (so none of the quantization,
training or fleet code, and never the float model under ``host/models/``), no
``doorstep-host`` command, no ``host`` extra. A build in a temporary directory also means a
``build/`` left in the checkout by an older build cannot leak into the wheel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from device.errors import DoorstepError

REQUIRED = ("device/share/device.yaml", "device/share/doorstep-device.service",
            "device/models/parcel-ssd/model.tflite")  # fmt: skip


def device_pyproject(text: str) -> str:
    """``pyproject.toml`` for the device wheel: everything about ``host`` taken out. Fails when
    a line it expects is gone, so a change to the file cannot silently put host code back."""
    edits = [
        (r'(?m)^include = \["device\*", "host\*"\]$', 'include = ["device*"]'),
        (r'(?m)^(# host/models/ holds no code.*\n)(#.*\n)*exclude = \["host\.models\*"\]\n', ""),
        (r'(?m)^doorstep-host = "host\.cli:main"\n', ""),
        (r"(?ms)^host = \[\n.*?^\]\n", ""),  # the host extra
        (r'(?m)^host = \["py\.typed"\]\n', ""),  # its package data
        (
            r"(?ms)^\[tool\.setuptools\.exclude-package-data\]\n(?:#[^\n]*\n)*"
            r'host = \["models/\*\*"\]\n',
            "",
        ),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, count=1)
        if count != 1:
            raise DoorstepError(f"pyproject.toml: no match for {pattern!r}: update host/wheel.py")
    return text


def build_device_wheel(root: Path, out: Path, edit: Callable[[Path], None] | None = None) -> Path:
    """Build the device wheel of the checkout at ``root`` into ``out``; return its path.

    ``edit(src)`` may change the copied sources before the build (tests make variants)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="doorstep-wheel-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(
            root / "device", src / "device", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        shutil.copy2(root / "README.md", src / "README.md")
        (src / "pyproject.toml").write_text(device_pyproject((root / "pyproject.toml").read_text()))
        if edit is not None:
            edit(src)
        before = set(out.glob("doorstep-*.whl"))
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--quiet", "--disable-pip-version-check", "-w", str(out), str(src)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    if build.returncode != 0:
        raise DoorstepError(f"building the device wheel failed:\n{build.stderr.strip()[-2000:]}")
    made = sorted(set(out.glob("doorstep-*.whl")) - before) or sorted(
        out.glob("doorstep-*.whl"), key=lambda p: p.stat().st_mtime
    )
    wheel = made[-1]
    check_device_wheel(wheel)
    return wheel


def check_device_wheel(wheel: Path) -> list[str]:
    """Refuse a wheel that carries host code or lacks what a Pi needs; return its names."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        entry_points = zf.read(meta).decode() if meta else ""
    problems = [n for n in names if n.startswith("host/")][:3]
    problems += [f"missing {n}" for n in REQUIRED if n not in names]
    if "doorstep-host" in entry_points:
        problems.append("the doorstep-host command")
    if problems:
        raise DoorstepError(f"{wheel}: not a device wheel: {', '.join(problems)}")
    return names
