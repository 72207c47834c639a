"""Reloading the daemon after ``activate``/``rollback``: decided before the switch, done after.

:func:`reload_target` reads the daemon record and decides how (``systemctl reload``, SIGHUP to
a verified daemon pid, or nothing) *before* any link changes, so a record that cannot be
trusted stops the command while the store is as it was; :func:`send_reload` carries it out.
A pid is signalled only when it is verifiably the daemon that wrote the record
(:func:`device.daemon_proc.daemon_mismatch`). Re-exported by :mod:`device.install`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from device.daemon_proc import daemon_mismatch, pid_exists
from device.errors import DoorstepError
from device.store_fs import InstallError

if TYPE_CHECKING:
    from device.install import Store

ReloadMethod = Literal["auto", "systemd", "signal", "none"]


@dataclass(frozen=True)
class ReloadTarget:
    """How ``activate``/``rollback`` will reload the daemon, decided before anything switches."""

    how: Literal["systemd", "signal", "none"]
    service: str = "doorstep-device"
    pid: int | None = None
    start_ticks: int | None = None
    uid: int | None = None


def reload_target(store: Store, method: ReloadMethod, service: str) -> ReloadTarget:
    """Decide how to reload: call this *before* switching links, so an unreadable record, or
    one naming a live process that is not verifiably the daemon (:func:`daemon_mismatch`: its
    command line, start time and user), stops the command while nothing has changed yet
    (:class:`InstallError` saying what to do). A record whose process is gone: no reload."""
    if method == "none":
        return ReloadTarget("none", service)
    if method == "systemd":
        return ReloadTarget("systemd", service)
    from device.install import read_daemon_record  # install imports this module

    try:
        record = read_daemon_record(store, live=False)
    except DoorstepError as exc:
        raise InstallError(
            f"{exc}: cannot tell which daemon to reload, so nothing was changed; restart the "
            f"daemon (it rewrites its record), or pass --reload systemd or --reload none"
        ) from None
    if method == "auto" and record is not None and record.systemd:
        return ReloadTarget("systemd", service)
    if record is None or record.state != "running" or not pid_exists(record.pid):
        return ReloadTarget("none", service)
    uid = _owner(store.state_dir)
    why = daemon_mismatch(record.pid, record.pid_start_ticks, uid)
    if why is not None:
        raise InstallError(
            f"{store.daemon_file}: {why}: it is not signalled, and nothing was changed; if the "
            "daemon runs, restart it (it rewrites its record), or pass --reload systemd or "
            "--reload none"
        )
    return ReloadTarget("signal", service, record.pid, record.pid_start_ticks, uid)


def _owner(path: Path) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def send_reload(target: ReloadTarget) -> str:
    """Carry out a :class:`ReloadTarget`; returns how ("systemd", "signal" or "none"). A pid is
    checked again just before the signal (it may have been reused since)."""
    if target.how == "systemd":
        cmd = ["systemctl", "reload", target.service]
        if os.geteuid() != 0:
            cmd = ["sudo", "-n", *cmd]  # the sudo rule in the README allows just this
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
        return "systemd"
    if target.how == "signal" and target.pid is not None and target.pid > 0:
        why = daemon_mismatch(target.pid, target.start_ticks, target.uid)
        if why is not None:
            raise InstallError(f"the daemon was not reloaded: {why}; restart it")
        try:
            os.kill(target.pid, signal.SIGHUP)
        except OSError as exc:
            raise InstallError(f"cannot signal the daemon (pid {target.pid}): {exc}") from None
        return "signal"
    return "none"


def reload_daemon(store: Store, method: ReloadMethod, service: str) -> str:
    """Ask the daemon to load ``current`` again; returns how (or "none" if no daemon runs).
    Prefer :func:`reload_target` before the switch and :func:`send_reload` after it."""
    return send_reload(reload_target(store, method, service))
