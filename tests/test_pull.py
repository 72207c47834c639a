"""Pull mode, device side: a real nginx serves signed bundles, a real Mosquitto carries the
retained desired and update topics, and the real agent (``doorstep-device update --once`` and
the daemon's own) fetches, verifies, switches, and reports; each fault of the issue gets a test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from brokers import HOST, Mosquitto
from origin import Nginx, StallingOrigin
from pullkit import (
    DEFAULT,
    Bus,
    desired,
    device_config,
    last_json,
    make_bundle,
    served,
    update_once,
)

from device.bundle.signing import generate_keypair, sign_bundle
from device.bundle.store import load_bundle, write_bundle
from device.install import Store

pytestmark = pytest.mark.timeout(180)


# ----------------------------------------------------------------------------- the tests


def test_update_once_fetches_verifies_switches_and_reports(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    key, pub = keys
    facts = served(make_bundle(tmp_path / "b2", "2.0.0", key), nginx.root)
    config = device_config(tmp_path, "d1", mosquitto, pub, nginx.base_url)
    bus.want("d1", desired(facts, nginx.url(facts["tar"].name), "2.0.0"))
    proc = update_once(config)
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc)["state"] == "serving"
    store = Store(tmp_path / "state-d1")
    assert store.linked(store.current) == facts["id"]
    assert not list(store.models.glob("*.tar*"))  # the download is gone once installed
    states = [r.state for r in bus.reports if r.device_id == "d1"]
    assert states[0] == "downloading" and states[-1] == "serving" and "installing" in states
    final = bus.wait_report(lambda r: r.state == "serving", 10)
    assert final.active_id == facts["id"] and final.active_version == "2.0.0"
    assert nginx.served_bytes() == facts["size"]  # fetched once, whole
    again = update_once(config)  # nothing to do: already serving, nothing fetched
    assert again.returncode == 0 and last_json(again)["state"] == "serving"
    assert nginx.served_bytes() == facts["size"]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("404", "HTTP 404"),
        ("truncated", "the body ended at"),
        ("wrong_sha", "is not the announced"),
        ("not_allowed", "not under update.allowed_url_prefixes"),
        ("too_large", "over update.max_bundle_mb"),
    ],
)
def test_update_once_faults_fail_clearly_and_change_nothing(
    tmp_path: Path,
    keys: tuple[Path, Path],
    nginx: Nginx,
    mosquitto: Mosquitto,
    bus: Bus,
    fault: str,
    message: str,
) -> None:
    key, pub = keys
    facts = served(make_bundle(tmp_path / "b2", "2.0.0", key), nginx.root)
    url = nginx.url(facts["tar"].name)
    extra: dict[str, Any] = {}
    update: dict[str, Any] = {}
    if fault == "404":
        url = nginx.url("0" * 64 + ".tar")
    elif fault == "truncated":
        data = facts["tar"].read_bytes()
        facts["tar"].write_bytes(data[: len(data) // 2])
    elif fault == "wrong_sha":
        extra["sha256"] = "f" * 64
    elif fault == "not_allowed":
        url = f"http://{HOST}:1/elsewhere/{facts['tar'].name}"
    elif fault == "too_large":
        update["max_bundle_mb"] = 1
    config = device_config(tmp_path, "d1", mosquitto, pub, nginx.base_url, **update)
    bus.want("d1", desired(facts, url, "2.0.0", **extra))
    proc = update_once(config)
    assert proc.returncode == 1, proc.stderr
    report = last_json(proc)
    assert report["state"] == "failed" and message in report["reason"], report
    assert "Traceback" not in proc.stderr
    store = Store(tmp_path / "state-d1")
    assert store.linked(store.current) is None  # still the model it had
    assert not (store.models / facts["id"]).exists()
    retained = bus.wait_report(lambda r: r.state == "failed", 10)
    assert message in (retained.reason or "")


def test_unsigned_or_foreign_signed_bundles_are_refused(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    """A broker publisher can only point at bundles our key signed."""
    _, pub = keys
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    config = device_config(tmp_path, "d1", mosquitto, pub, nginx.base_url)
    store = Store(tmp_path / "state-d1")
    for version, key in (("2.0.0", None), ("2.0.1", tmp_path / "other.key")):
        facts = served(make_bundle(tmp_path / f"b{version}", version, key), nginx.root)
        bus.want("d1", desired(facts, nginx.url(facts["tar"].name), version))
        proc = update_once(config)
        assert proc.returncode == 1, proc.stderr
        report = last_json(proc)
        assert report["state"] == "failed" and "sign" in report["reason"].lower(), report
        assert store.linked(store.current) is None
        assert not (store.models / facts["id"]).exists()


def test_downgrade_needs_allow_downgrade(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    key, pub = keys
    new = served(make_bundle(tmp_path / "b2", "2.0.0", key), nginx.root)
    old = served(make_bundle(tmp_path / "b1", "1.9.0", key), nginx.root)
    config = device_config(tmp_path, "d1", mosquitto, pub, nginx.base_url)
    bus.want("d1", desired(new, nginx.url(new["tar"].name), "2.0.0"))
    assert update_once(config).returncode == 0
    bus.want("d1", desired(old, nginx.url(old["tar"].name), "1.9.0", rollout_id="r2"))
    proc = update_once(config)
    assert proc.returncode == 1 and "older than the serving 2.0.0" in last_json(proc)["reason"]
    bus.want(
        "d1",
        desired(old, nginx.url(old["tar"].name), "1.9.0", rollout_id="r3", allow_downgrade=True),
    )
    proc = update_once(config)
    assert proc.returncode == 0, proc.stdout
    store = Store(tmp_path / "state-d1")
    assert store.linked(store.current) == old["id"] and store.linked(store.previous) == new["id"]


def test_a_stalled_download_resumes_from_where_it_stopped(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto, bus: Bus
) -> None:
    key, pub = keys
    root = tmp_path / "plain"
    root.mkdir()
    facts = served(make_bundle(tmp_path / "b2", "2.0.0", key), root)
    stall_at = 1_000_000
    origin = StallingOrigin(facts["tar"].read_bytes(), stall_at)
    origin.start()
    try:
        prefix = origin.url.rsplit("/", 1)[0] + "/"
        config = device_config(tmp_path, "d1", mosquitto, pub, prefix, timeout_s=1)
        bus.want("d1", desired(facts, origin.url, "2.0.0"))
        first = update_once(config)
        assert first.returncode == 1
        assert "nothing received for 1 s at 1000000 of" in last_json(first)["reason"]
        part = tmp_path / "state-d1" / "models" / f"{facts['id']}.tar.part"
        assert part.stat().st_size == stall_at  # kept for the next attempt
        origin.release()
        second = update_once(config)
        assert second.returncode == 0, second.stdout + second.stderr
        assert origin.ranges == [None, f"bytes={stall_at}-"]  # the rest only
    finally:
        origin.stop()
    store = Store(tmp_path / "state-d1")
    assert store.linked(store.current) == facts["id"]


def test_invalid_desired_message_is_reported_not_crashed(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    _, pub = keys
    config = device_config(tmp_path, "d1", mosquitto, pub, nginx.base_url)
    info = bus.client.publish("doorstep/d1/desired", b'{"bundle_id": "x"}', qos=1, retain=True)
    info.wait_for_publish(10)
    proc = update_once(config)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "invalid desired message" in last_json(proc)["reason"]
    shutil.rmtree(tmp_path / "state-d1", ignore_errors=True)


def test_the_daemon_follows_desired_and_rolls_back_a_bundle_that_fails(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    """The daemon's own agent: the model switches in-process (no restart); a bundle that
    cannot serve (here: no class has the `package` role) is rolled back and reported."""
    from daemonproc import DaemonProc
    from support.doorbell import write_still_image

    key, pub = keys
    good = served(make_bundle(tmp_path / "b2", "2.0.0", key), nginx.root)
    bad_dir = tmp_path / "b3"
    src = load_bundle(DEFAULT)
    labels = src.manifest.labels.model_copy(update={"roles": {"person": [0]}})
    write_bundle(
        bad_dir,
        src.manifest.model_copy(update={"version": "3.0.0", "labels": labels}),
        {name: src.file(name) for name in src.manifest.files},
    )
    sign_bundle(bad_dir, key)
    bad = served(bad_dir, nginx.root)
    config = device_config(
        tmp_path, "d1", mosquitto, pub, nginx.base_url, write_still_image(tmp_path / "still.png")
    )
    daemon = DaemonProc(config)
    try:
        daemon.record("start", timeout=60)
        bus.want("d1", desired(good, nginx.url(good["tar"].name), "2.0.0"))
        daemon.record("reloaded", timeout=60, version="2.0.0")
        report = bus.wait_report(lambda r: r.state == "serving" and r.bundle_id == good["id"], 30)
        assert report.active_version == "2.0.0"
        bus.want("d1", desired(bad, nginx.url(bad["tar"].name), "3.0.0", rollout_id="r2"))
        failed = daemon.record("reload_failed", timeout=60)
        assert "package" in failed["error"]
        back = daemon.record("reloaded", timeout=60, version="2.0.0")  # the old model again
        assert back["sha256"]
        report = bus.wait_report(lambda r: r.state == "rolled_back", 30)
        assert report.bundle_id == bad["id"] and report.active_id == good["id"]
        assert "package" in (report.reason or "")
        store = Store(tmp_path / "state-d1")
        assert store.linked(store.current) == good["id"]
        assert daemon.proc.poll() is None  # still running, still detecting
    finally:
        assert daemon.stop() == 0


def test_a_bundle_whose_self_test_fails_is_rolled_back_by_the_daemon(
    tmp_path: Path,
    keys: tuple[Path, Path],
    nginx: Nginx,
    mosquitto: Mosquitto,
    bus: Bus,
    testmodels: Path,
) -> None:
    """A signed bundle of a model whose int8 scores collapsed to 0 (it loads, it runs, it finds
    nothing): the daemon's self-test at reload refuses it, the agent rolls back."""
    from daemonproc import DaemonProc
    from support.doorbell import write_still_image

    from device.bundle.build import describe_model

    key, pub = keys
    manifest, files = describe_model(
        testmodels / "yolo_v8_int8_collapsed.tflite", testmodels / "labels.txt"
    )
    broken = tmp_path / "collapsed"
    write_bundle(broken, manifest.model_copy(update={"version": "4.0.0"}), files)
    sign_bundle(broken, key)
    facts = served(broken, nginx.root)
    config = device_config(
        tmp_path, "d1", mosquitto, pub, nginx.base_url, write_still_image(tmp_path / "s.png")
    )
    daemon = DaemonProc(config)
    try:
        daemon.record("start", timeout=60)
        bus.want("d1", desired(facts, nginx.url(facts["tar"].name), "4.0.0"))
        failed = daemon.record("reload_failed", timeout=60)
        assert "collapsed" in failed["error"] or "score is 0" in failed["error"], failed
        report = bus.wait_report(lambda r: r.state == "rolled_back", 60)
        assert "self-test" in (report.reason or "") or "score" in (report.reason or "")
        store = Store(tmp_path / "state-d1")
        assert store.linked(store.current) is None  # back to the shipped model
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
    # Restarted, the daemon does not try the rolled-back bundle again (the retained message is
    # still there); a new message is handled as usual.
    good = served(make_bundle(tmp_path / "b2", "2.0.0", key), nginx.root)
    again = DaemonProc(config)
    try:
        again.record("start", timeout=60)
        bus.want("d1", desired(good, nginx.url(good["tar"].name), "2.0.0", rollout_id="r2"))
        again.record("reloaded", timeout=60, version="2.0.0")
        assert not any(r.get("log") == "reload_failed" for r in again.records)
    finally:
        assert again.stop() == 0


