"""The daemon's two logs: JSON lines in a rotated file, and lines for people on stdout.

Under systemd stdout is the journal, so it gets short human lines by default (``--log-format
json`` puts the JSON lines there instead, for scripts and tests). The JSON-lines file keeps
every record (start, events, telemetry, reloads, stop) and rotates by size.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

from device.errors import ConfigError


def default_log_file(state_dir: Path) -> Path:
    logs = os.environ.get("LOGS_DIRECTORY")  # set by systemd's LogsDirectory=
    return (
        Path(logs.split(":")[0]) / "doorstep.jsonl"
        if logs
        else state_dir / "log" / "doorstep.jsonl"
    )


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
        self._file: logging.Logger | None = None
        self.path = json_file
        if json_file is not None:
            try:
                json_file.parent.mkdir(parents=True, exist_ok=True)
                handler = logging.handlers.RotatingFileHandler(
                    json_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
                )
            except OSError as exc:
                raise ConfigError(
                    f"{json_file}: cannot write the JSON-lines log: {exc.strerror} "
                    "(set telemetry.log_file)"
                ) from None
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger = logging.getLogger(f"doorstep.jsonl.{id(self)}")
            logger.propagate = False
            logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self._file = logger

    def emit(self, kind: str, human: str | None = None, **fields: Any) -> None:
        """Record ``fields`` as one JSON line; print ``human`` (if given) for people."""
        line = json.dumps({"t": round(time.time(), 3), "log": kind, **fields})
        if self._file is not None:
            self._file.info(line)
        if self.stdout_format == "json":
            print(line, file=self.stream, flush=True)
        elif human is not None:
            print(f"doorstep: {human}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            for handler in list(self._file.handlers):
                handler.close()
                self._file.removeHandler(handler)
