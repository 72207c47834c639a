"""The systemd unit (verified by systemd-analyze, with and without the broker drop-in; its
security exposure at most 2.0; the daemon working with the unit's /proc view), the sd_notify
protocol on a real datagram socket, and SIGHUP with a corrupt bundle (the old model keeps
serving)."""

from __future__ import annotations

import json
import os
import re
import shlex
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
BROKER_DROPIN = ROOT / "systemd" / "doorstep-device.service.d" / "broker-network.conf.example"
INSTALLED_EXE = "/opt/doorstep/bin/doorstep-device"
MAX_EXPOSURE = 2.0  # issue 11: `systemd-analyze security --offline=true` at most 2.0 (was 2.3)


def _directives(text: str) -> list[tuple[str, str]]:
    """The unit's ``Key=value`` lines, comments and section headers left out."""
    lines = (line.strip() for line in text.splitlines())
    return [
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition("=") for line in lines if "=" in line and line[0] not in "#;["
        )
    ]


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return exe


def _unit_copy(tmp_path: Path, broker_dropin: bool) -> Path:
    """The unit as ``doorstep-device unit --write`` installs it from this venv (ExecStart and
    ExecReload point at this venv, so ``verify`` holds without /opt/doorstep), optionally with
    the broker drop-in installed next to it as ``doorstep-device.service.d/broker-network.conf``
    (systemd-analyze reads it)."""
    exe = Path(sys.executable).parent / "doorstep-device"
    assert exe.is_file(), f"{exe}: missing; install doorstep into this venv (pip install -e .)"
    assert f"ExecStart={INSTALLED_EXE} " in UNIT.read_text()
    folder = tmp_path / ("with-dropin" if broker_dropin else "plain")
    proc = subprocess.run(
        [str(exe), "unit", "--write", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    unit = folder / UNIT.name
    assert f"ExecStart={exe} " in unit.read_text()
    if broker_dropin:
        (folder / f"{UNIT.name}.d").mkdir()
        shutil.copy(BROKER_DROPIN, folder / f"{UNIT.name}.d" / "broker-network.conf")
    return unit


@pytest.mark.parametrize("broker_dropin", [False, True], ids=["unit", "unit+broker-dropin"])
def test_unit_verifies_with_the_real_binary(tmp_path: Path, broker_dropin: bool) -> None:
    analyze = _systemd_analyze()
    unit = _unit_copy(tmp_path, broker_dropin)
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120
    )
    # verify warns on stderr (exit status 0) about a bad value, e.g. in the drop-in: none allowed
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    directives = _directives(UNIT.read_text())
    for pair in (
        ("Type", "notify"),
        ("Restart", "on-failure"),
        ("SupplementaryGroups", "video i2c"),
        ("StateDirectory", "doorstep"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "char-video4linux rw"),
        ("DeviceAllow", "char-media rw"),
        ("DeviceAllow", "/dev/dma_heap/linux,cma rw"),
        ("DeviceAllow", "/dev/dma_heap/system rw"),
        ("DeviceAllow", "/dev/vcio rw"),
        ("DeviceAllow", "char-i2c rw"),
        ("ProtectProc", "invisible"),
        ("IPAddressDeny", "any"),
        ("IPAddressAllow", "localhost"),
        ("IPAddressAllow", "10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 169.254.0.0/16 fc00::/7 fe80::/10"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallFilter", "~@privileged"),
        ("SystemCallErrorNumber", "EPERM"),
        ("UMask", "0027"),  # the doorstep group (deploy user) reads daemon.json and the logs
    ):
        assert pair in directives, pair
    keys = {key for key, _ in directives}
    assert "WatchdogSec" in keys
    # The camera, DMA heaps, /dev/vcio and I2C must stay reachable; ProcSubset=pid would hide
    # /proc/stat and /proc/cpuinfo (see the /proc test below).
    assert not keys & {"PrivateDevices", "ProtectClock", "PrivateUsers", "ProcSubset"}, keys


def _exposure(analyze: str, unit: Path) -> tuple[float, str]:
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    found = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)", proc.stdout
    )
    assert found, f"no overall exposure level in:\n{proc.stdout}\n{proc.stderr}"
    return float(found.group(1)), proc.stdout


