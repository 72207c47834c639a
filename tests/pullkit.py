"""Helpers of the pull-mode tests: signed bundles as an origin serves them, desired messages,
a test client on the broker, device configs with ``update:`` (fixtures in conftest)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from brokers import HOST, Mosquitto
from paho.mqtt.enums import CallbackAPIVersion

from device.bundle.signing import bundle_id, sign_bundle
from device.bundle.store import load_bundle, pack_bundle, write_bundle
from device.update.messages import Desired, UpdateReport

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "device" / "models" / "parcel-ssd"


def make_bundle(out: Path, version: str, key: Path | None) -> Path:
    """The shipped model as bundle ``version`` (its own id), signed with ``key`` if given."""
    src = load_bundle(DEFAULT)
    manifest = src.manifest.model_copy(update={"version": version})
    files = {name: src.file(name) for name in manifest.files}
    write_bundle(out, manifest, files)
    if key is not None:
        sign_bundle(out, key)
    return out


def served(bundle: Path, root: Path) -> dict[str, Any]:
    """``bundle`` packed into the origin's folder as ``<id>.tar``; its facts."""
    ident = bundle_id(bundle)
    tar = pack_bundle(bundle, root / f"{ident}.tar")
    data = tar.read_bytes()
    return {"id": ident, "tar": tar, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def desired(facts: dict[str, Any], url: str, version: str, **extra: Any) -> Desired:
    return Desired(
        rollout_id=extra.pop("rollout_id", "r1"),
        bundle_id=facts["id"],
        url=url,
        sha256=extra.pop("sha256", facts["sha256"]),
        size=extra.pop("size", facts["size"]),
        name="doorstep-parcel-ssd",
        version=version,
        health_deadline_s=extra.pop("health_deadline_s", 60),
        issued=time.time(),
        **extra,
    )


class Bus:
    """A test client on the broker: writes desired messages, reads update reports."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bus-{time.time_ns()}")
        self.reports: list[UpdateReport] = []
        self.cond = threading.Condition()
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._message
        self.client.connect(HOST, broker.port)
        self.client.loop_start()
        self.client.subscribe("doorstep/+/update", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            with self.cond:
                self.reports.append(UpdateReport.model_validate_json(msg.payload))
                self.cond.notify_all()

    def want(self, device: str, d: Desired | None) -> None:
        payload = d.model_dump_json() if d is not None else ""
        info = self.client.publish(f"doorstep/{device}/desired", payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def wait_report(self, pred: Callable[[UpdateReport], bool], timeout: float) -> UpdateReport:
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(r) for r in self.reports), timeout), [
                r.model_dump() for r in self.reports
            ]
            return next(r for r in self.reports if pred(r))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def device_config(
    tmp_path: Path,
    name: str,
    broker: Mosquitto,
    pub: Path,
    prefix: str,
    still: Path | None = None,
    **update: Any,
) -> Path:
    """``name``'s device.yaml with ``update:`` on; with ``still``, a camera for ``run`` that
    shows that image at 5 fps (``update --once`` needs none)."""
    state = tmp_path / f"state-{name}"
    cfg = {
        "device_id": name,
        "state_dir": str(state),
        "mqtt": {"url": f"mqtt://{HOST}:{broker.port}", "home_assistant": False},
        "signing": {"public_keys": [str(pub)]},
        "update": {"enabled": True, "allowed_url_prefixes": [prefix], "retry_min_s": 0.2,
                   **update},
    }  # fmt: skip
    if still is not None:
        cfg["source"] = {"type": "still", "path": str(still), "fps": 5}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def update_once(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device.cli", "update", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])
