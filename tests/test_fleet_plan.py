"""Fleet inventory and deploy planning: pure, no network; facts in, steps out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

import device
from device.bundle.signing import bundle_id, generate_keypair, sign_bundle
from device.errors import BundleError, ConfigError
from host.fleet.inventory import Device, RolloutPolicy, load_fleet
from host.fleet.plan import (
    Activate,
    BundleInfo,
    DaemonDown,
    DaemonFacts,
    DeviceFacts,
    HealthCheck,
    Install,
    InsufficientSpace,
    NotInstalled,
    Prune,
    Reload,
    Skip,
    Unreachable,
    Upload,
    VerifyUpload,
    actionable,
    plan_device,
    plan_fleet,
    plan_rollout,
    render_plan,
    stop_reason,
)

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
NEW = "a" * 64
OLD = "b" * 64
OLDER = "c" * 64


def _fleet(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _devices(*names: str) -> str:
    return "devices:\n" + "".join(
        f"  - {{name: {n}, host: 10.0.0.{i}}}\n" for i, n in enumerate(names, 1)
    )


# ------------------------------------------------------------------------------------ inventory


def test_shipped_fleet_config_is_valid() -> None:
    fleet = load_fleet(ROOT / "configs" / "fleet.yaml")
    assert [d.name for d in fleet.devices] == ["front-door", "back-door", "shop-entrance"]
    front, _, shop = fleet.devices
    assert front.user == "pi" and front.port == 22 and front.reload == "auto"
    assert front.config == PurePosixPath("/etc/doorstep/device.yaml")
    assert front.key_file is not None and front.key_file.is_absolute()  # ~ expanded
    assert shop.port == 2222 and shop.user == "doorbell" and shop.device_id == "shop-01"
    assert shop.state_dir == PurePosixPath("/home/doorbell/doorstep")
    assert shop.reload == "signal"
    assert shop.device_command("status") == [
        "/opt/doorstep/bin/doorstep-device",
        "status",
        "--state-dir",
        "/home/doorbell/doorstep",
        "--config",
        "/home/doorbell/doorstep/device.yaml",
        "--json",
    ]
    assert fleet.rollout.canary == 1 and fleet.rollout.keep_models == 3
    assert [d.name for d in fleet.select(group="house")] == ["front-door", "back-door"]
    assert [d.name for d in fleet.select(device="shop-entrance")] == ["shop-entrance"]
    assert len(fleet.select(group="all")) == 3
    with pytest.raises(ConfigError, match="no group 'garden'"):
        fleet.select(group="garden")
    with pytest.raises(ConfigError, match="no device named 'garage'"):
        fleet.select(device="garage")


def test_defaults_apply_and_relative_key_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = _fleet(
        tmp_path,
        "defaults:\n  key_file: keys/id_ed25519\n  user: pi\n"
        "devices:\n  - {name: a, host: 10.0.0.1}\n"
        "  - {name: b, host: 10.0.0.2, key_file: /etc/b.key, user: root, python: /opt/v/bin/python}\n",
    )
    a, b = load_fleet(path).devices
    assert a.key_file == tmp_path / "keys" / "id_ed25519" and a.user == "pi"
    assert a.device_id == "a" and a.state_dir == PurePosixPath("/var/lib/doorstep")
    assert b.key_file == Path("/etc/b.key") and b.user == "root"
    assert a.doorstep_argv("status") == ["doorstep-device", "status"]
    assert b.doorstep_argv("status") == ["/opt/v/bin/python", "-m", "device.cli", "status"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devices:\n  - {name: a}\n", "fleet.yaml: devices.0.host: Field required"),
        (
            "devices:\n  - {name: a, host: h1}\n  - {name: b, host: h2}\n  - {name: a, host: h3}\n",
            "fleet.yaml: devices.2.name: duplicate device name (got 'a'); first at devices.0",
        ),
        (
            _devices("a", "b") + "rollout:\n  batch: 150%\n",
            "fleet.yaml: rollout.batch: Value error, batch percentage must be above 0% and at "
            "most 100% (got '150%')",
        ),
        (
            _devices("a") + "rollout:\n  batch: 0\n",
            "rollout.batch: Value error, batch must be at least 1",
        ),
        (
            _devices("a") + "rollout:\n  batch: lots\n",
            "rollout.batch: Value error, batch must be a count",
        ),
        (
            _devices("a") + "rollout:\n  canary: -1\n",
            "rollout.canary: Input should be greater than",
        ),
        (
            "devices:\n  - {name: a, host: h, prot: 22}\n",
            "fleet.yaml: devices.0.prot: Extra inputs are not permitted (got 22)",
        ),
        (
            _devices("a") + "default:\n  user: pi\n",
            "fleet.yaml: default: Extra inputs are not permitted",
        ),
        (
            "devices:\n  - {name: a, host: h, port: 70000}\n",
            "devices.0.port: Input should be less than or equal to 65535 (got 70000)",
        ),
        (
            "devices:\n  - {name: front door, host: h}\n",
            "devices.0.name: String should match pattern",
        ),
        (
            "defaults:\n  state_dir: var/lib/doorstep\n" + _devices("a"),
            "defaults.state_dir: Value error, must be an absolute path on the device",
        ),
        (
            "devices:\n  - {name: a, host: h, device_id: x}\n  - {name: b, host: h, device_id: x}\n",
            "devices.1.device_id: duplicate device_id (got 'x'); first at devices.0",
        ),
        (
            _devices("a") + "rollout:\n  canary_group: canary\n",
            "rollout.canary_group: no device is in this group (got 'canary')",
        ),
        ("devices: []\n", "devices: List should have at least 1 item"),
        ("- a\n- b\n", "the top level must be a mapping"),
        (
            "devices:\n  - name: a\n    host: h1\n    host: h2\n",
            "fleet.yaml:4:5: invalid YAML: duplicate key 'host' (first on line 3)",
        ),
    ],
)
def test_bad_fleet_files_are_refused_with_the_key_path(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_fleet(_fleet(tmp_path, text))
    assert expected in str(info.value)


def test_a_missing_fleet_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: fleet file not found"):
        load_fleet(tmp_path / "nope.yaml")


ANSIBLE = """\
all:
  vars:
    ansible_user: pi
    ansible_ssh_private_key_file: keys/deploy
    unrelated_var: ignored
    doorstep_rollout: {canary: 1, batch: 2}
  hosts:
    front-door:
      ansible_host: 192.168.1.21
  children:
    shop:
      vars:
        ansible_port: 2222
        doorstep_state_dir: /home/doorbell/doorstep
      hosts:
        shop-entrance:
          ansible_host: shop-pi.example.net
          ansible_user: doorbell
          doorstep_device_id: shop-01
    canary:
      hosts:
        front-door:
