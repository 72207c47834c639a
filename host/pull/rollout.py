"""``doorstep-host rollout``: a pull rollout, as desired state on the broker, in waves.

Each device's retained ``<prefix>/<device_id>/desired`` names the bundle it should run; its
agent answers on the retained ``<prefix>/<device_id>/update``. The rollout opens waves as push
mode's deploy does (:func:`host.fleet.plan.plan_rollout`: a canary wave, then batches), writes
the desired message of each device of a wave (at ``--rate`` per minute), waits until every one
of them reports ``serving``, ``rolled_back`` or ``failed`` for this rollout (or the wave times
out: those still silent are *pending*, e.g. offline, and pick the message up when they return),
and stops as push mode stops (:func:`host.fleet.plan.stop_reason`: a canary failed, or more
than ``max_fail`` devices did). A device's own agent rolls a bad bundle back; the rollout only
stops opening waves.

Everything that matters is in the retained topics, so a killed rollout started again with the
same arguments continues: devices already holding this rollout's desired message are not
written again, and their reports are read back. A local journal keeps what the topics cannot:
each device's desired message from before the rollout, which ``--abort`` writes back.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from device.alerts.mqtt import BrokerSettings
from device.errors import DoorstepError
from device.update.messages import Desired, UpdateReport
from host.fleet.inventory import Device, RolloutPolicy
from host.fleet.plan import plan_rollout, stop_reason
from host.fleet.progress import Progress, QuietView

TERMINAL = ("serving", "rolled_back", "failed")
EXIT_DONE, EXIT_STOPPED, EXIT_PENDING = 0, 1, 3


class RolloutError(DoorstepError):
    pass


# ------------------------------------------------------------------------------ the bundle


def load_descriptor(source: str, base_url: str | None = None) -> dict[str, Any]:
    """The ``<id>.json`` that ``publish`` wrote, with its tar's URL. ``source`` is that file's
    URL or path, the tar's URL (``.../<id>.tar``), or the bare bundle id with ``base_url``."""
    if re.fullmatch(r"[0-9a-f]{64}", source):
        if not base_url:
            raise RolloutError(
                f"{source[:16]}...: a bundle id needs --base-url (where publish's files are "
                "served) to find <id>.json"
            )
        source = base_url.rstrip("/") + f"/{source}.json"
    elif source.startswith(("http://", "https://")) and source.endswith(".tar"):
        source = source[: -len(".tar")] + ".json"
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as response:
                raw = response.read(1 << 20)
            default_base = source.rsplit("/", 1)[0] + "/"
        else:
            raw = Path(source).read_bytes()
            default_base = None
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise RolloutError(f"{source}: cannot read the bundle descriptor: {exc}") from None
    need = ("id", "name", "version", "size", "sha256", "file")
    if not isinstance(data, dict) or any(k not in data for k in need):
        raise RolloutError(
            f"{source}: not a bundle descriptor (doorstep-host publish writes <id>.json with "
            f"{', '.join(need)})"
        )
    base = base_url or default_base
    url = (base.rstrip("/") + "/" + data["file"]) if base else data.get("url")
    if not url:
        raise RolloutError(
            f"{source}: the descriptor has no url: pass --base-url (where the publish "
            "directory is served)"
        )
    return {**data, "url": url}


def default_rollout_id(descriptor: dict[str, Any]) -> str:
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in descriptor["name"])[:32]
    return f"{name}-{descriptor['version']}-{descriptor['id'][:8]}"[:64]


# ------------------------------------------------------------------------------ the broker


