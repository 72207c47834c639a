"""Intel RAPL energy counters (``/sys/class/powercap``), for benchmarks on a PC."""

from __future__ import annotations

import time
from collections.abc import Callable

from device.power.base import PowerMeter, PowerMeterError, PowerReading
from device.power.config import RaplConfig


class RaplMeter(PowerMeter):
    """Mean watts between reads from ``energy_uj``, which wraps at ``max_energy_range_uj``."""

    MIN_INTERVAL_S = 0.05

    def __init__(
        self,
        config: RaplConfig,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = config.path
        self._clock, self._sleep = clock, sleep
        self._range_uj = self._read_uj("max_energy_range_uj")
        name_file = self.path / "name"
        name = name_file.read_text().strip() if name_file.is_file() else self.path.name
        self.source = f"rapl:{name}"
        self._last_uj, self._last_t = self._read_uj("energy_uj"), clock()
        self._last: PowerReading | None = None

    def _read_uj(self, name: str) -> int:
        file = self.path / name
        try:
            return int(file.read_text().strip())
        except FileNotFoundError:
            raise PowerMeterError(
                f"power meter rapl: {file} does not exist; RAPL needs an x86 CPU that has it "
                "(Intel, recent AMD) and the intel_rapl_msr module. On a Pi use pi5_pmic, an INA "
                "sensor or estimate"
            ) from None
        except PermissionError:
            raise PowerMeterError(
                f"power meter rapl: {file}: permission denied; since Linux 5.10 energy_uj is "
                "readable by root only (CVE-2020-8694). Run as root, or make it readable at boot, "
                f"e.g. a systemd-tmpfiles line `z {file} 0444 - - -`"
            ) from None
        except (OSError, ValueError) as exc:
            raise PowerMeterError(f"power meter rapl: cannot read {file}: {exc}") from None

    def read(self) -> PowerReading:
        now = self._clock()
        if now - self._last_t < self.MIN_INTERVAL_S:
            if self._last is not None:
                return self._last  # too soon for a fair mean; the caller sees the same reading
            self._sleep(self.MIN_INTERVAL_S - (now - self._last_t))
            now = self._clock()
        energy = self._read_uj("energy_uj")
        delta = energy - self._last_uj
        if delta < 0:  # the counter wrapped past max_energy_range_uj
            delta += self._range_uj
        interval = now - self._last_t
        self._last_uj, self._last_t = energy, now
        self._last = PowerReading(delta / 1e6 / interval, False, self.source, now, interval)
        return self._last
