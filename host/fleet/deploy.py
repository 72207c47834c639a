"""``doorstep-host deploy`` and ``rollback``: a bundle through the fleet, wave by wave.

1. Connect to every selected device (bounded parallelism) and gather its facts.
2. Plan each device (:mod:`host.fleet.plan`); devices with work form the waves, canaries first.
   A dry run stops here and prints the plan: nothing on any device has changed.
3. Run the waves one after the other, the devices of a wave in parallel (``policy.parallel`` at
   once). A failed canary, or more failures than ``max_fail``, stops the rollout: later waves
   are not started. Unreachable or refused devices changed nothing and do not count as failures,
   but they are not on the bundle, so the deploy as a whole does not succeed.

Every device ends with a :class:`~host.fleet.executor.DeviceResult`; :class:`DeployReport`
holds them and renders the summary table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from device.errors import DoorstepError
from host.fleet.executor import DeviceResult, DeviceRun, refusal_result, wait_healthy
from host.fleet.inventory import Device, RolloutPolicy
from host.fleet.plan import (
    BundleInfo,
    DeviceFacts,
    Refusal,
    Step,
    actionable,
    plan_device,
    plan_rollout,
    render_plan,
    stop_reason,
)
from host.fleet.progress import Progress, table
from host.fleet.remote import RemoteDoorstep
from host.fleet.ssh import DeviceError, connect
from host.safe_text import printable

T = TypeVar("T")


@dataclass
class Session:
    """A device, its open connection (None if none could be made) and its facts."""

    device: Device
    remote: RemoteDoorstep | None
    facts: DeviceFacts

    async def close(self) -> None:
        if self.remote is not None:
            remote, self.remote = self.remote, None
            await remote.conn.close()


async def open_session(device: Device, progress: Progress) -> Session:
    """Connect (host key checked) and gather facts; failures become facts, never exceptions."""
    progress.phase(device.name, "connecting")
    try:
        conn = await connect(device, connect_timeout=device.connect_timeout)
    except DeviceError as exc:
        return Session(device, None, DeviceFacts(reachable=False, error=exc.reason))
    remote = RemoteDoorstep(conn, device)
    progress.phase(device.name, "gathering facts")
    try:
        facts = await remote.facts()
    except DeviceError as exc:
        facts = DeviceFacts(reachable=True, error=f"`status` failed: {exc.reason}")
    except DoorstepError as exc:
        facts = DeviceFacts(reachable=True, error=str(exc))
    return Session(device, remote, facts)


async def gather_all(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all at once; if one raises (Ctrl-C, a bug), cancel the others and raise that error."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
    return [t.result() for t in tasks]


async def open_sessions(
    devices: Sequence[Device], limit: int, progress: Progress
) -> dict[str, Session]:
    gate = asyncio.Semaphore(limit)
    opened: list[Session] = []

    async def one(device: Device) -> Session:
        async with gate:
            session = await open_session(device, progress)
            opened.append(session)
            return session

    try:
        sessions = await gather_all(one(d) for d in devices)
    except BaseException:
        await close_sessions({str(i): s for i, s in enumerate(opened)})
        raise
    return {s.device.name: s for s in sessions}


async def close_sessions(sessions: dict[str, Session]) -> None:
    await asyncio.gather(*(s.close() for s in sessions.values()), return_exceptions=True)


# ------------------------------------------------------------------------------------ deploy


@dataclass
class DeployReport:
    """The plan and, unless it was a dry run, how every device ended."""

    bundle: BundleInfo
    policy: RolloutPolicy
    devices: list[Device]
    plans: dict[str, list[Step]]
    waves: list[list[str]]
    results: dict[str, DeviceResult] = field(default_factory=dict)
    stopped: str | None = None
    dry_run: bool = False

    @property
    def on_bundle(self) -> list[str]:
        return [n for n, r in self.results.items() if r.on_bundle(self.bundle.sha)]

    @property
    def ok(self) -> bool:
        """Every selected device ended on the bundle (a dry run: none was refused)."""
        if self.dry_run:
            return not any(p and isinstance(p[0], Refusal) for p in self.plans.values())
        return len(self.on_bundle) == len(self.devices)

    def plan_text(self) -> str:
        return render_plan(
            self.bundle, self.waves, self.plans, self.devices, self.policy, dry_run=self.dry_run
        )

    def summary(self) -> str:
        rows = []
        for device in self.devices:
            r = self.results[device.name]
            if r.active == self.bundle.sha:
                active = f"{self.bundle.version} (this bundle)"
            else:
                active = f"{r.active[:12]}…" if r.active else "-"
            rows.append([device.name, r.outcome, active, f"{r.seconds:.1f} s", r.detail])
        text = table(["DEVICE", "RESULT", "ACTIVE", "TIME", "DETAIL"], rows)
        tail = (
            f"{len(self.on_bundle)} of {len(self.devices)} device(s) on {self.bundle.label} "
            f"(id {self.bundle.sha[:12]}…)"
        )
        if self.stopped:
            tail += f"; {self.stopped}"
        return printable(f"{text}\n\n{tail}")  # the bundle's label is the bundle's own text

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": {
                "id": self.bundle.sha,
                "name": self.bundle.name,
                "version": self.bundle.version,
                "tar": str(self.bundle.path),
                "tar_sha256": self.bundle.tar_sha256,
                "signed_by": self.bundle.signed_by,
            },
            "dry_run": self.dry_run,
            "waves": self.waves,
            "plans": {n: [s.describe() for s in steps] for n, steps in self.plans.items()},
            "devices": [self.results[d.name].to_json() for d in self.devices if self.results],
            "stopped": self.stopped,
            "ok": self.ok,
        }


async def deploy(
    devices: Sequence[Device],
    bundle: BundleInfo,
    policy: RolloutPolicy,
    progress: Progress,
    *,
    dry_run: bool = False,
) -> DeployReport:
    """Bring ``devices`` onto ``bundle`` (see the module docstring); never raises per device."""
    progress.start([d.name for d in devices])
    sessions = await open_sessions(devices, policy.parallel, progress)
    try:
        plans = {d.name: plan_device(sessions[d.name].facts, bundle, policy, d) for d in devices}
        work = [d for d in devices if actionable(plans[d.name])]
        waves = plan_rollout(work, policy)
        report = DeployReport(bundle, policy, list(devices), plans, waves, dry_run=dry_run)
        if dry_run:
            for d in devices:
                progress.phase(d.name, "planned", f"{len(plans[d.name])} step(s)")
            return report
        for d in devices:
            if not actionable(plans[d.name]):
                result = refusal_result(d.name, plans[d.name], sessions[d.name].facts)
                report.results[d.name] = result
                progress.phase(d.name, result.outcome, result.detail)
        for number, wave in enumerate(waves, 1):
            for name in wave:
                progress.phase(name, "queued", f"wave {number}, {len(plans[name])} steps")
        await _run_waves(report, sessions, progress)
        return report
    finally:
        progress.close()
        await close_sessions(sessions)


async def _run_waves(
    report: DeployReport, sessions: dict[str, Session], progress: Progress
) -> None:
    policy, failed = report.policy, 0
    gate = asyncio.Semaphore(policy.parallel)

    async def one(name: str) -> DeviceResult:
        session = sessions[name]
        assert session.remote is not None  # actionable devices have a connection
        async with gate:
            run = DeviceRun(session.remote, report.bundle, policy, session.facts, progress)
            return await run.run(report.plans[name])

    for number, wave in enumerate(report.waves, 1):
        if report.stopped:
            for name in wave:
                report.results[name] = DeviceResult(
                    name, "not started", report.stopped, active=sessions[name].facts.active_sha
                )
                progress.phase(name, "not started")
            continue
        canary = number == 1 and policy.canary > 0
        progress.note(f"wave {number}{' (canary)' if canary else ''}: {', '.join(wave)}")
        results = await gather_all(one(name) for name in wave)
        for result in results:
            report.results[result.name] = result
        wave_failed = sum(r.failed for r in results)
        failed += wave_failed
        report.stopped = stop_reason(failed, canary and wave_failed > 0, policy)
        if report.stopped:
            progress.note(report.stopped)


# ------------------------------------------------------------------------------------ rollback


async def rollback(
    devices: Sequence[Device], policy: RolloutPolicy, progress: Progress
) -> list[DeviceResult]:
    """Switch each device back to its previous bundle and wait until its daemon serves it."""
    progress.start([d.name for d in devices])
    sessions = await open_sessions(devices, policy.parallel, progress)
    gate = asyncio.Semaphore(policy.parallel)

    async def one(session: Session) -> DeviceResult:
        name, facts = session.device.name, session.facts
        if session.remote is None or not facts.reachable:
            return DeviceResult(name, "unreachable", facts.error, active=facts.active_sha)
        if facts.doorstep_version is None:
            return DeviceResult(name, "refused", facts.error, active=facts.active_sha)
        if facts.previous_sha is None:
            return DeviceResult(
                name, "refused", "no previous model to roll back to", active=facts.active_sha
            )
        async with gate:
            return await _rollback_one(session.remote, facts, policy, progress)

    try:
        results = await gather_all(one(sessions[d.name]) for d in devices)
        for r in results:
            progress.phase(r.name, r.outcome, r.detail)
        return list(results)
    finally:
        progress.close()
        await close_sessions(sessions)


async def _rollback_one(
    remote: RemoteDoorstep, facts: DeviceFacts, policy: RolloutPolicy, progress: Progress
) -> DeviceResult:
    name, target = remote.name, facts.previous_sha
    assert target is not None
    t0 = time.monotonic()
    progress.phase(name, "rolling back", f"to {target[:12]}…")
    try:
        out = await remote.rollback(remote.device.reload)
    except DeviceError as exc:
        return DeviceResult(name, "failed", exc.reason, active=facts.active_sha)
    result = DeviceResult(name, "rolled back", active=target)
    if out.get("reloaded") == "none":
        result.detail = "switched; no daemon running: it loads this model when it starts"
    else:
        verdict = await wait_healthy(
            remote,
            target,
            "",
            facts.daemon,
            policy.health_deadline,
            policy.health_interval,
            lambda why: progress.phase(name, "health check", why),
        )
        if verdict.outcome == "ok":
            result.detail = f"serving {target[:12]}… again; self-test passed"
        else:
            result.outcome = "failed"
            result.detail = f"switched back to {target[:12]}…, but {verdict.reason}"
    result.seconds = time.monotonic() - t0
    return result


def rollback_summary(results: Sequence[DeviceResult]) -> str:
    rows = [
        [
            r.name,
            r.outcome,
            f"{r.active[:12]}…" if r.active else "-",
            f"{r.seconds:.1f} s",
            r.detail,
        ]
        for r in results
    ]
    ok = sum(r.outcome == "rolled back" for r in results)
    text = table(["DEVICE", "RESULT", "ACTIVE", "TIME", "DETAIL"], rows)
    return printable(f"{text}\n\n{ok} of {len(results)} device(s) rolled back")
