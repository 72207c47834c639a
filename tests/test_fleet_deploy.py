"""``doorstep-host deploy``, ``rollback`` and ``status`` against a real fleet on loopback.

Every doorbell here is a real sshd (own port, host key, client key and state directory) with a
real ``doorstep-device run`` daemon behind it (a still image as its camera, the test's signing
key trusted). Deploys go through the command line exactly as a person runs them; what the tests
check is what is on the devices afterwards: the ``current``/``previous`` links, the store, and
what each daemon reports it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.doorbell import DoorbellDaemon, start_daemons, write_still_image
from support.loopback import SshFleet

import device
from device.bundle.signing import bundle_id, generate_keypair, sign_bundle
from device.bundle.store import load_bundle, pack_bundle, write_bundle
from host.cli import main as host_main
from host.fleet.plan import BundleInfo

pytestmark = pytest.mark.host  # the device-only environment does not collect it (conftest)

SHIPPED = Path(device.__file__).parent / "models" / "parcel-ssd"
MiB = 1 << 20


# ------------------------------------------------------------------------------------ the lab


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.out)
        return data

    def outcomes(self) -> dict[str, str]:
        return {d["device"]: d["outcome"] for d in self.doc["devices"]}

    def detail(self, name: str) -> str:
        return next(str(d["detail"]) for d in self.doc["devices"] if d["device"] == name)


def cli(*args: str | Path) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = host_main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


def variant(out: Path, version: str, key: Path | None, **decoder: Any) -> Path:
    """The shipped bundle with another version (so another bundle id), optionally signed."""
    src = load_bundle(SHIPPED)
    m = src.manifest.model_copy(update={"version": version})
    if decoder:  # a packaging mistake the model itself does not reveal until it runs
        ssd = m.decoder.ssd.model_copy(update=decoder) if m.decoder.ssd else None
        m = m.model_copy(
            update={
                "decoder": m.decoder.model_copy(update={"ssd": ssd}),
                "thresholds": m.thresholds.model_copy(update={"score": 0.05}),
            }
        )
    write_bundle(out, m, dict(src.paths))
    if key is not None:
        sign_bundle(out, key)
    return out


@dataclass
class Lab:
    """Three loopback doorbells with daemons, a signing key, bundles and a fleet file."""

    fleet: SshFleet
    daemons: list[DoorbellDaemon]
    root: Path
    key: Path
    pub: Path
    fleet_file: Path
    bundles: dict[str, Path]

    def id(self, name: str) -> str:
        return bundle_id(self.bundles[name])

    def deploy(self, bundle: str | Path, *flags: str) -> Run:
        path = self.bundles.get(str(bundle), bundle)
        return cli("deploy", path, "--fleet", self.fleet_file, "--json", *flags)

    def linked(self, i: int, link: str = "current") -> str | None:
        try:
            return Path(os.readlink(self.fleet[i].state_dir / link)).name
        except OSError:
            return None

    def serving(self, i: int) -> str | None:
        """The bundle id the daemon reports it serves (None: the shipped default)."""
        record = self.daemons[i].record()
        assert record is not None
        return record.get("bundle_id")

    def write_fleet(
        self,
        known_hosts: Path | None = None,
        devices: dict[str, dict[str, Any]] | None = None,
        **rollout: Any,
    ) -> None:
        policy = {
            "canary": 1,
            "batch": "100%",
            "max_fail": 0,
            "health_deadline": 30,
            "health_interval": 0.2,
            "keep_models": 3,
            **rollout,
        }
        entries = [
            d.fleet_entry(config=str(dm.config))
            for d, dm in zip(self.fleet, self.daemons, strict=True)
        ]
        for entry in entries:
            entry.pop("known_hosts")  # one workstation file for all, as in real life
            entry.update((devices or {}).get(entry["name"], {}))
        doc = {
            "defaults": {"known_hosts": str(known_hosts or self.fleet.known_hosts)},
            "devices": entries,
            "rollout": policy,
        }
        self.fleet_file.write_text(yaml.safe_dump(doc, sort_keys=False))

    def snapshot(self) -> dict[str, Any]:
        """Everything deploy could change on the devices (not the daemons' own logs)."""
        seen: dict[str, Any] = {}
        for d in self.fleet:
            for path in sorted(d.state_dir.rglob("*")):
                rel = path.relative_to(d.state_dir)
                if rel.parts[0] in ("log", "outbox.sqlite", "snapshots"):
                    continue
                if path.is_symlink():
                    seen[f"{d.name}/{rel}"] = ("link", os.readlink(path))
                elif path.is_file():
                    st = path.stat()
                    seen[f"{d.name}/{rel}"] = ("file", st.st_size, st.st_mtime_ns)
                else:
                    seen[f"{d.name}/{rel}"] = ("dir",)
        return seen


@pytest.fixture
def make_lab(ssh_fleet: SshFleet, tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    started: list[DoorbellDaemon] = []

    def make(broker_url: str | None = None) -> Lab:
        key, pub = tmp_path / "signing.key", tmp_path / "signing.pub"
        generate_keypair(key, pub)
        bundles = {
            "v1": variant(tmp_path / "bundles" / "v1", "1.0.0", key),
            "v2": variant(tmp_path / "bundles" / "v2", "1.1.0", key),
            # Claims the model has no background column: the daemon's self-test inference then
            # meets class ids its labels do not name, and the model must not go live.
            "broken": variant(
                tmp_path / "bundles" / "broken", "1.2.0", key, background_class=False
            ),
        }
        image = write_still_image(tmp_path / "still.jpg")
        daemons = start_daemons(ssh_fleet, image, [pub], broker_url)
        started.extend(daemons)
        lab = Lab(ssh_fleet, daemons, tmp_path, key, pub, tmp_path / "fleet.yaml", bundles)
        lab.write_fleet()
        return lab

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    return make_lab()


# ------------------------------------------------------------------------------------ success


def test_deploy_reaches_every_device_then_a_rerun_skips_them(lab: Lab) -> None:
    pids = [d.pid for d in lab.daemons]
    first = lab.deploy("v1")
    assert first.code == 0, first.err
    assert first.outcomes() == dict.fromkeys(("door1", "door2", "door3"), "deployed")
    assert first.doc["waves"] == [["door1"], ["door2", "door3"]]  # canary, then the rest
    for i in range(3):
        assert lab.linked(i) == lab.id("v1") and lab.linked(i, "previous") is None
        assert lab.serving(i) == lab.id("v1")
        assert not list((lab.fleet[i].state_dir / "models").glob("*.part"))
    assert [d.pid for d in lab.daemons] == pids  # reloaded in place, never restarted

    second = lab.deploy("v2")
    assert second.code == 0, second.err
    for i in range(3):
        assert (lab.linked(i), lab.linked(i, "previous")) == (lab.id("v2"), lab.id("v1"))
        assert lab.serving(i) == lab.id("v2")

    again = cli("deploy", lab.bundles["v2"], "--fleet", lab.fleet_file)  # the human output
    assert again.code == 0
    assert again.out.count("skipped") == 3
    assert "3 of 3 device(s) on doorstep-parcel-ssd 1.1.0" in again.out
    assert "door1: skipped: doorstep-parcel-ssd 1.1.0 is already active" in again.err


def test_rollback_and_status_over_ssh(lab: Lab) -> None:
    assert lab.deploy("v1").code == 0
    assert lab.deploy("v2").code == 0

    back = cli("rollback", "--fleet", lab.fleet_file, "--device", "door2")
    assert back.code == 0, back.out + back.err
    assert "1 of 1 device(s) rolled back" in back.out
    assert lab.serving(1) == lab.id("v1") and lab.linked(1, "previous") == lab.id("v2")
    assert lab.serving(0) == lab.id("v2")  # the others are untouched

    status = cli("status", "--fleet", lab.fleet_file, "--json")
    assert status.code == 0
    rows = {r["device"]: r for r in status.doc["devices"]}
    assert status.doc["source"] == "doorstep-device status over SSH"
    assert rows["door2"]["model"].startswith("doorstep-parcel-ssd 1.0.0")
    assert rows["door1"]["model"].startswith("doorstep-parcel-ssd 1.1.0")
    assert all(r["reachable"] and r["daemon"].startswith("running") for r in rows.values())
    text = cli("status", "--fleet", lab.fleet_file).out
    assert "3 of 3 device(s) reachable; source: doorstep-device status over SSH" in text

    nothing = cli("rollback", "--fleet", lab.fleet_file, "--device", "door3")  # twice is fine
    assert nothing.code == 0 and lab.serving(2) == lab.id("v1")


def test_dry_run_gathers_facts_and_changes_nothing(lab: Lab) -> None:
    before = lab.snapshot()
    run = cli("deploy", lab.bundles["v1"], "--fleet", lab.fleet_file, "--dry-run")
    assert run.code == 0, run.err
    assert lab.snapshot() == before
    text = run.out
    assert "wave 1 (canary): door1" in text and "wave 2: door2, door3" in text
    steps = ("1. upload 3.3 MiB", "2. verify", "3. install", "4. activate", "5. health check")
    for step in steps:
        assert text.count(step) == 3, step
    assert "3 to change, 0 already on the bundle, 0 refused (dry run: nothing was changed)" in text


# ------------------------------------------------------------------------------------ faults


def test_a_corrupted_upload_is_refused_and_a_rerun_uploads_afresh(lab: Lab) -> None:
    tar = pack_bundle(lab.bundles["v1"], lab.root / "v1.tar")
    ident = lab.id("v1")
    # door2 holds a complete-looking upload whose middle is damaged (its end matches the tar,
    # so the resume check takes it as done): only the sha256 on the device can tell.
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part = lab.fleet[1].state_dir / "models" / f"{ident}.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(data))

    run = lab.deploy(tar)
    assert run.code == 1
    assert run.outcomes() == {"door1": "deployed", "door2": "failed", "door3": "deployed"}
    assert "corrupted upload refused: sha256 on the device is" in run.detail("door2")
    assert not part.exists() and not (part.parent / ident).exists()
    assert lab.linked(1) is None and lab.serving(1) is None  # still the shipped model

    again = lab.deploy(tar)
    assert again.code == 0, again.err
    assert again.outcomes()["door2"] == "deployed" and lab.serving(1) == ident


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("unsigned", "no manifest.sig; this device requires signed bundles"),
        ("untrusted key", "which this device does not trust"),
        ("forged", "changed after it was signed"),
    ],
)
def test_a_badly_signed_bundle_is_refused_by_every_device(lab: Lab, how: str, message: str) -> None:
    assert lab.deploy("v1").code == 0
    bad = variant(lab.root / "bad", "9.9.9", None if how == "unsigned" else lab.key)
    if how == "untrusted key":
        other = lab.root / "other.key"
        generate_keypair(other, lab.root / "other.pub")
        sign_bundle(bad, other)
    elif how == "forged":  # the manifest edited after signing (a version bumped by hand)
        manifest = bad / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"9.9.9"', '"9.9.8"'))

    run = lab.deploy(bad, "--canary", "0")
    assert run.code == 1
    assert set(run.outcomes().values()) == {"failed"}
    for name in ("door1", "door2", "door3"):
        assert message in run.detail(name), run.detail(name)
    for i in range(3):  # refused before anything switched: still on v1, nothing new installed
        assert lab.linked(i) == lab.id("v1") and lab.serving(i) == lab.id("v1")
        models = lab.fleet[i].state_dir / "models"
        assert [p.name for p in models.iterdir() if p.is_dir()] == [lab.id("v1")]


