"""``doorstep-host publish`` and ``rollout`` against real daemons pulling from a real nginx over
a real Mosquitto: waves, a failing canary, a rollout killed and started again, an offline
device, an abort."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import HOST, Mosquitto
from daemonproc import DaemonProc
from origin import Nginx
from pullkit import DEFAULT, Bus, device_config, make_bundle
from support.doorbell import write_still_image

from device.bundle.signing import sign_bundle
from device.bundle.store import load_bundle, write_bundle
from device.install import Store

pytestmark = [pytest.mark.host, pytest.mark.timeout(300)]


def host(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def publish(bundle: Path, nginx: Nginx) -> dict[str, Any]:
    proc = host("publish", str(bundle), "--to", str(nginx.root))
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def fleet_file(tmp_path: Path, names: list[str]) -> Path:
    lines = ["devices:"] + [f"  - {{name: {n}, host: {HOST}}}" for n in names]
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def daemons(
    tmp_path: Path, mosquitto: Mosquitto, nginx: Nginx, keys: tuple[Path, Path]
) -> Iterator[Callable[..., DaemonProc]]:
    started: list[DaemonProc] = []
    still = write_still_image(tmp_path / "still.png")

    def start(name: str) -> DaemonProc:
        config = device_config(tmp_path, name, mosquitto, keys[1], nginx.base_url, still)
        d = DaemonProc(config)
        started.append(d)
        d.record("start", timeout=60)
        return d

    yield start
    for d in started:
        d.stop()


def rollout(
    descriptor: dict[str, Any], nginx: Nginx, broker: Mosquitto, fleet: Path, *extra: str
) -> list[str]:
    return [
        sys.executable, "-m", "host.cli", "rollout", str(nginx.root / f"{descriptor['id']}.json"),
        "--base-url", nginx.base_url, "--fleet", str(fleet),
        "--broker", f"mqtt://{HOST}:{broker.port}", *extra,
    ]  # fmt: skip


def active(tmp_path: Path, name: str) -> str | None:
    store = Store(tmp_path / f"state-{name}")
    return store.linked(store.current)


def test_publish_refuses_unsigned_and_names_by_content(
    tmp_path: Path, nginx: Nginx, keys: tuple[Path, Path]
) -> None:
    unsigned = make_bundle(tmp_path / "u", "2.0.0", None)
    proc = host("publish", str(unsigned), "--to", str(nginx.root))
    assert proc.returncode == 2 and "not signed" in proc.stderr
    signed = make_bundle(tmp_path / "s", "2.0.0", keys[0])
    first = publish(signed, nginx)
    assert (nginx.root / f"{first['id']}.tar").stat().st_size == first["size"]
    again = publish(signed, nginx)
    assert again == first  # publishing twice rewrites nothing


def test_rollout_in_waves_to_real_daemons(
    tmp_path: Path,
    daemons: Callable[..., DaemonProc],
    nginx: Nginx,
    mosquitto: Mosquitto,
    keys: tuple[Path, Path],
) -> None:
    names = ["d1", "d2", "d3"]
    for n in names:
        daemons(n)
    d = publish(make_bundle(tmp_path / "b2", "2.0.0", keys[0]), nginx)
    fleet = fleet_file(tmp_path, names)
    dry = subprocess.run(
        [*rollout(d, nginx, mosquitto, fleet, "--batch", "1"), "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert dry.returncode == 0 and "canary: d1" in dry.stdout and "wave 3: d3" in dry.stdout
    assert all(active(tmp_path, n) is None for n in names)  # a dry run writes nothing
    journal = tmp_path / "journal.json"
    proc = subprocess.run(
        [*rollout(d, nginx, mosquitto, fleet, "--batch", "1"), "--journal", str(journal)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["serving"] == names and not result["failed"]
    assert proc.stderr.index("canary: d1") < proc.stderr.index("wave 2: d2")
    # In a pipe, a plain line per device and phase (a terminal gets rich's live rows instead).
    for n in names:
        assert proc.stderr.index(f"] {n}: desired sent") < proc.stderr.index(f"] {n}: serving")
    assert "\x1b[" not in proc.stderr
    assert all(active(tmp_path, n) == d["id"] for n in names)
    assert nginx.served_bytes() == 3 * d["size"]  # each device fetched it once
    by_id = [
        sys.executable, "-m", "host.cli", "rollout", d["id"], "--base-url", nginx.base_url,
        "--fleet", str(fleet), "--broker", f"mqtt://{HOST}:{mosquitto.port}",
        "--journal", str(journal),
    ]  # fmt: skip
    again = subprocess.run(by_id, capture_output=True, text=True, timeout=60)  # the bare id
    assert again.returncode == 0 and "already serving 2.0.0: d1, d2, d3" in again.stderr


def test_a_failing_canary_stops_the_rollout(
    tmp_path: Path,
    daemons: Callable[..., DaemonProc],
    nginx: Nginx,
    mosquitto: Mosquitto,
    keys: tuple[Path, Path],
    bus: Bus,
) -> None:
    names = ["d1", "d2", "d3"]
    for n in names:
        daemons(n)
    src = load_bundle(DEFAULT)
    labels = src.manifest.labels.model_copy(update={"roles": {"person": [0]}})
    bad = tmp_path / "bad"
    write_bundle(
        bad,
        src.manifest.model_copy(update={"version": "3.0.0", "labels": labels}),
        {n: src.file(n) for n in src.manifest.files},
    )
    sign_bundle(bad, keys[0])
    d = publish(bad, nginx)
    proc = subprocess.run(
        [*rollout(d, nginx, mosquitto, fleet_file(tmp_path, names)), "--journal",
         str(tmp_path / "j.json")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert "rolled_back" in result["failed"]["d1"] and "package" in result["failed"]["d1"]
    assert result["not_started"] == ["d2", "d3"] and "canary" in result["stopped"]
    assert all(active(tmp_path, n) is None for n in names)  # the canary rolled itself back
    status = host(
        "rollout", "--status", json.loads(proc.stdout.splitlines()[-1])["rollout_id"],
        "--fleet", str(fleet_file(tmp_path, names)), "--broker", f"mqtt://{HOST}:{mosquitto.port}",
        "--json",
    )  # fmt: skip
    rows = {r["device"]: r for r in json.loads(status.stdout)}
    assert rows["d1"]["state"] == "rolled_back" and rows["d2"]["desired"] == "-"


def test_a_killed_rollout_continues_and_an_offline_device_catches_up(
    tmp_path: Path,
    daemons: Callable[..., DaemonProc],
    nginx: Nginx,
    mosquitto: Mosquitto,
    keys: tuple[Path, Path],
    bus: Bus,
) -> None:
    daemons("d1")
    daemons("d2")  # d3 is offline
    d = publish(make_bundle(tmp_path / "b2", "2.0.0", keys[0]), nginx)
    fleet = fleet_file(tmp_path, ["d1", "d2", "d3"])
    journal = ["--journal", str(tmp_path / "j.json"), "--batch", "1", "--wave-timeout", "20"]
    first = subprocess.Popen(
        rollout(d, nginx, mosquitto, fleet, *journal),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        bus.wait_report(lambda r: r.device_id == "d1" and r.state == "serving", 120)
        os.kill(first.pid, signal.SIGKILL)  # the host dies after the canary
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=30)  # reaped, its pipes closed
    issued = {r.device_id for r in bus.reports if r.state == "serving"}
    assert "d1" in issued
    second = subprocess.run(
        rollout(d, nginx, mosquitto, fleet, *journal), capture_output=True, text=True, timeout=240
    )
    assert second.returncode == 3, second.stderr  # d3 never answered: pending
    result = json.loads(second.stdout.splitlines()[-1])
    assert result["serving"][:2] == ["d1", "d2"] and result["pending"] == ["d3"]
    assert "already serving 2.0.0: d1" in second.stderr  # not written again
    daemons("d3")  # comes back online: the retained desired message is waiting
    bus.wait_report(lambda r: r.device_id == "d3" and r.state == "serving", 120)
    assert active(tmp_path, "d3") == d["id"]


def test_abort_puts_the_previous_bundle_back(
    tmp_path: Path,
    daemons: Callable[..., DaemonProc],
    nginx: Nginx,
    mosquitto: Mosquitto,
    keys: tuple[Path, Path],
    bus: Bus,
) -> None:
    daemons("d1")
    fleet = fleet_file(tmp_path, ["d1"])
    v2 = publish(make_bundle(tmp_path / "b2", "2.0.0", keys[0]), nginx)
    v3 = publish(make_bundle(tmp_path / "b3", "3.0.0", keys[0]), nginx)
    for d in (v2, v3):  # two rollouts in a row
        proc = subprocess.run(
            [*rollout(d, nginx, mosquitto, fleet), "--journal", str(tmp_path / f"{d['id']}.json")],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert active(tmp_path, "d1") == d["id"]
    rid = json.loads(proc.stdout.splitlines()[-1])["rollout_id"]
    aborted_at = time.time()
    abort = host(
        "rollout", "--abort", rid, "--fleet", str(fleet), "--broker",
        f"mqtt://{HOST}:{mosquitto.port}", "--journal", str(tmp_path / f"{v3['id']}.json"),
    )  # fmt: skip
    assert abort.returncode == 0, abort.stderr
    assert "desired back to 2.0.0" in abort.stderr
    # A report written after the abort: the first rollout's own "serving 2.0.0" is on the bus too.
    bus.wait_report(
        lambda r: (
            r.device_id == "d1"
            and r.state == "serving"
            and r.active_id == v2["id"]
            and r.time >= aborted_at
        ),
        120,
    )
    assert active(tmp_path, "d1") == v2["id"]


def test_a_broker_restart_mid_rollout_is_carried_through(
    tmp_path: Path,
    make_mosquitto: Callable[..., Mosquitto],
    nginx: Nginx,
    keys: tuple[Path, Path],
) -> None:
    """The broker (persistent, as a production one is) restarts after the canary: the retained
    desired and update messages survive it, every client reconnects, the rollout completes."""

    broker = make_mosquitto("persistent", persistence=True)
    bus = Bus(broker)
    still = write_still_image(tmp_path / "still.png")
    procs = []
    try:
        for name in ("d1", "d2"):
            config = device_config(tmp_path, name, broker, keys[1], nginx.base_url, still)
            procs.append(DaemonProc(config))
            procs[-1].record("start", timeout=60)
        d = publish(make_bundle(tmp_path / "b2", "2.0.0", keys[0]), nginx)
        fleet = fleet_file(tmp_path, ["d1", "d2"])
        run = subprocess.Popen(
            [*rollout(d, nginx, broker, fleet, "--batch", "1", "--rate", "20"), "--journal",
             str(tmp_path / "j.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        bus.wait_report(lambda r: r.device_id == "d1" and r.state == "serving", 120)
        broker.stop()  # restarts on the same port, with its retained messages on disk
        broker.start()
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["serving"] == ["d1", "d2"]
        assert active(tmp_path, "d2") == d["id"]
        after = Bus(broker)  # what a new subscriber sees after the restart: retained state
        try:
            after.wait_report(lambda r: r.device_id == "d2" and r.state == "serving", 30)
        finally:
            after.close()
    finally:
        bus.close()
        for p in procs:
            p.stop()


def test_bench_rollout_runs_and_prints_its_table(tmp_path: Path) -> None:
    """The benchmark itself works (its figures are for the README, not asserted)."""
    from host.pull.origin import find_nginx

    if find_nginx() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    out = tmp_path / "rows.json"
    proc = host("bench-rollout", "--devices", "3", "--workers", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "no camera, no detector" in proc.stdout and "| 3 |" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["serving"] == 3 and row["origin_mb"] > 3 * 3.0  # each agent fetched the bundle
