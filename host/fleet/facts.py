"""Facts about a device, read from ``doorstep-device status --json``, and the health verdict.

Pure: these functions turn what a device answered into :class:`DeviceFacts` and decide, from
two snapshots of its daemon's record, whether a newly activated bundle is healthy. The SSH side
that runs the command lives in ``host.fleet.remote``.

The device's answers are parsed with the device's own models (:mod:`device.record`):
:class:`~device.record.StoreStatus` for ``status --json``, which embeds the daemon's
:class:`~device.record.DaemonRecord` (``<state_dir>/daemon.json``) as ``daemon``. A device is
not trusted: a document that does not validate (wrong types, deep nesting, garbage) is that
device's error, never an exception that stops the other devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from device.errors import DoorstepError
from device.record import DaemonRecord, RecordError, StoreStatus, parse_record
from device.record import parse_status as parse_status_doc
from host.fleet.plan import DaemonFacts, DeviceFacts


class StatusFormatError(DoorstepError):
    """The device printed something that is not the status document this host understands."""


def parse_status(doc: object, where: str = "device") -> DeviceFacts:
    """``status --json`` output (text or parsed JSON) -> :class:`DeviceFacts`; raise
    :class:`StatusFormatError` naming ``where`` for a document that does not validate."""
    try:
        status = parse_status_doc(doc, where)
    except RecordError as exc:
        raise StatusFormatError(
            f"{where}: `doorstep-device status --json` printed an unexpected document "
            f"({str(exc).removeprefix(f'{where}: ')}): is doorstep on the device the same "
            "version as here?"
        ) from None
    return facts_from_status(status)


def facts_from_status(status: StoreStatus) -> DeviceFacts:
    """The planner's facts from a validated status document; a record the device itself found
    invalid (``daemon_error``) becomes daemon facts with ``error`` set."""
    active, previous = status.active, status.previous
    daemon: DaemonFacts | None = None
    if status.daemon is not None:
        daemon = daemon_facts(status.daemon)
    elif status.daemon_error:
        daemon = DaemonFacts(error=status.daemon_error)
    return DeviceFacts(
        reachable=True,
        active_sha=active.id if active else None,
        active_label=f"{active.name} {active.version}" if active and active.name else None,
        previous_sha=previous.id if previous else None,
        free_bytes=status.free_bytes,
        doorstep_version=status.doorstep_version,
        stored=tuple(status.stored),
        partials=dict(status.partials),
        daemon=daemon,
    )


def parse_daemon(raw: object, where: str = "daemon.json") -> DaemonFacts:
    """A daemon record (``daemon.json`` bytes or parsed JSON) -> :class:`DaemonFacts`; a record
    that does not validate gives facts with ``error`` set (state "unknown"), never an error."""
    try:
        return daemon_facts(parse_record(raw, where))
    except RecordError as exc:
        return DaemonFacts(error=str(exc))


def daemon_facts(record: DaemonRecord) -> DaemonFacts:
    """The parts of a validated record the planner and the health gate decide on."""
    test, reload = record.self_test, record.last_reload
    return DaemonFacts(
        state=record.state,
        pid=record.pid,
        systemd=record.systemd,
        bundle_id=record.bundle_id,
        model_sha256=record.model_sha256,
        self_test_ok=test.ok,
        self_test_error=test.error,
        updated=record.updated,
        last_reload_ok=reload.ok if reload else None,
        last_reload_error=reload.error if reload else None,
        last_reload_time=reload.time if reload else None,
    )


# ------------------------------------------------------------------------------------ health


@dataclass(frozen=True)
class Verdict:
    """``ok``: the bundle serves and passed its self-test; ``failed``: it will not; else wait."""

    outcome: Literal["ok", "wait", "failed"]
    reason: str

    @property
    def done(self) -> bool:
        return self.outcome != "wait"


def health_verdict(
    before: DaemonFacts | None, now: DaemonFacts | None, sha: str, model_sha256: str = ""
) -> Verdict:
    """Is bundle ``sha`` live on the device, judged from its daemon's report ``now``?

    ``before`` is the daemon's report from before the switch: a report counts only when the
    daemon wrote it later than that one (device clock against device clock, so the host's clock
    does not matter). Healthy: the daemon runs, serves ``sha`` (and ``model_sha256``), and its
    self-test after the reload passed. A reload the daemon refused (it keeps the old model and
    says why in ``last_reload``) fails at once instead of waiting out the deadline.
    """
    daemon = now
    if daemon is None:
        return Verdict("wait", "the daemon has not reported (no daemon.json)")
    if daemon.error:  # the daemon rewrites its record after the reload: wait for that one
        return Verdict("wait", daemon.error)
    since = _last_written(before)
    if (
        daemon.last_reload_ok is False
        and daemon.last_reload_time is not None
        and (since is None or daemon.last_reload_time > since)
    ):
        keeps = f" and keeps serving {daemon.bundle_id[:12]}…" if daemon.bundle_id else ""
        return Verdict(
            "failed", f"the daemon refused the new model{keeps}: {daemon.last_reload_error}"
        )
    if daemon.state != "running":
        return Verdict("wait", f"the daemon is {daemon.state}")
    fresh = daemon.updated is not None and (since is None or daemon.updated > since)
    if not fresh:
        return Verdict("wait", "waiting for the daemon to reload")
    if not daemon.serves(sha, model_sha256):
        other = daemon.bundle_id or daemon.model_sha256 or "?"
        return Verdict("wait", f"the daemon serves {other[:12]}…, not {sha[:12]}… yet")
    if daemon.self_test_ok is False:
        return Verdict(
            "failed", f"the new model failed its self-test inference: {daemon.self_test_error}"
        )
    if daemon.self_test_ok is None:
        return Verdict("wait", "waiting for the self-test result")
    return Verdict("ok", "serving the new model; self-test passed")


def _last_written(daemon: DaemonFacts | None) -> float | None:
    """When the daemon last wrote its report (a refused reload counts too)."""
    if daemon is None:
        return None
    times = [t for t in (daemon.updated, daemon.last_reload_time) if t is not None]
    return max(times) if times else None
