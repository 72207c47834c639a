"""The outbox and its sender against a real Mosquitto and real filesystem faults.

A 10,000-event backlog drains at the broker's pace with a bounded window; a new ``arrived``
overtakes thousands of stale reminders; expired events are dropped and counted; a full or
read-only disk degrades to memory and recovers without losing what fit. Each of these failed on
the old outbox (1,000 events per connect, oldest first, a traceback on a full disk).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from brokers import HOST, Mosquitto, free_port
from childproc import LineReader
from fsfaults import fill, free, remount, small_tmpfs
from paho.mqtt.enums import CallbackAPIVersion

from device.alerts.memqueue import MemoryQueue, Row
from device.alerts.mqtt import BrokerSettings, Publisher
from device.alerts.outbox import Event, Outbox

TOPIC = "doorstep/door1/events"


class EventListener:
    """A subscriber to the events topic (MQTT 5, QoS 1) that keeps the order of arrival."""

    def __init__(self, port: int) -> None:
        self.ids: list[str] = []
        self.expiry: dict[str, int | None] = {}  # event id -> message expiry as received
        self.got = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"events-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5,
        )
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(TOPIC, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(HOST, port)
        self.client.loop_start()
        if not subscribed.wait(20):
            self.close()
            raise AssertionError(f"the listener could not subscribe on port {port}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        event_id = json.loads(msg.payload)["id"]
        with self.got:
            self.ids.append(event_id)
            self.expiry[event_id] = getattr(msg.properties, "MessageExpiryInterval", None)
            self.got.notify_all()

    def wait(self, predicate: Callable[[list[str]], bool], timeout: float = 30.0) -> bool:
        with self.got:
            return self.got.wait_for(lambda: predicate(self.ids), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Gate:
    """A loopback TCP path to the broker that the test opens: until then, connections to
    ``port`` are refused, as for a broker that is away. It only sequences the test (the
    listener subscribes before the publisher can reach the broker); bytes pass unchanged."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    def open(self) -> None:
        self._server = socket.create_server((HOST, self.port))
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((HOST, self.target), timeout=10)
            upstream.settimeout(None)
            self._socks += [client, upstream]
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close does not)
            self._server.close()
        for s in self._socks:
            s.close()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def closing() -> Iterator[list[Callable[[], Any]]]:
    """What a test started (publishers, listeners, outboxes): stopped even when it fails."""
    stops: list[Callable[[], Any]] = []
    yield stops
    for stop in reversed(stops):
        stop()


def publisher(
    url: str, box: Outbox, closing: list[Callable[[], Any]], max_inflight: int = 20
) -> Publisher:
    pub = Publisher(
        "door1", BrokerSettings(url=url, discovery_prefix=None), box, max_inflight=max_inflight
    )
    closing.append(pub.stop)
    return pub


def outbox(path: Path, closing: list[Callable[[], Any]], **options: Any) -> Outbox:
    box = Outbox(path, **options)
    closing.append(box.close)
    return box


def listen(port: int, closing: list[Callable[[], Any]]) -> EventListener:
    listener = EventListener(port)
    closing.append(listener.close)
    return listener


def events(prefix: str, n: int, kind: str = "arrived") -> list[Event]:
    return [
        Event(f"{prefix}{i}", TOPIC, {"event": kind, "id": f"{prefix}{i}"}, kind) for i in range(n)
    ]


# ---------------------------------------------------------------- backlog and priority


