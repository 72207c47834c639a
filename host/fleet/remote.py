"""``doorstep-device`` on a doorbell, driven over an SSH :class:`~host.fleet.ssh.Connection`.

Each method runs one device command with ``--state-dir``, ``--config`` (when the inventory
names one) and ``--json``, and returns the JSON object it printed. A refusal by the device
(exit 2, ``doorstep-device: error: ...``) becomes :class:`RefusedError` carrying the device's
own words; a missing command becomes :class:`NotInstalledError`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any, Literal

from device.install import RECORD_MAX_BYTES
from device.record import STATUS_MAX_BYTES
from host.fleet.facts import parse_daemon, parse_status
from host.fleet.inventory import Device, ReloadMethod
from host.fleet.plan import DaemonFacts, DeviceFacts, Layout
from host.fleet.ssh import CommandError, Connection, DeviceError, TransferError

DeviceReload = ReloadMethod | Literal["none"]
"""``--reload`` of activate and rollback: ``none`` switches links only"""

_ERROR_LINE = re.compile(r"^doorstep-device: error: (.*)$", re.MULTILINE | re.DOTALL)


class RefusedError(DeviceError):
    """``doorstep-device`` on the device refused (bad hash, bad signature, no previous, ...)."""


class NotInstalledError(DeviceError):
    """``doorstep-device`` is missing on the device, or too old to have the command."""


class RemoteDoorstep:
    """The doorstep-device commands of one device, over an open connection."""

    def __init__(self, conn: Connection, device: Device) -> None:
        self.conn = conn
        self.device = device

    @property
    def name(self) -> str:
        return self.device.name

    async def call(self, command: str, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``doorstep-device COMMAND ARGS ... --json``; its JSON object, or an error."""
        argv = self.device.device_command(command, *args)
        result = await self.conn.run(argv, check=False, timeout=timeout)
        if result.exit_status != 0:
            raise self._failure(command, result.exit_status, result.stderr)
        doc = _json_object(result.stdout)
        if doc is None:
            raise DeviceError(
                self.name,
                f"`doorstep-device {command} --json` printed no JSON object (or one too large "
                f"or nested too deeply): {result.stdout.strip()[:200]!r}",
            )
        return doc

    def _failure(self, command: str, status: int, stderr: str) -> DeviceError:
        shown = shlex.join(self.device.doorstep_argv(command))
        if status in (126, 127):
            return NotInstalledError(
                self.name,
                f"`{shown}` not found on the device: install doorstep[device] there "
                "(or set `doorstep`/`python` for it in the fleet file)",
            )
        if "invalid choice" in stderr and f"'{command}'" in stderr:
            return NotInstalledError(
                self.name,
                f"doorstep on the device is too old: it has no `{command}` command; upgrade it",
            )
        found = _ERROR_LINE.search(stderr)
        if found:
            return RefusedError(self.name, found.group(1).strip())
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return DeviceError(self.name, f"`{shown}` failed with exit code {status}: {tail}")

    # -------------------------------------------------------------------------- commands

    async def status(self) -> dict[str, Any]:
        return await self.call("status", timeout=60.0)

    async def facts(self) -> DeviceFacts:
        """The planner's facts; a missing or outdated doorstep is a fact, not an error."""
        try:
            doc = await self.status()
        except NotInstalledError as exc:
            return DeviceFacts(reachable=True, doorstep_version=None, error=exc.reason)
        return parse_status(doc, self.name)

    async def install(self, part: PurePosixPath, sha: str, tar_sha256: str) -> dict[str, Any]:
        return await self.call(
            "install", str(part), "--id", sha, "--sha256", tar_sha256, timeout=600.0
        )

    async def activate(self, path: PurePosixPath, reload: DeviceReload) -> dict[str, Any]:
        return await self.call("activate", str(path), "--reload", reload)

    async def rollback(self, reload: DeviceReload) -> dict[str, Any]:
        return await self.call("rollback", "--reload", reload)

    async def prune(self, keep: int) -> dict[str, Any]:
        return await self.call("prune", "--keep", str(keep))

    async def daemon(self) -> DaemonFacts | None:
        """The running daemon's own record, cheaply: what the health gate polls.

        ``<state_dir>/daemon.json`` (the record ``status`` reports as ``daemon``) read over
        SFTP, its pid checked in ``/proc``: no Python starts on the device, which matters on a
        small Pi that is busy loading the new model while it is polled. "running": the record's
        pid is alive (``status`` on the device checks its command line too). A record that is
        not a regular file, too large or invalid gives facts whose ``error`` says so.
        """
        path = str(Layout(self.device.state_dir).daemon_record)
        try:
            raw = await self.conn.read_file(path, limit=RECORD_MAX_BYTES, regular_only=True)
        except TransferError as exc:  # a link, a FIFO, too big: an invalid record, not a crash
            why = exc.reason.removeprefix(f"{path}: ")
            return DaemonFacts(error=f"{path}: invalid record: {why}")
        if raw is None:
            return None
        facts = parse_daemon(raw, path)  # the daemon writes atomically: never a torn record
        if facts.error or facts.pid is None:
            return facts
        alive = facts.state != "stopped" and await self.conn.exists(f"/proc/{facts.pid}")
        return replace(facts, state="running" if alive else "stopped")

    # -------------------------------------------------------------------------- files

    async def file_size(self, path: PurePosixPath) -> int | None:
        """Size of a file on the device, or None when it does not exist."""
        result = await self.conn.run(
            f"stat -c %s -- {shlex.quote(str(path))} 2>/dev/null || true", timeout=30.0
        )
        text = result.stdout.strip()
        return int(text) if text.isdigit() else None

    async def remove(self, path: PurePosixPath) -> None:
        await self.conn.run(["rm", "-f", "--", str(path)], timeout=30.0)


def _json_object(text: str) -> dict[str, Any] | None:
    """The JSON object a command printed (the whole output, else its last line); None for
    anything else, including output past :data:`STATUS_MAX_BYTES` or nested too deeply."""
    text = text.strip()
    if len(text) > STATUS_MAX_BYTES:
        return None
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            doc = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(doc, dict):
            return doc
    return None


__all__ = ["CommandError", "NotInstalledError", "RefusedError", "RemoteDoorstep"]