def test_a_bundle_failing_the_self_test_is_rolled_back_and_the_old_model_keeps_serving(
    lab: Lab,
) -> None:
    assert lab.deploy("v1").code == 0
    pids = [d.pid for d in lab.daemons]
    run = lab.deploy("broken", "--canary", "0")
    assert run.code == 1
    assert set(run.outcomes().values()) == {"rolled back"}
    for name in ("door1", "door2", "door3"):
        detail = run.detail(name)
        assert "the daemon refused the new model" in detail, detail
        assert "model predicted class id 1 but the labels name only 1" in detail
        assert f"rolled back: {lab.id('v1')[:12]}… serving again" in detail
    for i in range(3):
        assert lab.serving(i) == lab.id("v1")
        assert (lab.linked(i), lab.linked(i, "previous")) == (lab.id("v1"), lab.id("broken"))
        record = lab.daemons[i].record()
        assert record is not None and record["self_test"]["ok"]
    assert [d.pid for d in lab.daemons] == pids  # the daemons never stopped serving


def test_a_failing_canary_stops_the_rollout(lab: Lab) -> None:
    assert lab.deploy("v1").code == 0
    run = lab.deploy("broken", "--batch", "1")
    assert run.code == 1
    assert run.outcomes() == {
        "door1": "rolled back",
        "door2": "not started",
        "door3": "not started",
    }
    assert run.doc["stopped"] == "a canary device failed: rollout stopped before the other devices"
    for i in (1, 2):  # never touched: the broken bundle never even reached them
        assert lab.serving(i) == lab.id("v1")
        assert not (lab.fleet[i].state_dir / "models" / lab.id("broken")).exists()
        assert not list((lab.fleet[i].state_dir / "models").glob("*.part"))


