"""Home Assistant's device-based discovery, against a real Mosquitto.

The device config is checked against ``tests/data/homeassistant/device_discovery.schema.json``,
a JSON Schema written from Home Assistant's documented discovery fields (the page and the docs
commit it was written from are in its ``$comment``), so a misspelt key, a wrong type or a
missing required option fails here rather than silently in someone's Home Assistant.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from brokers import Mosquitto
from paho.mqtt.enums import CallbackAPIVersion
from test_alerts import Listener

from device.alerts.homeassistant import MIGRATE, discovery, legacy_topics
from device.alerts.mqtt import BrokerSettings, Publisher
from device.alerts.outbox import Outbox
from device.alerts.payloads import EVENT_TYPES, EventPayload

HA_DATA = Path(__file__).parent / "data" / "homeassistant"
DEVICE = "door9"
TOPIC = "homeassistant/device/doorstep_door9/config"


def device_schema() -> jsonschema.Draft202012Validator:
    schema = json.loads((HA_DATA / "device_discovery.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def event_schema() -> jsonschema.Draft202012Validator:
    schema = json.loads((HA_DATA / "event_payload.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def retained(url: str, topic: str) -> dict[str, bytes]:
    """Every retained message on ``topic`` (a filter), as a new subscriber gets them now.

    Synchronised on a probe: the client subscribes, then publishes to a topic of its own; the
    broker sends one client's messages in order, so the probe comes after every retained copy.
    """
    probe = f"probe/{uuid.uuid4().hex}"
    got: dict[str, bytes] = {}
    done, subscribed = threading.Event(), threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == probe:
            done.set()
        elif msg.retain:
            got[msg.topic] = bytes(msg.payload)

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    host, port = url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        client.subscribe([(topic, 1), (probe, 1)])
        assert subscribed.wait(30), "could not subscribe"
        client.publish(probe, b"x", qos=1)
        assert done.wait(30), "the probe did not come back"
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def publisher(url: str, tmp_path: Path, enabled: bool = True) -> Publisher:
    pub = Publisher(DEVICE, BrokerSettings(url=url), Outbox(tmp_path / f"o-{enabled}.sqlite"))
    pub.set_discovery(discovery(DEVICE, pub.base, "parcel-ssd", "1.2.3"), enabled=enabled)
    return pub


def legacy_config(topic: str) -> dict[str, Any]:
    """What doorstep before device discovery retained there (the keys that matter here)."""
    component, node, key = topic.split("/")[1:4]
    return {
        "name": key,
        "unique_id": f"{node}_{key}",
        "default_entity_id": f"{component}.{node}_{key}",
        "state_topic": f"doorstep/{DEVICE}/state",
        "device": {"identifiers": [node], "name": f"Doorstep {DEVICE}"},
    }


def test_the_device_config_has_every_entity_and_fits_the_documented_fields() -> None:
    d = discovery(DEVICE, f"doorstep/{DEVICE}", "parcel-ssd", "1.2.3", support_url="https://x.org/")
    assert d.topic == TOPIC
    device_schema().validate(d.config)
    cmps = d.components
    assert {c["platform"] for c in cmps.values()} == {
        "event",
        "binary_sensor",
        "image",
        "update",
        "sensor",
    }
    names = {c["name"] for c in cmps.values()}
    assert {"Parcel", "Parcel present", "Parcel snapshot", "Parcel model"} <= names
    assert {"Millijoules per inference", "Throttled", "Inference latency"} <= names
    event = cmps["parcel_event"]
    assert event["state_topic"] == f"doorstep/{DEVICE}/events"
    assert event["event_types"] == ["arrived", "reminder", "removed", "possible_theft"]
    assert cmps["throttled"]["device_class"] == "problem"
    diagnostic = {k for k, c in cmps.items() if c.get("entity_category") == "diagnostic"}
    assert {"latency", "fps", "power", "energy_per_inference", "temperature", "throttled"} <= (
        diagnostic
    )
    assert "parcel_event" not in diagnostic and "parcel" not in diagnostic
    assert all(c["default_entity_id"].startswith(c["platform"] + ".") for c in cmps.values())
    assert d.config["o"] == {
        "name": "doorstep",
        "sw_version": "1.2.3",
        "support_url": "https://x.org/",
    }
    # The unique ids of earlier versions' per-entity configs, so their entities migrate.
    for topic in d.legacy:
        assert legacy_config(topic)["unique_id"] in {c["unique_id"] for c in cmps.values()}


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["cmps"]["parcel_event"].pop("event_types"),
        lambda c: c["cmps"]["parcel"].__setitem__("platform", "binary-sensor"),
        lambda c: c["cmps"]["latency"].__setitem__("entity_category", "diagnostics"),
        lambda c: c["dev"].pop("identifiers"),
        lambda c: c.pop("o"),
        lambda c: c["cmps"]["fps"].__setitem__("qos", 3),
    ],
    ids=["no-event-types", "bad-platform", "bad-category", "no-identifiers", "no-origin", "qos"],
)
def test_the_schema_refuses_what_home_assistant_would(breakage: Any) -> None:
    config = json.loads(json.dumps(discovery(DEVICE, "doorstep/x", "m", "1").config))
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        device_schema().validate(config)


def test_every_event_payload_is_one_the_event_entity_accepts() -> None:
    """The event entity fires on a JSON object whose ``event_type`` is among its
    ``event_types``; the rest of the payload becomes the event's attributes."""
    base = {
        "id": "a1",
        "seq": 1,
        "device_id": DEVICE,
        "time": 1.0,
        "wall_time": 2.0,
        "zone": "porch",
        "count": 1,
        "boxes": [[1, 2, 3, 4]],
        "scores": [0.9],
        "model_sha256": "",
        "since": 1.0,
        "arrival_id": "a1",
    }
    seen = set()
    for kind, theft in [
        ("arrived", False),
        ("reminder", False),
        ("removed", False),
        ("removed", True),
    ]:
        payload = EventPayload(**base, event=kind, possible_theft=theft).model_dump(mode="json")
        event_schema().validate(payload)
        seen.add(payload["event_type"])
    assert seen == set(EVENT_TYPES)
    # An event stored by an earlier doorstep (no event_type) is read with one derived.
    old = {**base, "event": "removed", "possible_theft": True}
    assert EventPayload.model_validate(old).event_type == "possible_theft"


