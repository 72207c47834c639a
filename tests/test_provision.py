"""``doorstep-host provision`` against loopback devices: real sshd, real venvs, real pip installs
of wheels built from this checkout, real ``useradd``/``groupadd`` on a fresh root (``--prefix``),
``visudo -c`` and ``systemd-analyze verify``; the daemon started detached (systemd cannot run
here) and health-checked through its ``daemon.json``. Plus the pure planner on facts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from sshd import ROOT, SshDevice, SshFleet

from host.fleet.inventory import Device
from host.fleet.provision import ProvisionOptions, Wheel, parse_facts, plan_provision
from host.wheel import build_device_wheel

pytestmark = [pytest.mark.host, pytest.mark.timeout(900)]

PHOTO = Path(os.environ.get("DOORSTEP_SHARED", ROOT.parent / "shared")) / "data" / "coco-samples"


def _build_wheel(out: Path, version: str | None = None, broken: bool = False) -> Path:
    """The device wheel as `doorstep-host wheel` builds it; ``version`` bumps it, ``broken``
    makes `doorstep-device run` fail at start."""

    def edit(src: Path) -> None:
        if version:
            for rel in ("pyproject.toml", "device/__init__.py"):
                path = src / rel
                path.write_text(path.read_text().replace('"0.1.0"', f'"{version}"'))
        if broken:
            path = src / "device" / "daemon.py"
            path.write_text(
                path.read_text() + "\n\ndef run(*args, **kwargs):\n    raise SystemExit(3)\n"
            )

    return build_device_wheel(ROOT, out / "dist", edit=edit)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel and every wheel its device extra needs, in one directory, so the
    devices' pip installs need no network (`--no-index --find-links`)."""
    house = tmp_path_factory.mktemp("wheelhouse")
    wheel = _build_wheel(house)
    shutil.move(wheel, house / wheel.name)
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(house),
         "--find-links", str(house), f"{house / wheel.name}[device]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if got.returncode != 0:
        pytest.skip(
            f"cannot gather the device's wheels from the package registry: {got.stderr[-300:]}"
        )
    return house


def _fresh_root(device: SshDevice) -> Path:
    """An empty root for the device: /etc with just root, nobody and the video group."""
    root = device.workdir / "root"
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text("root:x:0:\nvideo:x:44:\nnogroup:x:65534:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\nvideo:*::\nnogroup:*::\n")
    for path in (etc / "shadow", etc / "gshadow"):
        path.chmod(0o640)
    return root


def _fleet_file(fleet: SshFleet, path: Path) -> Path:
    path.write_text(yaml.safe_dump({"devices": [d.fleet_entry() for d in fleet]}))
    return path


def _provision(
    fleet_file: Path, wheel: Path, house: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, object]]]:
    base = os.path.realpath(sys.executable)  # the interpreter a venv is made from
    broker = [] if "--broker" in extra else ["--broker", "none"]
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "provision", "--fleet", str(fleet_file),
         "--wheel", str(wheel), "--python", base, "--no-index", "--find-links", str(house),
         "--service", "detached", *broker, "--health-deadline", "120", "--json", *extra],
        capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"no JSON report (exit {proc.returncode}): {proc.stderr[-3000:]}"
        ) from None
    return proc, {d["device"]: d for d in doc["devices"]}


def _daemon(device: SshDevice) -> dict[str, object]:
    return json.loads((device.state_dir / "daemon.json").read_text())


def _alive(pid: object) -> bool:
    return isinstance(pid, int) and Path(f"/proc/{pid}").exists()


@pytest.fixture
def provisioned_fleet(ssh_fleet: SshFleet) -> Iterator[SshFleet]:
    """The loopback fleet; the detached daemons provision starts are stopped at teardown."""
    try:
        yield ssh_fleet
    finally:
        for device in ssh_fleet:
            record = device.state_dir / "daemon.json"
            if record.exists():
                pid = json.loads(record.read_text()).get("pid")
                if _alive(pid):
                    os.kill(int(pid), signal.SIGTERM)
                    deadline = time.monotonic() + 30
                    while _alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)


