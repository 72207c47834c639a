"""``doorstep-host watch``: the fleet's live events, as lines for people or as JSON.

The simplest alert subscriber: it subscribes to ``<prefix>/+/events``, ``availability`` and
``state`` and prints each message as it arrives. Events are de-duplicated by id (the daemon
redelivers what the broker did not acknowledge).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device.alerts.mqtt import BrokerSettings
from device.presence import describe_time


@dataclass
class Message:
    device: str
    kind: str  # events | availability | state | snapshot | telemetry
    payload: Any
    received: float  # Unix time


def describe(msg: Message) -> str | None:
    """One human line, or ``None`` for messages people need not see."""
    p, when = msg.payload, time.strftime("%H:%M:%S", time.localtime(msg.received))
    if msg.kind == "events":
        theft = "  POSSIBLE THEFT" if p.get("possible_theft") else ""
        lag = msg.received - p.get("wall_time", msg.received)
        return (
            f"{when}  {msg.device:<16} parcel {p['event']:<8} zone {p['zone']}, "
            f"count {p['count']}, {describe_time(p['time'])} (delivered in {lag * 1e3:.0f} ms)"
            f"{theft}"
        )
    if msg.kind == "availability":
        return f"{when}  {msg.device:<16} {p}"
    if msg.kind == "state":
        m = p.get("model", {})
        return (
            f"{when}  {msg.device:<16} state: parcel {'present' if p.get('present') else 'absent'}"
            f", model {m.get('name')} {m.get('version')} ({str(m.get('sha256', ''))[:12]})"
        )
    return None


@dataclass
class Watcher:
    broker: BrokerSettings
    prefix: str = "doorstep"
    on_message: Callable[[Message], None] | None = None
    kinds: tuple[str, ...] = ("events", "availability", "state")
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        host, port, tls = self.broker.address()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5 if self.broker.protocol == "5" else mqtt.MQTTv311,
        )
        if self.broker.username:
            self.client.username_pw_set(self.broker.username, self.broker.password())
        if tls or self.broker.ca_file:
            self.client.tls_set(
                ca_certs=str(self.broker.ca_file) if self.broker.ca_file else None,
                certfile=str(self.broker.cert_file) if self.broker.cert_file else None,
                keyfile=str(self.broker.key_file) if self.broker.key_file else None,
            )
        self._address = (host, port)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a, **k: self.subscribed.set()
        self.client.on_message = self._on_message

    def start(self) -> Watcher:
        self.client.connect_async(*self._address)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, *args: Any) -> None:
        client.subscribe([(f"{self.prefix}/+/{kind}", 1) for kind in self.kinds])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        device, kind = parts[-2], parts[-1]
        payload: Any
        if kind == "snapshot":
            payload = msg.payload
        else:
            try:
                text = msg.payload.decode()
                payload = json.loads(text) if kind != "availability" else text
            except (UnicodeDecodeError, json.JSONDecodeError):
                return  # not ours
        with self._lock:
            if kind == "events":
                if not isinstance(payload, dict) or payload.get("id") in self._seen:
                    return
                self._seen.add(payload["id"])
            m = Message(device, kind, payload, time.time())
            self.messages.append(m)
        if self.on_message is not None:
            self.on_message(m)

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.payload for m in self.messages if m.kind == "events"]

    def wait(self, predicate: Callable[[Watcher], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)
