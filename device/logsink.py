"""The daemon's two logs: JSON lines in a rotated file, and lines for people on stdout.

Under systemd stdout is the journal, so it gets short human lines by default (``--log-format
json`` puts the JSON lines there instead, for scripts and tests). The JSON-lines file keeps
every record (start, events, telemetry, reloads, stop) and rotates by size.

On a terminal (stdout a TTY, human format) the periodic telemetry line gives way to one live
status line, redrawn in place (:meth:`LogSink.status`); other lines print above it.

The file is never worth the daemon's life: a directory that cannot be written at start is
refused with one line, and a write that fails later (a full disk) is said once on stdout, the
records go to stdout only, and the file is written again as soon as it can be.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

from device.errors import ConfigError
from device.storage import Episode, check_writable


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating file whose write errors are kept for the sink to report, never printed as a
    traceback (what ``logging`` does by default)."""

    failure: str | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        exc = sys.exc_info()[1]
        self.failure = str(exc) if exc is not None else "write failed"
        stream, self.stream = self.stream, None
        if stream is not None:  # a half-written buffer: drop it; the file is opened afresh
            with contextlib.suppress(OSError):
                stream.close()


def default_log_file(state_dir: Path) -> Path:
    logs = os.environ.get("LOGS_DIRECTORY")  # set by systemd's LogsDirectory=
    return (
        Path(logs.split(":")[0]) / "doorstep.jsonl"
        if logs
        else state_dir / "log" / "doorstep.jsonl"
    )


# Records whose human line the live status replaces on a terminal (still in the JSON log).
LIVE_REPLACES = frozenset({"telemetry"})


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


class LogSink:
    def __init__(
        self,
        json_file: Path | None,
        max_bytes: int = 10_000_000,
        backups: int = 5,
        stdout_format: Literal["human", "json"] = "human",
        stream: TextIO | None = None,
    ) -> None:
        self.stdout_format = stdout_format
        self.stream = stream or sys.stdout
        self.live = stdout_format == "human" and _is_terminal(self.stream)
        self._status = ""  # the live line on screen, if any
        self._file: logging.Logger | None = None
        self._handler: _RotatingFile | None = None
        self.path = json_file
        self.storage = Episode()
        if json_file is not None:
            fix = "set telemetry.log_file to a file this user may write, or fix the ownership"
            short = check_writable(json_file.parent, "JSON-lines log's directory", fix)
            if json_file.exists() and not os.access(json_file, os.W_OK):
                raise ConfigError(f"{json_file}: the JSON-lines log is not writable by this user; {fix}")
            handler = _RotatingFile(
                json_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
            )
            self._handler = handler
            if short is not None:
                self.storage.enter(short)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger(f"doorstep.jsonl.{id(self)}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self._file = logger

    def emit(self, kind: str, human: str | None = None, **fields: Any) -> None:
        """Record ``fields`` as one JSON line; print ``human`` (if given) for people."""
        line = json.dumps({"t": round(time.time(), 3), "log": kind, **fields})
        if self._file is not None and self._handler is not None:
            self._handler.failure = None
            self._file.info(line)
            failure = self._handler.failure
            if failure is not None and self.storage.enter(failure):
                self._say(
                    "log_degraded",
                    f"{self.path}: cannot write the log ({failure}); records go to stdout only "
                    "until it can be written again",
                    error=failure,
                )
            elif failure is None and self.storage.leave():
                self._say("log_ok", f"{self.path}: the log is written again")
        if self.stdout_format == "json":
            print(line, file=self.stream, flush=True)
        elif human is not None and not (self.live and kind in LIVE_REPLACES):
            self._print(f"doorstep: {human}")

    def status(self, text: str) -> None:
        """The live status line (a terminal only): drawn in place of the last one."""
        if not self.live:
            return
        try:  # the terminal's own width (a COLUMNS inherited from elsewhere may be stale)
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 100
        self._status = text[: max(width - 1, 10)]
        self.stream.write(f"\r\x1b[K{self._status}")
        self.stream.flush()

    def _print(self, text: str) -> None:
        """A line for people; on a terminal it goes above the live status line."""
        if self._status:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream)
        if self._status:
            self.stream.write(self._status)
        self.stream.flush()

    def _say(self, kind: str, human: str, **fields: Any) -> None:
        """A record about the log file itself: stdout only."""
        if self.stdout_format == "json":
            line = json.dumps({"t": round(time.time(), 3), "log": kind, **fields})
            print(line, file=self.stream, flush=True)
        else:
            self._print(f"doorstep: {human}")

    def close(self) -> None:
        if self._status:  # leave the last status on screen, and the cursor on a new line
            self.stream.write("\n")
            self.stream.flush()
            self._status = ""
        if self._file is not None:
            for handler in list(self._file.handlers):
                handler.close()
                self._file.removeHandler(handler)
