"""``open_meter``: the meter a config describes, read once so problems surface at start-up."""

from __future__ import annotations

from device.power.base import PowerMeter
from device.power.config import (
    Ina219Config,
    Ina226Config,
    Ina260Config,
    Pi5PmicConfig,
    PowerConfig,
    RaplConfig,
)
from device.power.estimate import EstimateMeter
from device.power.ina import Ina219Meter, Ina226Meter, Ina260Meter
from device.power.pmic import Pi5PmicMeter
from device.power.rapl import RaplMeter


def open_meter(config: PowerConfig) -> PowerMeter:
    """Build the meter ``config`` describes and read it once, so problems surface at start-up."""
    if isinstance(config, Pi5PmicConfig):
        return Pi5PmicMeter(config)
    if isinstance(config, Ina219Config):
        return Ina219Meter(config)
    if isinstance(config, Ina226Config):
        return Ina226Meter(config)
    if isinstance(config, Ina260Config):
        return Ina260Meter(config)
    if isinstance(config, RaplConfig):
        meter = RaplMeter(config)
        meter.read()
        return meter
    return EstimateMeter(config)
