"""Home Assistant MQTT discovery: one device, its parcel sensor, health sensors and snapshot.

Each entity gets a retained config on ``<discovery_prefix>/<component>/<node>/<object>/config``
carrying the same ``device`` block, so Home Assistant shows one device with:

* ``binary_sensor`` *Parcel*: on while a parcel is in any zone (from ``state``);
* ``sensor`` *Inference latency* (pipeline p50, ms), *Frame rate*, *Power* (W), *CPU temperature*
  (from ``telemetry``);
* ``image`` *Parcel snapshot*: the JPEG retained on ``snapshot``.

Entity ids are set with ``default_entity_id`` (``object_id`` stopped working in Home Assistant
2026.4). All entities go unavailable with the device's ``availability`` topic (the Last Will).
"""

from __future__ import annotations

from typing import Any


def discovery_configs(
    device_id: str,
    base: str,
    model: str,
    sw_version: str,
    prefix: str = "homeassistant",
) -> dict[str, dict[str, Any]]:
    """``{config topic: config payload}`` for this device's entities; ``base`` is the device's
    topic root (``doorstep/<device_id>``)."""
    node = f"doorstep_{device_id}".replace("-", "_")
    device = {
        "identifiers": [node],
        "name": f"Doorstep {device_id}",
        "manufacturer": "doorstep",
        "model": model,
        "sw_version": sw_version,
    }
    common = {
        "availability_topic": f"{base}/availability",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "doorstep", "sw_version": sw_version},
    }

    def sensor(key: str, name: str, template: str, **extra: Any) -> tuple[str, dict[str, Any]]:
        return f"{prefix}/sensor/{node}/{key}/config", {
            **common,
            "name": name,
            "unique_id": f"{node}_{key}",
            "default_entity_id": f"sensor.{node}_{key}",
            "state_topic": f"{base}/telemetry",
            "value_template": template,
            "state_class": "measurement",
            "entity_category": "diagnostic",
            **extra,
        }

    configs = dict(
        [
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
                "temperature",
                "CPU temperature",
                "{{ value_json.cpu_temp_c }}",
                unit_of_measurement="°C",
                device_class="temperature",
            ),
        ]
    )
    configs[f"{prefix}/binary_sensor/{node}/parcel/config"] = {
        **common,
        "name": "Parcel",
        "unique_id": f"{node}_parcel",
        "default_entity_id": f"binary_sensor.{node}_parcel",
        "state_topic": f"{base}/state",
        "value_template": "{{ 'ON' if value_json.present else 'OFF' }}",
        "json_attributes_topic": f"{base}/state",
        "json_attributes_template": "{{ {'zones': value_json.zones, 'since': value_json.since,"
        " 'model': value_json.model.version} | tojson }}",
        "icon": "mdi:package-variant-closed",
    }
    # Installed: the model the state names; latest: what a pull rollout wants (retained on
    # `desired`; until one names a bundle, Home Assistant shows the installed one as latest).
    configs[f"{prefix}/update/{node}/model/config"] = {
        **common,
        "name": "Parcel model",
        "unique_id": f"{node}_model",
        "default_entity_id": f"update.{node}_model",
        "state_topic": f"{base}/state",
        "value_template": "{{ value_json.model.version }}",
        "latest_version_topic": f"{base}/desired",
        "latest_version_template": "{{ value_json.version }}",
        "entity_category": "diagnostic",
        "title": "doorstep parcel model",
    }
    configs[f"{prefix}/image/{node}/snapshot/config"] = {
        **common,
        "name": "Parcel snapshot",
        "unique_id": f"{node}_snapshot",
        "default_entity_id": f"image.{node}_snapshot",
        "image_topic": f"{base}/snapshot",
        "content_type": "image/jpeg",
    }
    return configs
