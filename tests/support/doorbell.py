"""The real ``doorstep-device run`` daemon for a loopback device (tests and the benchmark).

Each :class:`DoorbellDaemon` writes a ``device.yaml`` into its device's state directory (a still
image as the camera, the model from ``<state_dir>/current`` or the shipped one, optional MQTT,
the trusted signing keys) and runs the daemon as a child process. A deploy over SSH then reloads
it exactly as on a Pi without systemd: ``activate`` sends it SIGHUP, and its ``daemon.json`` is
what the health gate reads.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from support.loopback import ROOT, SshDevice

START_TIMEOUT_S = 60.0


class DaemonStartError(RuntimeError):
    """A daemon did not come up; the message carries the tail of its log."""


def write_still_image(path: Path) -> Path:
    """A synthetic 640x480 frame to serve as every doorbell's camera."""
    import cv2

    from device.bench import synthetic_frame

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), synthetic_frame(640, 480, seed=3)):
        raise OSError(f"{path}: could not write the still image")
    return path


def _die_with_parent() -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(eq=False)
class DoorbellDaemon:
    """``doorstep-device run`` for one loopback device."""

    device_id: str
    state_dir: Path
    workdir: Path
    python: str = sys.executable
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def for_device(cls, device: SshDevice) -> DoorbellDaemon:
        return cls(device.name, device.state_dir, device.workdir, device.python)

    @property
    def config(self) -> Path:
        return self.state_dir / "device.yaml"

    @property
    def log(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(
        self,
        image: Path,
        public_keys: Sequence[Path] = (),
        broker_url: str | None = None,
        fps: float = 5.0,
    ) -> Path:
        doc: dict[str, Any] = {
            "device_id": self.device_id,
            "state_dir": str(self.state_dir),
            "model": {"path": None, "num_threads": 1},
            "source": {"type": "still", "path": str(image), "fps": fps},
            "mqtt": (
                {
                    "url": broker_url,
                    "home_assistant": False,
                    "snapshot": False,
                    "drain_timeout_s": 2,
                }
                if broker_url
                else None
            ),
            "telemetry": {"log_file": str(self.state_dir / "log" / "doorstep.jsonl")},
            "signing": {"public_keys": [str(k) for k in public_keys]},
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        return self.config

    def start(self) -> None:
        """Launch the daemon (returns at once; :meth:`wait_ready` waits for its record)."""
        if self.running:
            return
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)  # not under systemd: activate reloads it with SIGHUP
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.python, "-m", "device.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=env,
                preexec_fn=_die_with_parent,
            )

    def record(self) -> dict[str, Any] | None:
        """Its ``daemon.json``, or None before it wrote one."""
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "daemon.json").read_text())
        except (OSError, ValueError):
            return None
        return data

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the daemon has written its record (its model loaded and self-tested)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.record()
            if rec is not None and rec.get("pid") == self.pid and rec.get("state") == "running":
                return rec
            if not self.running:
                break
            time.sleep(0.05)
        how = "timed out" if self.running else "exited"
        self.stop()
        raise DaemonStartError(
            f"{self.device_id}: the daemon {how}; {self.log}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def cpu_s(self) -> float:
        """CPU seconds the daemon has used so far (0 when not running)."""
        if self._proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_daemons(
    devices: Iterable[SshDevice],
    image: Path,
    public_keys: Sequence[Path] = (),
    broker_url: str | None = None,
) -> list[DoorbellDaemon]:
    """Configure and start a daemon per device, all at once; return when every one is ready."""
    daemons = [DoorbellDaemon.for_device(d) for d in devices]
    try:
        for daemon in daemons:
            daemon.write_config(image, public_keys, broker_url)
            daemon.start()
        for daemon in daemons:
            daemon.wait_ready()
    except BaseException:
        for daemon in daemons:
            daemon.stop()
        raise
    return daemons
