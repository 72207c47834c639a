"""The device's model store: install, activate, rollback, prune, status, and a live daemon
switching models on SIGHUP (real bundles, real daemon process, real signatures)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import cv2
import pytest
from childproc import finish

from device.bench import synthetic_frame
from device.bundle.build import describe_model
from device.bundle.signing import bundle_id, generate_keypair, sign_bundle
from device.bundle.store import pack_bundle, write_bundle
from device.errors import DoorstepError
from device.install import Store, activate, install, prune, read_daemon_record, rollback, status
from device.models import DEFAULT_BUNDLE
from device.record import DaemonRecord


def variant(tmp_path: Path, version: str) -> Path:
    """The shipped bundle under another version: same model, another bundle id."""
    out = tmp_path / f"bundle-{version}"
    shutil.copytree(DEFAULT_BUNDLE, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = version
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def collapsed_bundle(testmodels: Path, tmp_path: Path) -> Path:
    """A bundle that loads and verifies but whose int8 scores are all zero: fails self-test."""
    labels = ["parcel", "person", "dog", "cat"]  # tests/modelgen.py's classes
    manifest, files = describe_model(
        testmodels / "yolo_v8_int8_collapsed.tflite", labels, name="collapsed", version="bad"
    )
    return write_bundle(tmp_path / "bundle-collapsed", manifest, files).model_path.parent


def upload(store: Store, bundle: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """What deploy leaves on the device: models/<id>.tar.part, plus the tar's sha256."""
    tar = pack_bundle(bundle, tmp_path / f"{bundle.name}.tar")
    ident = bundle_id(bundle)
    store.models.mkdir(parents=True, exist_ok=True)
    part = store.models / f"{ident}.tar.part"
    shutil.copy(tar, part)
    return part, ident, hashlib.sha256(tar.read_bytes()).hexdigest()


def installed(store: Store, bundle: Path, tmp_path: Path, keys: list[Any] | None = None) -> Path:
    part, ident, sha = upload(store, bundle, tmp_path)
    return install(store, part, ident, sha, keys or [])


def test_install_activate_rollback_and_prune(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    dirs = [installed(store, variant(tmp_path, f"v{i}"), tmp_path) for i in range(4)]
    assert not store.partials()  # each upload consumed
    assert activate(store, dirs[0], []) == {"active": dirs[0].name, "previous": None}
    assert activate(store, dirs[1], []) == {"active": dirs[1].name, "previous": dirs[0].name}
    assert (store.current.resolve(), store.previous.resolve()) == (dirs[1], dirs[0])
    assert store.current.is_symlink() and not Path(str(store.current) + ".tmp").exists()
    st = status(store)
    assert st["active"]["version"] == "v1" and st["previous"]["version"] == "v0"
    assert st["active"]["model_sha256"] and st["free_bytes"] > 0 and len(st["stored"]) == 4
    assert rollback(store, []) == {"active": dirs[0].name, "previous": dirs[1].name}
    # keep 1: the two others go; current and previous stay whatever their age
    # a first deployment rolled back: `current` goes, the daemon falls back to its config's model
    first = Store(tmp_path / "first")
    only = installed(first, variant(tmp_path, "only"), tmp_path)
    activate(first, only, [])
    assert rollback(first, []) == {"active": None, "previous": only.name}
    assert not first.current.exists() and status(first)["active"] is None
    gone = prune(store, keep=1)
    assert sorted(gone) == sorted([dirs[2].name, dirs[3].name])
    assert sorted(store.stored()) == sorted([dirs[0].name, dirs[1].name])


def test_a_corrupt_upload_is_refused_and_removed(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    part, ident, sha = upload(store, variant(tmp_path, "v1"), tmp_path)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(DoorstepError, match="does not match the expected"):
        install(store, part, ident, sha, [])
    assert not part.exists() and not store.stored()


def test_a_tar_with_a_path_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    bundle = variant(tmp_path, "v1")
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(bundle / "manifest.json", arcname="../manifest.json")
    store.models.mkdir(parents=True)
    part = store.models / "x.tar.part"
    shutil.copy(evil, part)
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    with pytest.raises(DoorstepError, match="plain files only"):
        install(store, part, "0" * 64, sha, [])
    assert not list(store.models.glob(".*tmp*")) and not (tmp_path / "manifest.json").exists()
    for bad_id in ("x" * 64, "../../../outside/x", "a/b"):  # --id must be a bundle id
        with pytest.raises(DoorstepError, match="is not a bundle id"):
            install(store, part, bad_id, sha, [])
    assert sorted(p.name for p in store.models.iterdir()) == ["x.tar.part"]
    assert not (tmp_path / "outside").exists()


def test_signed_bundles_only_when_a_key_is_configured(tmp_path: Path) -> None:
    from device.install import trusted_keys

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    keys = trusted_keys([tmp_path / "k.pub"])
    store = Store(tmp_path / "state")
    signed = variant(tmp_path, "signed")
    sign_bundle(signed, tmp_path / "k.key")
    assert installed(store, signed, tmp_path, keys).is_dir()  # the signature travels in the tar
    unsigned = variant(tmp_path, "unsigned")
    with pytest.raises(DoorstepError, match="requires signed bundles"):
        installed(store, unsigned, tmp_path, keys)
    foreign = variant(tmp_path, "foreign")
    sign_bundle(foreign, tmp_path / "other.key")
    with pytest.raises(DoorstepError, match="does not trust"):
        installed(store, foreign, tmp_path, keys)
    # activate checks again: a bundle tampered with after install is refused
    target = store.model_dir(bundle_id(signed))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["thresholds"]["score"] = 0.01
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DoorstepError, match="changed after it was signed"):
        activate(store, target, keys)
    assert store.linked(store.current) is None


def _daemon_config(tmp_path: Path, store: Store, keys: Path | None) -> Path:
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), synthetic_frame(640, 480, seed=1))
    conf = tmp_path / "device.yaml"
    conf.write_text(
        f"device_id: d1\nstate_dir: {store.state_dir}\n"
        f"source:\n  type: still\n  path: {still}\n  fps: 5\n"
        f"telemetry:\n  log_file: {tmp_path / 'd.jsonl'}\n"
        + (f"signing:\n  public_keys: [{keys}]\n" if keys else "")
    )
    return conf


