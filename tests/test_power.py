"""Power meters and device health.

No Raspberry Pi 5, INA2xx sensor or RAPL zone is attached here, so the hardware meters are fed
recorded real outputs and register dumps (tests/data/power, sources in its README.md). The I2C
meters talk to ``SMBusStandIn``, a stand-in for ``smbus2.SMBus`` serving such a dump. Commands,
/proc and the process's own memory and CPU are real.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from device import sysstats
from device.errors import DoorstepError
from device.power import (
    EnergyCounter,
    EstimateConfig,
    EstimateMeter,
    Ina219Config,
    Ina219Meter,
    Ina226Config,
    Ina226Meter,
    Ina260Config,
    Ina260Meter,
    Pi5PmicConfig,
    Pi5PmicMeter,
    PowerConfig,
    PowerMeterError,
    PowerReading,
    RaplConfig,
    RaplMeter,
    open_meter,
    parse_pmic_read_adc,
)
from device.sysstats import CommandError, ProcessCpu, SystemCpu

DATA = Path(__file__).resolve().parent / "data" / "power"
ABSENT = "doorstep-test-no-such-vcgencmd"


def _text(name: str) -> str:
    return (DATA / name).read_text()


def _runner(text: str) -> sysstats.CommandRunner:
    def run(argv: Sequence[str]) -> str:
        return text

    return run


# ---- Raspberry Pi 5 PMIC ------------------------------------------------------------------------


def test_pmic_rails_are_paired_by_name_and_voltage_only_rails_left_out() -> None:
    rails = parse_pmic_read_adc(_text("pmic_read_adc.txt"))
    assert len(rails) == 12
    assert rails["VDD_CORE"] == (0.86173300, 6.22421000)
    assert rails["3V7_WL_SW"] == (3.69977600, 0.09368929)
    assert "EXT5V" not in rails and "BATT" not in rails
    # The heavy capture has an RTC battery at 3.01 V, but no current: still not a rail.
    assert "BATT" not in parse_pmic_read_adc(_text("pmic_read_adc_heavy.txt"))


def test_pmic_watts_are_the_rail_sum_computed_by_hand() -> None:
    meter = Pi5PmicMeter(Pi5PmicConfig(type="pi5_pmic"), runner=_runner(_text("pmic_read_adc.txt")))
    by_hand = (
        3.69977600 * 0.09368929  # 3V7_WL_SW
        + 3.31003300 * 0.08783370  # 3V3_SYS
        + 1.80512600 * 0.18054710  # 1V8_SYS
        + 1.10476100 * 0.22543980  # DDR_VDD2
        + 0.60146460 * 0.06666720  # DDR_VDDQ
        + 1.11025500 * 0.17566740  # 1V1_SYS
        + 0.80146440 * 0.37670900  # 0V8_SW
        + 0.86173300 * 6.22421000  # VDD_CORE
        + 3.31318300 * 0.00006105  # 3V3_DAC
        + 3.30677300 * 0.00036630  # 3V3_ADC
        + 0.80029220 * 0.00305250  # 0V8_AON
        + 5.08664000 * 0.02417580  # HDMI
    )
    reading = meter.read()
    assert reading.watts == pytest.approx(by_hand, rel=1e-12)
    assert reading.watts == pytest.approx(7.2398, abs=1e-4)
    assert reading.source == "pi5_pmic" and not reading.estimated


def test_pmic_calibration_factor_and_offset() -> None:
    cfg = Pi5PmicConfig(type="pi5_pmic", calibration_factor=1.1451, calibration_offset_w=0.5879)
    meter = Pi5PmicMeter(cfg, runner=_runner(_text("pmic_read_adc_idle.txt")))
    assert meter.read().watts == pytest.approx(1.9678110 * 1.1451 + 0.5879, abs=1e-6)


def test_pmic_idle_load_and_heavy_captures_rank_in_order() -> None:
    watts = [
        Pi5PmicMeter(Pi5PmicConfig(type="pi5_pmic"), runner=_runner(_text(name))).read().watts
        for name in ("pmic_read_adc_idle.txt", "pmic_read_adc.txt", "pmic_read_adc_heavy.txt")
    ]
    assert watts == sorted(watts)
    assert 1.5 < watts[0] < 2.5 and watts[2] > 10


def test_pmic_output_cut_off_after_the_currents_has_no_rails() -> None:
    lines = _text("pmic_read_adc.txt").splitlines()
    assert parse_pmic_read_adc("\n".join(lines[:12])) == {}
    half = parse_pmic_read_adc("\n".join(lines[:14]))  # currents, then two voltages
    assert list(half) == ["3V7_WL_SW", "3V3_SYS"]
    with pytest.raises(PowerMeterError, match="no rail readings"):
        Pi5PmicMeter(Pi5PmicConfig(type="pi5_pmic"), runner=_runner("\n".join(lines[:12])))


def test_pmic_output_separated_by_nuls_parses_the_same() -> None:
    text = _text("pmic_read_adc.txt")
    assert parse_pmic_read_adc(text.replace("\n", "\x00")) == parse_pmic_read_adc(text)


def test_missing_vcgencmd_is_a_clear_error() -> None:
    assert shutil.which(ABSENT) is None
    with pytest.raises(PowerMeterError, match=f"{ABSENT}: command not found.*raspi-utils"):
        Pi5PmicMeter(Pi5PmicConfig(type="pi5_pmic", vcgencmd=ABSENT))


@pytest.mark.skipif(shutil.which("vcgencmd") is not None, reason="this machine has vcgencmd")
def test_open_meter_fails_at_start_where_there_is_no_vcgencmd() -> None:
    with pytest.raises(PowerMeterError, match="vcgencmd: command not found"):
        open_meter(Pi5PmicConfig(type="pi5_pmic"))


def test_vcgencmd_failing_for_want_of_the_video_group_says_so(tmp_path: Path) -> None:
    script = tmp_path / "vcgencmd"
    script.write_text("#!/bin/sh\necho 'VCHI initialization failed' >&2\nexit 255\n")
    script.chmod(0o755)
    with pytest.raises(PowerMeterError, match=r"exit status 255\): VCHI.*`video` group"):
        Pi5PmicMeter(Pi5PmicConfig(type="pi5_pmic", vcgencmd=str(script)))


def test_a_board_without_pmic_read_adc_is_named() -> None:
    # What vcgencmd prints for a command the firmware lacks (e.g. on a Pi 4).
    runner = _runner('error=1 error_msg="Command not registered"\n')
    with pytest.raises(PowerMeterError, match="no rail readings.*Raspberry Pi 5"):
        Pi5PmicMeter(Pi5PmicConfig(type="pi5_pmic"), runner=runner)


# ---- INA219 / INA226 / INA260 -------------------------------------------------------------------


class SMBusStandIn:
    """A STAND-IN for ``smbus2.SMBus`` (no I2C sensor is attached here). It serves recorded
    register dumps, one per address, as the chips do: 16-bit registers sent most significant byte
    first. ``read_word_data`` behaves like SMBus "read word", which takes the first byte as the
    least significant, so on these chips it returns the value byte-swapped. A missing device
    fails with errno 121 (EREMOTEIO), as Linux reports a NACK."""

    def __init__(
        self,
        bus: int | str | None = None,
        force: bool = False,
        *,
        devices: dict[int, dict[int, int]],
    ) -> None:
        self.bus, self.devices = bus, devices
        self.writes: list[tuple[int, int, list[int]]] = []
        self.closed = False

    def _register(self, addr: int, register: int) -> int:
        if addr not in self.devices or register not in self.devices[addr]:
            raise OSError(121, "Remote I/O error")
        return self.devices[addr][register]

    def read_i2c_block_data(
        self, i2c_addr: int, register: int, length: int, force: bool | None = None
    ) -> list[int]:
        assert length == 2, "these chips have 16-bit registers"
        value = self._register(i2c_addr, register)
        return [value >> 8, value & 0xFF]

    def read_word_data(self, i2c_addr: int, register: int, force: bool | None = None) -> int:
        value = self._register(i2c_addr, register)
        return (value & 0xFF) << 8 | value >> 8

    def write_i2c_block_data(
        self, i2c_addr: int, register: int, data: Sequence[int], force: bool | None = None
    ) -> None:
        self._register(i2c_addr, 0x00)  # the device must answer
        self.writes.append((i2c_addr, register, list(data)))
        self.devices[i2c_addr][register] = data[0] << 8 | data[1]

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> SMBusStandIn:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _dump(name: str, **changes: int) -> dict[int, int]:
    regs = {int(k, 16): int(v, 16) for k, v in json.loads(_text(name))["registers"].items()}
    for key, value in changes.items():
        regs[int(key[1:], 16)] = value
    return regs


class _Buses:
    """A bus factory handing out stand-ins, kept for inspection."""

    def __init__(self, devices: dict[int, dict[int, int]]) -> None:
        self.devices = devices
        self.opened: list[SMBusStandIn] = []

    def __call__(self, bus: int) -> SMBusStandIn:
        self.opened.append(SMBusStandIn(bus, devices=self.devices))
        return self.opened[-1]


def test_stand_in_word_reads_come_byte_swapped_like_real_smbus() -> None:
    bus = SMBusStandIn(1, devices={0x40: _dump("ina219_datasheet_example.json")})
    assert bus.read_i2c_block_data(0x40, 0x01, 2) == [0x07, 0xD0]
    assert bus.read_word_data(0x40, 0x01) == 0xD007  # why the meters do not use word reads


def test_ina219_decodes_the_datasheet_example() -> None:
    # SBOS448F Table 3: shunt 0x07D0 = 2000 × 10 µV = 20 mV over 2 mΩ = 10 A;
    # bus 0x5D98 >> 3 = 2995 × 4 mV = 11.98 V; 11.98 V × 10 A = 119.8 W.
    buses = _Buses({0x40: _dump("ina219_datasheet_example.json")})
    meter = Ina219Meter(Ina219Config(type="ina219", shunt_ohms=0.002), bus_factory=buses)
    r = meter.read()
    assert r.volts == pytest.approx(11.98, abs=1e-12)
    assert r.amps == pytest.approx(10.0, abs=1e-12)
    assert r.watts == pytest.approx(119.8, abs=1e-9)
    assert r.source == "ina219@1:0x40" and not r.estimated
    assert buses.opened[0].bus == 1 and buses.opened[0].writes == []  # configuration untouched
    meter.close()
    assert buses.opened[0].closed


def test_ina226_decodes_the_datasheet_example() -> None:
    # SBOS547 Table 1: shunt 0x1F40 = 8000 × 2.5 µV = 20 mV over 2 mΩ = 10 A;
    # bus 0x2570 = 9584 × 1.25 mV = 11.98 V; 119.8 W (the chip's own power register: 4792 × 25 mW).
    buses = _Buses({0x40: _dump("ina226_datasheet_example.json")})
    with Ina226Meter(Ina226Config(type="ina226", shunt_ohms=0.002), bus_factory=buses) as meter:
        r = meter.read()
    assert r.volts == pytest.approx(11.98) and r.amps == pytest.approx(10.0)
    assert r.watts == pytest.approx(119.8, abs=1e-9) == 4792 * 0.025
    assert buses.opened[0].closed


def test_ina260_decodes_a_real_register_dump() -> None:
    # bitaxeorg/ESP-Miner#2: current 0xFFEA = -22 × 1.25 mA, bus 0x09C4 = 2500 × 1.25 mV,
    # power 0x0009 = 9 × 10 mW.
    buses = _Buses({0x40: _dump("ina260_bitaxe_dump.json")})
    r = Ina260Meter(Ina260Config(type="ina260"), bus_factory=buses).read()
    assert r.amps == pytest.approx(-0.0275, abs=1e-12)
    assert r.volts == pytest.approx(3.125, abs=1e-12)
    assert r.watts == pytest.approx(0.090, abs=1e-12)
    assert r.volts is not None and r.amps is not None
    assert abs(r.volts * abs(r.amps) - r.watts) < 0.010  # within one power LSB of V × I


def test_ina226_configured_on_an_ina260_names_the_chip_found() -> None:
    buses = _Buses({0x40: _dump("ina260_bitaxe_dump.json")})
    with pytest.raises(PowerMeterError) as err:
        Ina226Meter(Ina226Config(type="ina226"), bus_factory=buses)
    message = str(err.value)
    assert "INA226 at address 0x40 on I2C bus 1" in message
    assert "die ID 0x2270" in message and "set power.type: ina260" in message
    assert buses.opened[0].closed


def test_a_device_that_is_not_ti_is_refused() -> None:
    regs = _dump("ina226_datasheet_example.json", r0xFE=0x0000, r0xFF=0x0000)
    with pytest.raises(PowerMeterError, match="manufacturer ID 0x0000.*another device answers"):
        Ina260Meter(Ina260Config(type="ina260"), bus_factory=_Buses({0x40: regs}))


def test_nothing_at_the_address_is_a_clear_error() -> None:
    buses = _Buses({0x40: _dump("ina219_datasheet_example.json")})
    with pytest.raises(PowerMeterError, match=r"0x41 on I2C bus 1.*i2cdetect -y 1"):
        Ina219Meter(Ina219Config(type="ina219", address=0x41), bus_factory=buses)


def test_a_missing_i2c_bus_says_how_to_enable_it() -> None:
    assert not Path("/dev/i2c-97").exists()
    with pytest.raises(PowerMeterError, match=r"/dev/i2c-97\): no such bus; enable I2C"):
        open_meter(Ina260Config(type="ina260", bus=97))  # the real smbus2.SMBus


def test_ina219_max_expected_amps_programs_the_gain() -> None:
    # 3 A through 10 mΩ is 30 mV: the ±40 mV range (PG = 00) fits; 0x399F with PG cleared.
    buses = _Buses({0x40: _dump("ina219_datasheet_example.json", r0x00=0x399F)})
    cfg = Ina219Config(type="ina219", shunt_ohms=0.01, max_expected_amps=3.0)
    r = Ina219Meter(cfg, bus_factory=buses).read()
    assert buses.opened[0].writes == [(0x40, 0x00, [0x21, 0x9F])]
    assert r.amps == pytest.approx(2.0)  # 20 mV / 10 mΩ


def test_a_clipped_shunt_reading_is_refused() -> None:
    # INA219 at ±40 mV (config 0x019F): 4000 × 10 µV is the end of the range.
    regs = _dump("ina219_datasheet_example.json", r0x01=4000)
    with pytest.raises(PowerMeterError, match=r"±40 mV range.*exceeds 20 A.*max_expected_amps"):
        Ina219Meter(Ina219Config(type="ina219", shunt_ohms=0.002), bus_factory=_Buses({0x40: regs}))
    regs = _dump("ina226_datasheet_example.json", r0x01=0x7FFF)
    with pytest.raises(PowerMeterError, match=r"±81.92 mV range.*exceeds 0.819 A"):
        Ina226Meter(Ina226Config(type="ina226"), bus_factory=_Buses({0x40: regs}))


def test_a_reversed_shunt_still_reports_positive_watts() -> None:
    regs = _dump("ina226_datasheet_example.json", r0x01=0x10000 - 0x1F40)
    meter = Ina226Meter(
        Ina226Config(type="ina226", shunt_ohms=0.002), bus_factory=_Buses({0x40: regs})
    )
    r = meter.read()
    assert r.amps == pytest.approx(-10.0) and r.watts == pytest.approx(119.8)


def test_ina_config_refuses_a_current_beyond_the_shunt_range() -> None:
    with pytest.raises(ValidationError, match="200 mV exceeds the chip's ±81.92 mV"):
        Ina226Config(type="ina226", shunt_ohms=0.1, max_expected_amps=2.0)
    with pytest.raises(ValidationError, match="less than or equal to 79"):
        Ina219Config(type="ina219", address=0x50)


# ---- config -------------------------------------------------------------------------------------


class _Device(BaseModel):
    power: PowerConfig | None = None


def test_power_config_is_chosen_by_type_and_strict() -> None:
    cfg = _Device.model_validate({"power": {"type": "ina219", "address": 0x41}}).power
    assert isinstance(cfg, Ina219Config) and (cfg.bus, cfg.address, cfg.shunt_ohms) == (
        1,
        0x41,
        0.1,
    )
    assert isinstance(TypeAdapter(PowerConfig).validate_python({"type": "rapl"}), RaplConfig)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        _Device.model_validate({"power": {"type": "ina260", "shunt_ohms": 0.1}})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        _Device.model_validate({"power": {"type": "ina3221"}})


def test_estimate_config_needs_a_board_or_both_figures() -> None:
    assert EstimateConfig(type="estimate", board="pi4").profile() == (2.7, 6.4, "pi4")
    assert EstimateConfig(type="estimate", board="pi4", full_w=5.0).profile() == (2.7, 5.0, "pi4")
    assert EstimateConfig(type="estimate", idle_w=1, full_w=2).profile() == (1, 2, "custom")
    with pytest.raises(ValidationError, match="give a board"):
        EstimateConfig(type="estimate", idle_w=1.0)
    with pytest.raises(ValidationError, match="below idle_w"):
        EstimateConfig(type="estimate", board="pi5", full_w=1.0)


# ---- RAPL ---------------------------------------------------------------------------------------


class _Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def _zone(tmp_path: Path, energy: int, max_range: int = 262143328850) -> Path:
    (tmp_path / "name").write_text("package-0\n")
    (tmp_path / "max_energy_range_uj").write_text(f"{max_range}\n")
    (tmp_path / "energy_uj").write_text(f"{energy}\n")
    return tmp_path


def test_rapl_watts_from_energy_deltas(tmp_path: Path) -> None:
    zone = _zone(tmp_path, 1_000_000)
    meter = RaplMeter(RaplConfig(type="rapl", path=zone), clock=_Clock(10.0, 12.0, 12.01))
    (zone / "energy_uj").write_text("31000000\n")
    r = meter.read()
    assert r.watts == pytest.approx(15.0) and r.source == "rapl:package-0"
    assert (r.at, r.averaged_over_s) == (12.0, 2.0)
    assert meter.read() is r  # 10 ms later: too soon for a mean, the same reading again


def test_rapl_counter_wrap_around(tmp_path: Path) -> None:
    zone = _zone(tmp_path, 262142000000)
    meter = RaplMeter(RaplConfig(type="rapl", path=zone), clock=_Clock(0.0, 1.0))
    (zone / "energy_uj").write_text("500000\n")
    # (262143328850 - 262142000000) + 500000 µJ in one second
    assert meter.read().watts == pytest.approx(1.828850, abs=1e-9)


def test_rapl_missing_zone_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PowerMeterError, match="does not exist; RAPL needs"):
        RaplMeter(RaplConfig(type="rapl", path=tmp_path / "intel-rapl:9"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_rapl_unreadable_counter_explains_the_root_only_rule(tmp_path: Path) -> None:
    zone = _zone(tmp_path, 1)
    (zone / "energy_uj").chmod(0)
    with pytest.raises(PowerMeterError, match="since Linux 5.10 energy_uj is readable by root"):
        RaplMeter(RaplConfig(type="rapl", path=zone))


def test_rapl_on_this_machine() -> None:
    energy = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
    if not os.access(energy, os.R_OK):
        pytest.skip(f"{energy} is absent or not readable here")
    with open_meter(RaplConfig(type="rapl")) as meter:  # reads once: a 50 ms mean
        time.sleep(0.2)
        r = meter.read()
    assert 0 < r.watts < 1000 and r.averaged_over_s >= 0.2


# ---- estimate -----------------------------------------------------------------------------------


def _stat(path: Path, busy: int, idle: int) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user.
    path.write_text(
        f"cpu  {busy} 0 0 {idle} 0 0 0 0 {busy} 0\ncpu0 {busy} 0 0 {idle} 0 0 0 0 0 0\nintr 1\n"
    )


def test_estimate_scales_with_cpu_use(tmp_path: Path) -> None:
    stat_file = tmp_path / "stat"
    _stat(stat_file, busy=1000, idle=1000)
    cpu = SystemCpu(stat_file)
    meter = EstimateMeter(EstimateConfig(type="estimate", board="pi4"), cpu=cpu.sample)
    watts = []
    for busy, idle in ((1000, 1100), (1050, 1150), (1150, 1150)):  # idle, half, full
        _stat(stat_file, busy, idle)
        r = meter.read()
        assert r.estimated and r.source == "estimate:pi4" and r.averaged_over_s >= 0
        watts.append(r.watts)
    assert watts == pytest.approx([2.7, (2.7 + 6.4) / 2, 6.4])
    assert cpu.cores == 1


def test_estimate_on_this_machine_rises_with_a_busy_core() -> None:
    meter = open_meter(EstimateConfig(type="estimate", idle_w=1.0, full_w=9.0))
    assert isinstance(meter, EstimateMeter)
    cores = SystemCpu().cores
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    r = meter.read()
    assert r.estimated
    assert r.watts > 1.0 + 8.0 * 0.3 / cores  # one of `cores` cores was busy most of the time


# ---- energy per inference -----------------------------------------------------------------------


def _reading(at: float, watts: float, averaged: float = 0.0) -> PowerReading:
    return PowerReading(watts, False, "test", at, averaged)


def test_energy_of_instant_readings_is_trapezoids() -> None:
    counter = EnergyCounter(window_s=60)
    assert counter.summary() is None
    for at, w in ((0.0, 5.0), (1.0, 7.0), (2.0, 7.0)):
        counter.add(_reading(at, w))
    for i in range(10):
        counter.inference(at=0.1 + 0.19 * i)
    s = counter.summary()
    assert s is not None
    assert s.energy_mj == pytest.approx(13_000) and (s.duration_s, s.inferences) == (2.0, 10)
    assert s.watts == pytest.approx(6.5) and s.mj_per_inference == pytest.approx(1300)
    assert s.as_payload() == {
        "watts": 6.5,
        "estimated": False,
        "source": "test",
        "mj_per_inference": 1300.0,
    }


def test_energy_of_averaged_readings_covers_their_interval() -> None:
    counter = EnergyCounter()
    counter.add(_reading(1.0, 4.0, averaged=1.0))
    counter.add(_reading(1.0, 4.0, averaged=1.0))  # the same reading again: ignored
    counter.add(_reading(3.0, 6.0, averaged=2.0))
    s = counter.summary()
    assert s is not None
    assert s.energy_mj == pytest.approx(16_000) and s.duration_s == pytest.approx(3.0)
    assert s.watts == pytest.approx(16 / 3) and s.mj_per_inference is None


def test_energy_window_forgets_old_readings_and_inferences() -> None:
    counter = EnergyCounter(window_s=10)
    counter.add(_reading(0.0, 100.0))
    counter.inference(5, at=1.0)
    for t in range(1, 31):
        counter.add(_reading(float(t), 2.0))
        counter.inference(at=t + 0.5)
    s = counter.summary()
    assert s is not None
    assert s.watts == pytest.approx(2.0) and s.duration_s == pytest.approx(10.0)
    assert s.inferences == 10 and s.mj_per_inference == pytest.approx(2000)


# ---- health: throttling, temperature, memory, CPU -----------------------------------------------


def test_recorded_get_throttled_outputs_decode() -> None:
    lines = _text("get_throttled.txt").splitlines()
    decoded = [sysstats.parse_throttled(line) for line in lines]
    assert not any(decoded[0].values())
    on = [sorted(k for k, v in flags.items() if v) for flags in decoded[1:]]
    assert on[0] == ["throttled_since_boot", "under_voltage_since_boot"]  # 0x50000
    assert on[1] == [
        "throttled_now",
        "throttled_since_boot",
        "under_voltage_now",
        "under_voltage_since_boot",
    ]  # 0x50005
    assert on[2] == ["soft_temp_limit_now", "soft_temp_limit_since_boot"]  # 0x80008
    assert set(decoded[0]) == {
        f"{flag}_{when}"
        for flag in ("under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit")
        for when in ("now", "since_boot")
    }


def test_throttled_without_vcgencmd_is_none_and_garbage_is_an_error() -> None:
    assert sysstats.throttled(vcgencmd=ABSENT) is None
    assert sysstats.throttled(runner=_runner("throttled=0x2\n")) == {
        **dict.fromkeys(sysstats.parse_throttled("throttled=0x0"), False),
        "arm_freq_capped_now": True,
    }
    with pytest.raises(CommandError, match="not `vcgencmd get_throttled` output"):
        sysstats.throttled(runner=_runner('error=1 error_msg="Command not registered"'))
    with pytest.raises(ValueError, match="not `vcgencmd get_throttled` output"):
        sysstats.parse_throttled("throttled=0xZZ")


def test_a_hung_command_times_out() -> None:
    with pytest.raises(CommandError, match="did not finish within 0.2 s"):
        sysstats.run_command(["sleep", "5"], timeout_s=0.2)


def test_cpu_temperature_prefers_the_cpu_zone(tmp_path: Path) -> None:
    assert sysstats.cpu_temp_c(tmp_path) is None
    for i, (kind, temp) in enumerate((("acpitz", "27800"), ("x86_pkg_temp", "45000"))):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    assert sysstats.cpu_temp_c(tmp_path) == 45.0
    (tmp_path / "thermal_zone1" / "temp").write_text("")  # a zone that cannot be read now
    assert sysstats.cpu_temp_c(tmp_path) == 27.8


def test_cpu_temperature_on_this_machine_is_none_or_sane() -> None:
    t = sysstats.cpu_temp_c()
    assert t is None or -40.0 < t < 130.0


def test_rss_grows_with_a_touched_50_mb_array() -> None:
    before = sysstats.rss_mb()
    block = np.ones(50 * 2**20 // 8)  # ones, not empty: every page is written
    after = sysstats.rss_mb()
    assert after - before > 40
    del block


def test_process_cpu_sees_a_busy_loop() -> None:
    """The share is this process's own CPU time over the clock's time: spin until the kernel
    has charged 0.3 s of CPU to us (however long that takes on a busy machine), let the clock
    say one second passed, and the sample is those 0.3 s; then a second with no work is ~0."""

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall = [0.0]
    cpu = ProcessCpu(clock=lambda: wall[0])
    spent = cpu_seconds()
    while cpu_seconds() - spent < 0.3:
        pass
    spent = cpu_seconds() - spent
    wall[0] += 1.0
    busy = cpu.sample()
    assert 0.28 <= busy <= spent + 0.05  # os.times() counts in clock ticks (10 ms)
    wall[0] += 1.0
    assert cpu.sample() < 0.05  # nothing ran between the two samples


def test_system_cpu_counts_guest_time_once(tmp_path: Path) -> None:
    stat_file = tmp_path / "stat"
    stat_file.write_text("cpu  100 0 0 100 0 0 0 0 50 0\ncpu0 1\ncpu1 1\n")
    cpu = SystemCpu(stat_file)
    stat_file.write_text("cpu  150 0 0 150 0 0 0 0 100 0\ncpu0 1\ncpu1 1\n")
    assert cpu.sample() == 0.5 and cpu.cores == 2
    assert cpu.sample() == 0.5  # no tick since: the last value
    stat_file.chmod(stat.S_IWUSR)
    if os.geteuid() != 0:
        with pytest.raises(DoorstepError, match="cannot read CPU times"):
            cpu.sample()