def test_the_daemon_retries_a_failed_download_with_backoff(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    """The origin has not got the bundle yet (404): the agent reports it, waits, tries again
    (doubling from retry_min_s), and serves once the file is there, with no new message."""
    from daemonproc import DaemonProc
    from support.doorbell import write_still_image

    key, pub = keys
    elsewhere = tmp_path / "not-yet"
    elsewhere.mkdir()
    facts = served(make_bundle(tmp_path / "b2", "2.0.0", key), elsewhere)
    config = device_config(
        tmp_path, "d1", mosquitto, pub, nginx.base_url, write_still_image(tmp_path / "s.png")
    )
    daemon = DaemonProc(config)
    try:
        daemon.record("start", timeout=60)
        bus.want("d1", desired(facts, nginx.url(facts["tar"].name), "2.0.0"))
        failed = bus.wait_report(lambda r: r.state == "failed", 60)
        assert "HTTP 404" in (failed.reason or "")
        shutil.copy(facts["tar"], nginx.root / facts["tar"].name)  # the origin catches up
        bus.wait_report(lambda r: r.state == "serving" and r.active_id == facts["id"], 60)
        attempts = [r for r in bus.reports if r.state == "failed"]
        assert len(attempts) >= 1
    finally:
        assert daemon.stop() == 0


def test_a_redirect_outside_the_allowed_prefixes_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], nginx: Nginx, mosquitto: Mosquitto, bus: Bus
) -> None:
    """The origin may redirect within the allowed prefixes, never elsewhere."""
    import http.server
    import threading

    key, pub = keys
    facts = served(make_bundle(tmp_path / "b2", "2.0.0", key), nginx.root)
    target = {"url": "http://192.0.2.1/elsewhere.tar"}

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target["url"])
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer((HOST, 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mover = f"http://{HOST}:{server.server_address[1]}/"
        config = device_config(tmp_path, "d1", mosquitto, pub, mover)
        cfg = json.loads(config.read_text())
        cfg["update"]["allowed_url_prefixes"] = [mover, nginx.base_url]
        config.write_text(json.dumps(cfg))
        bus.want("d1", desired(facts, mover + "moved.tar", "2.0.0"))
        proc = update_once(config)
        assert proc.returncode == 1 and "outside update.allowed_url_prefixes" in proc.stdout
        target["url"] = nginx.url(facts["tar"].name)  # a move within the prefixes is followed
        proc = update_once(config)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