def _wait_record(store: Store, check: Any, timeout: float = 60) -> DaemonRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = read_daemon_record(store)
        if rec is not None and check(rec):
            return rec
        time.sleep(0.1)
    raise AssertionError(f"daemon record never matched: {read_daemon_record(store)}")


def device_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_a_running_daemon_switches_models_and_keeps_serving_through_a_bad_one(
    tmp_path: Path, testmodels: Path
) -> None:
    """activate -> SIGHUP -> the daemon runs the new bundle; a bundle that fails the self-test
    (an int8 model whose scores collapsed) leaves the old one serving; rollback restores."""
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    store = Store(tmp_path / "state")
    good = [variant(tmp_path, v) for v in ("v1", "v2")]
    bad = collapsed_bundle(testmodels, tmp_path)
    for b in (*good, bad):
        sign_bundle(b, tmp_path / "k.key")
    ids = [installed(store, b, tmp_path).name for b in (*good, bad)]
    activate(store, store.model_dir(ids[0]), [])
    conf = _daemon_config(tmp_path, store, tmp_path / "k.pub")
    proc = subprocess.Popen(
        [sys.executable, "-m", "device.cli", "run", "--config", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rec = _wait_record(store, lambda r: r.state == "running")
        assert rec.bundle_id == ids[0] and rec.self_test.ok
        out = device_cli("activate", str(store.model_dir(ids[1])), "--config", str(conf), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["reloaded"] == "signal"
        rec = _wait_record(store, lambda r: r.bundle_id == ids[1])
        assert rec.last_reload and rec.last_reload.ok and rec.self_test.ok

        out = device_cli("activate", str(store.model_dir(ids[2])), "--config", str(conf))
        assert out.returncode == 0, out.stderr  # the switch itself works ...
        rec = _wait_record(store, lambda r: r.last_reload and not r.last_reload.ok)
        assert rec.bundle_id == ids[1]  # ... but the daemon keeps the good model
        assert rec.last_reload and "collapsed" in str(rec.last_reload.error)
        assert rec.state == "running"

        out = device_cli("rollback", "--config", str(conf), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["active"] == ids[1]
        rec = _wait_record(store, lambda r: r.last_reload and r.last_reload.ok)
        assert rec.bundle_id == ids[1]
        st = json.loads(device_cli("status", "--config", str(conf), "--json").stdout)
        assert st["active"]["id"] == ids[1] and st["daemon"]["state"] == "running"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc)
    assert proc.returncode == 0, err
    final = read_daemon_record(store)
    assert final is not None and final.state == "stopped"


def test_store_commands_need_a_state_dir(tmp_path: Path) -> None:
    out = device_cli("status")
    assert out.returncode == 2 and "--state-dir DIR or --config FILE" in out.stderr
    out = device_cli("rollback", "--state-dir", str(tmp_path))
    assert out.returncode == 2 and "no deployed model to roll back from" in out.stderr
    out = device_cli("activate", str(tmp_path), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "install it first" in out.stderr


def test_a_restart_on_a_bad_deployment_falls_back(tmp_path: Path, testmodels: Path) -> None:
    """The daemon starts on `previous` (then the shipped model) when `current` fails."""
    from device.config import load_config
    from device.detect.checked import open_detector

    store = Store(tmp_path / "state")
    good = installed(store, variant(tmp_path, "good"), tmp_path)
    bad = installed(store, collapsed_bundle(testmodels, tmp_path), tmp_path)
    activate(store, good, [])
    activate(store, bad, [])  # current: the collapsed model; previous: the good one
    cfg = load_config(_daemon_config(tmp_path, store, None))
    args = (cfg.model, cfg.signing.public_keys, cfg.state_dir)
    det, path, _ = open_detector(*args, fallback=True)
    assert path == good and det.manifest.version == "good"
    store.previous.unlink()
    det, path, _ = open_detector(*args, fallback=True)
    assert path is None and det.manifest.name == "doorstep-parcel-ssd"  # the shipped model
    with pytest.raises(DoorstepError, match="collapsed"):
        open_detector(*args)  # a reload takes `current` only, and its self-test fails
