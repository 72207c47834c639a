"""The state directory as the daemon finds it: writable, short of space, or not writable at all.

A directory the service cannot write (read-only, owned by another user) is a set-up mistake:
the daemon refuses to start with one line saying what and how to fix it. A full disk is a
fault that passes: the daemon runs degraded (events held in memory, the log and the daemon
record skipped) and writes again when space returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device.errors import ConfigError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _owner(path: Path) -> str:
    """Who owns ``path``, or, when it is missing, the nearest directory above it that exists."""
    found = path
    while True:
        try:
            st = found.stat()
        except FileNotFoundError:
            if found == found.parent:
                return "?"
            found = found.parent
            continue
        except OSError:
            return "?"
        where = "" if found == path else f"missing; {found} above it: "
        return f"{where}uid {st.st_uid}, mode {st.st_mode & 0o7777:o}"


def check_writable(directory: Path, what: str, fix: str) -> str | None:
    """Create ``directory`` if needed and write a small probe file in it.

    Returns None when it can be written, a reason when only space is short (the caller runs
    degraded); raises ``ConfigError`` when it cannot be written at all."""
    me = f"uid {os.geteuid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=directory)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            return f"{directory}: {exc.strerror}"
        raise ConfigError(
            f"{directory}: the {what} cannot be written by this user ({me}; the directory: "
            f"{_owner(directory)}): {exc.strerror}; {fix}"
        ) from None
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            return f"{directory}: {exc.strerror}"
        raise ConfigError(
            f"{directory}: the {what} cannot be written: {exc.strerror}; {fix}"
        ) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


@dataclass
class Episode:
    """A fault that comes and goes (a full disk, a stalled camera): ``enter`` and ``leave`` say
    whether the state changed, so each episode is logged once, not once per frame."""

    error: str | None = None
    episodes: int = 0

    @property
    def active(self) -> bool:
        return self.error is not None

    def enter(self, error: str) -> bool:
        """Record the fault; True when this starts a new episode."""
        new = self.error is None
        self.error = error
        if new:
            self.episodes += 1
        return new

    def leave(self) -> bool:
        """The fault has passed; True when an episode just ended."""
        ended = self.error is not None
        self.error = None
        return ended