"""


def test_an_ansible_inventory_converts_to_the_same_model(tmp_path: Path) -> None:
    fleet = load_fleet(_fleet(tmp_path, ANSIBLE, "hosts.yml"))
    front, shop = fleet.devices
    assert (front.name, front.host, front.user, front.port) == (
        "front-door",
        "192.168.1.21",
        "pi",
        22,
    )
    assert front.key_file == tmp_path / "keys" / "deploy"
    assert front.groups == ("canary",)
    assert (shop.host, shop.user, shop.port, shop.device_id) == (
        "shop-pi.example.net",
        "doorbell",
        2222,
        "shop-01",
    )
    assert shop.state_dir == PurePosixPath("/home/doorbell/doorstep")
    assert shop.groups == ("shop",)
    assert fleet.rollout.batch == 2
    assert [d.name for d in fleet.select(group="canary")] == ["front-door"]


def test_ansible_inventory_errors_point_into_the_inventory(tmp_path: Path) -> None:
    text = "all:\n  hosts:\n    a:\n      ansible_port: high\n    b:\n      doorstep_sevice: x\n"
    with pytest.raises(ConfigError) as info:
        load_fleet(_fleet(tmp_path, text, "hosts.yml"))
    assert "hosts.yml: all.hosts.a.ansible_port: Input should be a valid integer" in str(info.value)
    assert "hosts.yml: all.hosts.b.doorstep_sevice: Extra inputs are not permitted" in str(
        info.value
    )
    with pytest.raises(ConfigError, match=r"h2.yml: all: unknown group keys \['host'\]"):
        load_fleet(_fleet(tmp_path, "all:\n  hosts:\n    host: {a: {}}\n  host: {}\n", "h2.yml"))


def test_rollout_overrides_are_validated() -> None:
    policy = RolloutPolicy().with_overrides(canary=2, batch="50%", max_fail=None)
    assert (policy.canary, policy.batch, policy.max_fail) == (2, "50%", 0)
    with pytest.raises(ConfigError, match="command line: batch: Value error"):
        RolloutPolicy().with_overrides(batch="150%")


# ------------------------------------------------------------------------------------ planner


def _bundle(size: int = 4 * MB) -> BundleInfo:
    return BundleInfo(
        sha=NEW,
        size=size,
        name="doorstep-parcel-ssd",
        version="1.1.0",
        path=Path("/build/parcel.tar"),
        tar_sha256="d" * 64,
        signed_by="0123456789abcdef",
    )


def _daemon(serving: str | None = OLD, **changes: object) -> DaemonFacts:
    base: dict[str, object] = {
        "state": "running",
        "pid": 4242,
        "bundle_id": serving,
        "model_sha256": "e" * 64,
        "self_test_ok": True,
        "updated": 1000.0,
    }
    base.update(changes)
    return DaemonFacts(**base)  # type: ignore[arg-type]


def _facts(**changes: object) -> DeviceFacts:
    base: dict[str, object] = {
        "active_sha": OLD,
        "previous_sha": OLDER,
        "free_bytes": 1 << 30,
        "doorstep_version": "0.1.0",
        "stored": (OLDER, OLD),
        "daemon": _daemon(),
    }
    base.update(changes)
    return DeviceFacts(**base)  # type: ignore[arg-type]


POLICY = RolloutPolicy(health_deadline=30, keep_models=3)
MODELS = PurePosixPath("/var/lib/doorstep/models")


def test_a_fresh_deploy_uploads_verifies_installs_activates_and_checks_health() -> None:
    steps = plan_device(_facts(), _bundle(), POLICY)
    assert steps == [
        Upload(Path("/build/parcel.tar"), MODELS / f"{NEW}.tar.part", 4 * MB, resume_from=0),
        VerifyUpload(MODELS / f"{NEW}.tar.part", 4 * MB, "d" * 64),
        Install(MODELS / f"{NEW}.tar.part", MODELS / NEW, NEW, "d" * 64),
        Activate(NEW, MODELS / NEW, replaces=OLD, reload="auto"),
        HealthCheck(NEW, 30, rollback_to=OLD),
    ]
    assert "reload the daemon (systemctl reload under systemd, else SIGHUP)" in steps[3].describe()


def test_a_device_already_on_the_bundle_is_skipped() -> None:
    facts = _facts(active_sha=NEW, previous_sha=OLD, daemon=_daemon(NEW))
    assert plan_device(facts, _bundle(), POLICY) == [
        Skip("doorstep-parcel-ssd 1.1.0 is already active")
    ]


def test_an_activated_but_unconfirmed_device_is_reloaded_and_checked() -> None:
    # A run was cut off after the switch: current is the bundle, the daemon still serves OLD
    # (or its self-test failed). Finish that run; roll back to what is now previous.
    for daemon in (_daemon(OLD), _daemon(NEW, self_test_ok=False)):
        facts = _facts(active_sha=NEW, previous_sha=OLD, stored=(OLD, NEW), daemon=daemon)
        assert plan_device(facts, _bundle(), POLICY) == [
            Reload(MODELS / NEW, "auto"),
            HealthCheck(NEW, 30, rollback_to=OLD),
        ]


def test_a_device_whose_daemon_is_down_is_refused() -> None:
    # Nothing could confirm the new model works: change nothing, say how to fix it.
    for daemon, state in ((None, "no daemon.json"), (_daemon(state="stopped"), "stopped")):
        steps = plan_device(_facts(daemon=daemon), _bundle(), POLICY)
        assert steps == [DaemonDown(state)]
        assert "systemctl start doorstep-device" in steps[0].describe()


def test_an_interrupted_upload_resumes_where_it_stopped() -> None:
    steps = plan_device(_facts(partials={NEW: 3 * MB}), _bundle(), POLICY)
    assert steps[0] == Upload(
        Path("/build/parcel.tar"), MODELS / f"{NEW}.tar.part", 4 * MB, resume_from=3 * MB
    )
    assert isinstance(steps[1], VerifyUpload)
    # A complete .part needs only verifying; one longer than the tar is not ours: start over.
    full = plan_device(_facts(partials={NEW: 4 * MB}), _bundle(), POLICY)
    assert isinstance(full[0], VerifyUpload)
    longer = plan_device(_facts(partials={NEW: 5 * MB}), _bundle(), POLICY)
    assert isinstance(longer[0], Upload) and longer[0].resume_from == 0


def test_a_bundle_already_in_the_store_is_activated_without_uploading() -> None:
    steps = plan_device(_facts(stored=(OLDER, NEW, OLD)), _bundle(), POLICY)
    assert [type(s) for s in steps] == [Activate, HealthCheck]
    assert steps[0] == Activate(NEW, MODELS / NEW, replaces=OLD)


def test_low_disk_is_refused_before_anything_changes() -> None:
    steps = plan_device(_facts(free_bytes=6 * MB), _bundle(4 * MB), POLICY)
    assert steps == [InsufficientSpace(8 * MB, 6 * MB, PurePosixPath("/var/lib/doorstep"))]
    # What is already uploaded counts: 3 MB there, 1 MB to go, 4 MB to unpack.
    ok = plan_device(_facts(free_bytes=6 * MB, partials={NEW: 3 * MB}), _bundle(4 * MB), POLICY)
    assert isinstance(ok[0], Upload)
    assert "not enough space" in steps[0].describe()
    # A device that cannot tell its free space is left to refuse by itself.
    assert isinstance(plan_device(_facts(free_bytes=None), _bundle(), POLICY)[0], Upload)


def test_unreachable_and_uninstalled_devices_are_refused() -> None:
    down = DeviceFacts(reachable=False, error="connection refused")
    assert plan_device(down, _bundle(), POLICY) == [Unreachable("connection refused")]
    assert Unreachable("connection refused").describe() == "cannot connect: connection refused"
    bare = _facts(doorstep_version=None)
    assert plan_device(bare, _bundle(), POLICY) == [NotInstalled("doorstep-device")]
    old = _facts(doorstep_version=None, error="it has no `status` command; upgrade it")
    assert "no `status` command" in plan_device(old, _bundle(), POLICY)[0].describe()


def test_prune_keeps_k_in_all_and_never_the_new_current_or_previous() -> None:
    stored = tuple(f"{i}" * 64 for i in range(1, 7))  # oldest first: 111.., 222.., ...
    s1, s2, s3, s4, s5, s6 = stored
    # s3 is active (it becomes previous), s1 was previous (it may go now).
    facts = _facts(active_sha=s3, previous_sha=s1, stored=stored, partials={"e" * 64: 100})
    steps = plan_device(facts, _bundle(), RolloutPolicy(keep_models=3))
    prune = steps[-1]
    assert isinstance(prune, Prune) and isinstance(steps[-2], HealthCheck)
    # 7 models with NEW; 3 stay: NEW (current), s3 (previous) and the newest other, s6.
    assert prune.models == (s1, s2, s4, s5)
    assert prune.partials == ("e" * 64,)  # the device deletes it only if over a day old
    one = plan_device(facts, _bundle(), RolloutPolicy(keep_models=1))[-1]
    assert isinstance(one, Prune) and one.models == (s1, s2, s4, s5, s6)  # current+previous stay
    nothing = plan_device(_facts(stored=(OLDER, OLD)), _bundle(), RolloutPolicy(keep_models=3))
    assert not any(isinstance(s, Prune) for s in nothing)


def test_device_settings_shape_the_steps() -> None:
    dev = Device(
        name="shop",
        host="h",
        device_id="shop",
        state_dir=PurePosixPath("/home/d/state"),
        reload="signal",
    )
    steps = plan_device(_facts(), _bundle(), POLICY, dev)
    assert steps[0] == Upload(
        Path("/build/parcel.tar"), PurePosixPath(f"/home/d/state/models/{NEW}.tar.part"), 4 * MB
    )
    assert Activate(NEW, PurePosixPath(f"/home/d/state/models/{NEW}"), OLD, "signal") in steps
    assert "(SIGHUP)" in steps[3].describe()


def _named(*names: str, groups: dict[str, tuple[str, ...]] | None = None) -> list[Device]:
    groups = groups or {}
    return [Device(name=n, host=n, device_id=n, groups=groups.get(n, ())) for n in names]


def test_rollout_waves_canary_then_fixed_batches() -> None:
    devices = _named("d1", "d2", "d3", "d4", "d5")
    waves = plan_rollout(devices, RolloutPolicy(canary=1, batch=2))
    assert waves == [["d1"], ["d2", "d3"], ["d4", "d5"]]


def test_rollout_waves_with_a_percentage_batch() -> None:
    devices = _named("d1", "d2", "d3", "d4", "d5")
    # 50% of 5 devices rounds down to 2 (as Ansible's serial does).
    assert plan_rollout(devices, RolloutPolicy(canary=1, batch="50%")) == [
        ["d1"],
        ["d2", "d3"],
        ["d4", "d5"],
    ]
    assert plan_rollout(devices, RolloutPolicy(canary=0, batch="100%")) == [
        ["d1", "d2", "d3", "d4", "d5"]
    ]
    assert plan_rollout(devices, RolloutPolicy(canary=0, batch="10%")) == [
        [n] for n in ("d1", "d2", "d3", "d4", "d5")
    ]


def test_canaries_come_from_the_canary_group_first() -> None:
    devices = _named("d1", "d2", "d3", "d4", groups={"d3": ("canary",)})
    waves = plan_rollout(devices, RolloutPolicy(canary=2, canary_group="canary", batch=5))
    assert waves == [["d3", "d1"], ["d2", "d4"]]


def test_stop_reason() -> None:
    policy = RolloutPolicy(max_fail=1)
    assert stop_reason(1, False, policy) is None
    assert "max_fail=1" in (stop_reason(2, False, policy) or "")
    assert "canary" in (stop_reason(1, True, policy) or "")


def test_render_plan_mentions_every_device_and_step() -> None:
    devices = _named("front", "back", "shop", "garage")
    facts = {
        "front": _facts(),
        "back": _facts(active_sha=NEW, previous_sha=OLD, daemon=_daemon(NEW)),
        "shop": _facts(free_bytes=MB),
        # garage: no facts gathered at all
    }
    policy = RolloutPolicy(canary=1, batch=2)
    plans = plan_fleet(devices, facts, _bundle(), policy)
    work = [d for d in devices if actionable(plans[d.name])]  # only these get waves
    assert [d.name for d in work] == ["front"]
    text = render_plan(_bundle(), plan_rollout(work, policy), plans, devices, policy)
    for name in ("front", "back", "shop", "garage"):
        assert f"\n{name}  (" in text
    for word in ("upload", "verify", "install", "activate", "reload", "health check"):
        assert word in text
    assert "wave 1 (canary): front" in text
    assert "skip: doorstep-parcel-ssd 1.1.0 is already active" in text
    assert "REFUSED not enough space" in text
    assert "REFUSED cannot connect: no facts gathered" in text
    assert "signed by key 0123456789abcdef" in text
    assert "1 to change, 1 already on the bundle, 2 refused" in text


# ------------------------------------------------------------------------------------ bundle


def test_bundle_info_from_a_signed_tar(tmp_path: Path) -> None:
    src = Path(
        shutil.copytree(Path(device.__file__).parent / "models" / "parcel-ssd", tmp_path / "b")
    )
    key = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    sign_bundle(src, tmp_path / "k.pem")
    tar = tmp_path / "b.tar"
    with tarfile.open(tar, "w") as out:
        for path in sorted(src.iterdir()):
            out.add(path, arcname=path.name)
    info = BundleInfo.from_tar(tar)
    assert info.sha == bundle_id(src) and len(info.sha) == 64
    assert info.size == tar.stat().st_size and info.name == "doorstep-parcel-ssd"
    assert info.signed_by == key.key_id and len(info.tar_sha256) == 64
    with pytest.raises(BundleError, match="pack the directory first"):
        BundleInfo.from_tar(src)


def test_an_inventory_of_top_level_groups_needs_no_all(tmp_path: Path) -> None:
    text = "doorbells:\n  hosts:\n    porch.local:\n    gate.local: {ansible_port: 2200}\n"
    fleet = load_fleet(_fleet(tmp_path, text, "hosts.yml"))
    assert [(d.name, d.host, d.port, d.groups) for d in fleet.devices] == [
        ("porch.local", "porch.local", 22, ("doorbells",)),
        ("gate.local", "gate.local", 2200, ("doorbells",)),
    ]


# ------------------------------------------------------------------------------------ facts


@pytest.fixture
def daemon_lookalike(tmp_path: Path) -> Iterator[int]:
    """The pid of a live process whose command line is ``.../doorstep-device run`` (a stand-in
    for the daemon: ``status`` counts a record as running only for such a process)."""
    exe = tmp_path / "bin" / "doorstep-device"
    exe.parent.mkdir()
    exe.symlink_to(sys.executable)
    with subprocess.Popen(
        [str(exe), "-c", "import sys; sys.stdin.read()", "run"], stdin=subprocess.PIPE
    ) as proc:
        try:
            yield proc.pid
        finally:
            proc.kill()


def test_facts_from_a_real_device_status_document(tmp_path: Path, daemon_lookalike: int) -> None:
    from device.install import Store, status, write_daemon_record
    from host.fleet.facts import StatusFormatError, parse_status

    store = Store(tmp_path / "state")
    store.state_dir.mkdir()
    empty = parse_status(status(store))
    assert (empty.active_sha, empty.previous_sha, empty.daemon, empty.stored) == (
        None,
        None,
        None,
        (),
    )
    assert empty.doorstep_version == device.__version__ and empty.free_bytes
    assert plan_device(empty, _bundle(), POLICY) == [DaemonDown("no daemon.json")]

    store.models.mkdir(parents=True)
    (store.models / f"{NEW}.tar.part").write_bytes(b"x" * 10)
    write_daemon_record(
        store,
        {
            "pid": daemon_lookalike,  # alive, and looks like the daemon
            "state": "running",
            "systemd": False,
            "model_sha256": "e" * 64,
            "bundle_id": None,
            "model": {"name": "doorstep-parcel-ssd", "version": "1.0.0"},
            "self_test": {"ok": True, "ms": 12.0, "time": 1.0, "error": None},
            "last_reload": None,
            "started": 1.0,
            "updated": 2.0,
        },
    )
    facts = parse_status(status(store))
    assert facts.partials == {NEW: 10}
    assert facts.daemon == DaemonFacts(
        state="running",
        pid=daemon_lookalike,
        model_sha256="e" * 64,
        self_test_ok=True,
        updated=2.0,
    )
    with pytest.raises(StatusFormatError, match="door9: `doorstep-device status --json` printed"):
        parse_status({"active": None}, "door9")


def _now(**daemon: object) -> DaemonFacts:
    return _daemon(**daemon)  # type: ignore[arg-type]


def test_health_verdict() -> None:
    from host.fleet.facts import Verdict, health_verdict

    before = _daemon(OLD, updated=100.0)
    # Not yet reloaded: the report predates the switch, even though it says OLD is fine.
    assert health_verdict(before, _now(serving=OLD, updated=100.0), NEW).outcome == "wait"
    # Reloaded onto the new bundle, self-test passed.
    ok = health_verdict(before, _now(serving=NEW, updated=101.0), NEW)
    assert (ok.outcome, ok.reason) == ("ok", "serving the new model; self-test passed")
    # A daemon that reports no bundle id is judged by its model's sha256.
    assert health_verdict(before, _now(serving=None, updated=101.0), NEW, "e" * 64).outcome == "ok"
    assert health_verdict(before, _now(serving=None, updated=101.0), NEW, "f" * 64).outcome == (
        "wait"
    )
    # The daemon refused the model: fail at once, with its reason.
    refused = health_verdict(
        before,
        _now(
            serving=OLD,
            updated=101.0,
            last_reload_ok=False,
            last_reload_error="self-test inference failed: NaN",
            last_reload_time=101.0,
        ),
        NEW,
    )
    assert refused.outcome == "failed" and "self-test inference failed: NaN" in refused.reason
    assert f"keeps serving {OLD[:12]}" in refused.reason
    # ... but an old refusal (before the switch) is history, not a verdict on this bundle.
    old_refusal = _daemon(OLD, updated=90.0, last_reload_ok=False, last_reload_time=100.0)
    assert (
        health_verdict(
            old_refusal,
            _now(serving=OLD, updated=90.0, last_reload_ok=False, last_reload_time=100.0),
            NEW,
        ).outcome
        == "wait"
    )
    failed_test = health_verdict(
        before, _now(serving=NEW, updated=101.0, self_test_ok=False, self_test_error="x"), NEW
    )
    assert failed_test.outcome == "failed"
    assert health_verdict(
        before, _now(serving=NEW, updated=101.0, state="stopped"), NEW
    ).reason == ("the daemon is stopped")
    assert health_verdict(before, None, NEW).outcome == "wait"
    # A record the daemon could not have written: the verdict waits (the daemon rewrites its
    # record after the reload) and says why; at the deadline the gate rolls back.
    bad = DaemonFacts(error="/s/daemon.json: invalid record: pid: Field required")
    assert health_verdict(before, bad, NEW) == Verdict("wait", bad.error or "")


# ------------------------------------------------------------------ hostile device answers


GOOD_RECORD: dict[str, object] = {
    "pid": 4242,
    "state": "running",
    "systemd": False,
    "model_sha256": "e" * 64,
    "bundle_id": OLD,
    "model": {"name": "doorstep-parcel-ssd", "version": "1.0.0"},
    "self_test": {"ok": True, "ms": 12.0, "time": 1.0, "error": None},
    "last_reload": None,
    "last_event": {"event": "arrived", "id": "ab", "zone": "porch", "wall_time": 1.7e9},
    "started": 1.0,
    "updated": 2.0,
}


def _status_doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "doorstep_version": "0.1.0",
        "state_dir": "/var/lib/doorstep",
        "active": {"id": OLD, "name": "parcel", "version": "2", "model_sha256": "e" * 64},
        "previous": None,
        "stored": [OLD],
        "partials": {},
        "free_bytes": 1 << 30,
        "daemon": GOOD_RECORD,
        "daemon_error": None,
    }
    doc.update(changes)
    return doc


def test_a_device_whose_record_is_invalid_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The device reports an invalid record as ``daemon_error``: the plan refuses that device,
    quoting the device's reason, instead of crashing or calling the daemon "stopped"."""
    from device.install import Store, status
    from host.fleet.facts import parse_status
    from host.fleet.plan import BadDaemonRecord

    store = Store(tmp_path)
    store.daemon_file.write_text("[" * 20_000 + "]" * 20_000)
    facts = parse_status(status(store), "door1")
    assert facts.daemon is not None and facts.daemon.error is not None
    assert facts.daemon.error.startswith(f"{store.daemon_file}: invalid record: ")
    steps = plan_device(facts, _bundle(), POLICY)
    assert steps == [BadDaemonRecord(facts.daemon.error)]
    assert "cannot be read" in steps[0].describe() and "restart" in steps[0].describe()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("[" * 100_000 + "]" * 100_000, "recursion limit exceeded"),
        ("[" * 600_000 + "]" * 600_000, "more than 1048576 bytes"),
        ("null", "Input should be an object"),
        ("[1, 2]", "Input should be an object"),
        (_status_doc(daemon={**GOOD_RECORD, "pid": True}), "daemon.pid: Input should be a valid"),
        (_status_doc(daemon=[1]), "daemon: Input should be a valid dictionary"),
        (_status_doc(stored=["../../etc"]), "stored.0: String should match pattern"),
        (_status_doc(free_bytes="lots"), "free_bytes: Input should be a valid integer"),
        (_status_doc(doorstep_version=None), "doorstep_version: Input should be a valid string"),
    ],
    ids=["100k-deep", "too-big", "null", "list", "pid", "daemon", "stored", "free", "version"],
)
def test_a_garbage_status_answer_is_that_devices_error(answer: object, why: str) -> None:
    from host.fleet.facts import StatusFormatError, parse_status
    from host.fleet.status import from_status_doc

    with pytest.raises(StatusFormatError) as caught:
        parse_status(answer, "door9")
    assert str(caught.value).startswith("door9: `doorstep-device status --json` printed")
    assert why in str(caught.value)
    row = from_status_doc("door9", answer)
    assert row.reachable and row.daemon == "invalid status" and why in row.last_event


