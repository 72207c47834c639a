"""MQTT publishing with paho-mqtt 2.x: availability with a Last Will, retained state, QoS 1
events through the durable outbox, reconnect with backoff, TLS and passwords.

Events are committed to the outbox first (``commit``, or ``Outbox.commit`` then ``kick``);
the ``Sender`` thread (``device.alerts.sender``) drains it continuously, at most
``max_inflight`` unacknowledged, every other kind before reminders, each with an MQTT 5
message expiry of its remaining lifetime.

Topics under ``doorstep/<device_id>/``: ``availability`` (retained online/offline), ``state``
(retained JSON), ``events`` (QoS 1, not retained, with a message expiry), ``snapshot``
(retained JPEG while a parcel is there, cleared on removal), ``telemetry`` (periodic JSON).
Home Assistant's device discovery config goes to ``homeassistant/device/<node>/config`` on every
connect and whenever Home Assistant announces ``online`` on ``homeassistant/status``
(``device.alerts.homeassistant``). Payloads: ``device.alerts.payloads``.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device.alerts.homeassistant import MIGRATE, Discovery
from device.alerts.outbox import Event, Outbox
from device.alerts.sender import Sender, SenderStats
from device.errors import ConfigError

if TYPE_CHECKING:
    from device.config import MqttConfig

log = logging.getLogger("doorstep.mqtt")
PROBE_WAIT_S = 5.0  # how long the discovery probe may take before the config goes out anyway


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

    @classmethod
    def from_config(cls, cfg: MqttConfig) -> BrokerSettings:
        """The connection the ``mqtt`` section describes."""
        return cls(
            url=cfg.url,
            protocol=cfg.protocol,
            username=cfg.username,
            password_file=cfg.password_file,
            password_env=cfg.password_env,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            event_expiry_s=cfg.event_expiry_s,
            discovery_prefix=cfg.discovery_prefix if cfg.home_assistant else None,
        )

    def address(self) -> tuple[str, int, bool]:
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ConfigError(
                f"broker url {self.url!r}: expected mqtt://host[:port] or mqtts://host[:port]"
            )
        tls = u.scheme == "mqtts"
        return u.hostname, u.port or (8883 if tls else 1883), tls

    def client(self, client_id: str = "") -> mqtt.Client:
        """A paho client for this broker: protocol, credentials and TLS set (not connected)."""
        _, _, tls = self.address()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311,
        )
        if self.username:
            client.username_pw_set(self.username, self.password())
        if tls or self.ca_file:
            client.tls_set(
                ca_certs=str(self.ca_file) if self.ca_file else None,
                certfile=str(self.cert_file) if self.cert_file else None,
                keyfile=str(self.key_file) if self.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        return client

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
    """Events go through the outbox (committed first, sent by a ``Sender`` thread, deleted
    when acked); state, snapshot and discovery are retained and sent again on every connect."""

    def __init__(
        self,
        device_id: str,
        broker: BrokerSettings,
        outbox: Outbox,
        prefix: str = "doorstep",
        *,
        max_inflight: int = 20,
    ) -> None:
        self.base = f"{prefix}/{device_id}"
        self.broker, self.outbox = broker, outbox
        host, port, _ = broker.address()
        self._address = (host, port)
        v5 = broker.protocol == "5"
        self.client = broker.client(f"doorstep-{device_id}")
        self.client.will_set(f"{self.base}/availability", "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=60)
        # room for the event window plus availability, state, snapshot, update and discovery
        # (with its migration: two messages per per-entity topic of earlier versions)
        self.client.max_inflight_messages_set(max_inflight + 32)
        self.connected = threading.Event()
        self.connects = 0  # successful connections so far (a resend may follow each reconnect)
        self.sender = Sender(
            self.client,
            outbox,
            self.connected,
            max_inflight,
            expiry_cap_s=broker.event_expiry_s if v5 else None,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self.sender.on_publish
        self.client.on_message = self._on_message
        self._state: dict[str, Any] | None = None
        self._snapshot: bytes | None = None  # b"" once cleared
        self._update: str | None = None  # the last pull-mode report (retained)
        self._on_desired: Callable[[bytes], Any] | None = None
        self._discovery: Discovery | None = None
        self._discovery_on = True
        self._probe = f"{self.base}/discovery-probe"  # see _check_legacy_discovery
        self._probe_sent = ""  # the nonce of this connection's probe
        self._probe_lock = threading.Lock()
        self._legacy_found: set[str] = set()
        self._legacy_checked = False

    @classmethod
    def from_config(cls, cfg: MqttConfig, device_id: str, outbox: Outbox) -> Publisher:
        """The publisher the ``mqtt`` section describes (``outbox``: ``Outbox.from_config``)."""
        return cls(
            device_id,
            BrokerSettings.from_config(cfg),
            outbox,
            cfg.prefix,
            max_inflight=cfg.max_inflight,
        )

    # -- lifecycle
    def start(self) -> None:
        host, port = self._address
        self.sender.start()
        self.client.connect_async(host, port, keepalive=self.broker.keepalive_s)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline (the Will covers crashes), flush what the broker will take, disconnect.
        Events not acknowledged stay in the outbox for the next start."""
        self.sender.stop(timeout)
        if self.connected.is_set():
            info = self.client.publish(f"{self.base}/availability", "offline", qos=1, retain=True)
            info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    # -- publishing
    @property
    def events_topic(self) -> str:
        return f"{self.base}/events"

    def event(self, payload: Mapping[str, Any]) -> Event:
        """The outbox entry for an event payload (its ``id`` and ``event`` kind)."""
        return Event(
            str(payload["id"]), self.events_topic, payload, str(payload.get("event", "event"))
        )

    def commit(
        self, payloads: Sequence[Mapping[str, Any]], state: Mapping[str, str] | None = None
    ) -> bool:
        """Commit event payloads (and ``state``) to the outbox in one transaction, then wake the
        sender; True once durable on disk (False: held in memory, see ``Outbox.commit``)."""
        durable = self.outbox.commit([self.event(p) for p in payloads], state)
        self.kick()
        return durable

    def publish_event(self, event: Mapping[str, Any]) -> bool:
        """``commit([event])``: returns once the event is stored (True: on disk)."""
        return self.commit([event])

    def kick(self) -> None:
        """Wake the sender after committing to the outbox directly."""
        self.sender.kick()

    def stats(self) -> SenderStats:
        return self.sender.stats()

    def publish_state(self, state: dict[str, Any]) -> None:
        self._state = state
        if self.connected.is_set():
            self.client.publish(f"{self.base}/state", json.dumps(state), qos=1, retain=True)

    def publish_snapshot(self, jpeg: bytes | None) -> None:
        """Retain ``jpeg`` on ``snapshot``; ``None`` clears the retained image (parcel gone)."""
        self._snapshot = jpeg or b""
        if self.connected.is_set():
            self.client.publish(f"{self.base}/snapshot", self._snapshot, qos=1, retain=True)

    def follow_desired(self, callback: Callable[[bytes], Any]) -> None:
        """Pull mode: subscribe to ``<base>/desired`` (on every connect) and hand each message
        to ``callback`` (paho's network thread: it must only queue)."""
        self._on_desired = callback
        if self.connected.is_set():
            self.client.subscribe(f"{self.base}/desired", qos=1)

    def publish_update(self, report_json: str) -> None:
        """Retain the pull agent's report on ``<base>/update`` (sent again on reconnect)."""
        self._update = report_json
        if self.connected.is_set():
            self.client.publish(f"{self.base}/update", report_json, qos=1, retain=True)

    def publish_telemetry(self, telemetry: dict[str, Any]) -> None:
        """Best effort (QoS 0, not retained): a missed report is replaced by the next one."""
        if self.connected.is_set():
            self.client.publish(f"{self.base}/telemetry", json.dumps(telemetry), qos=0)

    def set_discovery(self, discovery: Discovery, enabled: bool = True) -> None:
        """Home Assistant's device discovery: sent (retained) on every connect and whenever
        Home Assistant comes online; ``enabled=False`` clears it instead, with its entities.
        Call it before :meth:`start`."""
        self._discovery, self._discovery_on = discovery, enabled

    def _check_legacy_discovery(self, client: mqtt.Client) -> None:
        """On connect: which per-entity configs of earlier versions does the broker retain?

        Subscribe to them and to a probe topic of our own, then publish the probe: the broker
        sends one client's messages in order, so the retained copies come before the probe, and
        the device config goes out when the probe is back (``_on_legacy_checked``). A config
        found later still migrates, one by one."""
        d = self._discovery
        if d is None:
            return
        if not self._discovery_on:  # discovery turned off: remove the device and its entities
            for topic in (d.topic, *d.legacy):
                client.publish(topic, b"", qos=1, retain=True)
            return
        self._legacy_found, self._legacy_checked = set(), False
        self._probe_sent = f"{self.connects}-{os.getpid()}"
        client.subscribe([(topic, 1) for topic in (*d.legacy, self._probe)])
        client.publish(self._probe, self._probe_sent, qos=1)
        # A broker whose ACL refuses the subscription, or grants it and never delivers
        # (Mosquitto does so): the device config goes out after PROBE_WAIT_S all the same.
        timer = threading.Timer(PROBE_WAIT_S, self._probe_lost, args=(self._probe_sent,))
        timer.daemon = True
        timer.start()

    def _probe_lost(self, nonce: str) -> None:
        if nonce == self._probe_sent and not self._legacy_checked and self.connected.is_set():
            log.warning("%s did not come back within %g s: Home Assistant configs of earlier "
                        "versions are not looked for", self._probe, PROBE_WAIT_S)  # fmt: skip
            self._on_legacy_checked()

    def _on_legacy_checked(self) -> None:
        with self._probe_lock:  # the probe or the timer, whichever is first: once
            if self._legacy_checked:
                return
            self._legacy_checked = True
        self._send_discovery(sorted(self._legacy_found))

    def _send_discovery(self, migrate: Sequence[str] = ()) -> None:
        """The device config, retained. ``migrate``: per-entity topics of earlier versions that
        hold a config; Home Assistant's documented migration hands each over first (``{"migrate_
        discovery": true}``: it unloads the entity but keeps its id, settings and history), then
        takes the device config (which adopts them by their unique ids), then the old topics
        are cleared."""
        d = self._discovery
        if d is None or not self._discovery_on:
            return
        publish = self.client.publish
        for topic in migrate:
            publish(topic, json.dumps(MIGRATE), qos=1)
        publish(d.topic, json.dumps(d.config), qos=1, retain=True)
        for topic in migrate:
            publish(topic, b"", qos=1, retain=True)
        if migrate:
            log.info(
                "Home Assistant: %d per-entity configs moved to device discovery", len(migrate)
            )

    def drain(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every stored event; True if the outbox emptied."""
        return self.sender.drain(timeout)

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
        if self._update is not None:
            client.publish(f"{self.base}/update", self._update, qos=1, retain=True)
        if self.broker.discovery_prefix and self._discovery_on:
            client.subscribe(f"{self.broker.discovery_prefix}/status", qos=1)
        self._check_legacy_discovery(client)
        if self._on_desired is not None:
            client.subscribe(f"{self.base}/desired", qos=1)
        self.connects += 1
        self.sender.kick()  # paho resends what was in flight; the sender fills the window

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == f"{self.base}/desired" and self._on_desired is not None:
            self._on_desired(bytes(msg.payload))
            return
        d = self._discovery
        if d is not None and self._discovery_on:
            if msg.topic == self._probe:
                if msg.payload.decode(errors="replace") == self._probe_sent:
                    self._on_legacy_checked()
                return
            if msg.topic in d.legacy:
                # A retained config of an earlier version (our own hand-over and clearing come
                # back live, not retained, or empty).
                if msg.retain and msg.payload and not _is_migrate(msg.payload):
                    if self._legacy_checked:
                        self._send_discovery([msg.topic])
                    else:
                        self._legacy_found.add(msg.topic)
                return
        if msg.topic.endswith("/status") and msg.payload == b"online":
            self._send_discovery()  # Home Assistant restarted and forgot non-retained configs


def _is_migrate(payload: bytes | bytearray) -> bool:
    try:
        return bool(json.loads(payload) == MIGRATE)
    except ValueError:
        return False
