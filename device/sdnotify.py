"""The sd_notify protocol: READY, WATCHDOG, RELOADING, STOPPING, STATUS to systemd.

A datagram to the socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace); nothing happens when it is unset (not under systemd). The watchdog interval comes
from ``$WATCHDOG_USEC``; :meth:`Notifier.watchdog` pets it at most twice per interval, so it can
be called from every frame: a hung camera or runtime stops the frames and trips it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        self._addr = ("\0" + path[1:]) if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval = int(usec) / 1e6 if usec.isdigit() else None
        self._last_pet = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # systemd went away: nothing to tell
                self._sock.sendto("\n".join(fields).encode(), self._addr)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_pet >= self.watchdog_interval / 2:
            self._last_pet = now
            self.send("WATCHDOG=1")
