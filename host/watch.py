"""``doorstep-host watch``: the fleet's live events, as lines for people or as JSON.

The simplest alert subscriber: it subscribes to ``<prefix>/+/events``, ``availability`` and
``state`` and prints each message as it arrives. Events are de-duplicated by id (the daemon
redelivers what the broker did not acknowledge).

Anyone who may publish under the prefix can send anything, so every message is checked before
it is used: at most :data:`PAYLOAD_MAX_BYTES`, and valid against the same pydantic models the
daemon builds its payloads with (:mod:`device.alerts.payloads`, whose JSON Schemas are shipped).
A message that is not is counted and reported through ``on_invalid`` (once per topic) as an
:class:`Invalid`, and skipped. Nothing a message holds can stop the network thread: whatever
goes wrong while one is handled is that message's problem, never the watcher's.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ValidationError

from device.alerts.mqtt import BrokerSettings
from device.alerts.payloads import EventPayload, StatePayload, TelemetryPayload
from device.config_fields import TOPIC_PATTERN
from device.errors import ConfigError
from device.presence import describe_time
from device.record import describe_errors
from host.safe_text import printable

#: Largest payload looked at (a state is about 1 KiB, an event or telemetry a few).
PAYLOAD_MAX_BYTES = 64 * 1024
#: Messages a watcher keeps (the newest), event ids it remembers to drop redeliveries, and
#: topics whose first invalid message it reports: bounded, so no publisher can fill the memory.
KEEP_MESSAGES = 10_000
KEEP_EVENT_IDS = 10_000
REPORT_INVALID_TOPICS = 1_000
#: Longest topic prefix (the device config's bound).
PREFIX_MAX_CHARS = 64
MODELS: dict[str, type[BaseModel]] = {
    "events": EventPayload,
    "state": StatePayload,
    "telemetry": TelemetryPayload,
}
AVAILABILITY = ("online", "offline")
_PREFIX = re.compile(TOPIC_PATTERN)


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a topic prefix a daemon can have (``doorstep``, ``home/doorbells``),
    else :class:`ConfigError`: wildcards (``#``, ``+``), empty levels and spaces are refused."""
    if len(prefix) > PREFIX_MAX_CHARS or not _PREFIX.match(prefix):
        raise ConfigError(
            f"--prefix {printable(prefix, newlines=False)!s}: not a topic prefix: use letters, "
            "digits, _ and - in levels separated by / (no wildcards # or +, no empty level), "
            f"at most {PREFIX_MAX_CHARS} characters, as mqtt.prefix in the device config"
        )
    return prefix


@dataclass
class Message:
    device: str
    kind: str  # events | availability | state | snapshot | telemetry
    payload: Any
    """the parsed JSON as published (``str`` for availability, ``bytes`` for a snapshot)"""
    received: float  # Unix time
    model: BaseModel | None = None
    """the payload validated (:data:`MODELS`); None for availability and snapshots"""


@dataclass(frozen=True)
class Invalid:
    """A message that was skipped: where it came from and what is wrong with it."""

    topic: str
    reason: str

    def describe(self) -> str:
        return printable(
            f"invalid message on {self.topic}: {self.reason} (skipped)", newlines=False
        )


def parse_message(topic: str, payload: bytes, received: float | None = None) -> Message | Invalid:
    """One received message, checked: a :class:`Message` or why it is :class:`Invalid`. Pure."""
    parts = topic.split("/")
    if len(parts) < 3:
        return Invalid(topic, "not a <prefix>/<device_id>/<kind> topic")
    device, kind = parts[-2], parts[-1]
    when = time.time() if received is None else received
    if kind == "snapshot":
        return Message(device, kind, payload, when)
    if len(payload) > PAYLOAD_MAX_BYTES:
        return Invalid(topic, f"{len(payload)} bytes, more than {PAYLOAD_MAX_BYTES}")
    if kind == "availability":
        text = payload.decode("utf-8", "replace")
        if text not in AVAILABILITY:
            return Invalid(topic, f"availability {text[:40]!r}, not 'online' or 'offline'")
        return Message(device, kind, text, when)
    model = MODELS.get(kind)
    if model is None:
        return Invalid(topic, f"unknown kind {kind!r}")
    try:
        checked = model.model_validate_json(payload)
    except ValidationError as exc:
        return Invalid(topic, describe_errors(exc))
    return Message(device, kind, checked.model_dump(mode="json"), when, checked)


