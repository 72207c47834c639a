"""Energy per inference: readings and an inference count turned into watts and millijoules."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from device.power.base import PowerReading


@dataclass(frozen=True)
class EnergySummary:
    """Energy over a window. ``mj_per_inference`` is the whole board's energy divided by the
    inferences in the window (idle draw included): what each inference costs at this duty cycle."""

    watts: float
    energy_mj: float
    duration_s: float
    inferences: int
    mj_per_inference: float | None
    estimated: bool
    source: str

    def as_payload(self) -> dict[str, Any]:
        """The ``power`` section of the telemetry message."""
        mj = self.mj_per_inference
        return {
            "watts": round(self.watts, 3),
            "estimated": self.estimated,
            "source": self.source,
            "mj_per_inference": None if mj is None else round(mj, 3),
        }


class EnergyCounter:
    """Integrates readings over time and counts inferences, keeping the last ``window_s``.

    Instant readings are joined by trapezoids; averaged readings (RAPL, estimate) cover the
    ``averaged_over_s`` before them. A reading not newer than the previous one is ignored."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._segments: deque[tuple[float, float, float]] = deque()  # (start, end, joules)
        self._inferences: deque[tuple[float, int]] = deque()
        self._last: PowerReading | None = None
        self._estimated = False
        self._source = ""

    def add(self, reading: PowerReading) -> None:
        last = self._last
        if last is not None and reading.at <= last.at:
            return
        if reading.averaged_over_s > 0:
            start = reading.at - reading.averaged_over_s
            if last is not None:
                start = max(start, last.at)
            self._segments.append((start, reading.at, reading.watts * (reading.at - start)))
        elif last is not None:
            joules = (last.watts + reading.watts) / 2 * (reading.at - last.at)
            self._segments.append((last.at, reading.at, joules))
        self._last = reading
        self._estimated, self._source = reading.estimated, reading.source
        while self._segments and self._segments[0][1] <= reading.at - self.window_s:
            self._segments.popleft()
        self._drop_old_inferences()

    def inference(self, count: int = 1, at: float | None = None) -> None:
        """Count ``count`` inferences done at ``at`` (default: now, ``time.monotonic()``)."""
        self._inferences.append((time.monotonic() if at is None else at, count))

    def _drop_old_inferences(self) -> None:
        if self._segments:
            start = self._segments[0][0]
            while self._inferences and self._inferences[0][0] <= start:
                self._inferences.popleft()

    def summary(self) -> EnergySummary | None:
        """Mean watts and millijoules per inference over the window; None before two readings."""
        if not self._segments:
            return None
        start, end = self._segments[0][0], self._segments[-1][1]
        covered = sum(e - s for s, e, _ in self._segments)
        joules = sum(j for _, _, j in self._segments)
        count = sum(n for t, n in self._inferences if start < t <= end)
        return EnergySummary(
            watts=joules / covered if covered > 0 else 0.0,
            energy_mj=joules * 1e3,
            duration_s=covered,
            inferences=count,
            mj_per_inference=joules * 1e3 / count if count else None,
            estimated=self._estimated,
            source=self._source,
        )
