"""No meter: a board's idle and full-load watts scaled by the machine's CPU use."""

from __future__ import annotations

import time
from collections.abc import Callable

from device.power.base import PowerMeter, PowerReading
from device.power.config import EstimateConfig
from device.sysstats import SystemCpu


class EstimateMeter(PowerMeter):
    """idle_w + (full_w - idle_w) × the machine's CPU use since the previous read."""

    def __init__(
        self,
        config: EstimateConfig,
        cpu: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_w, self.full_w, name = config.profile()
        self.source = f"estimate:{name}"
        self._cpu = cpu or SystemCpu().sample
        self._clock = clock
        self._last_t = clock()

    def read(self) -> PowerReading:
        share = min(1.0, max(0.0, self._cpu()))
        now = self._clock()
        interval, self._last_t = now - self._last_t, now
        watts = self.idle_w + (self.full_w - self.idle_w) * share
        return PowerReading(watts, True, self.source, now, max(interval, 0.0))
