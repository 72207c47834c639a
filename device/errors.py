"""The errors doorstep raises for bad input: each says what was wrong, where, and what to do."""

from __future__ import annotations

from typing import Any


class DoorstepError(Exception):
    """Base of every error the command-line tools report as a one-line message (exit code 2)."""


class ConfigError(DoorstepError):
    """A configuration file that does not validate."""


class BundleError(DoorstepError):
    """A model bundle that is missing, incomplete, tampered with or inconsistent."""


class ModelError(DoorstepError):
    """A model file that cannot be loaded or whose layout doorstep cannot run."""


class LabelsError(DoorstepError):
    """A label file that does not parse or does not fit the model."""


class DetectorError(DoorstepError):
    """The detector produced outputs that cannot be trusted (NaN, collapsed scores, ...)."""


class CollapsedScoresError(DetectorError):
    """Every class score is zero on a frame that should show something: a collapsed quantization."""


class BrokenOutputsError(DetectorError):
    """Outputs no working model gives: NaN or inf in a tensor, or scores that saturate."""


def format_validation_error(exc: Any, where: str) -> str:
    """A pydantic ``ValidationError`` as one line per problem: ``where: key.path: reason (got
    value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        text = repr(got)
        text = text if len(text) <= 200 else f"{text[:120]}... ({len(text)} characters)"
        shown = "" if isinstance(got, dict | list) else f" (got {text})"
        lines.append(f"{where}: {loc}: {err['msg']}{shown}")
    return "\n".join(lines)
