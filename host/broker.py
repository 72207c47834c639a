"""An MQTT broker on loopback for the demo when none is configured: no root, no apt.

Mosquitto when it is installed (a real broker, started as a child process with a config of our
own), otherwise amqtt in this process (pure Python, MQTT 3.1.1). Either listens on
127.0.0.1 at a free port and is stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from device.errors import DoorstepError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(proc: subprocess.Popen[Any] | None) -> None:
    """Stop ``proc`` (SIGTERM, then SIGKILL after 10 s) and reap it; None or gone: nothing."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def find_mosquitto() -> str | None:
    exe = shutil.which("mosquitto")
    if exe is None and Path("/usr/sbin/mosquitto").exists():
        exe = "/usr/sbin/mosquitto"
    return exe


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.url``; ``kind`` says which broker runs."""

    def __init__(self, prefer: str = "auto", extra_config: str = "") -> None:
        """``extra_config``: more mosquitto.conf lines (mosquitto only)."""
        if prefer not in ("auto", "mosquitto", "amqtt"):
            raise DoorstepError(f"embedded broker {prefer!r}: choose auto, mosquitto or amqtt")
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._mosquitto = find_mosquitto() if prefer in ("auto", "mosquitto") else None
        if prefer == "mosquitto" and self._mosquitto is None:
            raise DoorstepError("mosquitto is not installed (apt install mosquitto)")
        self.kind = "mosquitto" if self._mosquitto else "amqtt"
        # amqtt speaks MQTT 3.1.1 only
        self.protocol = "5" if self.kind == "mosquitto" else "3.1.1"
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._extra = extra_config

    def start(self) -> EmbeddedBroker:
        if self._mosquitto:
            self._tmp = tempfile.TemporaryDirectory(prefix="doorstep-broker-")
            conf = Path(self._tmp.name) / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                + self._extra
            )
            self._proc = subprocess.Popen(
                [self._mosquitto, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            self._start_amqtt()
        if not wait_for_port(self.port, 10):
            self.stop()
            raise DoorstepError(f"the embedded {self.kind} broker did not start on {self.url}")
        return self

    def _start_amqtt(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise DoorstepError(
                "no broker: install mosquitto, or amqtt (pip install amqtt; the host extra has it)"
            ) from None
        for name in ("amqtt", "transitions"):  # their INFO chatter is not the demo's
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="amqtt", daemon=True)
        self._thread.start()
        started.wait(15)
        if failure:
            raise DoorstepError(f"the embedded amqtt broker failed to start: {failure[0]}")

    def stop(self) -> None:
        terminate(self._proc)
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._loop is not None and self._broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = self._broker = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
