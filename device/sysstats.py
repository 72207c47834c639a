"""Health figures of the device: CPU temperature, Pi throttling flags, this process's memory and
CPU use, and the whole machine's CPU use.

Everything here reads ``/proc``, ``/sys`` or runs ``vcgencmd``; nothing heavier than the standard
library is imported (no psutil), so telemetry costs little on a Pi Zero.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from device.errors import DoorstepError

CommandRunner = Callable[[Sequence[str]], str]
"""Runs an argv and returns its stdout; injectable so tests can feed recorded outputs."""


class CommandError(DoorstepError):
    """A helper command (``vcgencmd``) that failed, timed out or printed something unexpected."""


class CommandNotFoundError(CommandError):
    """The command is not installed (e.g. ``vcgencmd`` on anything but Raspberry Pi OS)."""


def run_command(argv: Sequence[str], timeout_s: float = 5.0) -> str:
    """Run ``argv`` and return its stdout; raise ``CommandError`` saying what went wrong."""
    shown = " ".join(argv)
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise CommandNotFoundError(f"{argv[0]}: command not found") from None
    except PermissionError as exc:
        raise CommandError(f"{argv[0]}: cannot run it: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"`{shown}` did not finish within {timeout_s:g} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        detail = lines[-1] if lines else "no output"
        raise CommandError(f"`{shown}` failed (exit status {proc.returncode}): {detail}")
    return proc.stdout


# The bits of `vcgencmd get_throttled` (Raspberry Pi documentation, "vcgencmd"): 0-3 are the
# state now, 16-19 the same conditions latched since boot. Other bits are ignored.
_THROTTLE_BITS = {
    "under_voltage": 0,
    "arm_freq_capped": 1,
    "throttled": 2,
    "soft_temp_limit": 3,
}


def parse_throttled(text: str) -> dict[str, bool]:
    """Decode ``throttled=0x50005`` into ``{"under_voltage_now": True, ..., "<flag>_since_boot":
    ...}`` for under_voltage, arm_freq_capped, throttled and soft_temp_limit."""
    key, sep, value = text.strip().partition("=")
    try:
        if key != "throttled" or not sep:
            raise ValueError
        bits = int(value, 16)
    except ValueError:
        raise ValueError(f"not `vcgencmd get_throttled` output: {text.strip()[:80]!r}") from None
    flags = {}
    for name, bit in _THROTTLE_BITS.items():
        flags[f"{name}_now"] = bool(bits >> bit & 1)
        flags[f"{name}_since_boot"] = bool(bits >> (bit + 16) & 1)
    return flags


def throttled(
    runner: CommandRunner | None = None, vcgencmd: str = "vcgencmd"
) -> dict[str, bool] | None:
    """The Pi's throttling flags (see ``parse_throttled``); None where vcgencmd is absent (not a
    Pi). Raises ``CommandError`` if vcgencmd is there but fails or prints something else."""
    try:
        text = (runner or run_command)([vcgencmd, "get_throttled"])
    except CommandNotFoundError:
        return None
    try:
        return parse_throttled(text)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


_CPU_ZONE_HINTS = ("cpu", "soc", "x86_pkg", "coretemp", "k10temp", "package")


def cpu_temp_c(root: Path = Path("/sys/class/thermal")) -> float | None:
    """The CPU temperature in °C from the kernel's thermal zones; None if there are none.

    With several zones, one whose type names the CPU (``cpu-thermal`` on a Pi, ``x86_pkg_temp``
    on Intel) wins over the rest (``acpitz``, battery, wifi...)."""
    best: tuple[int, float] | None = None
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip().lower()
            millideg = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):  # some zones refuse reads while their device sleeps
            continue
        rank = 0 if any(hint in kind for hint in _CPU_ZONE_HINTS) else 1
        if best is None or rank < best[0]:
            best = (rank, millideg / 1000.0)
    return None if best is None else best[1]


def rss_mb() -> float:
    """This process's resident memory now, in MiB (``/proc/self/statm``).

    Off Linux it falls back to the peak RSS from ``getrusage``, which never goes down."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class ProcessCpu:
    """This process's CPU use between calls, as a fraction of one core (above 1 with threads)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = self._now()

    def _now(self) -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, self._clock()

    def sample(self) -> float:
        """CPU seconds used per wall second since the previous call (or since creation)."""
        (cpu0, wall0), (cpu1, wall1) = self._last, self._now()
        self._last = (cpu1, wall1)
        return (cpu1 - cpu0) / (wall1 - wall0) if wall1 > wall0 else 0.0


class SystemCpu:
    """The whole machine's CPU use between calls, 0..1, from the ``cpu`` line of ``/proc/stat``.

    That line sums every core, so busy/total is already normalised by the core count: one busy
    core of four reads 0.25."""

    def __init__(self, path: Path = Path("/proc/stat")) -> None:
        self.path = path
        self.cores = 0
        self._last = self._read()
        self._fraction = 0.0

    def _read(self) -> tuple[int, int]:
        try:
            lines = self.path.read_text().splitlines()
            fields = [int(v) for v in lines[0].split()[1:]]
        except (OSError, IndexError, ValueError) as exc:
            raise DoorstepError(f"{self.path}: cannot read CPU times: {exc}") from None
        self.cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
        # already counted in user and nice, so only the first eight add up to the total.
        total = sum(fields[:8])
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return total - idle, total

    def sample(self) -> float:
        """Busy share of all cores since the previous call; the last value if no tick passed."""
        (busy0, total0), (busy1, total1) = self._last, self._read()
        if total1 > total0:
            self._fraction = min(1.0, max(0.0, (busy1 - busy0) / (total1 - total0)))
            self._last = (busy1, total1)
        return self._fraction