def test_status_rows_come_from_the_typed_record() -> None:
    from host.fleet.status import from_status_doc

    row = from_status_doc("door1", _status_doc())
    assert row.model == f"parcel 2 ({OLD[:12]})" and row.daemon == "running, self-test ok"
    assert row.last_seen == 2.0
    assert row.last_event.startswith("parcel arrived in porch at ")  # the record's last event
    degraded = {
        **GOOD_RECORD,
        "storage": "degraded",
        "source": {"status": "stalled", "last_frame_age_s": 12.0},
        "last_reload": {"ok": False, "error": "x", "time": 3.0},
    }
    row = from_status_doc("door1", _status_doc(daemon=degraded))
    assert row.daemon == (
        "running, self-test ok, last reload FAILED, storage degraded, camera stalled"
    )
    error = "/var/lib/doorstep/daemon.json: invalid record: pid: Field required"
    row = from_status_doc("door1", _status_doc(daemon=None, daemon_error=error))
    assert (row.daemon, row.last_event, row.detail) == ("invalid record", error, error)


def test_parse_daemon_never_raises() -> None:
    from host.fleet.facts import parse_daemon

    good = parse_daemon(json.dumps(GOOD_RECORD).encode(), "d.json")
    assert good.error is None and good.bundle_id == OLD and good.self_test_ok
    for raw in (b"null", b"\xff", b"[" * 60_000, json.dumps({**GOOD_RECORD, "pid": -1}).encode()):
        facts = parse_daemon(raw, "d.json")
        assert facts.error is not None and facts.error.startswith("d.json: invalid record: ")
        assert facts.state == "unknown"
