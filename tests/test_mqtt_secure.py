"""The device's publisher against real Mosquitto brokers that demand a password, TLS or both.

Each refusal is shown from both sides: the broker's log (or the publisher's own warning) says
the attempt was made and refused, the publisher never connects, and the event stays in the
on-disk outbox until a correctly configured publisher delivers it.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import MQTT_USERS, Mosquitto, Pki, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from device.alerts.mqtt import BrokerSettings, Publisher
from device.alerts.outbox import Outbox
from device.errors import ConfigError

DEVICE_USER = "doorbell"
PASSWORD = MQTT_USERS[DEVICE_USER]
# How mosquitto logs a failed handshake: "OpenSSL Error[0]: error:...:SSL routines::..." or
# "Client connection from ... failed: error:...:SSL routines::...", depending on when it fails.
TLS_FAILED = "SSL routines"


class Subscriber:
    """A paho client subscribed to ``topic``, as Home Assistant or a script would be.

    It authenticates like any other client: ``username``/``password``, the CA to check the
    broker by, and a client certificate for mutual TLS.
    """

    def __init__(
        self,
        url: str,
        topic: str = "doorstep/#",
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Condition()
        scheme, _, address = url.partition("://")
        host, port = address.rsplit(":", 1)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"subscriber-{time.monotonic_ns()}"
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if scheme == "mqtts":
            self.client.tls_set(
                ca_certs=str(ca_file) if ca_file else None,
                certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None,
            )
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not subscribed.wait(30):
            self.close()
            raise AssertionError(f"the subscriber could not subscribe to {topic} at {url}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.got:
            self.messages.append((msg.topic, msg.payload))
            self.got.notify_all()

    def payloads(self, suffix: str = "/events") -> list[bytes]:
        with self.got:
            return [p for t, p in self.messages if t.endswith(suffix)]

    def wait(self, predicate: Callable[[Subscriber], Any], timeout: float = 30.0) -> bool:
        with self.got:
            return bool(self.got.wait_for(lambda: predicate(self), timeout))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def closing() -> Iterator[list[Callable[[], Any]]]:
    """Things a test started (publishers, subscribers); stopped even when the test fails."""
    stops: list[Callable[[], Any]] = []
    yield stops
    for stop in reversed(stops):
        stop()
    gc.collect()  # what the stopped clients left is collected under this test's warning filters


def event(n: int) -> dict[str, Any]:
    return {"event": "arrived", "id": f"e{n}", "seq": n, "time": float(n)}


def start(
    settings: BrokerSettings,
    outbox: Path,
    closing: list[Callable[[], Any]],
    paho_log: bool = False,
) -> Publisher:
    """The device's publisher, started; ``paho_log`` sends paho's own debug lines to logging."""
    pub = Publisher("door1", settings, Outbox(outbox))
    closing.append(pub.outbox.close)
    closing.append(pub.stop)
    if paho_log:
        pub.client.enable_logger()
    pub.start()
    return pub


def subscribe(url: str, closing: list[Callable[[], Any]], **auth: Any) -> Subscriber:
    sub = Subscriber(url, "doorstep/door1/events", **auth)
    closing.append(sub.close)
    return sub


def delivered(sub: Subscriber, event_id: str) -> bool:
    return sub.wait(lambda s: event_id in {json.loads(p)["id"] for p in s.payloads()})


def refused_in_log(broker: Mosquitto, marker: str, since: int) -> bool:
    """Wait (bounded) until the broker's log, past offset ``since``, shows ``marker``."""
    return wait_until(lambda: marker in broker.log_text()[since:], timeout=30)


