"""A fresh install's files and defaults: ``init``, ``unit``, ``config-path``, the state directory
of a run by hand, and ``inspect`` with no model (real processes, the real shipped files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from childproc import NOBODY, as_nobody

from device import configpath
from device.config import load_config
from device.init import TEMPLATE, UNIT, render_config, unit_warnings

ROOT = Path(__file__).resolve().parent.parent


def device(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``doorstep-device ARGS`` with a clean environment for the config lookup."""
    base = {k: v for k, v in os.environ.items() if k not in ("DOORSTEP_CONFIG", "STATE_DIRECTORY")}
    return subprocess.run(
        [sys.executable, "-m", "device.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def test_the_checkout_links_to_the_shipped_files() -> None:
    """configs/device.yaml and the unit in systemd/ are the files the wheel carries."""
    assert (ROOT / "configs" / "device.yaml").resolve() == TEMPLATE.resolve()
    assert (ROOT / "systemd" / "doorstep-device.service").resolve() == UNIT.resolve()
    load_config(TEMPLATE)  # the template is a working config as it stands


def test_init_writes_a_commented_config_with_the_values_given(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "device.yaml"
    proc = device(
        "init", "--config", str(target), "--device-id", "porch-2",
        "--broker", "mqtts://broker.lan:8883", "--source", "rtsp://cam.lan/live?x=1#a",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {target}" in proc.stdout and "check-config" in proc.stdout
    text = target.read_text()
    assert text.count("\n#") > 20  # the template's comments are kept
    cfg = load_config(target)
    assert cfg.device_id == "porch-2"
    assert cfg.mqtt is not None and cfg.mqtt.url == "mqtts://broker.lan:8883"
    assert cfg.source is not None and cfg.source.type == "opencv"
    assert cfg.source.uri == "rtsp://cam.lan/live?x=1#a"  # a '#' is not a YAML comment here
    assert cfg.presence == load_config(TEMPLATE).presence  # the rest is the template's
    assert (target.stat().st_mode & 0o777) == 0o644  # the service user reads it


def test_init_without_a_broker_and_with_a_usb_camera(tmp_path: Path) -> None:
    target = tmp_path / "device.yaml"
    assert (
        device("init", "--config", str(target), "--broker", "none", "--source", "0").returncode == 0
    )
    data = yaml.safe_load(target.read_text())
    assert data["mqtt"] is None and data["source"]["uri"] == 0
    assert load_config(target).device_id  # the host name, made a valid id


def test_init_never_replaces_a_file_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "device.yaml"
    target.write_text("device_id: mine\n")
    proc = device("init", "--config", str(target))
    assert proc.returncode == 2 and "exists: not replaced" in proc.stderr
    assert target.read_text() == "device_id: mine\n"
    proc = device("init", "--config", str(target), "--force", "--device-id", "new")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "device.yaml.bak").read_text() == "device_id: mine\n"
    assert load_config(target).device_id == "new"


def test_init_does_not_follow_a_planted_backup_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "device.yaml"
    target.write_text("device_id: old\n")
    (tmp_path / "device.yaml.bak").symlink_to(victim)
    proc = device("init", "--config", str(target), "--force")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "device_id: old\n"  # nothing replaced either


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--device-id", "front door", "--device-id 'front door'"),
        ("--broker", "http://broker.lan", "scheme 'http' is not mqtt"),
        ("--broker", "mqtt://broker.lan:99999", "mqtt.url"),
    ],
)
def test_init_refuses_values_that_cannot_work(
    tmp_path: Path, flag: str, value: str, says: str
) -> None:
    target = tmp_path / "device.yaml"
    proc = device("init", "--config", str(target), flag, value)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no temp file left either


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "etc" / "device.yaml"
    monkeypatch.setattr(configpath, "SYSTEM_CONFIG", system)
    monkeypatch.delenv("DOORSTEP_CONFIG", raising=False)
    with pytest.raises(configpath.ConfigError, match=r"DOORSTEP_CONFIG.*device.yaml.*init"):
        configpath.config_path(None)
    assert configpath.init_target(None) == system
    system.parent.mkdir()
    system.write_text("device_id: x\n")
    assert configpath.config_path(None) == system
    monkeypatch.setenv("DOORSTEP_CONFIG", str(tmp_path / "env.yaml"))
    assert configpath.config_path(None) == tmp_path / "env.yaml"
    assert configpath.config_path("given.yaml") == Path("given.yaml")


def test_config_path_and_check_config_follow_doorstep_config(tmp_path: Path) -> None:
    target = tmp_path / "d.yaml"
    assert device("init", "--config", str(target), "--broker", "none").returncode == 0
    env = {"DOORSTEP_CONFIG": str(target)}
    proc = device("config-path", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == str(target)
    proc = device("check-config", env=env)
    assert proc.returncode == 0 and f"{target}: valid" in proc.stderr
    if not configpath.SYSTEM_CONFIG.exists():  # this machine is not a doorbell
        proc = device("config-path", cwd=tmp_path)
        assert proc.returncode == 2 and "doorstep-device init" in proc.stderr


def test_run_without_config_reads_doorstep_config(tmp_path: Path, coco_samples: Path) -> None:
    target = tmp_path / "d.yaml"
    state = tmp_path / "state"
    init = device("init", "--config", str(target), "--broker", "none", "--state-dir", str(state))
    assert init.returncode == 0, init.stderr
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(coco_samples / "pets.jpg", frames / "pets.jpg")
    proc = device(
        "run", "--source", str(frames), env={"DOORSTEP_CONFIG": str(target)}, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # The state directory is named only in that config: it was read.
    assert json.loads((state / "daemon.json").read_text())["state"] == "stopped"


def test_a_user_who_cannot_write_var_lib_keeps_state_in_xdg_state_home(
    coco_samples: Path,
) -> None:
    """`run` by hand as a normal user with the template's state_dir: one line, then it runs."""
    nobody = as_nobody(ROOT)
    base = Path(tempfile.mkdtemp(prefix="doorstep-user-"))  # readable by nobody, unlike tmp_path
    try:
        base.chmod(0o755)
        config = base / "device.yaml"
        config.write_text(render_config("by-hand", "none", None, None))
        config.chmod(0o644)
        frames = base / "frames"
        frames.mkdir(mode=0o755)
        shutil.copy(coco_samples / "pets.jpg", frames / "pets.jpg")
        xdg = base / "xdg"
        xdg.mkdir()
        os.chown(xdg, NOBODY, NOBODY)
        env = {
            k: v for k, v in os.environ.items() if k not in ("DOORSTEP_CONFIG", "STATE_DIRECTORY")
        }
        proc = subprocess.run(
            [*nobody, sys.executable, "-m", "device.cli", "run", "--config", str(config),
             "--source", str(frames)],
            capture_output=True, text=True, timeout=300, cwd=base, env={**env, "XDG_STATE_HOME": str(xdg)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        (line,) = [x for x in proc.stderr.splitlines() if "not writable by this user" in x]
        assert str(configpath.SYSTEM_STATE) in line and str(xdg / "doorstep") in line
        record = json.loads((xdg / "doorstep" / "daemon.json").read_text())
        assert record["state"] == "stopped"
        assert (xdg / "doorstep" / "log" / "doorstep.jsonl").stat().st_uid == NOBODY
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_state_fallback_only_for_the_system_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setattr(configpath, "SYSTEM_STATE", tmp_path / "ro" / "doorstep")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(configpath, "_writable", lambda d: False)  # as a user who may not
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert configpath.user_state_dir(tmp_path / "ro" / "doorstep") == tmp_path / "xdg" / "doorstep"
    assert configpath.user_state_dir(tmp_path / "elsewhere") is None  # chosen: refused, not moved
    monkeypatch.setenv("XDG_STATE_HOME", "relative/not/allowed")
    assert configpath.user_state_dir(tmp_path / "ro" / "doorstep") == (
        Path.home() / ".local" / "state" / "doorstep"
    )
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/doorstep")  # under systemd: the unit's
    assert configpath.user_state_dir(tmp_path / "ro" / "doorstep") is None


def test_unit_points_at_this_install(tmp_path: Path) -> None:
    proc = device("unit")
    assert proc.returncode == 0, proc.stderr
    assert f"ExecStart={sys.prefix}/bin/doorstep-device run " in proc.stdout
    assert f"ExecReload={sys.prefix}/bin/python3 " in proc.stdout
    assert "pypi.org" not in proc.stdout and "ExecReload=/bin/kill" not in proc.stdout
    assert device("unit", "--write", str(tmp_path)).returncode == 0
    again = device("unit", "--write", str(tmp_path))
    assert again.returncode == 2 and "exists" in again.stderr
    assert unit_warnings("/home/pi/doorstep") and "ProtectHome" in unit_warnings("/home/pi/x")[0]


def test_inspect_with_no_model_shows_what_the_device_runs(tmp_path: Path) -> None:
    proc = device("inspect", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "inspecting " in proc.stderr and "parcel-ssd" in proc.stderr  # the shipped one
    assert json.loads(proc.stdout)["manifest"]["name"] == "doorstep-parcel-ssd"
