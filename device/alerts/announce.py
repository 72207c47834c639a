"""Where the daemon's decisions go once they are stored: MQTT (when a broker is configured)
with Home Assistant discovery and the parcel snapshot. paho is imported only here, and only
when there is a broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device.alerts.mqtt import Publisher
    from device.alerts.outbox import Outbox
    from device.config import MqttConfig
    from device.presence import Event, PresenceTracker


class Announcer:
    """The ``mqtt`` section's publisher, or nothing at all (``mqtt: null``: events are only
    logged)."""

    def __init__(self, cfg: MqttConfig | None, device_id: str, outbox: Outbox) -> None:
        self.cfg, self.device_id, self.outbox = cfg, device_id, outbox
        self.publisher: Publisher | None = None

    def start(self, model_name: str, version: str, state: dict[str, Any]) -> None:
        """Connect in the background; discovery and ``state`` go out on every (re)connect."""
        q = self.cfg
        if q is None:
            return
        from device.alerts.homeassistant import discovery
        from device.alerts.mqtt import Publisher

        self.publisher = Publisher.from_config(q, self.device_id, self.outbox)
        # Built either way: with discovery turned off, the device config is cleared instead.
        self.publisher.set_discovery(
            discovery(
                self.device_id,
                self.publisher.base,
                model_name,
                version,
                q.discovery_prefix,
                support_url=q.support_url,
            ),
            enabled=q.home_assistant,
        )
        self.publisher.publish_state(state)
        self.publisher.start()

    def event(self, event: Event, jpeg: bytes | None, tracker: PresenceTracker) -> None:
        """An event already committed to the outbox: wake the sender; retain the snapshot
        (``jpeg``, made at an arrival) and clear it once the last parcel is gone."""
        if self.publisher is None or self.cfg is None:
            return
        self.publisher.kick()
        if not self.cfg.snapshot:
            return
        if event.kind == "removed" and not any(tracker.present().values()):
            self.publisher.publish_snapshot(None)
        elif event.kind == "arrived" and jpeg is not None:
            self.publisher.publish_snapshot(jpeg)

    def wants_snapshot(self) -> bool:
        return self.cfg is not None and self.cfg.snapshot

    def state(self, state: dict[str, Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish_state(state)

    def telemetry(self, payload: dict[str, Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish_telemetry(payload)

    def drain(self) -> bool:
        """Wait (``drain_timeout_s``) for the broker to acknowledge what is stored; True when
        nothing was left unacknowledged (the rest stays in the outbox for the next start)."""
        if self.publisher is None or self.cfg is None:
            return True
        return self.publisher.drain(timeout=self.cfg.drain_timeout_s)

    def stop(self) -> None:
        """Say offline (the Last Will covers crashes) and disconnect."""
        if self.publisher is not None:
            self.publisher.stop()
