"""CPU, memory, temperature, throttling and power, for the telemetry reports."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from device.errors import DoorstepError

if TYPE_CHECKING:  # the meters are imported only when one is configured
    from device.config import TelemetryConfig
    from device.power import EnergyCounter, PowerConfig, PowerMeter


class Health:
    """Process and board health; with a power meter, it is read every
    ``telemetry.power_sample_s`` from the frame loop and the readings are integrated
    (``EnergyCounter``) into mean watts and millijoules per inference over the report window."""

    def __init__(self, telemetry: TelemetryConfig, power: PowerConfig | None) -> None:
        from device import sysstats

        self._sys = sysstats
        self._cpu = sysstats.ProcessCpu()
        self._meter: PowerMeter | None = None
        self._energy: EnergyCounter | None = None
        self._every = telemetry.power_sample_s
        self._next = 0.0
        if power is not None:
            from device.power import EnergyCounter, open_meter

            self._meter = open_meter(power)
            self._energy = EnergyCounter(window_s=telemetry.interval_s)

    def inference(self) -> None:
        if self._energy is not None:
            self._energy.inference()

    def sample(self, force: bool = False) -> None:
        """Read the meter if a sample is due (cheap to call every frame)."""
        if self._meter is None or self._energy is None:
            return
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._every
        try:
            self._energy.add(self._meter.read())
        except DoorstepError as exc:
            print(f"doorstep: power meter: {exc}", file=sys.stderr)

    def __call__(self) -> dict[str, Any]:
        power = None
        if self._energy is not None:
            self.sample(force=True)
            summary = self._energy.summary()
            power = summary.as_payload() if summary is not None else None
        try:
            flags = self._sys.throttled()
        except DoorstepError:
            flags = None
        return {
            "cpu_percent": round(self._cpu.sample() * 100, 2),
            "rss_mb": round(self._sys.rss_mb(), 1),
            "cpu_temp_c": self._sys.cpu_temp_c(),
            "throttled": flags,
            "power": power,
        }
