"""Child processes in the tests: their output read with deadlines, and stopping them for sure.

``readline()`` on a pipe has no timeout: a child that never prints the awaited line would hang
the test for ever. :class:`LineReader` reads a pipe in its own thread into a queue, so a test
waits for a line for at most ``timeout`` seconds and fails with what the child did print; and a
child that writes a lot to a pipe nobody reads can never block on a full pipe buffer.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

NOBODY = 65534


def as_nobody(cwd: Path) -> list[str]:
    """The command prefix that runs a child as user nobody (uid and gid 65534, no groups);
    skips the calling test where that cannot work (not root, no setpriv, or this checkout's
    Python out of nobody's reach)."""
    import pytest

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to run a child as another user")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import device.daemon"],
        cwd=cwd,
        capture_output=True,
        timeout=120,
    )
    if probe.returncode != 0:
        pytest.skip("this checkout's Python cannot be run by user nobody")
    return prefix


def default_signals() -> None:
    """``preexec_fn`` for a child a test stops with SIGINT or SIGHUP and their default meaning.

    Ignored signals stay ignored across exec, and a shell ignores SIGINT for its background
    jobs (``nohup`` SIGHUP too): run so, the suite's children would shrug off the Ctrl-C or the
    hang-up the test sends. A test that means the terminal's defaults restores them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class LineReader:
    """The lines of ``stream`` (a text pipe), read by a thread; ``name`` labels failures, which
    also show the tail of ``also`` (the same child's other stream, say)."""

    def __init__(self, stream: IO[str] | None, name: str, also: LineReader | None = None) -> None:
        if stream is None:
            raise ValueError(f"{name}: the child's stream is not a pipe")
        self.name, self.also = name, also
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(
            target=self._pump, args=(stream,), name=f"read {name}", daemon=True
        )
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._lock:
                    self._lines.append(line.rstrip("\n"))
                self._queue.put(line.rstrip("\n"))
        except ValueError:  # the pipe was closed under us (the test is over)
            pass
        finally:
            stream.close()  # at its end: nothing is left open for the garbage collector
            self._queue.put(None)  # end of stream

    def text(self) -> str:
        """Everything read so far, for failure messages."""
        with self._lock:
            return "\n".join(self._lines)

    def _tail(self) -> str:
        return "\n".join(self.text().splitlines()[-30:]) or "(nothing)"

    def _fail(self, what: str) -> AssertionError:
        also = f"\n{self.also.name}:\n{self.also._tail()}" if self.also is not None else ""
        return AssertionError(f"{self.name}: {what}; it printed:\n{self._tail()}{also}")

    def next(self, timeout: float) -> str:
        """The next line; fails if none comes within ``timeout`` s or the stream ended."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise self._fail(f"no line within {timeout:g} s") from None
        if line is None:
            self._queue.put(None)  # stays ended for the next caller
            raise self._fail("the stream ended")
        return line

    def until(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """Skip lines up to the first that satisfies ``predicate``, within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.0, deadline - time.monotonic()))
            if predicate(line):
                return line

    def record_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """For JSON-lines output: the first record (a JSON object) that satisfies ``predicate``;
        other lines (a notice for people) are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.0, deadline - time.monotonic()))
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and predicate(record):
                return record

    def rest(self, timeout: float) -> list[str]:
        """Wait (bounded) for the end of the stream; the lines not taken yet."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise self._fail(f"the stream did not end within {timeout:g} s")
        lines = []
        while (line := self._queue.get_nowait()) is not None:
            lines.append(line)
        self._queue.put(None)
        return lines


def stop(proc: subprocess.Popen[Any], timeout: float = 30) -> int:
    """Terminate ``proc`` if it still runs, kill it if it does not end within ``timeout`` s,
    and reap it; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """``proc.communicate()`` bounded: its stdout and stderr once it ended by itself within
    ``timeout`` s; otherwise it is killed and the test fails with what it printed."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(
            f"{proc.args!r} did not end within {timeout:g} s (killed); stderr:\n"
            + (err or "(not captured)")[-3000:]
        ) from None