def describe(msg: Message) -> str | None:
    """One human line, or ``None`` for messages people need not see. Control characters in
    what the device sent are shown as escapes."""
    when = time.strftime("%H:%M:%S", time.localtime(msg.received))
    p = msg.model
    if isinstance(p, EventPayload):
        theft = "  POSSIBLE THEFT" if p.possible_theft else ""
        lag = msg.received - p.wall_time
        line = (
            f"{when}  {msg.device:<16} parcel {p.event:<8} zone {p.zone}, "
            f"count {p.count}, {describe_time(p.time)} (delivered in {lag * 1e3:.0f} ms)"
            f"{theft}"
        )
    elif msg.kind == "availability":
        line = f"{when}  {msg.device:<16} {msg.payload}"
    elif isinstance(p, StatePayload):
        m = p.model
        line = (
            f"{when}  {msg.device:<16} state: parcel {'present' if p.present else 'absent'}"
            f", model {m.name} {m.version} ({m.sha256[:12]})"
        )
    else:
        return None
    return printable(line, newlines=False)


@dataclass
class Watcher:
    broker: BrokerSettings
    prefix: str = "doorstep"
    on_message: Callable[[Message], None] | None = None
    kinds: tuple[str, ...] = ("events", "availability", "state")
    messages: deque[Message] = field(default_factory=lambda: deque(maxlen=KEEP_MESSAGES))
    """the newest :data:`KEEP_MESSAGES` valid messages"""
    on_invalid: Callable[[Invalid], None] | None = None
    """called for the first invalid message of each topic (of the first
    :data:`REPORT_INVALID_TOPICS`); all are counted in ``invalid_count``"""
    invalid: list[Invalid] = field(default_factory=list)
    """the first invalid message of each topic reported"""
    invalid_count: int = 0

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        host, port, _ = self.broker.address()
        self.client = self.broker.client()
        self._address = (host, port)
        self._seen: dict[str, None] = {}  # insertion-ordered: the oldest id goes first
        self._bad_topics: set[str] = set()
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
        # paho's network thread runs this: an exception escaping it would end that thread
        # (and silently every later message), so nothing may.
        topic = "?"
        try:
            topic = msg.topic
            self._handle(topic, bytes(msg.payload))
        except Exception as exc:  # a bug, or an output that failed: this message only
            self._reject(Invalid(topic, f"could not be handled: {type(exc).__name__}: {exc}"))

    def _handle(self, topic: str, payload: bytes) -> None:
        parsed = parse_message(topic, payload)
        if isinstance(parsed, Invalid):
            self._reject(parsed)
            return
        with self._lock:
            if isinstance(parsed.model, EventPayload):
                if parsed.model.id in self._seen:
                    return
                self._seen[parsed.model.id] = None
                if len(self._seen) > KEEP_EVENT_IDS:
                    del self._seen[next(iter(self._seen))]
            self.messages.append(parsed)
        if self.on_message is not None:
            self.on_message(parsed)

    def _reject(self, bad: Invalid) -> None:
        with self._lock:
            self.invalid_count += 1
            if bad.topic in self._bad_topics or len(self._bad_topics) >= REPORT_INVALID_TOPICS:
                return
            self._bad_topics.add(bad.topic)
            self.invalid.append(bad)
        if self.on_invalid is not None:
            with contextlib.suppress(Exception):  # a report that fails (a closed pipe) neither
                self.on_invalid(bad)

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
