"""``doorstep-host status``: per device, is it reachable, what does it run, is the daemon up.

Two sources, and the output says which was used:

- **SSH** (default): ``doorstep-device status --json`` on each device, in parallel.
- **MQTT** (``--broker``): the retained ``<prefix>/<device_id>/state`` and ``availability``
  topics every daemon keeps on the broker. No SSH at all, so it works for doorbells the
  workstation cannot log in to, but it knows only what the daemons last published. Every
  message is validated against the daemon's payload models (``host.watch``): an invalid one
  is reported once and skipped, never a traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from device.alerts.mqtt import BrokerSettings
from device.alerts.payloads import StatePayload
from device.errors import DoorstepError
from device.record import LastEvent, RecordError, parse_status
from host.fleet.errors import DeviceError
from host.fleet.inventory import Device
from host.fleet.progress import table
from host.safe_text import printable

if TYPE_CHECKING:
    from host.watch import Invalid, Message


@dataclass
class DeviceStatus:
    """One row of ``status``."""

    device: str
    reachable: bool
    detail: str = ""
    model: str = "-"
    bundle_id: str | None = None
    daemon: str = "-"
    last_seen: float | None = None
    last_event: str = "-"
    source: str = "ssh"

    def row(self, now: float) -> list[str]:
        reach = "yes" if self.reachable else "no"
        return [
            self.device,
            reach,
            self.model,
            self.daemon,
            _ago(self.last_seen, now),
            self.last_event if self.reachable else self.detail,
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def render(statuses: Sequence[DeviceStatus], source: str) -> str:
    now = time.time()
    rows = [s.row(now) for s in statuses]
    text = table(["DEVICE", "REACHABLE", "MODEL", "DAEMON", "LAST SEEN", "LAST EVENT"], rows)
    up = sum(s.reachable for s in statuses)
    return printable(f"{text}\n\n{up} of {len(statuses)} device(s) reachable; source: {source}")


# ------------------------------------------------------------------------------------ SSH


async def status_over_ssh(devices: Sequence[Device], limit: int = 10) -> list[DeviceStatus]:
    from host.fleet.remote import RemoteDoorstep  # asyncssh: the rows above import without it
    from host.fleet.ssh import connect

    gate = asyncio.Semaphore(limit)

    async def one(device: Device) -> DeviceStatus:
        async with gate:
            try:
                async with connect(device, connect_timeout=device.connect_timeout) as conn:
                    doc = await RemoteDoorstep(conn, device).status()
            except DeviceError as exc:
                return DeviceStatus(device.name, False, exc.reason)
            except DoorstepError as exc:
                return DeviceStatus(device.name, True, str(exc))
            return from_status_doc(device.name, doc)

    return list(await asyncio.gather(*(one(d) for d in devices)))


def from_status_doc(name: str, doc: object) -> DeviceStatus:
    """A row from ``doorstep-device status --json`` (parsed with the device's own model; a
    document that does not validate is that device's row, saying why)."""
    try:
        status = parse_status(doc, name)
    except RecordError as exc:
        return DeviceStatus(
            name, True, str(exc), daemon="invalid status", last_event=_why(str(exc), name)
        )
    active, record = status.active, status.daemon
    model = f"{active.name} {active.version} ({active.id[:12]})" if active else "shipped default"
    state = "-"
    if record is not None:
        state = record.state + ", self-test " + ("ok" if record.self_test.ok else "FAILED")
        if record.last_reload is not None and not record.last_reload.ok:
            state += ", last reload FAILED"
        if record.storage != "ok":
            state += f", storage {record.storage}"
        if record.source is not None and record.source.status != "ok":
            state += f", camera {record.source.status}"
    elif status.daemon_error:
        state = "invalid record"
    return DeviceStatus(
        name,
        True,
        detail=status.daemon_error or "",
        model=model,
        bundle_id=active.id if active else None,
        daemon=state,
        last_seen=record.updated if record is not None else None,
        last_event=(
            _event_text(record.last_event)
            if record is not None
            else _why(status.daemon_error, name)
            if status.daemon_error
            else "-"
        ),
    )


def _why(error: str, name: str) -> str:
    return error.removeprefix(f"{name}: ")


def _event_text(event: LastEvent | None) -> str:
    if event is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.wall_time))
    return f"parcel {event.event} in {event.zone} at {stamp}"


# ------------------------------------------------------------------------------------ MQTT


def status_over_mqtt(
    devices: Sequence[Device],
    broker: BrokerSettings,
    prefix: str = "doorstep",
    wait: float = 3.0,
    on_invalid: Callable[[Invalid], None] | None = None,
) -> list[DeviceStatus]:
    """Rows from the retained state and availability of each device on ``broker``.

    Every message is validated (:mod:`host.watch`); an invalid one is skipped and reported
    through ``on_invalid`` (once per topic), and a device whose retained state is invalid
    gets a row saying so.
    """
    from host.watch import Watcher

    ids = {d.device_id: d for d in devices}
    watcher = Watcher(broker, prefix, None, ("state", "availability"), on_invalid=on_invalid)
    watcher.start()
    try:
        if not watcher.subscribed.wait(10):
            raise DoorstepError(f"no answer from the broker at {broker.url}")

        def complete(w: Watcher) -> bool:
            seen = {(m.device, m.kind) for m in w.messages}
            seen |= {_topic_key(bad.topic) for bad in w.invalid}
            return all((i, k) in seen for i in ids for k in ("state", "availability"))

        watcher.wait(complete, timeout=wait)  # retained messages arrive at once
    finally:
        watcher.stop()
    latest: dict[tuple[str, str], Message] = {}
    for m in watcher.messages:
        latest[(m.device, m.kind)] = m
    invalid = {_topic_key(bad.topic): bad.reason for bad in watcher.invalid}
    rows = []
    for device_id, device in ids.items():
        state = latest.get((device_id, "state"))
        online = latest.get((device_id, "availability"))
        bad_state = invalid.get((device_id, "state"))
        if state is None and online is None and bad_state is None:
            rows.append(
                DeviceStatus(device.name, False, "nothing retained on the broker", source="mqtt")
            )
            continue
        model = state.model if state is not None else None
        row = _from_state(
            device.name,
            model if isinstance(model, StatePayload) else None,
            online.payload if online is not None else None,
        )
        if state is None and bad_state is not None:
            row.daemon += ", invalid state"
            row.last_event = f"invalid state on the broker: {bad_state}"
        rows.append(row)
    return rows


def _topic_key(topic: str) -> tuple[str, str]:
    parts = topic.split("/")
    return (parts[-2], parts[-1]) if len(parts) >= 2 else ("", topic)


def _from_state(name: str, state: StatePayload | None, online: str | None) -> DeviceStatus:
    status = DeviceStatus(name, online == "online", f"availability {online}", source="mqtt")
    status.daemon = str(online or "unknown")
    if state is not None:
        m = state.model
        status.model = f"{m.name} {m.version} (model {m.sha256[:12]})"
        status.daemon += ", self-test " + ("ok" if state.self_test.ok else "FAILED")
        status.last_seen = state.updated
        status.last_event = (
            "parcel present" + (f" (count {state.count})" if state.count else "")
            if state.present
            else "no parcel"
        )
    return status


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    s = max(now - when, 0.0)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"
