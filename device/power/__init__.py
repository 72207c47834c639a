"""Power meters, chosen by ``type`` in the config, and energy per inference.

- ``pi5_pmic``: the Raspberry Pi 5's own PMIC, read with ``vcgencmd pmic_read_adc``; the sum of
  volts × amps over its rails. The rails miss conversion losses and the 5 V loads (USB, HATs), so
  a linear calibration (factor and offset) against a USB meter brings it to the wall figure.
- ``ina219``, ``ina226``, ``ina260``: TI current/power monitors on I2C (smbus2), in series with
  the supply.
- ``rapl``: Intel RAPL energy counters (``/sys/class/powercap``), for benchmarks on a PC.
- ``estimate``: no meter: a board's idle and full-load watts scaled by the machine's CPU use,
  always labelled estimated.

``open_meter(config)`` builds one and reads it once, so a wrong address or a missing tool fails
at start-up with a message naming the device. ``EnergyCounter`` turns readings and an
inference count into mean watts and millijoules per inference over a window.

Modules: ``config`` (the pydantic models), ``base`` (reading, meter interface, error), ``pmic``,
``ina``, ``rapl``, ``estimate`` (the meters), ``factory`` (``open_meter``) and ``energy``.
Importing this package loads only ``config`` and ``base``: ``device.config`` imports it at
start-up, so the meters (and what they import: ``device.sysstats``, ``subprocess``; smbus2 only
when a bus is opened) load on first use of one of their names.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from device.power.base import PowerMeter, PowerMeterError, PowerReading
from device.power.config import (
    BOARD_PROFILES,
    EstimateConfig,
    Ina219Config,
    Ina226Config,
    Ina260Config,
    Pi5PmicConfig,
    PowerConfig,
    RaplConfig,
)

if TYPE_CHECKING:
    from device.power.energy import EnergyCounter, EnergySummary
    from device.power.estimate import EstimateMeter
    from device.power.factory import open_meter
    from device.power.ina import BusFactory, I2cBus, Ina219Meter, Ina226Meter, Ina260Meter
    from device.power.pmic import Pi5PmicMeter, parse_pmic_read_adc
    from device.power.rapl import RaplMeter

# Name -> submodule, for the names loaded on first use (PEP 562).
_LAZY = {
    "EnergyCounter": "energy",
    "EnergySummary": "energy",
    "EstimateMeter": "estimate",
    "open_meter": "factory",
    "BusFactory": "ina",
    "I2cBus": "ina",
    "Ina219Meter": "ina",
    "Ina226Meter": "ina",
    "Ina260Meter": "ina",
    "Pi5PmicMeter": "pmic",
    "parse_pmic_read_adc": "pmic",
    "RaplMeter": "rapl",
}

__all__ = [
    "BOARD_PROFILES",
    "BusFactory",
    "EnergyCounter",
    "EnergySummary",
    "EstimateConfig",
    "EstimateMeter",
    "I2cBus",
    "Ina219Config",
    "Ina219Meter",
    "Ina226Config",
    "Ina226Meter",
    "Ina260Config",
    "Ina260Meter",
    "Pi5PmicConfig",
    "Pi5PmicMeter",
    "PowerConfig",
    "PowerMeter",
    "PowerMeterError",
    "PowerReading",
    "RaplConfig",
    "RaplMeter",
    "open_meter",
    "parse_pmic_read_adc",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