def test_migration_from_per_entity_topics(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """An install of an earlier doorstep has one retained config per entity. The new daemon
    hands each over (``migrate_discovery``), sends the device config, then clears the old ones,
    in that order (Home Assistant keeps the entity ids and history)."""
    old = legacy_topics(DEVICE)
    ha = mqtt.Client(CallbackAPIVersion.VERSION2)
    ha.connect("127.0.0.1", mosquitto.port)
    ha.loop_start()
    for topic in old:
        ha.publish(topic, json.dumps(legacy_config(topic)), qos=1, retain=True).wait_for_publish(30)
    assert set(retained(mosquitto.url, "homeassistant/#")) == set(old)
    listener = Listener(mosquitto.url, topic="homeassistant/#")
    assert listener.wait(lambda li: len(li.messages) == len(old))  # the retained old configs
    pub = publisher(mosquitto.url, tmp_path)
    pub.start()
    try:
        n = len(old)
        assert listener.wait(lambda li: len(li.messages) >= n + 2 * n + 1)
        live = listener.messages[n:]
        kinds = []
        for topic, payload, _ in live:
            if topic == TOPIC:
                kinds.append("device")
                device_schema().validate(json.loads(payload))
            elif topic in old:
                kinds.append("migrate" if payload else "clear")
                if payload:
                    assert json.loads(payload) == MIGRATE
        assert kinds == ["migrate"] * n + ["device"] + ["clear"] * n
        # What Home Assistant finds from now on: the device config only.
        now = retained(mosquitto.url, "homeassistant/#")
        assert set(now) == {TOPIC}
    finally:
        pub.stop()
        listener.close()
        ha.loop_stop()
        ha.disconnect()


def test_discovery_is_sent_again_when_home_assistant_comes_online(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Home Assistant announces ``online`` on ``homeassistant/status`` after a restart."""
    pub = publisher(mosquitto.url, tmp_path)
    pub.start()
    try:
        assert pub.connected.wait(30)
        listener = Listener(mosquitto.url, topic=TOPIC)
        assert listener.wait(lambda li: len(li.messages) >= 1)  # live or retained: timing
        assert set(retained(mosquitto.url, TOPIC)) == {TOPIC}
        before = len(listener.messages)
        ha = mqtt.Client(CallbackAPIVersion.VERSION2)
        ha.connect("127.0.0.1", mosquitto.port)
        ha.loop_start()
        ha.publish("homeassistant/status", "online", qos=1).wait_for_publish(30)
        assert listener.wait(lambda li: len(li.messages) > before)
        topic, payload, was_retained = listener.messages[before]
        assert topic == TOPIC and not was_retained  # sent again, live
        device_schema().validate(json.loads(payload))
        ha.loop_stop()
        ha.disconnect()
        listener.close()
    finally:
        pub.stop()


def test_turning_discovery_off_removes_the_device(mosquitto: Mosquitto, tmp_path: Path) -> None:
    pub = publisher(mosquitto.url, tmp_path)
    pub.start()
    assert pub.connected.wait(30)
    listener = Listener(mosquitto.url, topic=TOPIC)
    assert listener.wait(lambda li: len(li.messages) >= 1)
    pub.stop()
    assert set(retained(mosquitto.url, "homeassistant/#")) == {TOPIC}
    off = publisher(mosquitto.url, tmp_path, enabled=False)
    off.start()
    try:
        assert listener.wait(lambda li: li.messages[-1][1] == b"")  # the empty config, live
        assert retained(mosquitto.url, "homeassistant/#") == {}
    finally:
        off.stop()
        listener.close()


def test_a_broker_that_refuses_the_probe_still_gets_the_device_config(
    make_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """An ACL that lets the device write its topics but not read them back: the probe's
    subscription is refused, and the device config goes out without the search for old ones."""
    acl = "topic write doorstep/#\ntopic readwrite homeassistant/#\n"
    broker = make_mosquitto("mosquitto-acl", acl=acl)
    pub = publisher(broker.url, tmp_path)
    pub.start()
    try:
        assert pub.connected.wait(30)
        listener = Listener(broker.url, topic=TOPIC)
        assert listener.wait(lambda li: len(li.messages) >= 1)
        device_schema().validate(json.loads(listener.messages[0][1]))
        listener.close()
    finally:
        pub.stop()