def test_a_10000_event_backlog_drains_completely_with_a_bounded_window(
    mosquitto: Mosquitto, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    """The broker is down while 10,000 events are raised; when it is back, all go out, each
    id at least once (twice only across a reconnect), never more than max_inflight at once."""
    mosquitto.stop()
    gate = Gate(mosquitto.port)
    closing.append(gate.close)
    box = outbox(tmp_path / "outbox.sqlite", closing)
    pub = publisher(f"mqtt://{HOST}:{gate.port}", box, closing, max_inflight=20)
    pub.start()  # retrying against a broker that is away
    expected = set()
    for batch in range(10):
        new = events(f"b{batch}-", 1000)
        assert box.commit(new)
        pub.kick()
        expected |= {e.id for e in new}
    assert len(box) == 10_000 and pub.stats().sent == 0
    mosquitto.start()
    listener = listen(mosquitto.port, closing)  # subscribed before the publisher can connect
    gate.open()
    assert pub.drain(60), f"{len(box)} events left; sent {pub.stats()}\n{mosquitto.log_tail()}"
    assert listener.wait(lambda ids: expected <= set(ids), timeout=30), (
        f"{len(expected - set(listener.ids))} never arrived\n{mosquitto.log_tail()}"
    )
    assert set(listener.ids) == expected
    duplicates = len(listener.ids) - len(expected)
    assert duplicates == 0 or pub.connects > 1, f"{duplicates} duplicates without a reconnect"
    stats = pub.stats()
    assert stats.max_inflight_seen == 20  # the window was used, and never exceeded
    assert stats.acked >= 10_000 and len(box) == 0


def test_a_new_arrival_overtakes_thousands_of_stale_reminders(
    mosquitto: Mosquitto, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    now = [1_000_000.0]
    box = outbox(tmp_path / "outbox.sqlite", closing, clock=lambda: now[0])
    assert box.commit(events("r", 9000, "reminder"))  # hours old, still within expiry
    now[0] += 4 * 3600
    listener = listen(mosquitto.port, closing)
    pub = publisher(mosquitto.url, box, closing, max_inflight=20)
    pub.start()
    assert listener.wait(lambda ids: len(ids) >= 300)  # draining the backlog
    assert pub.publish_event({"event": "arrived", "id": "new-parcel"})
    sent_at_commit = pub.stats().sent  # reminders sent before the arrival was stored, at most
    assert listener.wait(lambda ids: "new-parcel" in ids)
    position = listener.ids.index("new-parcel")  # = events the broker had before it (in order)
    # after the commit, only the batch the sender had already read may go first: one window
    assert position - sent_at_commit <= 20 + 2, (
        f"the arrival waited behind {position - sent_at_commit} reminders sent after it"
    )
    assert len(box) > 1000  # and the backlog was far from drained when it went out
    assert pub.drain(60)
    assert listener.wait(lambda ids: len(set(ids)) == 9001)


def test_pending_puts_every_kind_before_reminders_oldest_first(tmp_path: Path) -> None:
    now = [100.0]
    box = Outbox(tmp_path / "o.sqlite", clock=lambda: now[0])
    for kind, name in [("reminder", "r1"), ("arrived", "a1"), ("reminder", "r2")]:
        box.commit([Event(name, TOPIC, {}, kind)])
        now[0] += 1
    box.commit([Event("x1", TOPIC, {}, "removed"), Event("a2", TOPIC, {}, "arrived")])
    assert [p.id for p in box.pending()] == ["a1", "x1", "a2", "r1", "r2"]
    assert [p.id for p in box.pending(2, exclude={"a1"})] == ["x1", "a2"]
    box.close()


# ---------------------------------------------------------------- expiry


def test_expired_events_are_dropped_counted_and_never_sent(
    mosquitto: Mosquitto, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    now = [10_000.0]
    box = outbox(tmp_path / "outbox.sqlite", closing, expiry_s=1000, clock=lambda: now[0])
    assert box.commit(events("old", 5))
    now[0] += 1900  # the old ones are now 1,900 s old: past expiry
    assert box.commit(events("fresh", 1))
    now[0] += 100  # the fresh one is 100 s old: 900 s of life left
    listener = listen(mosquitto.port, closing)
    pub = publisher(mosquitto.url, box, closing)
    pub.start()
    assert listener.wait(lambda ids: "fresh0" in ids)
    assert pub.drain(30)
    assert listener.ids == ["fresh0"]
    assert box.stats().dropped_expired == 5 and box.dropped == 5 and len(box) == 0
    expiry = listener.expiry["fresh0"]  # MQTT 5: the event's remaining life, not a full day
    assert expiry is not None and 0 < expiry <= 900


# ---------------------------------------------------------------- full and read-only disks


def test_a_full_disk_degrades_to_memory_delivers_live_and_writes_out_when_space_returns(
    mosquitto: Mosquitto, tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    with small_tmpfs(tmp_path / "disk", 1024) as disk:
        box = outbox(disk / "state" / "outbox.sqlite", closing)
        listener = listen(mosquitto.port, closing)
        pub = publisher(mosquitto.url, box, closing)
        pub.start()
        assert pub.connected.wait(20)
        assert pub.commit([{"event": "arrived", "id": "before"}], {"tracker": "1"})
        fill(disk)
        # the disk is full: kept in memory, published live all the same
        assert not pub.commit([{"event": "arrived", "id": f"live{i}"} for i in range(5)])
        stats = box.stats()
        assert stats.storage == "degraded" and "full" in (stats.storage_error or "")
        assert stats.storage_episodes == 1
        assert listener.wait(lambda ids: {f"live{i}" for i in range(5)} <= set(ids))
        assert pub.drain(30)
        # the broker goes away: these wait in memory, and the state with them
        mosquitto.stop()
        assert not pub.commit(
            [{"event": "removed", "id": f"later{i}"} for i in range(3)], {"tracker": "2"}
        )
        assert box.stats().in_memory == 3 and box.get_state("tracker") == "2"
        free(disk)
        assert box.wait_stored(60), box.stats()  # the sender's retry wrote the memory queue
        assert box.stats().storage == "ok" and box.stats().in_memory == 0
        pub.stop()
        box.close()
        again = Outbox(disk / "state" / "outbox.sqlite")  # what a restart finds
        found = sorted(p.id for p in again.pending())
        state, storage = again.get_state("tracker"), again.stats().storage
        again.close()
        assert found == ["later0", "later1", "later2"]
        assert state == "2" and storage == "ok"


def test_a_read_only_state_dir_degrades_and_recovers(
    tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    with small_tmpfs(tmp_path / "disk", 1024) as disk:
        box = Outbox(disk / "outbox.sqlite")
        assert box.commit(events("kept", 2), {"k": "1"})
        box.close()
        remount(disk, read_only=True)
        try:
            ro = outbox(disk / "outbox.sqlite", closing)  # no traceback, degraded
            assert ro.stats().storage == "degraded"
            assert not ro.commit(events("new", 2), {"k": "2"})
            assert [p.id for p in ro.pending()] == ["new0", "new1"]  # still deliverable
            assert ro.get_state("k") == "2"
            assert not ro.flush()  # still read-only
        finally:
            remount(disk, read_only=False)
        assert ro.flush()
        assert [p.id for p in ro.pending()] == ["kept0", "kept1", "new0", "new1"]
        ro.close()
        again = Outbox(disk / "outbox.sqlite")
        assert again.get_state("k") == "2" and len(again) == 4
        again.close()


def test_the_memory_queue_is_bounded_newest_kept_reminders_first(
    tmp_path: Path, closing: list[Callable[[], Any]]
) -> None:
    with small_tmpfs(tmp_path / "disk", 1024) as disk:
        remount(disk, read_only=True)
        try:
            box = outbox(disk / "state" / "outbox.sqlite", closing, memory_max=10)
            assert not box.commit(events("r", 3, "reminder"))
            for i in range(25):
                assert not box.commit(events(f"a{i}-", 1))
        finally:
            remount(disk, read_only=False)
        stats = box.stats()
        assert stats.in_memory == 10 and stats.dropped_memory == 18 and stats.drop_episodes == 1
        assert [p.id for p in box.pending()] == [f"a{i}-0" for i in range(15, 25)]
        assert box.flush() and len(box) == 10


def test_the_disk_bound_drops_reminders_first_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_events=3)
    box.commit(events("a", 1) + events("r", 1, "reminder") + events("b", 2))
    assert [p.id for p in box.pending()] == ["a0", "b0", "b1"]
    box.commit(events("c", 1))
    assert [p.id for p in box.pending()] == ["b0", "b1", "c0"]
    assert box.stats().dropped_full == 2
    box.close()


# ---------------------------------------------------------------- atomic events and state

CHILD = textwrap.dedent(
    """
    import sys
    from device.alerts.outbox import Event, Outbox
    box = Outbox(sys.argv[1])
    n = int(box.get_state("n") or 0)
    while True:
        n += 1
        box.commit([Event(f"e{n}", "t", {"n": n}, "arrived")], {"n": str(n)})
        print(n, flush=True)
    """
)


@pytest.mark.parametrize("commits_before_kill", [1, 4, 9, 16, 25])
def test_kill_9_leaves_events_and_state_both_or_neither(
    tmp_path: Path, commits_before_kill: int
) -> None:
    """A child commits event n with state n in a loop and is killed while it commits (it
    goes on after the line it printed): the stored state always names the last stored event,
    and a restart continues from it."""
    path = tmp_path / "outbox.sqlite"
    root = Path(__file__).resolve().parent.parent
    for _run in range(2):  # the second run resumes from what the first left
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        try:
            out = LineReader(child.stdout, "the committing child")
            for _ in range(commits_before_kill):
                out.next(timeout=30)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)
        box = Outbox(path)
        n = int(box.get_state("n") or 0)
        ids = {p.id for p in box.pending(100_000)}
        box.close()
        assert n >= commits_before_kill
        assert ids == {f"e{i}" for i in range(1, n + 1)}, f"state {n}, {len(ids)} events"


def test_the_memory_queue_orders_and_bounds_plain_rows() -> None:
    queue = MemoryQueue(3)
    rows = [
        Row(f"r{i}", TOPIC, b"{}", "reminder" if i % 2 else "arrived", float(i)) for i in range(5)
    ]
    assert queue.add(rows[:3]) == 0
    assert queue.add(rows[3:]) == 2  # r1 and r3, the reminders, go first
    assert [r.id for _, r in queue.best(10, skip=set(), cutoff=0)] == ["r0", "r2", "r4"]
    assert [r.id for _, r in queue.best(1, skip={"r0"}, cutoff=0)] == ["r2"]
    assert queue.expire(cutoff=1.0) == 1 and len(queue) == 2
    assert queue.discard("r2") and not queue.discard("r2")
    assert [r.id for r in queue.rows()] == ["r4"]
