"""A full disk is a fault that passes; an unwritable state directory is refused at start.

Real filesystems (a small tmpfs that fills up and is freed, or is mounted read-only), a real
daemon in a child process on a still-image "camera" showing real photos, a real Mosquitto.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from childproc import as_nobody
from conftest import SHARED
from daemonproc import ROOT, DaemonProc, Scene, porch_config, unique_events
from fsfaults import fill, free, remount, small_tmpfs
from test_alerts import Listener


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "state", size_kib=4096) as mount:
        yield mount


def _config(tmp_path: Path, state: Path, url: str, scene: Path) -> Path:
    return porch_config(
        tmp_path / "device.yaml", state=state, scene=scene, url=url, device_id="porch-disk"
    )


_unique = unique_events


def _last_state(li: Listener) -> dict[str, Any] | None:
    states = [json.loads(p) for t, p, _ in li.messages if t.endswith("/state")]
    return states[-1] if states else None


def test_a_disk_that_fills_mid_run_and_is_freed_loses_nothing(
    tmp_path: Path, disk: Path, mosquitto: Any, porch: Scene
) -> None:
    listener = Listener(mosquitto.url)
    daemon = DaemonProc(_config(tmp_path, disk, mosquitto.url, porch.path))
    try:
        daemon.record("start", timeout=120)
        fill(disk)
        porch.show("parcel")
        arrived = daemon.record("event", timeout=60, event="arrived")
        daemon.record("storage_degraded", timeout=60)
        # detection goes on and the alert still goes out, live, from memory
        assert listener.wait(lambda li: arrived["id"] in [e["id"] for e in li.events()], 30)
        assert listener.wait(
            lambda li: (_last_state(li) or {}).get("storage", {}).get("status") == "degraded", 30
        ), _last_state(listener)
        tele = daemon.record("telemetry", timeout=60)
        assert tele["storage"]["status"] == "degraded"
        free(disk)
        daemon.record("storage_ok", timeout=120)  # the outbox's retry found space again
        porch.show("empty")
        daemon.record("event", timeout=60, event="removed")
        assert listener.wait(lambda li: len(_unique(li)) >= 2, 30)
        assert daemon.stop() == 0
    finally:
        daemon.kill9()
        listener.close()
    assert [e["event"] for e in _unique(listener)] == ["arrived", "removed"]
    assert "Traceback" not in daemon.err.text()
    log = (disk / "log" / "doorstep.jsonl").read_text().splitlines()
    assert any(json.loads(line)["log"] == "stop" for line in log)  # the log is written again


def test_a_daemon_started_on_a_full_disk_runs_degraded(
    tmp_path: Path, disk: Path, mosquitto: Any, porch: Scene
) -> None:
    fill(disk)
    listener = Listener(mosquitto.url)
    daemon = DaemonProc(_config(tmp_path, disk, mosquitto.url, porch.path))
    try:
        daemon.record("start", timeout=120)
        porch.show("parcel")
        arrived = daemon.record("event", timeout=60, event="arrived")
        assert listener.wait(lambda li: arrived["id"] in [e["id"] for e in li.events()], 30)
        free(disk)
        daemon.record("storage_ok", timeout=120)
        assert daemon.stop() == 0
    finally:
        daemon.kill9()
        listener.close()
    assert "Traceback" not in daemon.err.text()


def _run_once(config: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "device.cli", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_read_only_state_directory_is_refused_in_one_line(
    tmp_path: Path, disk: Path, porch: Scene
) -> None:
    remount(disk, read_only=True)
    try:
        done = _run_once(_config(tmp_path, disk, "mqtt://127.0.0.1:1", porch.path))
    finally:
        remount(disk, read_only=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "error:" in x]
    assert str(disk) in line and "state directory" in line and "Read-only file system" in line


def test_a_state_directory_owned_by_another_user_is_refused_in_one_line() -> None:
    """The daemon as an unprivileged user (nobody) on a root-owned state directory."""
    nobody = as_nobody(ROOT)
    owl = SHARED / "data" / "coco-samples" / "owl.jpg"
    if not owl.is_file():
        pytest.skip(f"needs {owl} (the project's shared data)")
    base = Path(tempfile.mkdtemp(prefix="doorstep-owner-"))  # readable by nobody, unlike tmp_path
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir(mode=0o755)  # root's, not writable by nobody
        scene = base / "scene.png"
        shutil.copy(owl, scene)
        config = _config(base, state, "mqtt://127.0.0.1:1", scene)
        done = _run_once(config, *nobody)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "error:" in x]
    assert "state directory" in line and "uid 65534" in line and "Permission denied" in line
