"""What every power meter shares: the reading, the meter interface and the error."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType

from device.errors import DoorstepError


class PowerMeterError(DoorstepError):
    """A power meter that cannot be opened or read; the message names it and what to do."""


@dataclass(frozen=True)
class PowerReading:
    """One reading. ``at`` is ``time.monotonic()``. ``averaged_over_s`` > 0 means ``watts`` is the
    mean over the seconds before ``at`` (energy counters, CPU-time deltas), not an instant."""

    watts: float
    estimated: bool
    source: str
    at: float
    averaged_over_s: float = 0.0
    volts: float | None = None
    amps: float | None = None


class PowerMeter(ABC):
    """A source of ``PowerReading``; close it (or use it as a context manager) when done."""

    source: str

    @abstractmethod
    def read(self) -> PowerReading:
        """Read the meter now; raise ``PowerMeterError`` saying why if it cannot."""

    def close(self) -> None:  # noqa: B027 - optional: only meters that hold a bus override it
        """Release the bus or files the meter holds."""

    def __enter__(self) -> PowerMeter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