def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    score, report = _exposure(analyze, _unit_copy(tmp_path, broker_dropin=False))
    assert score <= MAX_EXPOSURE, report
    assert "allow list with non-localhost entries" in report, report  # the LAN, by default
    # Allowing a hosted broker (the documented drop-in) keeps it within the bound too.
    score, report = _exposure(analyze, _unit_copy(tmp_path, broker_dropin=True))
    assert score <= MAX_EXPOSURE, report


def test_exec_reload_sends_sighup_with_only_the_venvs_python(tmp_path: Path) -> None:
    """ExecReload, as installed, run as systemd would (its words, $MAINPID filled in): the
    target gets SIGHUP, with no /bin/kill needed."""
    unit = _unit_copy(tmp_path, broker_dropin=False)
    line = dict(_directives(unit.read_text()))["ExecReload"]
    words = shlex.split(line)
    assert Path(words[0]).parent == Path(sys.executable).parent and "kill" not in words[0]
    target = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})\n"
            "print('ready', flush=True)\n"
            "got = signal.sigtimedwait({signal.SIGHUP}, 60)\n"
            "print('hup' if got else 'timeout', flush=True)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        reader = LineReader(target.stdout, "the reload target")
        assert reader.next(timeout=60) == "ready"
        words = [str(target.pid) if w == "$MAINPID" else w for w in words]
        subprocess.run(words, check=True, timeout=60)
        assert reader.next(timeout=90) == "hup"
    finally:
        stop(target)


def _proc_mount_options(text: str) -> str:
    """The ``mount -t proc`` options the unit's ProtectProc= and ProcSubset= amount to."""
    values = dict(_directives(text))
    options = []
    if values.get("ProtectProc", "default") != "default":
        options.append(f"hidepid={values['ProtectProc']}")
    if values.get("ProcSubset", "all") != "all":
        options.append(f"subset={values['ProcSubset']}")
    return ",".join(options) or "defaults"


UNSHARE = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork"]


def _run_with_proc(tmp_path: Path, options: str) -> subprocess.CompletedProcess[str]:
    """``doorstep-device run`` on a finite replay, with /proc mounted with ``options`` in its
    own mount and PID namespaces (a user namespace makes that possible without root)."""
    config = tmp_path / f"device-{options}.yaml"
    config.write_text(
        f"device_id: d1\nstate_dir: state-{options}\ntelemetry:\n  interval_s: 0.5\n"
        "power:\n  type: estimate\n  board: pi5\n"
    )
    daemon = [sys.executable, "-m", "device.cli", "run", "--config", str(config)]
    daemon += ["--source", str(tmp_path / "frames"), "--log-format", "json"]
    script = f'mount -t proc -o {options} proc /proc && exec "$@"'
    return subprocess.run(
        [*UNSHARE, "--kill-child", "sh", "-c", script, "sh", *daemon],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )


@pytest.mark.timeout(240)
def test_the_daemon_runs_with_the_units_proc_view(tmp_path: Path) -> None:
    """ProtectProc=invisible (and any ProcSubset=) as a /proc mount: the daemon still reads
    /proc/self, the estimate meter /proc/stat, and the runtime's XNNPACK /proc/cpuinfo."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(  # the same namespaces and a fresh /proc, with nothing run in them
        [*UNSHARE, "sh", "-c", "mount -t proc -o hidepid=invisible proc /proc"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /proc here (container?): {probe.stderr.strip()}")
    write_frames(render_demo(), tmp_path / "frames")
    options = _proc_mount_options(UNIT.read_text())
    assert "hidepid=invisible" in options, options
    proc = _run_with_proc(tmp_path, options)
    assert proc.returncode == 0, proc.stderr
    assert "Error in cpuinfo" not in proc.stderr, proc.stderr  # XNNPACK needs /proc/cpuinfo
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    telemetry = [r for r in records if r["log"] == "telemetry"]
    assert telemetry and records[-1]["log"] == "stop", proc.stdout[-2000:]
    last = telemetry[-1]
    assert last["rss_mb"] > 0 and last["power"]["source"] == "estimate:pi5", last
    # The run's total, not the last window's: on a busy machine the last report can come just
    # before the stop and count no inference.
    assert records[-1]["inferences"] > 0, records[-1]
    # The check sees the difference: ProcSubset=pid on top would stop the daemon at start-up.
    broken = _run_with_proc(tmp_path, options + ",subset=pid")
    assert broken.returncode != 0 and "/proc/stat" in broken.stderr, broken.stderr


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
    err = LineReader(proc.stderr, "daemon stderr")
    out = LineReader(proc.stdout, "daemon stdout", also=err)  # a failure shows both
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
