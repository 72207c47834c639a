"""The Raspberry Pi 5's PMIC, read with ``vcgencmd pmic_read_adc``."""

from __future__ import annotations

import re
import time

from device.power.base import PowerMeter, PowerMeterError, PowerReading
from device.power.config import Pi5PmicConfig
from device.sysstats import CommandError, CommandNotFoundError, CommandRunner, run_command

_PMIC_LINE = re.compile(
    r"^\s*(?P<rail>\w+?)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)="
    r"(?P<value>[-+]?[\d.]+(?:[eE][-+]?\d+)?)(?P=kind)\s*$"
)


def parse_pmic_read_adc(text: str) -> dict[str, tuple[float, float]]:
    """``{rail: (volts, amps)}`` for every rail with both readings, in the order printed.

    Lines look like ``  VDD_CORE_A current(7)=6.22421000A`` and ``VDD_CORE_V volt(15)=0.86V``;
    EXT5V_V and BATT_V have no current and are left out. NUL separators are accepted too."""
    volts: dict[str, float] = {}
    amps: dict[str, float] = {}
    for line in re.split(r"[\r\n\x00]+", text):
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    return {rail: (volts[rail], a) for rail, a in amps.items() if rail in volts}


class Pi5PmicMeter(PowerMeter):
    """Sum of V × A over the PMIC's rails, times the calibration factor, plus the offset."""

    def __init__(self, config: Pi5PmicConfig, runner: CommandRunner | None = None) -> None:
        self.config = config
        self.source = "pi5_pmic"
        self.rails: dict[str, tuple[float, float]] = {}
        self._run = runner or run_command
        self.read()

    def read(self) -> PowerReading:
        argv = [self.config.vcgencmd, "pmic_read_adc"]
        try:
            text = self._run(argv)
        except CommandNotFoundError as exc:
            raise PowerMeterError(
                f"power meter pi5_pmic: {exc}; vcgencmd comes with Raspberry Pi OS (package "
                "raspi-utils, libraspberrypi-bin before Bookworm). On other machines choose "
                "another power.type"
            ) from None
        except CommandError as exc:
            hint = ""
            if "vcio" in str(exc) or "VCHI" in str(exc):
                hint = "; the service user needs the `video` group to talk to the firmware"
            raise PowerMeterError(f"power meter pi5_pmic: {exc}{hint}") from None
        rails = parse_pmic_read_adc(text)
        if not rails:
            first = text.strip().splitlines()[0][:100] if text.strip() else "nothing"
            raise PowerMeterError(
                f"power meter pi5_pmic: `{' '.join(argv)}` printed no rail readings ({first!r}); "
                "pmic_read_adc exists only on a Raspberry Pi 5, CM5 or Pi 500 with current "
                "firmware"
            )
        self.rails = rails
        total = sum(v * a for v, a in rails.values())
        watts = total * self.config.calibration_factor + self.config.calibration_offset_w
        return PowerReading(watts, False, self.source, time.monotonic())
