"""Home Assistant MQTT discovery, device-based (Home Assistant 2024.11+).

One retained config on ``<prefix>/device/doorstep_<id>/config`` describes the whole doorbell:
``dev`` (the device), ``o`` (origin: doorstep, its version, where to get help) and ``cmps``, one
entry per entity:

* ``event`` *Parcel*: fires ``arrived``, ``reminder``, ``removed`` or ``possible_theft`` from the
  ``events`` topic (the payload's ``event_type``; the rest of it becomes the event's attributes);
* ``binary_sensor`` *Parcel present*: on while a parcel is in any zone (from ``state``);
* ``image`` *Parcel snapshot*: the JPEG retained on ``snapshot``;
* ``update`` *Parcel model*: installed (the state's model version) against the latest a pull
  rollout announced on ``desired``;
* diagnostic sensors from ``telemetry``: *Inference latency*, *Frame rate*, *Power*,
  *Millijoules per inference*, *CPU temperature*, and a *Throttled* problem sensor.

Entity ids are set with ``default_entity_id`` (``object_id`` stopped working in Home Assistant
2026.4); they are the ones the per-entity discovery of earlier doorstep versions gave, so an
install keeps its entities, history and automations through :func:`legacy_topics`' migration.
All entities go unavailable with the device's ``availability`` topic (the Last Will).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from device.alerts.payloads import EVENT_TYPES

MIGRATE = {"migrate_discovery": True}

# Jinja for Home Assistant: on while any of the Pi's *_now throttling flags is set; None (state
# unknown) where there are no flags (not a Pi).
_THROTTLED = (
    "{% set t = value_json.throttled %}"
    "{{ none if t is none else ('ON' if t.under_voltage_now or t.throttled_now "
    "or t.arm_freq_capped_now or t.soft_temp_limit_now else 'OFF') }}"
)


def node_id(device_id: str) -> str:
    """The id every topic, unique id and entity id of this device is built on."""
    return f"doorstep_{device_id}".replace("-", "_")


@dataclass(frozen=True)
class Discovery:
    """The device's discovery config and where it goes."""

    topic: str  # <prefix>/device/<node>/config
    config: dict[str, Any]
    legacy: tuple[str, ...]  # the per-entity topics of earlier versions, to migrate away from

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        cmps: dict[str, dict[str, Any]] = self.config["cmps"]
        return cmps


def device_topic(device_id: str, prefix: str = "homeassistant") -> str:
    return f"{prefix}/device/{node_id(device_id)}/config"


def legacy_topics(device_id: str, prefix: str = "homeassistant") -> tuple[str, ...]:
    """Every per-entity config topic doorstep published before device-based discovery."""
    node = node_id(device_id)
    old = [("sensor", k) for k in ("latency", "fps", "power", "temperature")]
    old += [("binary_sensor", "parcel"), ("update", "model"), ("image", "snapshot")]
    return tuple(f"{prefix}/{component}/{node}/{key}/config" for component, key in old)


def discovery(
    device_id: str,
    base: str,
    model: str,
    sw_version: str,
    prefix: str = "homeassistant",
    support_url: str | None = None,
) -> Discovery:
    """The discovery config for this device; ``base`` is its topic root (``doorstep/<id>``);
    ``support_url`` goes in the origin (Home Assistant links it on the device page)."""
    node = node_id(device_id)

    def entity(platform: str, key: str, name: str, **options: Any) -> tuple[str, dict[str, Any]]:
        return key, {
            "platform": platform,
            "name": name,
            "unique_id": f"{node}_{key}",
            "default_entity_id": f"{platform}.{node}_{key}",
            **options,
        }

    def sensor(key: str, name: str, template: str, **options: Any) -> tuple[str, dict[str, Any]]:
        return entity(
            "sensor",
            key,
            name,
            state_topic=f"{base}/telemetry",
            value_template=template,
            state_class="measurement",
            entity_category="diagnostic",
            **options,
        )

    components = dict(
        [
            entity(
                "event",
                "parcel_event",
                "Parcel",
                state_topic=f"{base}/events",
                event_types=list(EVENT_TYPES),
                icon="mdi:package-variant",
            ),
            # The unique id of earlier versions' "Parcel" binary sensor, so it migrates.
            entity(
                "binary_sensor",
                "parcel",
                "Parcel present",
                state_topic=f"{base}/state",
                value_template="{{ 'ON' if value_json.present else 'OFF' }}",
                json_attributes_topic=f"{base}/state",
                json_attributes_template="{{ {'zones': value_json.zones, 'since': "
                "value_json.since, 'model': value_json.model.version} | tojson }}",
                icon="mdi:package-variant-closed",
            ),
            entity(
                "image",
                "snapshot",
                "Parcel snapshot",
                image_topic=f"{base}/snapshot",
                content_type="image/jpeg",
            ),
            # Installed: the model the state names; latest: what a pull rollout wants (retained
            # on `desired`; until one names a bundle, Home Assistant shows the installed one).
            entity(
                "update",
                "model",
                "Parcel model",
                state_topic=f"{base}/state",
                value_template="{{ value_json.model.version }}",
                latest_version_topic=f"{base}/desired",
                latest_version_template="{{ value_json.version }}",
                entity_category="diagnostic",
                title="doorstep parcel model",
            ),
            sensor(
                "latency",
                "Inference latency",
                "{{ value_json.stages_ms.pipeline.p50 if 'pipeline' in value_json.stages_ms "
                "else none }}",
                unit_of_measurement="ms",
                device_class="duration",
                icon="mdi:timer-outline",
            ),
            sensor("fps", "Frame rate", "{{ value_json.fps }}", unit_of_measurement="fps"),
            sensor(
                "power",
                "Power",
                "{{ value_json.power.watts if value_json.power else none }}",
                unit_of_measurement="W",
                device_class="power",
            ),
            sensor(
                "energy_per_inference",
                "Millijoules per inference",
                "{{ value_json.power.mj_per_inference if value_json.power else none }}",
                unit_of_measurement="mJ",
                icon="mdi:lightning-bolt-outline",
            ),
            sensor(
                "temperature",
                "CPU temperature",
                "{{ value_json.cpu_temp_c }}",
                unit_of_measurement="°C",
                device_class="temperature",
            ),
            entity(
                "binary_sensor",
                "throttled",
                "Throttled",
                state_topic=f"{base}/telemetry",
                value_template=_THROTTLED,
                device_class="problem",
                entity_category="diagnostic",
            ),
        ]
    )
    origin = {"name": "doorstep", "sw_version": sw_version}
    if support_url:
        origin["support_url"] = support_url
    config = {
        "dev": {
            "identifiers": [node],
            "name": f"Doorstep {device_id}",
            "manufacturer": "doorstep",
            "model": model,
            "sw_version": sw_version,
        },
        "o": origin,
        "availability_topic": f"{base}/availability",
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "cmps": components,
    }
    return Discovery(device_topic(device_id, prefix), config, legacy_topics(device_id, prefix))