class FleetView:
    """The fleet's retained ``desired`` and ``update`` messages, kept current."""

    def __init__(self, broker: BrokerSettings, prefix: str, device_ids: Sequence[str]) -> None:
        self.broker, self.prefix = broker, prefix
        self.ids = set(device_ids)
        self.desired: dict[str, Desired | None] = {}
        self.reports: dict[str, UpdateReport] = {}
        self.invalid = 0
        self.messages = 0
        self._changed: set[str] = set()
        self.cond = threading.Condition()
        self._synced = threading.Event()
        self._sync_topic = f"{prefix}/_rollout/sync-{os.getpid()}-{time.time_ns()}"
        self.client = broker.client(f"doorstep-rollout-{os.getpid()}-{time.time_ns() % 10**6}")
        host, port, _ = broker.address()
        self._address = (host, port)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a, **k: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)

    def start(self, timeout: float = 30.0) -> None:
        try:
            self.client.connect(*self._address, keepalive=30)
        except OSError as exc:
            raise RolloutError(f"cannot reach the broker {self.broker.url}: {exc}") from None
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise RolloutError(f"the broker {self.broker.url} did not accept the connection")
        # Retained messages come right after each SUBACK; a message of our own published after
        # the subscriptions comes back after them: then the picture is complete.
        self.client.publish(self._sync_topic, b"sync", qos=1)
        if not self._synced.wait(timeout):
            self.stop()
            raise RolloutError(f"the broker {self.broker.url} did not deliver the fleet's state")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, reason: Any, p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            return
        client.subscribe(
            [(f"{self.prefix}/+/desired", 1), (f"{self.prefix}/+/update", 1), (self._sync_topic, 1)]
        )
        self.connected.set()

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._sync_topic:
            self._synced.set()
            return
        parts = msg.topic.split("/")
        if len(parts) < 3 or parts[-2] not in self.ids:
            return
        device, kind = parts[-2], parts[-1]
        with self.cond:
            self.messages += 1
            self._changed.add(device)
            try:
                if kind == "desired":
                    self.desired[device] = (
                        Desired.model_validate_json(msg.payload) if msg.payload else None
                    )
                elif kind == "update" and msg.payload:
                    self.reports[device] = UpdateReport.model_validate_json(msg.payload)
            except ValidationError:
                self.invalid += 1  # a device that lies or a stray publisher: ignored, counted
            self.cond.notify_all()

    def want(self, device_id: str, desired: Desired | None, patience: float = 300.0) -> None:
        """Retain ``desired`` on the device's topic, once the broker has acknowledged it; across
        a broker restart (paho reconnects, the message is sent again) for up to ``patience``."""
        payload = desired.model_dump_json() if desired is not None else b""
        deadline = time.monotonic() + patience
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.connected.wait(left):
                raise RolloutError(
                    f"the broker {self.broker.url} was unreachable for {patience:g} s while "
                    f"writing {device_id}'s desired message; run the same command again later"
                )
            info = self.client.publish(
                f"{self.prefix}/{device_id}/desired", payload, qos=1, retain=True
            )
            try:
                info.wait_for_publish(min(30.0, max(left, 0.1)))
            except (RuntimeError, ValueError):  # not queued: the connection dropped meanwhile
                continue
            if info.is_published():
                break
        with self.cond:
            self.desired[device_id] = desired

    def take_changed(self) -> set[str]:
        """Devices with a message since the last call (call with ``cond`` held, as ``wait``'s
        predicate is)."""
        changed, self._changed = self._changed, set()
        return changed

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


# ------------------------------------------------------------------------------ the journal


