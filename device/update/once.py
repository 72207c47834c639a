"""``doorstep-device update --once``: one pass of the pull agent outside the daemon.

Connects to the broker of ``device.yaml``, reads the retained ``desired`` message, handles it
as the daemon's own agent would, publishes the retained report and exits: 0 when the desired
bundle serves (or nothing is desired), 1 when it failed or was rolled back, 2 on bad input.
Applying the model: a running daemon is reloaded (``systemctl reload`` or SIGHUP, as
``activate`` does) and its record watched until it serves the new bundle or the deadline
passes; with no daemon running, the model is loaded and self-tested here, as the daemon will at
its next start.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from device.errors import DoorstepError
from device.update.agent import UpdateAgent
from device.update.messages import UpdateReport

if TYPE_CHECKING:
    from device.config import DeviceConfig
    from device.install import Store


def apply_outside(cfg: DeviceConfig, store: Store) -> Any:
    """The ``apply`` of an agent running beside (not inside) the daemon."""
    from device.install import read_daemon_record
    from device.reload import reload_daemon

    def apply(deadline_s: float) -> tuple[bool, str | None]:
        wanted = store.linked(store.current)
        record = read_daemon_record(store)
        if record is None or record.state != "running":
            from device.detect.checked import open_detector

            try:
                open_detector(cfg.model, cfg.signing.public_keys, store.state_dir)
            except DoorstepError as exc:
                return False, f"self-test: {exc}"
            return True, None
        since = time.time()
        reload_daemon(store, "auto", cfg.signing.service)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            record = read_daemon_record(store)
            last = record.last_reload if record is not None else None
            if last is not None and last.time >= since - 1:
                if last.ok and record is not None and record.bundle_id == wanted:
                    return True, None
                if not last.ok:
                    return False, f"the daemon's reload failed: {last.error}"
            time.sleep(0.2)
        return False, f"the daemon did not serve {wanted} within {deadline_s:g} s"

    return apply


def run_once(cfg: DeviceConfig, wait_s: float = 10.0) -> int:
    """See the module doc; the report is also printed as one JSON line."""
    from device.alerts.mqtt import BrokerSettings
    from device.install import Store, trusted_keys

    if cfg.mqtt is None:
        raise DoorstepError("update --once needs an mqtt section in the config")
    if not cfg.signing.public_keys:
        raise DoorstepError("update --once needs signing.public_keys: only signed bundles")
    if not cfg.update.allowed_url_prefixes:
        raise DoorstepError("update --once needs update.allowed_url_prefixes")
    store = Store(cfg.state_dir)
    broker = BrokerSettings.from_config(cfg.mqtt)
    base = f"{cfg.mqtt.prefix}/{cfg.device_id}"
    client = broker.client(f"doorstep-update-{cfg.device_id}")
    host, port, _ = broker.address()
    subscribed, got = threading.Event(), threading.Event()
    message: list[bytes] = []

    def on_connect(c: mqtt.Client, u: Any, f: Any, reason: Any, p: Any = None) -> None:
        if not getattr(reason, "is_failure", False):
            c.subscribe(f"{base}/desired", qos=1)

    def on_subscribe(c: mqtt.Client, u: Any, mid: Any, codes: Any, p: Any = None) -> None:
        subscribed.set()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == f"{base}/desired" and not got.is_set():
            message.append(bytes(msg.payload))
            got.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise DoorstepError(f"cannot reach the broker {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        if not subscribed.wait(wait_s):
            raise DoorstepError(f"the broker {host}:{port} did not take the subscription")
        got.wait(wait_s)  # the retained message comes right after the SUBACK, if there is one
        reports: list[UpdateReport] = []

        def report(r: UpdateReport) -> None:
            reports.append(r)
            info = client.publish(f"{base}/update", r.model_dump_json(), qos=1, retain=True)
            if r.state != "downloading":
                info.wait_for_publish(wait_s)

        agent = UpdateAgent(
            cfg.update,
            store,
            trusted_keys(cfg.signing.public_keys),
            cfg.device_id,
            apply_outside(cfg, store),
            report,
        )
        if not message or not message[0]:
            print(json.dumps({"device_id": cfg.device_id, "state": "idle", "desired": None}))
            return 0
        desired = agent.offer(message[0])
        if desired is None:
            print(reports[-1].model_dump_json() if reports else "{}")
            return 1
        outcome = agent.run_once(desired)
        print(reports[-1].model_dump_json())
        return 0 if outcome.state == "serving" else 1
    finally:
        client.disconnect()
        client.loop_stop()
