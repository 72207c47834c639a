"""Per-stage latency windows and the periodic telemetry report.

Each stage keeps its last ``window`` samples (milliseconds); a report gives p50, p95 and max of
each, the frame and inference rates since the last report, the share of frames the motion gate
skipped, dropped frames, this process's CPU use and RSS, the CPU temperature, throttling flags
(on a Pi) and power, with millijoules per inference when a meter is configured.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGES = (
    "capture_wait",
    "motion",
    "preprocess",
    "invoke",
    "decode",
    "presence",
    "publish",
    "pipeline",
)


class StageWindow:
    """The last ``size`` samples of each stage, in milliseconds."""

    def __init__(self, size: int = 600) -> None:
        self.size = size
        self._samples: dict[str, deque[float]] = {}

    def add(self, stage: str, ms: float) -> None:
        q = self._samples.get(stage)
        if q is None:
            q = self._samples[stage] = deque(maxlen=self.size)
        q.append(ms)

    def recent(self, stage: str, n: int) -> list[float]:
        """The last ``n`` samples of ``stage`` (oldest first)."""
        q = self._samples.get(stage)
        return list(q)[-n:] if q else []

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage in sorted(self._samples, key=lambda s: STAGES.index(s) if s in STAGES else 99):
            q = self._samples[stage]
            if not q:
                continue
            a = np.fromiter(q, dtype=np.float64, count=len(q))
            p50, p95 = np.percentile(a, [50, 95])
            out[stage] = {
                "p50": round(float(p50), 3),
                "p95": round(float(p95), 3),
                "max": round(float(a.max()), 3),
                "n": len(q),
            }
        return out


@dataclass
class Counters:
    frames: int = 0
    inferences: int = 0
    skipped: int = 0
    dropped: int = 0


@dataclass
class Telemetry:
    """Collects stage times and counts; ``report()`` returns the payload fields for a window."""

    interval_s: float = 60.0
    window: StageWindow = field(default_factory=StageWindow)
    health: Callable[[], dict[str, Any]] | None = None  # cpu, rss, temperature, power
    clock: Callable[[], float] = time.monotonic
    total: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._start = self._last = self.clock()
        self._at_last = Counters()

    def stage(self, name: str, ms: float) -> None:
        self.window.add(name, ms)

    def due(self) -> bool:
        return self.clock() - self._last >= self.interval_s

    def report(self) -> dict[str, Any]:
        now = self.clock()
        span = max(now - self._last, 1e-9)
        t, a = self.total, self._at_last
        frames, inferences = t.frames - a.frames, t.inferences - a.inferences
        fields: dict[str, Any] = {
            "time": round(time.time(), 3),
            "uptime_s": round(now - self._start, 3),
            "window_s": round(span, 3),
            "frames": frames,
            "inferences": inferences,
            "fps": round(frames / span, 3),
            "inference_fps": round(inferences / span, 3),
            "skipped_by_motion": round((t.skipped - a.skipped) / frames, 4) if frames else 0.0,
            "dropped": max(0, t.dropped - a.dropped),
            "stages_ms": self.window.summary(),
        }
        fields.update(self.health() if self.health is not None else {})
        self._last = now
        self._at_last = Counters(t.frames, t.inferences, t.skipped, t.dropped)
        return fields
