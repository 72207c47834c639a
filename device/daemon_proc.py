"""Is a pid the doorstep daemon that wrote the record? Checked before it is signalled.

``daemon.json`` lives in a group-writable directory, so its pid is a claim, not a fact. A
process is taken for the daemon only when, read from ``/proc/<pid>``: its command line is
``doorstep-device run`` (or ``python -m device.cli run``), its start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) is the one the daemon recorded for itself, and it
runs as the user who owns the state directory (the service user). A pid reused by another
process, a planted pid (init, ``-1`` is already refused by the record model) or another user's
process fails one of the three. Standard library only (``status`` starts fast).
"""

from __future__ import annotations

import os
from pathlib import Path

from device.safefile import UnsafeFileError, read_small_file


def process_start_ticks(pid: int | None = None) -> int | None:
    """When ``pid`` (default: this process) started, in clock ticks since boot; None when
    unknown (no such process, no ``/proc``)."""
    path = Path(f"/proc/{pid if pid is not None else os.getpid()}/stat")
    try:
        raw = read_small_file(path, 64 * 1024)
    except UnsafeFileError:
        return None
    if raw is None or b")" not in raw:
        return None
    fields = raw[raw.rindex(b")") + 1 :].split()  # after the command name: field 3 onwards
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def pid_exists(pid: int) -> bool:
    """Is there a process ``pid`` (> 0), of any user?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def cmdline(pid: int) -> list[bytes] | None:
    """``pid``'s argv, or None when it cannot be read (gone, hidepid, not Linux)."""
    try:
        raw = read_small_file(Path(f"/proc/{pid}/cmdline"), 64 * 1024)
    except UnsafeFileError:
        return None
    return None if raw is None else raw.split(b"\0")


def looks_like_daemon(argv: list[bytes]) -> bool:
    """``.../doorstep-device run ...`` or ``python -m device.cli run ...``."""
    for i, arg in enumerate(argv):
        if arg.endswith(b"doorstep-device") or (
            arg == b"device.cli" and argv[i - 1 : i] == [b"-m"]
        ):
            return b"run" in argv[i + 1 :]
    return False


def daemon_mismatch(pid: int, start_ticks: int | None, service_uid: int | None) -> str | None:
    """Why the live process ``pid`` is not verifiably the daemon that recorded ``start_ticks``
    (running as ``service_uid`` when given), or None when it is."""
    if pid <= 0:
        return f"pid {pid} is no process id"
    argv = cmdline(pid)
    if argv is None:
        return f"the command line of pid {pid} cannot be read"
    if not looks_like_daemon(argv):
        shown = b" ".join(argv)[:80].decode("utf-8", "replace")
        return f"pid {pid} is not a doorstep daemon ({shown!r})"
    if start_ticks is None:
        return "the record does not say when the daemon started (written by an older daemon)"
    if process_start_ticks(pid) != start_ticks:
        return f"pid {pid} started at another time than the daemon that wrote the record"
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return f"pid {pid} is gone"
    if service_uid is not None and uid != service_uid:
        return f"pid {pid} runs as uid {uid}, not the service user (uid {service_uid})"
    return None


def daemon_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Is ``pid`` (> 0) a live process that looks like ``doorstep-device run`` (and, when
    ``start_ticks`` is given, started then)? When its command line cannot be read, a live pid
    counts (a plausibility check for ``status``; signalling uses :func:`daemon_mismatch`)."""
    if not pid_exists(pid):
        return False
    argv = cmdline(pid)
    if argv is None:
        return pid_exists(pid)
    if not looks_like_daemon(argv):
        return False
    return start_ticks is None or process_start_ticks(pid) == start_ticks