def test_an_unreachable_device_does_not_hold_up_the_others_and_a_rerun_completes_it(
    lab: Lab,
) -> None:
    lab.fleet[1].stop()  # door2 is powered off
    run = lab.deploy("v1")
    assert run.code == 1
    assert run.outcomes() == {"door1": "deployed", "door2": "unreachable", "door3": "deployed"}
    assert "connection refused" in run.detail("door2")
    human = cli("deploy", lab.bundles["v1"], "--fleet", lab.fleet_file)
    assert human.code == 1 and "2 of 3 device(s) on doorstep-parcel-ssd 1.0.0" in human.out

    lab.fleet[1].start()  # back on: same port, keys and state
    lab.fleet[1].wait_ready()
    again = lab.deploy("v1")
    assert again.code == 0, again.err
    assert again.outcomes() == {"door1": "skipped", "door2": "deployed", "door3": "skipped"}
    assert lab.serving(1) == lab.id("v1")


def test_a_reload_that_fails_after_the_switch_is_undone(lab: Lab) -> None:
    assert lab.deploy("v1").code == 0
    # door1 is told its daemon runs under systemd, which it does not (a missing sudo rule
    # fails the same way): activate switches `current`, then cannot reload.
    lab.write_fleet(devices={"door1": {"reload": "systemd"}})
    run = lab.deploy("v2")
    assert run.code == 1
    assert run.outcomes() == {"door1": "failed", "door2": "not started", "door3": "not started"}
    detail = run.detail("door1")
    assert "systemctl reload doorstep-device failed" in detail, detail
    assert "the switch was undone (the daemon kept serving the old model)" in detail
    assert (lab.linked(0), lab.linked(0, "previous")) == (lab.id("v1"), lab.id("v2"))
    assert lab.serving(0) == lab.id("v1")