def secret_file(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "broker-password"
    path.write_text(secret + "\n")  # as `echo secret > file` leaves it
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- passwords


def listener_auth() -> dict[str, Any]:
    return {"username": "listener", "password": MQTT_USERS["listener"]}


def test_password_from_a_file_delivers(
    mosquitto_password: Mosquitto, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    assert mosquitto_password.password_file is not None
    assert PASSWORD not in mosquitto_password.password_file.read_text()  # hashed, not stored
    sub = subscribe(mosquitto_password.url, closing, **listener_auth())
    settings = BrokerSettings(
        url=mosquitto_password.url,
        username=DEVICE_USER,
        password_file=secret_file(tmp_path, PASSWORD),
    )
    pub = start(settings, tmp_path / "outbox.sqlite", closing)
    assert pub.connected.wait(30), mosquitto_password.log_tail()
    pub.publish_event(event(1))
    assert pub.drain(30)
    assert delivered(sub, "e1")
    assert f"u'{DEVICE_USER}'" in mosquitto_password.log_text()  # it logged in as that user


def test_password_from_an_environment_variable_delivers(
    mosquitto_password: Mosquitto,
    tmp_path: Path,
    closing: list[Callable[[], Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOORSTEP_TEST_MQTT_PASSWORD", PASSWORD)
    sub = subscribe(mosquitto_password.url, closing, **listener_auth())
    settings = BrokerSettings(
        url=mosquitto_password.url,
        username=DEVICE_USER,
        password_env="DOORSTEP_TEST_MQTT_PASSWORD",
    )
    pub = start(settings, tmp_path / "outbox.sqlite", closing)
    assert pub.connected.wait(30), mosquitto_password.log_tail()
    pub.publish_event(event(2))
    assert pub.drain(30)
    assert delivered(sub, "e2")


def test_wrong_password_keeps_the_event_and_never_shows_the_password(
    mosquitto_password: Mosquitto,
    tmp_path: Path,
    closing: list[Callable[[], Any]],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-doorbell-password-913"
    sub = subscribe(mosquitto_password.url, closing, **listener_auth())
    settings = BrokerSettings(
        url=mosquitto_password.url,
        username=DEVICE_USER,
        password_file=secret_file(tmp_path, wrong),
    )
    pub = start(settings, tmp_path / "outbox.sqlite", closing, paho_log=True)
    pub.publish_event(event(3))
    assert wait_until(lambda: "broker refused the connection" in caplog.text, timeout=30)
    assert "not authorised" in mosquitto_password.log_text()
    assert not pub.connected.is_set()
    assert [p.id for p in pub.outbox.pending()] == ["e3"]  # nothing lost
    assert sub.payloads() == []
    pub.stop()

    out, err = capsys.readouterr()
    for text in (caplog.text, out, err):
        assert wrong not in text
        assert PASSWORD not in text
    assert "Sending CONNECT" in caplog.text  # paho's own lines were captured and checked too

    pub.outbox.close()  # the daemon restarts with the right password: the event goes out
    fixed = BrokerSettings(
        url=mosquitto_password.url,
        username=DEVICE_USER,
        password_file=secret_file(tmp_path, PASSWORD),
    )
    again = start(fixed, tmp_path / "outbox.sqlite", closing)
    assert again.drain(30), mosquitto_password.log_tail()
    assert delivered(sub, "e3")


def test_missing_password_variable_is_a_config_error(tmp_path: Path) -> None:
    settings = BrokerSettings(
        url="mqtt://127.0.0.1:1883", username=DEVICE_USER, password_env="DOORSTEP_NO_SUCH_VAR"
    )
    with pytest.raises(ConfigError, match="DOORSTEP_NO_SUCH_VAR"):
        Publisher("door1", settings, Outbox(tmp_path / "outbox.sqlite"))


def test_a_password_file_hashed_in_python_is_accepted_by_mosquitto(
    make_mosquitto: Callable[..., Mosquitto], tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    """The fallback for hosts without ``mosquitto_passwd`` writes what this broker reads."""
    broker = make_mosquitto(users=MQTT_USERS, hash_in_python=True)
    assert broker.password_file is not None
    scheme = "$7$" if broker.version >= (2,) else "$6$"
    assert broker.password_file.read_text().startswith(f"{DEVICE_USER}:{scheme}")
    sub = subscribe(broker.url, closing, **listener_auth())
    settings = BrokerSettings(
        url=broker.url, username=DEVICE_USER, password_file=secret_file(tmp_path, PASSWORD)
    )
    pub = start(settings, tmp_path / "outbox.sqlite", closing)
    assert pub.connected.wait(30), broker.log_tail()
    pub.publish_event(event(4))
    assert delivered(sub, "e4")


# ---------------------------------------------------------------- TLS


def test_tls_with_the_ca_delivers(
    mosquitto_tls: Mosquitto, mqtt_pki: Pki, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    assert mosquitto_tls.url.startswith("mqtts://127.0.0.1:")
    sub = subscribe(mosquitto_tls.url, closing, ca_file=mqtt_pki.ca)
    pub = start(
        BrokerSettings(url=mosquitto_tls.url, ca_file=mqtt_pki.ca), tmp_path / "o.sqlite", closing
    )
    assert pub.connected.wait(30), mosquitto_tls.log_tail()
    pub.publish_event(event(5))
    assert pub.drain(30)
    assert delivered(sub, "e5")


# paho-mqtt 2.2 does not close the socket when a TLS handshake fails (_ssl_wrap_socket), so
# each refused attempt leaves an SSLSocket for the garbage collector, which warns.
PAHO_LEAKS_FAILED_TLS_SOCKETS = pytest.mark.filterwarnings(
    "ignore:unclosed <ssl.SSLSocket:ResourceWarning"
)


@PAHO_LEAKS_FAILED_TLS_SOCKETS
@pytest.mark.parametrize(
    "mismatch", ["another CA", "the system's CAs", "a certificate for another name"]
)
def test_tls_refuses_a_broker_it_cannot_verify(
    mismatch: str,
    make_mosquitto: Callable[..., Mosquitto],
    mqtt_pki: Pki,
    tmp_path: Path,
    closing: list[Callable[[], Any]],
) -> None:
    """Trusting another CA (or only the system's), or a broker whose certificate names another
    host: no connection, and the event waits in the outbox until a publisher that trusts the
    broker sends it."""
    server, trusted = mqtt_pki.server, {"another CA": mqtt_pki.other_ca}.get(mismatch)
    if mismatch == "a certificate for another name":
        server, trusted = mqtt_pki.misnamed, mqtt_pki.ca
    broker = make_mosquitto(tls=server)
    since = len(broker.log_text())
    pub = start(BrokerSettings(url=broker.url, ca_file=trusted), tmp_path / "o.sqlite", closing)
    pub.publish_event(event(6))
    assert refused_in_log(broker, TLS_FAILED, since), broker.log_tail()
    assert not pub.connected.is_set()
    assert [p.id for p in pub.outbox.pending()] == ["e6"]
    if server is mqtt_pki.server:  # the same broker, trusted now: the kept event goes out
        pub.stop()
        pub.outbox.close()
        sub = subscribe(broker.url, closing, ca_file=mqtt_pki.ca)
        fixed = BrokerSettings(url=broker.url, ca_file=mqtt_pki.ca)
        again = start(fixed, tmp_path / "o.sqlite", closing)
        assert again.drain(30), broker.log_tail()
        assert delivered(sub, "e6")


def test_mutual_tls_with_a_client_certificate_delivers(
    mosquitto_mtls: Mosquitto, mqtt_pki: Pki, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    cert, key = mqtt_pki.client_cert, mqtt_pki.client_key
    sub = subscribe(mosquitto_mtls.url, closing, ca_file=mqtt_pki.ca, cert_file=cert, key_file=key)
    settings = BrokerSettings(
        url=mosquitto_mtls.url, ca_file=mqtt_pki.ca, cert_file=cert, key_file=key
    )
    pub = start(settings, tmp_path / "o.sqlite", closing)
    assert pub.connected.wait(30), mosquitto_mtls.log_tail()
    pub.publish_event(event(7))
    assert pub.drain(30)
    assert delivered(sub, "e7")


def test_mutual_tls_without_a_client_certificate_is_refused(
    mosquitto_mtls: Mosquitto, mqtt_pki: Pki, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    settings = BrokerSettings(url=mosquitto_mtls.url, ca_file=mqtt_pki.ca)
    since = len(mosquitto_mtls.log_text())
    pub = start(settings, tmp_path / "o.sqlite", closing)
    pub.publish_event(event(8))
    assert refused_in_log(mosquitto_mtls, TLS_FAILED, since), mosquitto_mtls.log_tail()
    assert not pub.connected.is_set()
    assert [p.id for p in pub.outbox.pending()] == ["e8"]
    assert "New client connected" not in mosquitto_mtls.log_text()