@pytest.mark.parametrize("ssh_fleet", [1], indirect=True)
def test_fresh_root_rerun_upgrade_and_a_failed_upgrade_rolled_back(
    provisioned_fleet: SshFleet, wheelhouse: Path, tmp_path: Path
) -> None:
    if not (PHOTO / "pets.jpg").is_file():
        pytest.skip(f"needs {PHOTO}/pets.jpg (the project's shared data)")
    device = provisioned_fleet[0]
    root = _fresh_root(device)
    fleet_file = _fleet_file(provisioned_fleet, tmp_path / "fleet.yaml")
    (wheel,) = wheelhouse.glob("doorstep-0.1.0-*.whl")
    keygen = subprocess.run(
        [sys.executable, "-m", "host.cli", "keygen", "--out", str(tmp_path / "release")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    common = ["--prefix", str(root), "--source", f"still:{PHOTO / 'pets.jpg'}",
              "--deploy-user", "nobody", "--signing-key", str(tmp_path / "release.pub")]  # fmt: skip
    if shutil.which("visudo") is None:
        pytest.skip("visudo is not installed (apt-get install sudo; .ci/run does)")

    # 1. the plan: nothing changes
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "provision", "--fleet", str(fleet_file), "--wheel",
         str(wheel), "--service", "detached", "--python", os.path.realpath(sys.executable),
         "--dry-run", *common],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for kind in ("groups", "user", "deploy-user", "venv", "switch", "config", "unit", "service"):
        assert f"  {kind}" in proc.stdout, proc.stdout
    assert not (root / "opt").exists() and "doorstep" not in (root / "etc" / "passwd").read_text()

    # 2. a fresh root
    started = time.monotonic()
    proc, report = _provision(fleet_file, wheel, wheelhouse, *common)
    print(f"provisioned 1 fresh loopback device in {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    first = report[device.name]
    assert first["outcome"] == "provisioned" and first["version"] == "0.1.0", first
    link = root / "opt" / "doorstep"
    assert link.is_symlink() and Path(os.readlink(link)).parent == root / "opt" / "doorstep-venvs"
    passwd, group = (root / "etc" / "passwd").read_text(), (root / "etc" / "group").read_text()
    assert "\ndoorstep:" in passwd and "\ni2c:" in group
    assert any(line.startswith("video:") and "doorstep" in line for line in group.splitlines())
    assert any(line.startswith("doorstep:") and "nobody" in line for line in group.splitlines())
    config = yaml.safe_load((root / "etc" / "doorstep" / "device.yaml").read_text())
    assert config["device_id"] == device.name and config["state_dir"] == str(device.state_dir)
    key = root / "etc" / "doorstep" / "keys" / "release.pub"
    assert config["signing"]["public_keys"] == [str(key)]
    assert key.read_bytes() == (tmp_path / "release.pub").read_bytes()
    unit = (root / "etc" / "systemd" / "system" / "doorstep-device.service").read_text()
    assert (
        f"ExecStart={link}/bin/doorstep-device run --config {root}/etc/doorstep/device.yaml" in unit
    )
    sudoers = root / "etc" / "sudoers.d" / "doorstep"
    assert (
        "nobody ALL=(root) NOPASSWD: /usr/bin/systemctl reload doorstep-device"
        in sudoers.read_text()
    )
    assert (sudoers.stat().st_mode & 0o777) == 0o440
    record = _daemon(device)
    assert record["state"] == "running" and _alive(record["pid"])
    assert record["self_test"]["ok"] is True  # type: ignore[index]
    pid = record["pid"]

    # 3. a re-run changes nothing, not even the daemon
    proc, report = _provision(fleet_file, wheel, wheelhouse, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report[device.name]["outcome"] == "unchanged" and report[device.name]["steps"] == []
    assert _daemon(device)["pid"] == pid

    # 4. a newer wheel upgrades in place; the old venv is kept as previous
    newer = _build_wheel(tmp_path, version="0.1.1")
    old_venv = os.readlink(link)
    proc, report = _provision(fleet_file, newer, wheelhouse, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report[device.name]["outcome"] == "provisioned"
    assert report[device.name]["version"] == "0.1.1"
    assert os.readlink(root / "opt" / "doorstep.previous") == old_venv
    record = _daemon(device)
    assert record["pid"] != pid and _alive(record["pid"]) and record["state"] == "running"

    # 5. a wheel whose daemon cannot start: switched back, the previous one serves again
    broken = _build_wheel(tmp_path / "broken", version="0.1.2", broken=True)
    good_venv = os.readlink(link)
    proc, report = _provision(fleet_file, broken, wheelhouse, *common, "--health-deadline", "20")
    assert proc.returncode == 1
    outcome = report[device.name]
    assert outcome["outcome"] == "rolled back", outcome
    assert "the previous one serves again" in str(outcome["detail"])
    assert os.readlink(link) == good_venv
    record = _daemon(device)
    assert record["state"] == "running" and _alive(record["pid"])


@pytest.mark.parametrize("ssh_fleet", [3], indirect=True)
def test_three_fresh_devices_at_once_and_one_unreachable(
    provisioned_fleet: SshFleet, wheelhouse: Path, tmp_path: Path
) -> None:
    if not (PHOTO / "pets.jpg").is_file():
        pytest.skip(f"needs {PHOTO}/pets.jpg (the project's shared data)")
    for device in provisioned_fleet:
        _fresh_root(device)
    # {name} in --prefix: each device its own root (they share this machine)
    prefix = str(provisioned_fleet.root / "{name}" / "root")
    fleet_file = _fleet_file(provisioned_fleet, tmp_path / "fleet.yaml")
    (wheel,) = wheelhouse.glob("doorstep-0.1.0-*.whl")
    started = time.monotonic()
    proc, results = _provision(
        fleet_file, wheel, wheelhouse, "--prefix", prefix, "--source", f"still:{PHOTO / 'pets.jpg'}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    elapsed = time.monotonic() - started
    print(f"provisioned 3 loopback devices in {elapsed:.0f} s")
    assert {r["outcome"] for r in results.values()} == {"provisioned"}
    for device in provisioned_fleet:
        assert _daemon(device)["state"] == "running"
    dead = provisioned_fleet[2]
    dead.stop()  # a powered-off doorbell: the others are re-checked, unchanged
    proc, report = _provision(
        fleet_file, wheel, wheelhouse, "--prefix", prefix, "--source", f"still:{PHOTO / 'pets.jpg'}"
    )
    assert proc.returncode == 1 and report[dead.name]["outcome"] == "unreachable"
    assert {report[d.name]["outcome"] for d in provisioned_fleet.devices[:2]} == {"unchanged"}


@pytest.mark.parametrize("ssh_fleet", [1], indirect=True)
def test_the_health_gate_over_mqtt(
    provisioned_fleet: SshFleet, wheelhouse: Path, tmp_path: Path, mosquitto: Any
) -> None:
    """With --health-over-mqtt the device must show up online, self-tested, on the real broker;
    with the broker gone the same run fails, saying where it looked."""
    if not (PHOTO / "pets.jpg").is_file():
        pytest.skip(f"needs {PHOTO}/pets.jpg (the project's shared data)")
    device = provisioned_fleet[0]
    _fresh_root(device)
    fleet_file = _fleet_file(provisioned_fleet, tmp_path / "fleet.yaml")
    (wheel,) = wheelhouse.glob("doorstep-0.1.0-*.whl")
    args = ["--prefix", str(device.workdir / "root"), "--source", f"still:{PHOTO / 'pets.jpg'}",
            "--broker", mosquitto.url, "--health-over-mqtt"]  # fmt: skip
    proc, report = _provision(fleet_file, wheel, wheelhouse, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert report[device.name]["outcome"] == "provisioned"
    config = yaml.safe_load((device.workdir / "root" / "etc/doorstep/device.yaml").read_text())
    assert config["mqtt"]["url"] == mosquitto.url
    mosquitto.stop()
    proc, report = _provision(fleet_file, wheel, wheelhouse, *args, "--health-deadline", "5")
    assert proc.returncode == 1
    failed = report[device.name]
    assert failed["outcome"] == "failed" and "health" in str(failed["detail"])
    assert mosquitto.url in str(failed["detail"]), failed


# ------------------------------------------------------------------------------ the planner

PI_FRESH = """now=1700000000
login_uid=1000
login_user=pi
arch=aarch64
os=Debian GNU/Linux 12 (bookworm)
python=/usr/bin/python3
python_version=3.11
free_kb=9000000
root_ok=yes
systemctl=yes
systemd_analyze=yes
visudo=yes
apt=yes
group_video=pi
service_active=inactive
service_enabled=not-found
"""


def _options(tmp_path: Path, **kw: object) -> ProvisionOptions:
    whl = tmp_path / "doorstep-0.1.0-py3-none-any.whl"
    whl.write_bytes(b"PK not really")
    return ProvisionOptions(wheel=Wheel.read(whl), **kw)  # type: ignore[arg-type]


def _device() -> Device:
    return Device(name="front", host="192.0.2.1", device_id="front", user="pi")


def test_a_fresh_pi_needs_every_step(tmp_path: Path) -> None:
    plan = plan_provision(_device(), parse_facts(PI_FRESH), _options(tmp_path))
    assert plan.refusal is None
    kinds = [s.kind for s in plan.steps]
    assert kinds == ["apt", "groups", "user", "deploy-user", "venv", "switch", "config",
                     "sudo-rule", "unit", "service", "health"]  # fmt: skip
    assert plan.steps[0].detail == "apt-get install -y python3-venv python3-picamera2"
    assert "pi" in plan.steps[3].detail and "i2c" in plan.steps[1].detail


def test_a_provisioned_pi_needs_only_the_health_gate(tmp_path: Path) -> None:
    options = _options(tmp_path, source="0")
    from host.fleet.provision import sha256_text, sudo_rule

    done = PI_FRESH.replace("service_active=inactive", "service_active=active").replace(
        "service_enabled=not-found", "service_enabled=enabled"
    ) + (
        f"venv=yes\nuser=yes\ngroup_video=pi,doorstep\ngroup_i2c=doorstep\ngroup_doorstep=pi\n"
        f"installed={options.wheel.sha256} 0.1.0\nconfig=yes\n"
        f"sudoers_sha={sha256_text(sudo_rule('pi'))}\nunit_sha=x\ndaemon_alive=yes\n"
    )
    plan = plan_provision(_device(), parse_facts(done), options)
    assert [s.kind for s in plan.steps] == ["unit", "health"]  # the unit is compared on the device
    assert not [s for s in plan.changes if s.kind != "unit"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (("python_version=3.11", "python_version=3.9"), "Python 3.9; doorstep needs 3.11"),
        (("root_ok=yes\n", ""), "no passwordless sudo"),
        (("free_kb=9000000", "free_kb=1000"), "MB free"),
        (("systemctl=yes\n", ""), "--service detached"),
        (("login_user=pi", "login_user=pi ALL=(ALL) NOPASSWD: ALL"), "not a valid user name"),
    ],
)
def test_devices_that_cannot_be_provisioned_are_refused(
    tmp_path: Path, change: tuple[str, str], says: str
) -> None:
    facts = parse_facts(PI_FRESH.replace(*change))
    plan = plan_provision(_device(), facts, _options(tmp_path))
    assert plan.refusal is not None and says in plan.refusal and not plan.steps


def test_a_prefix_cannot_install_apt_packages(tmp_path: Path) -> None:
    options = _options(tmp_path, prefix=PurePosixPath("/tmp/root"))
    plan = plan_provision(_device(), parse_facts(PI_FRESH), options)
    assert plan.refusal is not None and "--prefix cannot install" in plan.refusal


def test_garbage_facts_do_not_crash_the_planner(tmp_path: Path) -> None:
    facts = parse_facts("free_kb=lots\n\x00\x01=2\n" + "x" * 10_000)
    assert facts.error is not None
    plan = plan_provision(_device(), facts, _options(tmp_path))
    assert plan.refusal is not None
