"""The ``power`` section of the device config: one pydantic model per meter ``type``.

Only pydantic and the standard library are imported here, so ``device.config`` can load it at
start-up without pulling in the meters themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Pi5PmicConfig(_Section):
    """The Raspberry Pi 5's PMIC rails (also CM5 and Pi 500), via ``vcgencmd pmic_read_adc``."""

    type: Literal["pi5_pmic"] = Field(description="the Raspberry Pi 5 PMIC")
    vcgencmd: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        "vcgencmd", description="the vcgencmd executable, a name on PATH or a path"
    )
    calibration_factor: Annotated[float, Field(gt=0, le=10)] = Field(
        1.0,
        description="0..10: watts = rail sum × factor + offset; fit both against a USB-C meter "
        "(one board measured 1.1451 and 0.5879 W: github.com/jfikar/RPi5-power)",
    )
    calibration_offset_w: Annotated[float, Field(ge=-5, le=20)] = Field(
        0.0,
        description="watts (-5..20) added after the factor: what the rails never see (losses, "
        "5 V loads)",
    )


def _not_empty(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path names no file or directory: give a path")
    return value


class _InaConfig(_Section):
    bus: Annotated[int, Field(ge=0, le=255)] = Field(
        1,
        description="I2C bus number 0..255, /dev/i2c-<bus>; 1 is the Pi's GPIO header (pins 3 "
        "and 5)",
    )
    address: Annotated[int, Field(ge=0x40, le=0x4F)] = Field(
        0x40, description="7-bit I2C address, 0x40-0x4F as set by the A0/A1 pins"
    )


def _check_shunt_range(shunt_ohms: float, max_amps: float | None, range_v: float) -> None:
    if max_amps is not None and max_amps * shunt_ohms > range_v:
        raise ValueError(
            f"max_expected_amps × shunt_ohms = {max_amps * shunt_ohms * 1e3:g} mV exceeds the "
            f"chip's ±{range_v * 1e3:g} mV shunt range: fit a smaller shunt resistor"
        )


class Ina219Config(_InaConfig):
    """A TI INA219 (26 V, ±320 mV shunt range) on I2C."""

    type: Literal["ina219"] = Field(description="a TI INA219 on I2C")
    shunt_ohms: Annotated[float, Field(gt=0, le=10)] = Field(
        0.1, description="the shunt resistor, (0..10] Ω; 0.1 Ω (R100) on the common boards"
    )
    max_expected_amps: Annotated[float, Field(gt=0, le=100)] | None = Field(
        None,
        description="amps (0..100]: if set, the gain is programmed to the smallest shunt range "
        "that fits this current; null leaves the chip's configuration (power-on: ±320 mV, 3.2 A at 0.1 Ω)",
    )

    @model_validator(mode="after")
    def _fits(self) -> Ina219Config:
        _check_shunt_range(self.shunt_ohms, self.max_expected_amps, 0.32)
        return self


class Ina226Config(_InaConfig):
    """A TI INA226 (36 V, ±81.92 mV shunt range) on I2C."""

    type: Literal["ina226"] = Field(description="a TI INA226 on I2C")
    shunt_ohms: Annotated[float, Field(gt=0, le=10)] = Field(
        0.1,
        description="the shunt resistor, (0..10] Ω; at 0.1 Ω (R100) the chip tops out at 0.82 A, less than "
        "a Pi 4 or 5 draws: boards for a Pi use 0.01 Ω (R010)",
    )
    max_expected_amps: Annotated[float, Field(gt=0, le=100)] | None = Field(
        None, description="amps (0..100], checked against the shunt range at load"
    )

    @model_validator(mode="after")
    def _fits(self) -> Ina226Config:
        _check_shunt_range(self.shunt_ohms, self.max_expected_amps, 0.08192)
        return self


class Ina260Config(_InaConfig):
    """A TI INA260 (integrated 2 mΩ shunt, ±15 A, 36 V) on I2C."""

    type: Literal["ina260"] = Field(description="a TI INA260 on I2C")


class RaplConfig(_Section):
    """Intel RAPL energy counters: the CPU package of a PC running doorstep's benchmarks."""

    type: Literal["rapl"] = Field(description="Intel/AMD RAPL energy counters")
    path: Annotated[Path, BeforeValidator(_not_empty)] = Field(
        Path("/sys/class/powercap/intel-rapl:0"),
        description="a powercap zone; intel-rapl:0 is CPU package 0, not the whole machine",
    )


# Board profiles: (idle W, all-core-load W) at the 5 V input, headless, nothing on USB.
# pi4 and pi3 (3 B+): Jeff Geerling's measurements, pidramble.com/wiki/benchmarks/power-consumption
#   (Pi 4 B 540 mA / 1280 mA under `stress --cpu 4`; 3 B+ 350 mA / 980 mA).
# pi_zero2: idle 120 mA @ 5 V measured by CNX Software (2021-12-09, "A deep dive into Raspberry
#   Pi Zero 2 W's power consumption"); the load figure is a plausible ~600 mA, not a measurement.
# pi5: rounded from published wall-meter figures (about 3 W idle; 7.9 W under Geekbench is
#   quoted in github.com/geerlingguy/sbc-reviews/issues/21); all-core load is put at 8 W.
BOARD_PROFILES: dict[str, tuple[float, float]] = {
    "pi5": (3.0, 8.0),
    "pi4": (2.7, 6.4),
    "pi3": (1.9, 5.1),
    "pi_zero2": (0.6, 3.0),
}


class EstimateConfig(_Section):
    """No meter: a board profile's idle and full-load watts, scaled by the machine's CPU use."""

    type: Literal["estimate"] = Field(description="no meter: an estimate from CPU use")
    board: Literal["pi5", "pi4", "pi3", "pi_zero2"] | None = Field(
        None, description="a built-in profile (idle W, full-load W); idle_w/full_w override it"
    )
    idle_w: Annotated[float, Field(ge=0, le=500)] | None = Field(
        None, description="watts (0..500) with the CPU idle"
    )
    full_w: Annotated[float, Field(ge=0, le=500)] | None = Field(
        None, description="watts (0..500) with every core busy"
    )

    @model_validator(mode="after")
    def _complete(self) -> EstimateConfig:
        if self.board is None and (self.idle_w is None or self.full_w is None):
            raise ValueError(
                f"give a board ({', '.join(BOARD_PROFILES)}) or both idle_w and full_w"
            )
        idle, full, _ = self.profile()
        if full < idle:
            raise ValueError(f"full_w ({full:g}) is below idle_w ({idle:g})")
        return self

    def profile(self) -> tuple[float, float, str]:
        """``(idle W, full-load W, name)`` after applying the overrides."""
        idle, full = BOARD_PROFILES[self.board] if self.board else (0.0, 0.0)
        idle = idle if self.idle_w is None else self.idle_w
        full = full if self.full_w is None else self.full_w
        return idle, full, self.board or "custom"


PowerConfig = Annotated[
    Pi5PmicConfig | Ina219Config | Ina226Config | Ina260Config | RaplConfig | EstimateConfig,
    Field(discriminator="type"),
]
