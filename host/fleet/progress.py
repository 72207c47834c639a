"""What a person sees while the fleet is worked on: a live line per device, then a table.

:class:`LiveView` redraws one line per device in place on a terminal (phase, upload percentage
and rate, what the health check waits for); :class:`PlainView` prints a line per change for
logs, CI and pipes. Both implement :class:`Progress`, which the deploy code calls; neither needs
anything beyond the standard library.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from host.safe_text import printable


class Progress(Protocol):
    """Receives what happens on each device as it happens."""

    def start(self, names: Sequence[str]) -> None:
        """The devices about to be worked on, in display order."""

    def phase(self, name: str, phase: str, detail: str = "") -> None:
        """``name`` moved to ``phase`` (connecting, uploading, health check, deployed, ...)."""

    def transfer(self, name: str, done: int, total: int) -> None:
        """Bytes of an upload on the device so far."""

    def note(self, text: str) -> None:
        """A line about the whole rollout (a wave starts, the rollout stops)."""

    def close(self) -> None:
        """Done: leave the final state on screen."""


FINAL = {"deployed", "skipped", "rolled back", "failed", "refused", "unreachable", "not started"}


@dataclass
class _Row:
    phase: str = "waiting"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    total: int = 0
    first: int = -1
    t_first: float = 0.0

    def text(self, name: str, width: int, now: float) -> str:
        extra = self.detail
        if self.phase == "uploading" and self.total:
            extra = f"{self.done / self.total:4.0%} of {_mib(self.total)}"
            if self.first >= 0 and now > self.t_first and self.done > self.first:
                extra += f"  {_mib((self.done - self.first) / (now - self.t_first))}/s"
        line = f"{name:<{width}}  {self.phase:<13} {extra}"
        return line


class PlainView:
    """A line per phase change (and per quarter of an upload), with seconds since the start."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.t0 = time.monotonic()
        self._quarter: dict[str, int] = {}
        self._last: dict[str, tuple[str, str]] = {}

    def _print(self, text: str) -> None:
        line = printable(text, newlines=False)  # device names and errors: no escapes
        print(f"[{time.monotonic() - self.t0:6.1f}s] {line}", file=self.out, flush=True)

    def start(self, names: Sequence[str]) -> None:
        pass

    def phase(self, name: str, phase: str, detail: str = "") -> None:
        if self._last.get(name) == (phase, detail):
            return  # a health check polling: say it once
        self._last[name] = (phase, detail)
        self._print(f"{name}: {phase}" + (f": {detail}" if detail else ""))

    def transfer(self, name: str, done: int, total: int) -> None:
        quarter = 4 * done // total if total else 4
        if quarter > self._quarter.get(name, 0):
            self._quarter[name] = quarter
            self._print(f"{name}: uploaded {_mib(done)} of {_mib(total)}")

    def note(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass


class LiveView:
    """One line per device, redrawn in place (at most ten times a second) on a terminal."""

    def __init__(self, out: TextIO | None = None, interval: float = 0.1) -> None:
        self.out = out or sys.stderr
        self.interval = interval
        self.rows: dict[str, _Row] = {}
        self._drawn = 0
        self._last = 0.0

    def start(self, names: Sequence[str]) -> None:
        for name in names:
            self.rows.setdefault(name, _Row())
        self._draw(force=True)

    def phase(self, name: str, phase: str, detail: str = "") -> None:
        row = self.rows.setdefault(name, _Row())
        if phase != row.phase:
            row.started = time.monotonic()
        row.phase, row.detail = phase, detail
        self._draw(force=True)

    def transfer(self, name: str, done: int, total: int) -> None:
        row = self.rows.setdefault(name, _Row())
        if row.first < 0:
            row.first, row.t_first = done, time.monotonic()
        row.done, row.total = done, total
        self._draw(force=done >= total)

    def note(self, text: str) -> None:
        self._clear()
        print(printable(text, newlines=False), file=self.out)
        self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)

    def _clear(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")  # up N lines, erase to the end
            self._drawn = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        cols, lines = shutil.get_terminal_size((100, 40))
        width = max((len(n) for n in self.rows), default=0)
        shown = list(self.rows.items())
        if len(shown) > max(lines - 3, 5):  # a big fleet: the busy devices and a count
            busy = [(n, r) for n, r in shown if r.phase not in FINAL and r.phase != "waiting"]
            shown = busy[: max(lines - 4, 4)]
        self._clear()
        text = [
            printable(row.text(name, width, now), newlines=False)[: cols - 1] for name, row in shown
        ]
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row.phase] = counts.get(row.phase, 0) + 1
        text.append(printable("  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))))
        self.out.write("".join(line + "\n" for line in text))
        self.out.flush()
        self._drawn = len(text)


class QuietView:
    """Shows nothing (a dry run prints its plan instead)."""

    def start(self, names: Sequence[str]) -> None:
        pass

    def phase(self, name: str, phase: str, detail: str = "") -> None:
        pass

    def transfer(self, name: str, done: int, total: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_view(json_mode: bool = False, out: TextIO | None = None) -> Progress:
    """The live view on a terminal, plain lines otherwise (always on stderr)."""
    out = out or sys.stderr
    if not json_mode and out.isatty():
        return LiveView(out)
    return PlainView(out)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with left-aligned columns (the last column is not padded); control
    characters in the cells (devices report some of them) are shown as escapes."""
    header = [printable(c, newlines=False) for c in header]
    rows = [[printable(c, newlines=False) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [str(c).ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*padded, str(cells[-1])]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"
