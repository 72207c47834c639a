"""The default parcel detector shipped with doorstep (see MODEL_CARD.md beside this file)."""

from __future__ import annotations

from pathlib import Path

from device.errors import ModelError

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "parcel-ssd"


def default_bundle() -> Path:
    """The shipped int8 parcel bundle; used when a command or config names no model."""
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        raise ModelError(
            f"no default model at {DEFAULT_BUNDLE} (this install lacks it): pass --model or set model.path"
        )
    return DEFAULT_BUNDLE
