"""Test subjects made from real exports: a ``.tflite`` as older TF 2.x exporters wrote it."""

from __future__ import annotations

from pathlib import Path


def strip_signatures(src: Path, dst: Path) -> None:
    """``src`` with its SignatureDefs removed (TF 2.x exporters of 2021-2023 wrote none)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(src))
    model.signatureDefs = []
    flatbuffer_utils.write_model(model, str(dst))
