"""The outbox and the MQTT publisher against a real Mosquitto: nothing lost, ever."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import Mosquitto
from paho.mqtt.enums import CallbackAPIVersion

from device.alerts.mqtt import BrokerSettings, Publisher
from device.alerts.outbox import Outbox
from device.errors import ConfigError


class Listener:
    """A subscriber, as Home Assistant or a script would be.

    With ``session`` (a client id) the session is persistent: the broker keeps the subscription
    while the listener is away (and across its own restart, if it has ``persistence``), queues
    what is published meanwhile, and a new ``Listener`` with the same ``session`` receives it.
    A test that restarts the broker uses that rather than racing to subscribe first.
    """

    def __init__(self, url: str, topic: str = "doorstep/#", session: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.got = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=session or f"listener-{time.monotonic_ns()}",
            clean_session=session is None,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(30), "the listener could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.got:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.got.notify_all()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.messages if t.endswith("/events")]

    def wait(self, predicate: Any, timeout: float = 30.0) -> bool:
        with self.got:
            return self.got.wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        self.client.disconnect()  # sent by the loop, which then ends
        self.client.loop_stop()


def event(n: int) -> dict[str, Any]:
    return {"event": "arrived", "id": f"e{n}", "seq": n, "time": float(n)}


def test_events_state_and_availability_reach_a_subscriber(mosquitto: Any, tmp_path: Path) -> None:
    listener = Listener(mosquitto.url)
    pub = Publisher("door1", BrokerSettings(url=mosquitto.url), Outbox(tmp_path / "outbox.sqlite"))
    pub.start()
    assert pub.connected.wait(10)
    pub.publish_state({"present": True, "count": 1})
    for n in range(3):
        pub.publish_event(event(n))
    assert pub.drain(10)
    assert listener.wait(lambda li: len(li.events()) == 3)
    assert [e["id"] for e in listener.events()] == ["e0", "e1", "e2"]
    topics = {t: p for t, p, _ in listener.messages}
    assert topics["doorstep/door1/availability"] == b"online"
    assert json.loads(topics["doorstep/door1/state"]) == {"present": True, "count": 1}
    pub.stop()
    assert listener.wait(lambda li: li.messages[-1][1] == b"offline")
    listener.close()


def test_last_will_says_offline_when_the_daemon_dies(mosquitto: Any, tmp_path: Path) -> None:
    listener = Listener(mosquitto.url, "doorstep/door1/availability")
    pub = Publisher(
        "door1", BrokerSettings(url=mosquitto.url, keepalive_s=1), Outbox(tmp_path / "o.sqlite")
    )
    pub.start()
    assert pub.connected.wait(10)
    assert listener.wait(lambda li: li.messages and li.messages[-1][1] == b"online")
    pub.client.loop_stop()  # the process "hangs": no more keepalives, no clean disconnect
    pub.client.socket().close()  # type: ignore[union-attr]
    assert listener.wait(lambda li: li.messages[-1][1] == b"offline", timeout=10)
    listener.close()


def test_broker_outage_loses_nothing(
    make_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = make_mosquitto(persistence=True)
    # A persistent session: the broker keeps the subscription and queues for it across its
    # restart, so the listener gets what is sent before it is back (no race to subscribe).
    listener = Listener(broker.url, session="outage-listener")
    pub = Publisher("door1", BrokerSettings(url=broker.url), Outbox(tmp_path / "outbox.sqlite"))
    pub.start()
    assert pub.connected.wait(30)
    pub.publish_event(event(0))
    assert pub.drain(30)
    assert listener.wait(lambda li: [e["id"] for e in li.events()] == ["e0"])
    listener.close()
    broker.stop()
    for n in range(1, 4):  # raised while the broker is down: kept on disk
        pub.publish_event(event(n))
    assert len(pub.outbox) == 3
    broker.start()
    assert pub.drain(60)  # acknowledged by the broker: queued for the listener's session
    listener = Listener(broker.url, session="outage-listener")
    assert listener.wait(lambda li: {"e1", "e2", "e3"} <= {e["id"] for e in li.events()})
    # all three arrive, and nothing else but possibly e0 again: QoS 1 is at least once, and the
    # first listener may have left before its PUBACK for e0 reached the broker (receivers
    # de-duplicate by id)
    assert {e["id"] for e in listener.events()} - {"e0"} == {"e1", "e2", "e3"}
    pub.stop()
    listener.close()


def test_a_restart_delivers_what_was_not_acknowledged(mosquitto: Any, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite")
    box.add("left-over", "doorstep/door1/events", event(7) | {"id": "left-over"}, "arrived")
    box.close()  # the daemon stopped before the broker acknowledged it
    listener = Listener(mosquitto.url)
    pub = Publisher("door1", BrokerSettings(url=mosquitto.url), Outbox(tmp_path / "outbox.sqlite"))
    pub.start()
    assert pub.drain(15)
    assert listener.wait(lambda li: any(e["id"] == "left-over" for e in li.events()))
    pub.stop()
    listener.close()


def test_outbox_is_bounded_reminders_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_events=3)
    box.add("a1", "t", {}, "arrived")
    box.add("r1", "t", {}, "reminder")
    box.add("a2", "t", {}, "arrived")
    box.add("a3", "t", {}, "removed")
    assert [p.id for p in box.pending()] == ["a1", "a2", "a3"] and box.dropped == 1
    box.add("a4", "t", {}, "arrived")
    assert [p.id for p in box.pending()] == ["a2", "a3", "a4"] and box.dropped == 2


def test_bad_broker_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected mqtt://host"):
        BrokerSettings(url="http://x").address()
    with pytest.raises(ConfigError, match="DOORSTEP_NOPE is not set"):
        BrokerSettings(password_env="DOORSTEP_NOPE").password()
    with pytest.raises(ConfigError, match="cannot read the broker password"):
        BrokerSettings(password_file=tmp_path / "none").password()
