"""The device side must never pull in TensorFlow, Keras or host/ (a Pi installs doorstep[device])."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import device

FORBIDDEN = ("tensorflow", "keras", "tf_keras", "host")
DEVICE_DIR = Path(device.__file__).parent


def _device_modules() -> list[str]:
    return ["device"] + [m.name for m in pkgutil.walk_packages([str(DEVICE_DIR)], prefix="device.")]


def test_importing_every_device_module_loads_no_tensorflow_keras_or_host() -> None:
    modules = _device_modules()
    assert len(modules) > 10  # the walk found the package
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []


def test_no_device_source_file_imports_tensorflow_keras_or_host() -> None:
    offenders = []
    for path in DEVICE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_device_cli_stays_light() -> None:
    """The CLI module imports no runtime, OpenCV or pydantic until a command needs them."""
    heavy = ("cv2", "tflite_runtime", "ai_edge_litert", "pydantic")
    code = f"import sys, device.cli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