class _UnpluggedError(Exception):
    """Raised from the progress view midway through an upload: the deploy is cut off."""


class _CutAfter:
    """A progress view that pulls the plug once ``limit`` bytes are on the device."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def start(self, names: Sequence[str]) -> None: ...
    def phase(self, name: str, phase: str, detail: str = "") -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...

    def transfer(self, name: str, done: int, total: int) -> None:
        if done >= self.limit:
            raise _UnpluggedError


def test_an_upload_interrupted_midway_completes_on_the_next_run(lab: Lab) -> None:
    from host.fleet.deploy import deploy
    from host.fleet.inventory import load_fleet

    tar = pack_bundle(lab.bundles["v1"], lab.root / "v1.tar")
    bundle = BundleInfo.from_tar(tar)
    fleet = load_fleet(lab.fleet_file)
    with pytest.raises(_UnpluggedError):
        asyncio.run(deploy(list(fleet.devices), bundle, fleet.rollout, _CutAfter(2 * MiB)))
    part = lab.fleet[0].state_dir / "models" / f"{bundle.sha}.tar.part"
    cut_at = part.stat().st_size
    assert 2 * MiB <= cut_at < bundle.size  # part of it there, nothing activated
    assert lab.linked(0) is None and lab.serving(0) is None

    run = lab.deploy(tar)
    assert run.code == 0, run.err
    door1 = run.doc["devices"][0]
    assert door1["resumed_from"] == cut_at
    assert door1["uploaded_bytes"] == bundle.size - cut_at
    assert "upload resumed at" in door1["detail"]
    assert all(lab.serving(i) == bundle.sha for i in range(3))


def test_an_unknown_host_key_is_refused_and_that_device_left_alone(lab: Lab) -> None:
    partial = lab.root / "known_hosts.partial"  # door3's host key was never recorded
    partial.write_text("".join(d.known_hosts_line + "\n" for d in lab.fleet.devices[:2]))
    lab.write_fleet(known_hosts=partial)
    run = lab.deploy("v1")
    assert run.code == 1
    assert run.outcomes() == {"door1": "deployed", "door2": "deployed", "door3": "unreachable"}
    assert "host key of" in run.detail("door3") and "is unknown" in run.detail("door3")
    assert "ssh-keyscan" in run.detail("door3")
    assert not (lab.fleet[2].state_dir / "models").exists()


# ------------------------------------------------------------------------------------ MQTT


def test_status_from_the_retained_mqtt_state(make_lab: Callable[..., Lab], mosquitto: Any) -> None:
    lab = make_lab(mosquitto.url)
    assert lab.deploy("v2").code == 0
    run = cli("status", "--fleet", lab.fleet_file, "--broker", mosquitto.url, "--json")
    assert run.code == 0, run.err
    assert run.doc["source"] == f"retained MQTT state on {mosquitto.url}"
    rows = run.doc["devices"]
    assert [r["device"] for r in rows] == ["door1", "door2", "door3"]
    for row in rows:
        assert row["reachable"] and row["source"] == "mqtt"
        assert row["model"].startswith("doorstep-parcel-ssd 1.1.0")
        assert row["daemon"] == "online, self-test ok"
        assert row["last_event"] == "no parcel"

    lab.daemons[2].stop()  # its Last Will / clean stop marks it offline
    after = cli("status", "--fleet", lab.fleet_file, "--broker", mosquitto.url, "--json")
    assert after.code == 1
    assert {r["device"]: r["reachable"] for r in after.doc["devices"]}["door3"] is False


# ------------------------------------------------------------------------------------ CLI


def test_keygen_and_sign_commands(tmp_path: Path) -> None:
    made = cli("keygen", "--out", tmp_path / "keys" / "fleet", "--comment", "ci")
    assert made.code == 0, made.err
    key, pub = tmp_path / "keys" / "fleet.key", tmp_path / "keys" / "fleet.pub"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and pub.read_text().startswith(
        "doorstep-ed25519 "
    )
    again = cli("keygen", "--out", tmp_path / "keys" / "fleet")
    assert again.code == 2 and "already exists; refusing to overwrite" in again.err

    bundle = Path(shutil.copytree(SHIPPED, tmp_path / "parcel"))
    signed = cli("sign", bundle, "--key", key, "--tar")
    assert signed.code == 0, signed.err
    info = BundleInfo.from_tar(tmp_path / "parcel.tar")
    assert info.signed_by is not None and info.signed_by in made.out
    assert info.sha == bundle_id(bundle)

    missing = cli("sign", tmp_path / "nope", "--key", key)
    assert missing.code == 2 and "doorstep-host: error:" in missing.err


def test_deploy_refuses_bad_input_with_a_clear_error(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("devices:\n  - {name: a, host: 127.0.0.1}\n")
    gone = cli("deploy", tmp_path / "nope.tar", "--fleet", fleet)
    assert gone.code == 2 and "nope.tar: not found" in gone.err
    bad = cli("deploy", SHIPPED, "--fleet", tmp_path / "missing.yaml")
    assert bad.code == 2 and "missing.yaml: fleet file not found" in bad.err
    wrong = cli("deploy", SHIPPED, "--fleet", fleet, "--batch", "150%")
    assert wrong.code == 2 and "batch percentage must be above 0%" in wrong.err
    group = cli("status", "--fleet", fleet, "--group", "garden")
    assert group.code == 2 and "no group 'garden'" in group.err


@pytest.mark.parametrize("command", ["keygen", "sign", "deploy", "rollback", "status"])
def test_every_fleet_command_has_help_with_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        host_main([command, "--help"])
    assert done.value.code == 0
    assert "example" in capsys.readouterr().out


# ------------------------------------------------------------------ a device that lies


def test_a_device_with_a_garbage_record_is_refused_and_the_others_deploy(lab: Lab) -> None:
    """door2's daemon.json is 100,000-deep JSON, door3's a FIFO (planted by a group member):
    each is that device's refusal, with the device's reason; nothing hangs or crashes, and
    door1 deploys. ``status`` shows the two as invalid records."""
    planted = [lab.fleet[i].state_dir / "daemon.json" for i in (1, 2)]
    planted[0].write_text("[" * 100_000 + "]" * 100_000)
    planted[1].unlink()
    os.mkfifo(planted[1])
    dry = cli("deploy", lab.bundles["v1"], "--fleet", lab.fleet_file, "--dry-run")
    assert dry.code == 1, dry.err  # some devices cannot take it
    assert "1 to change, 0 already on the bundle, 2 refused" in dry.out, dry.out
    run = lab.deploy("v1", "--canary", "0")
    assert run.outcomes() == {"door1": "deployed", "door2": "refused", "door3": "refused"}
    assert f"{planted[0]}: invalid record: 200000 bytes, more than the 65536" in run.detail("door2")
    assert f"{planted[1]}: invalid record: not a regular file (a FIFO)" in run.detail("door3")
    assert "restart the daemon" in run.detail("door3")
    assert lab.linked(1) is None and lab.linked(2) is None  # nothing changed on them
    status = cli("status", "--fleet", lab.fleet_file, "--json")
    rows = {r["device"]: r for r in status.doc["devices"]}
    assert rows["door1"]["daemon"] == "running, self-test ok"
    assert rows["door2"]["daemon"] == rows["door3"]["daemon"] == "invalid record"
    assert "invalid record" in rows["door3"]["last_event"]


def test_the_health_gate_reads_a_hostile_record_as_that_devices_error(
    ssh_fleet: SshFleet, tmp_path: Path
) -> None:
    """What the health gate polls over SFTP: a link, a FIFO (whose open would block the SFTP
    server), an oversized or deep document, a record of the wrong shape. Each becomes facts
    whose ``error`` says why; none hangs (each read is bounded by a timeout here)."""
    from host.fleet.remote import RemoteDoorstep
    from host.fleet.ssh import connect

    device = ssh_fleet[0]
    path = device.state_dir / "daemon.json"
    elsewhere = tmp_path / "good.json"
    good = {
        "pid": os.getpid(),
        "state": "running",
        "model_sha256": "e" * 64,
        "model": {"name": "m", "version": "1"},
        "self_test": {"ok": True, "ms": 1.0, "time": 1.0},
        "started": 1.0,
        "updated": 2.0,
    }
    elsewhere.write_text(json.dumps(good))

    def plant(kind: str) -> None:
        if path.exists() or path.is_symlink():
            path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "link":
            path.symlink_to(elsewhere)
        elif kind == "deep":
            path.write_text("[" * 30_000 + "]" * 30_000)
        elif kind == "big":
            path.write_bytes(b" " * (1 << 20))
        elif kind == "pid-true":
            path.write_text(json.dumps({**good, "pid": True}))
        else:
            path.write_text(json.dumps(good))

    expected = {
        "fifo": "not a regular file",
        "dev-zero": "a symbolic link",
        "link": "a symbolic link",
        "deep": "recursion limit exceeded",
        "big": "more than 65536",
        "pid-true": "pid: Input should be a valid integer",
    }

    async def go() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with connect(device) as conn:
            remote = RemoteDoorstep(conn, device.inventory_device())
            for kind in [*expected, "good"]:
                plant(kind)
                seen[kind] = await asyncio.wait_for(remote.daemon(), timeout=30)
        return seen

    seen = asyncio.run(go())
    for kind, why in expected.items():
        facts = seen[kind]
        assert facts is not None and facts.error is not None, kind
        assert facts.error.startswith(f"{path}: invalid record: ") and why in facts.error, facts
    assert seen["good"].error is None and seen["good"].state == "running"  # this pid is alive


def test_test_harnesses_are_not_in_the_shipped_package(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib.util
    import subprocess
    import sys

    for name in ("host.fleet.loopback", "host.fleet.doorbell", "host.fleet.bench", "host.redbox"):
        assert importlib.util.find_spec(name) is None, name
    with pytest.raises(SystemExit) as done:
        host_main(["bench-deploy", "--help"])
    assert done.value.code == 2 and "invalid choice: 'bench-deploy'" in capsys.readouterr().err
    # The benchmark lives with the tests and runs from the checkout (scripts/run bench).
    out = subprocess.run(
        [sys.executable, "-m", "support.bench_deploy", "--help"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "PYTHONPATH=tests" in out.stdout, out.stderr


def test_a_link_planted_at_the_upload_is_refused_and_never_written_through(lab: Lab) -> None:
    """door2's ``models/<id>.tar.part`` is a link to a file elsewhere on the device (planted by
    a member of the doorstep group): that device fails naming the path, the file is never
    written, a re-run refuses again; the other devices deploy."""
    ident = lab.id("v1")
    victim = lab.root / "victim.conf"
    victim.write_text("precious\n")
    part = lab.fleet[1].state_dir / "models" / f"{ident}.tar.part"
    part.parent.mkdir(parents=True)
    part.symlink_to(victim)
    for others in ("deployed", "skipped"):
        run = lab.deploy("v1", "--canary", "0")
        assert run.code == 1
        assert run.outcomes() == {"door1": others, "door2": "failed", "door3": others}
        assert f"{part}: a symbolic link: refused" in run.detail("door2"), run.detail("door2")
        assert victim.read_text() == "precious\n" and part.is_symlink()
        assert lab.linked(1) is None