def journal_path(rollout_id: str, explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "doorstep" / "rollouts" / f"{rollout_id}.json"


def read_journal(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RolloutError(f"{path}: unreadable rollout journal: {exc}") from None
    return data if isinstance(data, dict) else {}


def write_journal(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the rollout


@dataclass
class Result:
    serving: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)
    stopped: str | None = None

    @property
    def exit_code(self) -> int:
        if self.stopped or self.failed:
            return EXIT_STOPPED
        return EXIT_PENDING if self.pending or self.not_started else EXIT_DONE


def _answered(view: FleetView, device: Device, rollout_id: str, bundle: str) -> str | None:
    r = view.reports.get(device.device_id)
    if r is None:
        return None
    if r.active_id == bundle and r.state == "serving":
        return "serving"
    if r.rollout_id == rollout_id and r.bundle_id == bundle and r.state in TERMINAL:
        return r.state
    return None


def run_rollout(
    view: FleetView,
    devices: Sequence[Device],
    descriptor: dict[str, Any],
    rollout_id: str,
    policy: RolloutPolicy,
    *,
    rate_per_min: float | None = None,
    allow_downgrade: bool = False,
    wave_timeout: float | None = None,
    journal: Path,
    say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    progress: Progress | None = None,
) -> Result:
    """Open the waves one after the other; ``progress`` (``host.fleet.progress``) is told each
    device's phase as its reports come in (downloading with bytes, verifying, ... serving)."""
    bundle = descriptor["id"]
    show = progress or QuietView()
    book = read_journal(journal)
    book.setdefault("rollout_id", rollout_id)
    book.setdefault("bundle", descriptor)
    book.setdefault("before", {})
    result = Result()
    todo = [d for d in devices if _answered(view, d, rollout_id, bundle) != "serving"]
    result.serving = [d.name for d in devices if d not in todo]
    show.start([d.name for d in devices])
    for name in result.serving:
        show.phase(name, "serving", descriptor["version"])
    if result.serving:
        say(f"already serving {descriptor['version']}: {', '.join(result.serving)}")
    waves = plan_rollout(todo, policy)
    by_name = {d.name: d for d in todo}
    timeout = wave_timeout if wave_timeout is not None else policy.health_deadline + 600
    failed_total = 0
    next_at = 0.0
    for number, names in enumerate(waves, 1):
        wave = [by_name[n] for n in names]
        label = "canary" if number == 1 and policy.canary else f"wave {number}"
        say(f"{label}: {', '.join(names)}")
        opening = []
        for d in wave:
            current = view.desired.get(d.device_id)
            if current is not None and current.rollout_id == rollout_id:
                continue  # opened by an earlier run of this rollout
            before = view.reports.get(d.device_id)
            book["before"].setdefault(
                d.device_id,
                {
                    "desired": current.model_dump() if current is not None else None,
                    "active_id": before.active_id if before else None,
                    "active_version": before.active_version if before else None,
                },
            )
            opening.append(d)
        if opening:  # what each device had, on disk before any of the wave is overwritten
            write_journal(journal, book)
        for d in opening:
            if rate_per_min:  # --rate: desired messages per minute, across waves
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at = time.monotonic() + 60.0 / rate_per_min
            show.phase(d.name, "desired sent")
            view.want(
                d.device_id,
                Desired(
                    rollout_id=rollout_id,
                    bundle_id=bundle,
                    url=descriptor["url"],
                    sha256=descriptor["sha256"],
                    size=descriptor["size"],
                    name=descriptor["name"],
                    version=descriptor["version"],
                    health_deadline_s=policy.health_deadline,
                    allow_downgrade=allow_downgrade,
                    issued=round(time.time(), 3),
                ),
            )

        # Only the devices whose messages arrived since the last look are checked again: a
        # wave of N devices costs O(messages), not O(N x messages).
        waiting = {d.device_id: d for d in wave if not _answered(view, d, rollout_id, bundle)}

        def wave_answered(waiting: dict[str, Device] = waiting) -> bool:
            for device_id in view.take_changed():
                d = waiting.get(device_id)
                if d is None:
                    continue
                report = view.reports.get(device_id)
                if report is not None and report.rollout_id == rollout_id:
                    show.phase(d.name, report.state.replace("_", " "), report.reason or "")
                    if report.state == "downloading" and report.size:
                        show.transfer(d.name, report.bytes, report.size)
                if _answered(view, d, rollout_id, bundle):
                    del waiting[device_id]
            return not waiting

        view.wait(wave_answered, timeout)
        for d in wave:
            state = _answered(view, d, rollout_id, bundle)
            if state == "serving":
                result.serving.append(d.name)
                show.phase(d.name, "serving", descriptor["version"])
                if progress is None:
                    say(f"  {d.name}: serving {descriptor['version']}")
            elif state in ("failed", "rolled_back"):
                report = view.reports[d.device_id]
                result.failed[d.name] = f"{state}: {report.reason}"
                failed_total += 1
                show.phase(d.name, state.replace("_", " "), report.reason or "")
                if progress is None:
                    say(f"  {d.name}: {state}: {report.reason}")
            else:
                result.pending.append(d.name)
                show.phase(d.name, "pending", f"no answer within {timeout:g} s (offline?)")
                if progress is None:
                    say(f"  {d.name}: no answer within {timeout:g} s (offline?): pending")
        reason = stop_reason(
            failed_total, number == 1 and policy.canary > 0 and failed_total > 0, policy
        )
        if reason is not None:
            result.stopped = reason
            result.not_started = [n for w in waves[number:] for n in w]
            for name in result.not_started:
                show.phase(name, "not started")
            say(reason)
            break
    book["result"] = {
        "serving": result.serving,
        "failed": result.failed,
        "pending": result.pending,
        "not_started": result.not_started,
        "stopped": result.stopped,
        "time": round(time.time(), 3),
    }
    write_journal(journal, book)
    return result


def abort_rollout(
    view: FleetView,
    devices: Sequence[Device],
    rollout_id: str,
    journal: Path,
    say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> int:
    """Write back each device's desired message from before ``rollout_id``; a device that had
    none is sent back to the bundle it ran before (still in its store: no download)."""
    book = read_journal(journal)
    descriptor = book.get("bundle") or {}
    base = descriptor.get("url", "").rsplit("/", 1)[0] + "/" if descriptor.get("url") else None
    touched = 0
    for d in devices:
        current = view.desired.get(d.device_id)
        if current is None or current.rollout_id != rollout_id:
            continue
        before = (book.get("before") or {}).get(d.device_id) or {}
        back = {
            "rollout_id": f"{rollout_id[:58]}-abort",
            "allow_downgrade": True,  # going back is a downgrade the agent must accept
            "issued": round(time.time(), 3),
        }
        if before.get("desired"):
            view.want(
                d.device_id, Desired.model_validate(before["desired"]).model_copy(update=back)
            )
            say(f"{d.name}: desired back to {before['desired']['version']}")
        elif before.get("active_id") and base:
            ident = before["active_id"]
            view.want(
                d.device_id,
                current.model_copy(
                    update={
                        **back,
                        "bundle_id": ident,
                        "url": f"{base}{ident}.tar",
                        "version": before.get("active_version") or "0",
                    }
                ),
            )
            say(f"{d.name}: back to the bundle it ran before ({ident[:12]})")
        else:
            view.want(d.device_id, None)
            say(
                f"{d.name}: desired cleared; it ran the shipped model before, which pull mode "
                "cannot name: `doorstep-host rollback` (push) switches it back"
            )
        touched += 1
    if not touched:
        say(f"no device holds rollout {rollout_id}: nothing to abort")
    return 0


def status_rows(
    view: FleetView, devices: Sequence[Device], rollout_id: str | None
) -> list[dict[str, Any]]:
    rows = []
    for d in devices:
        desired = view.desired.get(d.device_id)
        report = view.reports.get(d.device_id)
        other = rollout_id and (desired is None or desired.rollout_id != rollout_id)
        mine = None if other else desired
        rows.append(
            {
                "device": d.name,
                "device_id": d.device_id,
                "desired": f"{mine.version} ({mine.rollout_id})" if mine else "-",
                "state": report.state if report else "-",
                "active_version": report.active_version if report else None,
                "reason": report.reason if report else None,
            }
        )
    return rows
