"""What a person sees while the fleet is worked on: a live line per device, then a table.

:class:`LiveView` redraws one row per device in place on a terminal with rich (phase, an
upload bar with percentage and rate, what the health check waits for); :class:`PlainView`
prints a line per change for logs, CI and pipes. Both implement :class:`Progress`, which the
deploy code calls.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TextIO

from host.safe_text import printable

if TYPE_CHECKING:  # rich is imported by the live view only (plain lines and tables need none)
    from rich.console import Console, RenderableType


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


FINAL = {
    "deployed",
    "serving",
    "skipped",
    "rolled back",
    "failed",
    "refused",
    "unreachable",
    "not started",
    "pending",
}


@dataclass
class _Row:
    phase: str = "waiting"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    total: int = 0
    first: int = -1
    t_first: float = 0.0

    def upload(self, now: float) -> str:
        """``42% of 3.0 MiB  1.1 MiB/s`` while uploading."""
        extra = f"{self.done / self.total:4.0%} of {_mib(self.total)}"
        if self.first >= 0 and now > self.t_first and self.done > self.first:
            extra += f"  {_mib((self.done - self.first) / (now - self.t_first))}/s"
        return extra


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
    """One row per device, redrawn in place by rich's live display (ten times a second) on a
    terminal: phase, an upload bar with percentage and rate, what the health check waits for,
    and a count per phase. A fleet taller than the terminal shows its busy devices."""

    def __init__(self, out: TextIO | None = None, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(file=out or sys.stderr, highlight=False)
        self.rows: dict[str, _Row] = {}
        self._lock = threading.Lock()
        self._live = Live(
            console=self.console,
            refresh_per_second=10,
            get_renderable=self._render,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def start(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                self.rows.setdefault(name, _Row())
        self._live.start()

    def phase(self, name: str, phase: str, detail: str = "") -> None:
        with self._lock:
            row = self.rows.setdefault(name, _Row())
            if phase != row.phase:
                row.started = time.monotonic()
            row.phase, row.detail = phase, detail

    def transfer(self, name: str, done: int, total: int) -> None:
        with self._lock:
            row = self.rows.setdefault(name, _Row())
            if row.first < 0:
                row.first, row.t_first = done, time.monotonic()
            row.done, row.total = done, total

    def note(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(printable(text, newlines=False)))  # above the live rows

    def close(self) -> None:
        self._live.refresh()
        self._live.stop()

    def _render(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        with self._lock:
            shown = [(n, replace(r)) for n, r in self.rows.items()]
            counts: dict[str, int] = {}
            for row in self.rows.values():
                counts[row.phase] = counts.get(row.phase, 0) + 1
        if len(shown) > max(self.console.size.height - 4, 5):  # a big fleet: the busy devices
            busy = [(n, r) for n, r in shown if r.phase not in FINAL and r.phase != "waiting"]
            shown = busy[: max(self.console.size.height - 5, 4)]
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        for name, row in shown:
            label = Text(printable(name, newlines=False), style="bold")
            phase = Text(row.phase, style=_STYLE.get(row.phase, ""))
            if row.phase == "uploading" and row.total:
                bar = Table.grid(padding=(0, 1))
                bar.add_row(
                    ProgressBar(total=row.total, completed=row.done, width=24),
                    Text(row.upload(now)),
                )
                grid.add_row(label, phase, bar)
            else:
                grid.add_row(label, phase, Text(printable(row.detail, newlines=False)))
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        grid.add_row(Text(summary, style="dim"), Text(""), Text(""))
        return grid


_STYLE = {
    "deployed": "green",
    "serving": "green",
    "pending": "yellow",
    "skipped": "dim",
    "rolled back": "yellow",
    "failed": "red",
    "refused": "red",
    "unreachable": "red",
    "not started": "dim",
}


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
