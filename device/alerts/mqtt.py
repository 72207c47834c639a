"""MQTT publishing with paho-mqtt 2.x: availability with a Last Will, retained state, QoS 1
events through the durable outbox, reconnect with backoff, TLS and passwords.

Topics under ``doorstep/<device_id>/``: ``availability`` (retained online/offline), ``state``
(retained JSON), ``events`` (QoS 1, not retained, with a message expiry), ``snapshot``
(retained JPEG while a parcel is there, cleared on removal), ``telemetry`` (periodic JSON).
Home Assistant discovery configs go under ``homeassistant/`` and are sent again whenever Home
Assistant announces ``online`` on ``homeassistant/status``. Payloads: ``device.alerts.payloads``.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.alerts.outbox import Outbox
from device.errors import ConfigError

log = logging.getLogger("doorstep.mqtt")


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "mqtt://127.0.0.1:1883"
    protocol: str = "5"  # or "3.1.1"
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    event_expiry_s: int = 86_400
    keepalive_s: int = 30
    discovery_prefix: str | None = "homeassistant"  # None: no Home Assistant discovery

    def address(self) -> tuple[str, int, bool]:
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ConfigError(
                f"broker url {self.url!r}: expected mqtt://host[:port] or mqtts://host[:port]"
            )
        tls = u.scheme == "mqtts"
        return u.hostname, u.port or (8883 if tls else 1883), tls

    def password(self) -> str | None:
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"{self.password_file}: cannot read the broker password: {exc.strerror}"
                ) from None
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"broker password: environment variable {self.password_env} is not set"
                )
            return value
        return None


class Publisher:
    """Publishes through the outbox; ``publish_event`` returns once the event is on disk."""

    def __init__(
        self, device_id: str, broker: BrokerSettings, outbox: Outbox, prefix: str = "doorstep"
    ) -> None:
        self.base = f"{prefix}/{device_id}"
        self.broker, self.outbox = broker, outbox
        host, port, tls = broker.address()
        self._address = (host, port)
        v5 = broker.protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"doorstep-{device_id}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        self._v5 = v5
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password())
        if tls or broker.ca_file:
            self.client.tls_set(
                ca_certs=str(broker.ca_file) if broker.ca_file else None,
                certfile=str(broker.cert_file) if broker.cert_file else None,
                keyfile=str(broker.key_file) if broker.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.will_set(f"{self.base}/availability", "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=60)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._inflight: dict[int, str] = {}  # message id -> event id, until the broker acks
        self._early_acks: set[int] = set()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._snapshot: bytes | None = None  # b"" once cleared
        self._discovery: dict[str, dict[str, Any]] = {}
        self.connected = threading.Event()
        self.client.on_message = self._on_message

    # -- lifecycle
    def start(self) -> None:
        host, port = self._address
        self.client.connect_async(host, port, keepalive=self.broker.keepalive_s)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline (the Will covers crashes), flush what the broker will take, disconnect."""
        if self.connected.is_set():
            info = self.client.publish(f"{self.base}/availability", "offline", qos=1, retain=True)
            info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    # -- publishing
    def publish_event(self, event: dict[str, Any]) -> None:
        self.outbox.add(event["id"], f"{self.base}/events", event, event.get("event", "event"))
        self._send_pending()

    def publish_state(self, state: dict[str, Any]) -> None:
        self._state = state
        if self.connected.is_set():
            self.client.publish(f"{self.base}/state", json.dumps(state), qos=1, retain=True)

    def publish_snapshot(self, jpeg: bytes | None) -> None:
        """Retain ``jpeg`` on ``snapshot``; ``None`` clears the retained image (parcel gone)."""
        self._snapshot = jpeg or b""
        if self.connected.is_set():
            self.client.publish(f"{self.base}/snapshot", self._snapshot, qos=1, retain=True)

    def publish_telemetry(self, telemetry: dict[str, Any]) -> None:
        """Best effort (QoS 0, not retained): a missed report is replaced by the next one."""
        if self.connected.is_set():
            self.client.publish(f"{self.base}/telemetry", json.dumps(telemetry), qos=0)

    def set_discovery(self, configs: dict[str, dict[str, Any]]) -> None:
        """Home Assistant discovery ``{topic: config}``; sent on every (re)connect and whenever
        Home Assistant comes online."""
        self._discovery = configs
        if self.connected.is_set():
            self._send_discovery()

    def _send_discovery(self) -> None:
        for topic, config in self._discovery.items():
            self.client.publish(topic, json.dumps(config), qos=1, retain=True)

    def drain(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every stored event; True if the outbox emptied."""
        deadline = time.monotonic() + timeout
        while len(self.outbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not len(self.outbox)

    def _send_pending(self) -> None:
        if not self.connected.is_set():
            return
        props = None
        if self._v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = self.broker.event_expiry_s
        with self._send_lock:  # one sender at a time (publish_event and the reconnect thread)
            with self._lock:
                waiting = set(self._inflight.values())
            for item in self.outbox.pending():
                if item.id in waiting:
                    continue
                # Never hold _lock across paho calls: paho's network thread holds its own lock
                # while it runs _on_publish, which takes _lock.
                info = self.client.publish(
                    item.topic, item.payload, qos=1, retain=False, properties=props
                )
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    continue
                with self._lock:
                    acked_already = info.mid in self._early_acks
                    self._early_acks.discard(info.mid)
                    if not acked_already:
                        self._inflight[info.mid] = item.id
                if acked_already:  # the broker answered before publish() returned
                    self.outbox.delete(item.id)

    # -- callbacks (paho's network thread)
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection: %s", reason)
            return
        self.connected.set()
        client.publish(f"{self.base}/availability", "online", qos=1, retain=True)
        if self._state is not None:
            client.publish(f"{self.base}/state", json.dumps(self._state), qos=1, retain=True)
        if self._snapshot is not None:
            client.publish(f"{self.base}/snapshot", self._snapshot, qos=1, retain=True)
        if self.broker.discovery_prefix:
            client.subscribe(f"{self.broker.discovery_prefix}/status", qos=1)
            self._send_discovery()
        with self._lock:
            self._inflight.clear()  # resend everything not acknowledged; receivers de-duplicate by id
            self._early_acks.clear()
        threading.Thread(target=self._send_pending, daemon=True).start()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/status") and msg.payload == b"online":
            self._send_discovery()  # Home Assistant restarted and forgot non-retained configs

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any = None, props: Any = None
    ) -> None:
        with self._lock:  # delete before forgetting the id, so no sender can pick it up again
            event_id = self._inflight.get(mid)
            if event_id is None:
                self._early_acks.add(mid)
            else:
                self.outbox.delete(event_id)
                del self._inflight[mid]
