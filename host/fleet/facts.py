"""Facts about a device, read from ``doorstep-device status --json``, and the health verdict.

Pure: these functions turn the JSON a device printed into :class:`DeviceFacts` and decide, from
two snapshots of it, whether a newly activated bundle is healthy. The SSH side that runs the
command lives in ``host.fleet.remote``.

The status document (the device side's contract)::

    {"doorstep_version", "state_dir",
     "active": {"id", "name", "version", "model_sha256"} | null, "previous": ... | null,
     "stored": [ids oldest first], "partials": {id: bytes}, "free_bytes",
     "daemon": {"state": "running"|"stopped"|"unknown", "pid", "systemd", "model_sha256",
                "bundle_id", "self_test": {"ok", "ms", "time", "error"}, "started", "updated",
                "last_reload": {"ok", "error", "time"}?} | null}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from device.errors import DoorstepError
from host.fleet.plan import DaemonFacts, DeviceFacts


class StatusFormatError(DoorstepError):
    """The device printed something that is not the status document this host understands."""


def parse_status(doc: Mapping[str, Any], where: str = "device") -> DeviceFacts:
    """``status --json`` output -> :class:`DeviceFacts`; raise :class:`StatusFormatError`."""
    try:
        active = doc.get("active") or None
        previous = doc.get("previous") or None
        partials = {str(k): int(v) for k, v in (doc.get("partials") or {}).items()}
        return DeviceFacts(
            reachable=True,
            active_sha=str(active["id"]) if active else None,
            active_label=_label(active),
            previous_sha=str(previous["id"]) if previous else None,
            free_bytes=_int(doc.get("free_bytes")),
            doorstep_version=str(doc["doorstep_version"]),
            stored=tuple(str(s) for s in doc.get("stored") or ()),
            partials=partials,
            daemon=parse_daemon(doc.get("daemon")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StatusFormatError(
            f"{where}: `doorstep-device status --json` printed an unexpected document "
            f"({type(exc).__name__}: {exc}): is doorstep on the device the same version as here?"
        ) from None


def parse_daemon(raw: Any) -> DaemonFacts | None:
    if not raw:
        return None
    test = raw.get("self_test") or {}
    reload = raw.get("last_reload") or {}
    state = raw.get("state", "unknown")
    return DaemonFacts(
        state=state if state in ("running", "stopped") else "unknown",
        pid=_int(raw.get("pid")),
        systemd=bool(raw.get("systemd")),
        bundle_id=raw.get("bundle_id"),
        model_sha256=raw.get("model_sha256"),
        self_test_ok=test.get("ok") if test else None,
        self_test_error=test.get("error") if test else None,
        updated=_float(raw.get("updated")),
        last_reload_ok=reload.get("ok") if reload else None,
        last_reload_error=reload.get("error") if reload else None,
        last_reload_time=_float(reload.get("time")) if reload else None,
    )


def _label(ref: Mapping[str, Any] | None) -> str | None:
    if not ref:
        return None
    name, version = ref.get("name"), ref.get("version")
    return f"{name} {version}" if name else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


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
