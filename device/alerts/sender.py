"""The sender: drains the outbox continuously at the broker's pace, a bounded window in flight.

One thread owns the in-flight window (message id -> event id). paho's network thread only
appends each PUBACK's message id to a list and wakes the sender, so no lock is ever held
across a paho call. Every ack frees a slot that the next event fills at once: a backlog of
thousands goes out without pauses, and because the outbox hands out every other kind before
reminders, a new ``arrived`` waits behind at most one window, never behind the backlog.

An ack may reach the list before the sender has recorded the id ``publish()`` returned, but
the sender records it before it reads the list again; so an ack whose id it does not know
belongs to another message (state, availability) and is ignored. Messages
in flight when the connection drops stay in paho's queue and are sent again on reconnect
(with the DUP flag: receivers de-duplicate by the event's id).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.alerts.outbox import Outbox, Pending

log = logging.getLogger("doorstep.mqtt")

_QUEUED = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)  # NO_CONN: paho keeps it, sends on connect


@dataclass(frozen=True)
class SenderStats:
    sent: int  # publishes of events, resends by paho after a reconnect not included
    acked: int
    rejected: int  # acked with an MQTT 5 failure reason (e.g. not authorized): not retried
    inflight: int
    max_inflight_seen: int


class Sender:
    """Keeps at most ``max_inflight`` outbox events in flight on ``client``."""

    def __init__(
        self,
        client: mqtt.Client,
        outbox: Outbox,
        connected: threading.Event,
        max_inflight: int = 20,
        expiry_cap_s: float | None = None,
    ) -> None:
        """``expiry_cap_s`` set (MQTT 5 only): each event carries a message expiry of its
        remaining lifetime in the outbox, at most this."""
        self.client, self.outbox, self.connected = client, outbox, connected
        self.max_inflight, self.expiry_cap_s = max_inflight, expiry_cap_s
        self._cond = threading.Condition()
        self._acks: list[tuple[int, bool]] = []  # (message id, refused), from paho's thread
        self._kicked = True
        self._stopping = False
        self._inflight: dict[int, str] = {}  # message id -> event id; the sender thread's own
        self._more = True  # the last read filled the window: there may be more waiting
        self._wait: float | None = None
        self._thread: threading.Thread | None = None
        self.sent = self.acked = self.rejected = self.max_inflight_seen = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="doorstep-sender", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # acks that came after its last cycle: settle them
                with self._cond:
                    acks, self._acks = self._acks, []
                self.outbox.delete_many(self._settle(acks))

    def kick(self) -> None:
        """Something was committed (or the connection is back): look at the outbox now."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any = None, props: Any = None
    ) -> None:
        """paho's callback (network thread): queue the ack for the sender, nothing more."""
        refused = bool(getattr(reason, "is_failure", False))
        with self._cond:
            self._acks.append((mid, refused))
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every stored event was acknowledged; True if the outbox emptied."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.outbox) == 0, timeout)

    def stats(self) -> SenderStats:
        return SenderStats(
            self.sent, self.acked, self.rejected, len(self._inflight), self.max_inflight_seen
        )

    # -- the sender thread
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or self._kicked or bool(self._acks), self._wait
                )
                if self._stopping:
                    return
                acks, self._acks = self._acks, []
                kicked, self._kicked = self._kicked, False
            try:
                self._cycle(acks, kicked)
            except Exception:  # never die silently: the next kick or ack tries again
                log.exception("the MQTT sender failed")
                self._wait = 1.0
            with self._cond:
                self._cond.notify_all()  # drain() looks again

    def _settle(self, acks: list[tuple[int, bool]]) -> list[str]:
        """The event ids the broker acknowledged, out of the window."""
        done = []
        for mid, refused in acks:
            event_id = self._inflight.pop(mid, None)
            if event_id is None:
                continue  # not an event: state, availability, discovery
            done.append(event_id)
            self.acked += 1
            if refused:
                self.rejected += 1
                log.warning("the broker refused event %s; it is not sent again", event_id)
        return done

    def _cycle(self, acks: list[tuple[int, bool]], kicked: bool) -> None:
        done = self._settle(acks)
        retry_in = self.outbox.maintain()
        self._wait = None if retry_in is None else max(retry_in, 0.1)
        if self.connected.is_set() and (kicked or self._more):
            self._fill(exclude=done)  # refill the window first, then spend time on the delete
        if done:
            self.outbox.delete_many(done)

    def _fill(self, exclude: list[str]) -> None:
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        batch = self.outbox.pending(room, exclude={*self._inflight.values(), *exclude})
        self._more = len(batch) == room
        for item in batch:
            info = self.client.publish(
                item.topic, item.payload, qos=1, retain=False, properties=self._properties(item)
            )
            if info.rc not in _QUEUED:
                log.warning("cannot publish event %s: %s", item.id, mqtt.error_string(info.rc))
                self._more = True
                break
            self._inflight[info.mid] = item.id
            self.sent += 1
            self.max_inflight_seen = max(self.max_inflight_seen, len(self._inflight))

    def _properties(self, item: Pending) -> Properties | None:
        if self.expiry_cap_s is None:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = max(1, math.ceil(min(self.expiry_cap_s, item.expires_in)))
        return props
