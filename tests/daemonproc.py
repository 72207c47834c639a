"""A real ``doorstep-device run`` in a child process, for fault tests and the fault trials.

It reads the daemon's JSON-lines stdout with deadlines (:class:`childproc.LineReader`), can
give it a real sd_notify socket (:class:`NotifySocket`, a bound datagram socket, as systemd's
is), start it with the picamera2 stand-in in place of the camera library, and kill it with
SIGKILL at any instant.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from childproc import LineReader

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class NotifySocket:
    """A datagram socket at ``path`` collecting what the daemon sends systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="notify", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.extend(data.decode().split("\n"))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


class DaemonProc:
    """``doorstep-device run --config CONFIG --log-format json ARGS`` as a child process."""

    def __init__(
        self,
        config: Path,
        *args: str,
        notify: NotifySocket | None = None,
        watchdog_s: float | None = None,
        standin: dict[str, Any] | None = None,
    ) -> None:
        argv = ["run", "--config", str(config), "--log-format", "json", *args]
        if standin is None:
            cmd = [sys.executable, "-m", "device.cli", *argv]
        else:  # the picamera2 stand-in, put in place before doorstep imports the camera library
            boot = (
                "import sys, cv2; sys.path.insert(0, {tests!r}); import picamera2_standin as s; "
                "s.install(cv2.imread({image!r}), fail_after={fail}, hang_after={hang}); "
                "from device.cli import main; sys.exit(main({argv!r}))"
            ).format(
                tests=str(TESTS),
                image=str(standin["image"]),
                fail=standin.get("fail_after"),
                hang=standin.get("hang_after"),
                argv=argv,
            )
            cmd = [sys.executable, "-c", boot]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify.path)
        if watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out = LineReader(self.proc.stdout, "daemon stdout")
        self.err = LineReader(self.proc.stderr, "daemon stderr")
        self.records: list[dict[str, Any]] = []

    def record(self, kind: str, timeout: float = 60, **match: Any) -> dict[str, Any]:
        """The next log record of ``kind`` (whose fields equal ``match``)."""

        def wanted(r: dict[str, Any]) -> bool:
            self.records.append(r)
            return r.get("log") == kind and all(r.get(k) == v for k, v in match.items())

        try:
            return self.out.record_until(wanted, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstderr:\n{self.err.text()[-3000:]}") from None

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"the daemon did not end within {timeout:g} s\nstdout:\n{self.out.text()[-3000:]}"
                f"\nstderr:\n{self.err.text()[-3000:]}"
            ) from None

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def all_records(self, timeout: float = 30) -> list[dict[str, Any]]:
        """Every record printed, once the process has ended."""
        rest = [json.loads(line) for line in self.out.rest(timeout) if line.startswith("{")]
        return [*self.records, *rest]


def wait_file(path: Path, predicate: Callable[[Path], bool], timeout: float) -> bool:
    """Poll a file the daemon writes (its record, its log) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate(path):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return False


class Scene:
    """What a still-image "camera" sees: a file the daemon's ``still`` source re-reads when it
    is replaced (atomically, by a rename, so the daemon never reads half an image)."""

    def __init__(self, path: Path, images: dict[str, Any]) -> None:
        self.path, self.images = path, images
        self.current: str | None = None

    def show(self, name: str) -> None:
        import cv2

        tmp = self.path.with_name(f".{self.path.name}.tmp.png")
        assert cv2.imwrite(str(tmp), self.images[name])
        os.replace(tmp, self.path)
        self.current = name


def porch_scenes(shared: Path, coco_samples: Path) -> dict[str, Any]:
    """A fixed camera's view as real photos: ``empty`` (owl.jpg, no parcel) and ``parcel``
    (a real doorstep parcel from packages-v6), both 640x480."""
    import cv2
    import pytest

    parcels = shared / "data" / "packages-v6" / "test" / "images"
    if not parcels.is_dir():
        pytest.skip(f"needs {parcels} (the project's shared data)")
    empty = cv2.resize(cv2.imread(str(coco_samples / "owl.jpg")), (640, 480))
    parcel = cv2.resize(cv2.imread(str(sorted(parcels.glob("*.jpg"))[0])), (640, 480))
    return {"empty": empty, "parcel": parcel}


PORCH_CONFIG = """
device_id: {device_id}
state_dir: {state}
presence: {{arrive_hits: 3, arrive_window: 5, remove_after_s: {remove}, reminder_every_s: null}}
motion: {{max_idle_s: 0.3}}
telemetry: {{interval_s: {interval}}}
source: {{type: still, path: {scene}, fps: 10}}
mqtt: {{url: {url}, drain_timeout_s: {drain}}}
"""


def porch_config(
    path: Path,
    *,
    state: Path,
    scene: Path,
    url: str,
    device_id: str = "porch",
    remove: float = 2.0,
    interval: float = 1.0,
    drain: float = 10.0,
) -> Path:
    """A device.yaml for a daemon watching a :class:`Scene` (a still image as its camera)."""
    path.write_text(
        PORCH_CONFIG.format(
            device_id=device_id,
            state=state,
            remove=remove,
            interval=interval,
            scene=scene,
            url=url,
            drain=drain,
        )
    )
    return path


def unique_events(listener: Any) -> list[dict[str, Any]]:
    """The events as a subscriber keeps them: redeliveries (the same id) de-duplicated."""
    seen: dict[str, dict[str, Any]] = {}
    for e in listener.events():
        seen.setdefault(e["id"], e)
    return list(seen.values())
