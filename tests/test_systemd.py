"""The systemd unit (verified by systemd-analyze), the sd_notify protocol on a real datagram
socket, and SIGHUP with a corrupt bundle (the old model keeps serving)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from childproc import LineReader, finish, stop

from device.models import DEFAULT_BUNDLE
from host.render import render_demo, write_frames

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "doorstep-device.service"


def test_unit_verifies_with_the_real_binary(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).parent / "doorstep-device"
    unit = tmp_path / "doorstep-device.service"
    unit.write_text(UNIT.read_text().replace("/opt/doorstep/bin/doorstep-device", str(exe)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "SupplementaryGroups=video i2c",
        "StateDirectory=doorstep",
        "DeviceAllow=char-video4linux rw",
    ):
        assert line in text
    assert (
        "PrivateDevices=" not in text and "ProtectClock=" not in text
    )  # the camera must still work


def _daemon(tmp_path: Path, source: str | None, config: str, **env: str) -> subprocess.Popen[str]:
    """``doorstep-device run`` in a child process, JSON log lines on its stdout."""
    (tmp_path / "device.yaml").write_text(config)
    cmd = [sys.executable, "-m", "device.cli", "run", "--config", str(tmp_path / "device.yaml")]
    cmd += ["--log-format", "json"]
    cmd += ["--source", source] if source else []
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )


def test_ready_watchdog_and_stopping_on_a_real_datagram_socket(tmp_path: Path) -> None:
    write_frames(render_demo(), tmp_path / "frames")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    proc = _daemon(
        tmp_path,
        str(tmp_path / "frames"),
        "device_id: d1\nstate_dir: s\n",
        NOTIFY_SOCKET=str(tmp_path / "notify"),
        WATCHDOG_USEC="1",
    )
    got: list[str] = []
    try:
        while "STOPPING=1" not in got:
            got += sock.recv(4096).decode().split("\n")
    finally:
        sock.close()
        _, err = finish(proc)
    assert proc.returncode == 0, err
    assert got.index("READY=1") < got.index("WATCHDOG=1") < got.index("STOPPING=1")
    assert got.count("WATCHDOG=1") >= 20  # petted from the frame loop, one per frame here
    assert any(f.startswith("STATUS=") for f in got)


def test_sighup_with_a_corrupt_bundle_keeps_serving_the_old_model(
    tmp_path: Path, traffic_video: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    config = (
        f"device_id: d1\nstate_dir: s\nmodel:\n  path: {bundle}\n"
        f"source:\n  type: opencv\n  uri: {traffic_video}\n  loop: true\n"
        "telemetry:\n  interval_s: 0.5\n"
    )
    proc = _daemon(tmp_path, None, config)  # a looping video: a source that never ends
    out, err = LineReader(proc.stdout, "daemon stdout"), LineReader(proc.stderr, "daemon stderr")
    try:
        first = out.record_until(lambda r: True, timeout=90)
        assert first["log"] == "start"
        model = bundle / "model.tflite"
        data = bytearray(model.read_bytes())
        data[100_000] ^= 0xFF
        model.write_bytes(bytes(data))  # the new "deployment" is corrupt
        proc.send_signal(signal.SIGHUP)  # its handler is installed before "start" is logged
        line = out.record_until(lambda r: r["log"] == "reload_failed", timeout=90)
        assert "does not match the manifest" in line["error"] and line["sha256"] == first["sha256"]
        # Still serving: the second telemetry report after the failed reload covers only time
        # after it (the first may span it), and it counts new frames and inferences.
        out.record_until(lambda r: r["log"] == "telemetry", timeout=60)
        after = out.record_until(lambda r: r["log"] == "telemetry", timeout=60)
        assert after["frames"] > 0 and after["inferences"] > 0, after
        proc.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in out.rest(timeout=60) if line.startswith("{")]
    finally:
        code = stop(proc)
    assert code == 0, err.text()
    assert rest and rest[-1]["log"] == "stop"
    assert not [r for r in rest if r["log"] in ("reloaded", "reload_failed")]  # one reload only
