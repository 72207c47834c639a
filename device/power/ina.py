"""TI INA219, INA226 and INA260 current/power monitors on I2C.

smbus2 is imported only when a meter opens a real bus, so this module loads anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from device.power.base import PowerMeter, PowerMeterError, PowerReading
from device.power.config import Ina219Config, Ina226Config, _InaConfig


class I2cBus(Protocol):
    """The part of ``smbus2.SMBus`` the INA meters use."""

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]: ...

    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: Sequence[int], force: bool | None = None
    ) -> None: ...

    def close(self) -> None: ...


BusFactory = Callable[[int], I2cBus]


def _smbus(bus: int) -> I2cBus:
    from smbus2 import SMBus  # the only hardware import, kept here so the rest runs anywhere

    smbus: I2cBus = SMBus(bus)
    return smbus


def _signed(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


_TI_MANUFACTURER_ID = 0x5449  # "TI" in ASCII
_DIE_IDS = {0x226: "ina226", 0x227: "ina260"}  # register 0xFF, bits 15-4 (3-0: die revision)


class _InaMeter(PowerMeter):
    chip: str
    die_id: int | None = None

    def __init__(self, config: _InaConfig, bus_factory: BusFactory | None = None) -> None:
        self.config = config
        self.source = f"{self.chip}@{config.bus}:0x{config.address:02x}"
        self._where = (
            f"power meter {self.chip.upper()} at address 0x{config.address:02x} on I2C bus "
            f"{config.bus} (/dev/i2c-{config.bus})"
        )
        self._bus: I2cBus | None = None
        try:
            self._bus = (bus_factory or _smbus)(config.bus)
        except FileNotFoundError:
            raise PowerMeterError(
                f"{self._where}: no such bus; enable I2C (`raspi-config nonint do_i2c 0`, or "
                "dtparam=i2c_arm=on in config.txt) and reboot"
            ) from None
        except PermissionError:
            raise PowerMeterError(
                f"{self._where}: permission denied; add the service user to the `i2c` group"
            ) from None
        except OSError as exc:
            raise PowerMeterError(f"{self._where}: cannot open the bus: {exc}") from None
        try:
            self._identify()
            self._setup()
            self.read()
        except BaseException:
            self.close()
            raise

    def _open_bus(self) -> I2cBus:
        if self._bus is None:
            raise PowerMeterError(f"{self._where}: the meter is closed")
        return self._bus

    def _get(self, register: int) -> int:
        # These chips send the most significant byte first. SMBus "read word" assumes the least
        # significant byte first (smbus2's read_word_data would need a byte swap), so read the
        # two bytes as a block and assemble them in the chip's order.
        try:
            data = self._open_bus().read_i2c_block_data(self.config.address, register, 2)
        except OSError as exc:
            raise PowerMeterError(
                f"{self._where}: reading register 0x{register:02x} failed: {exc}; is the chip "
                f"wired and powered? `i2cdetect -y {self.config.bus}` lists what answers"
            ) from None
        if len(data) != 2:
            raise PowerMeterError(f"{self._where}: register 0x{register:02x} gave {data!r}")
        return data[0] << 8 | data[1]

    def _set(self, register: int, value: int) -> None:
        try:
            self._open_bus().write_i2c_block_data(
                self.config.address, register, [value >> 8 & 0xFF, value & 0xFF]
            )
        except OSError as exc:
            raise PowerMeterError(
                f"{self._where}: writing register 0x{register:02x} failed: {exc}"
            ) from None

    def _identify(self) -> None:
        if self.die_id is None:  # the INA219 has no ID registers: a readable config will do
            self._get(0x00)
            return
        maker, die = self._get(0xFE), self._get(0xFF)
        if maker == _TI_MANUFACTURER_ID and die >> 4 == self.die_id:
            return
        found = f"manufacturer ID 0x{maker:04x}, die ID 0x{die:04x}"
        if maker == _TI_MANUFACTURER_ID and die >> 4 in _DIE_IDS:
            hint = f"that is an {_DIE_IDS[die >> 4].upper()}: set power.type: {_DIE_IDS[die >> 4]}"
        else:
            hint = "another device answers at this address; check the A0/A1 pins and `i2cdetect`"
        raise PowerMeterError(
            f"{self._where}: expected manufacturer ID 0x{_TI_MANUFACTURER_ID:04x} and die ID "
            f"0x{self.die_id:03x}x, found {found}; {hint}"
        )

    def _setup(self) -> None:
        """Program the chip, if this meter needs to."""

    def _reading(self, volts: float, amps: float, watts: float | None = None) -> PowerReading:
        # The sign of the current only says which way round the shunt is wired.
        w = volts * abs(amps) if watts is None else watts
        return PowerReading(w, False, self.source, time.monotonic(), volts=volts, amps=amps)

    def _clipped(self, limit_v: float) -> PowerMeterError:
        shunt = getattr(self.config, "shunt_ohms", 0.002)
        return PowerMeterError(
            f"{self._where}: shunt voltage at the end of its ±{limit_v * 1e3:g} mV range, so the "
            f"reading is clipped: the current exceeds {limit_v / shunt:.3g} A. Use a smaller shunt"
            + (" or set max_expected_amps" if self.chip == "ina219" else "")
        )

    def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.close()


class Ina219Meter(_InaMeter):
    """INA219: shunt register 0x01 (10 µV/bit, signed), bus register 0x02 (bits 15-3, 4 mV/bit).

    Current is shunt voltage / shunt_ohms and power bus V × current, so the chip's calibration
    register (and its current and power registers) are not needed."""

    chip = "ina219"
    config: Ina219Config
    _PGA_RANGES_V = (0.04, 0.08, 0.16, 0.32)  # PG bits 12-11 = 0..3

    def _setup(self) -> None:
        amps = self.config.max_expected_amps
        if amps is None:
            return
        pg = next(i for i, r in enumerate(self._PGA_RANGES_V) if r >= amps * self.config.shunt_ohms)
        # The power-on configuration 0x399F (32 V bus range, 12-bit, continuous) with this gain.
        self._set(0x00, 0x399F & ~0x1800 | pg << 11)

    def read(self) -> PowerReading:
        range_v = self._PGA_RANGES_V[self._get(0x00) >> 11 & 0b11]
        raw = _signed(self._get(0x01))
        if abs(raw) * 10e-6 >= range_v:
            raise self._clipped(range_v)
        volts = (self._get(0x02) >> 3) * 4e-3
        return self._reading(volts, raw * 10e-6 / self.config.shunt_ohms)


class Ina226Meter(_InaMeter):
    """INA226: shunt register 0x01 (2.5 µV/bit, signed), bus register 0x02 (1.25 mV/bit)."""

    chip = "ina226"
    config: Ina226Config
    die_id = 0x226

    def read(self) -> PowerReading:
        raw = _signed(self._get(0x01))
        if raw >= 0x7FFF or raw <= -0x8000:
            raise self._clipped(0.08192)
        volts = self._get(0x02) * 1.25e-3
        return self._reading(volts, raw * 2.5e-6 / self.config.shunt_ohms)


class Ina260Meter(_InaMeter):
    """INA260: current 0x01 (1.25 mA/bit, signed), bus 0x02 (1.25 mV/bit), power 0x03 (10 mW/bit).

    Watts come from the chip's power register: it multiplies per sample, so it stays right when
    averaging is on and the load varies."""

    chip = "ina260"
    die_id = 0x227

    def read(self) -> PowerReading:
        amps = _signed(self._get(0x01)) * 1.25e-3
        volts = self._get(0x02) * 1.25e-3
        return self._reading(volts, amps, self._get(0x03) * 10e-3)
