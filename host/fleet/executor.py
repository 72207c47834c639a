"""Run one device's planned steps over SSH: upload, verify, install, activate, health gate.

The steps come from :func:`host.fleet.plan.plan_device`; this module only carries them out and
says what happened in a :class:`DeviceResult`. Each step is safe to repeat, so a failed or
interrupted run is finished by running the deploy again: the upload resumes, an installed bundle
is not installed twice, a bundle already active is skipped.

The health gate: after ``activate`` the device's ``status`` is polled until its daemon reports
the new bundle, with a passing self-test, in a report written after the switch. If that does not
happen within the deadline (or the daemon says it refused the model), the device is rolled back
to its previous bundle and the result says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from device.errors import DoorstepError
from host.fleet.facts import Verdict, health_verdict
from host.fleet.inventory import RolloutPolicy
from host.fleet.plan import (
    Activate,
    BundleInfo,
    DaemonFacts,
    DeviceFacts,
    HealthCheck,
    Install,
    Layout,
    Prune,
    Refusal,
    Reload,
    Skip,
    Step,
    Unreachable,
    Upload,
    VerifyUpload,
)
from host.fleet.progress import Progress
from host.fleet.remote import RemoteDoorstep
from host.fleet.ssh import DeviceError

Outcome = Literal[
    "deployed", "skipped", "rolled back", "failed", "refused", "unreachable", "not started"
]


@dataclass
class DeviceResult:
    """How one device ended."""

    name: str
    outcome: Outcome
    detail: str = ""
    active: str | None = None
    """the bundle id active on the device at the end, as far as is known"""
    seconds: float = 0.0
    uploaded: int = 0
    resumed_from: int = 0
    steps: list[str] = field(default_factory=list)

    def on_bundle(self, sha: str) -> bool:
        return self.outcome in ("deployed", "skipped") and self.active == sha

    @property
    def failed(self) -> bool:
        """Counts against ``max_fail`` (a refusal changed nothing, so it does not)."""
        return self.outcome in ("failed", "rolled back")

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "outcome": self.outcome,
            "detail": self.detail,
            "active": self.active,
            "seconds": round(self.seconds, 2),
            "uploaded_bytes": self.uploaded,
            "resumed_from": self.resumed_from,
            "steps": self.steps,
        }


class StepFailedError(Exception):
    """A step found the device unfit to go on (the reason is the message)."""


def refusal_result(name: str, steps: Sequence[Step], facts: DeviceFacts) -> DeviceResult:
    """The result of a device that needs nothing (skip) or cannot take the bundle (refusal)."""
    first = steps[0]
    if isinstance(first, Skip):
        return DeviceResult(name, "skipped", first.reason, active=facts.active_sha)
    outcome: Outcome = "unreachable" if isinstance(first, Unreachable) else "refused"
    return DeviceResult(name, outcome, first.describe(), active=facts.active_sha)


class DeviceRun:
    """Carries out one device's steps and reports each phase to ``progress``."""

    def __init__(
        self,
        remote: RemoteDoorstep,
        bundle: BundleInfo,
        policy: RolloutPolicy,
        facts: DeviceFacts,
        progress: Progress,
    ) -> None:
        self.remote = remote
        self.bundle = bundle
        self.policy = policy
        self.facts = facts
        self.progress = progress
        self.layout = Layout(remote.device.state_dir)
        self.result = DeviceResult(remote.name, "failed", active=facts.active_sha)
        self.switched = False

    @property
    def name(self) -> str:
        return self.remote.name

    def _phase(self, phase: str, detail: str = "") -> None:
        self.progress.phase(self.name, phase, detail)

    async def run(self, steps: Sequence[Step]) -> DeviceResult:
        """Every step in order; never raises a :class:`DeviceError` (it goes in the result)."""
        t0 = time.monotonic()
        if steps and isinstance(steps[0], Skip | Refusal):
            result = refusal_result(self.name, steps, self.facts)
            self._phase(result.outcome, result.detail)
            return result
        try:
            for step in steps:
                await self._step(step)
                self.result.steps.append(step.kind)
            self.result.outcome, self.result.active = "deployed", self.bundle.sha
            self.result.detail = self.result.detail or "serving the new model; self-test passed"
        except (DeviceError, StepFailedError) as exc:
            reason = exc.reason if isinstance(exc, DeviceError) else str(exc)
            if self.switched:  # the health gate did not finish: the state is uncertain
                reason += "; the bundle was activated but not confirmed: deploy again to finish"
            if self.result.outcome != "rolled back":
                self.result.outcome, self.result.detail = "failed", reason
        self.result.seconds = time.monotonic() - t0
        self._phase(self.result.outcome, self.result.detail)
        return self.result

    async def _step(self, step: Step) -> None:
        if isinstance(step, Upload):
            await self._upload(step)
        elif isinstance(step, VerifyUpload):
            await self._verify(step)
        elif isinstance(step, Install):
            self._phase("installing")
            await self.remote.install(step.archive, step.sha, step.tar_sha256)
        elif isinstance(step, Activate):
            self._phase("activating")
            try:
                out = await self.remote.activate(step.path, step.reload)
            except DeviceError as exc:
                await self._undo_switch(step.sha, exc)
                raise
            self.switched = True
            self.result.active = step.sha
            self._check_reloaded(out)
        elif isinstance(step, Reload):
            self._phase("reloading")
            out = await self.remote.activate(step.path, step.method)
            self.switched = True
            self._check_reloaded(out)
        elif isinstance(step, HealthCheck):
            await self._health(step)
        elif isinstance(step, Prune):
            await self._prune(step)
        else:  # pragma: no cover - a step kind added to the planner but not here
            raise StepFailedError(f"no executor for step {step.kind}")

    async def _upload(self, step: Upload) -> None:
        self._phase("uploading")
        target = str(self.layout.upload_target(self.bundle.sha))

        def progress(done: int, total: int) -> None:
            self.progress.transfer(self.name, done, total)

        up = await self.remote.conn.upload(step.source, target, progress=progress)
        self.result.uploaded = up.size - up.resumed_from
        self.result.resumed_from = up.resumed_from
        if up.resumed_from:
            self.result.detail = f"upload resumed at {up.resumed_from} bytes"

    async def _verify(self, step: VerifyUpload) -> None:
        self._phase("verifying", "size and sha256 on the device")
        size = await self.remote.file_size(step.path)
        if size != step.size:
            raise StepFailedError(
                f"upload incomplete: {step.path} holds {size} of {step.size} bytes; deploy again "
                "to resume it"
            )
        digest = await self.remote.conn.sha256(str(step.path))
        if digest != step.sha256:
            await self.remote.remove(step.path)
            raise StepFailedError(
                f"corrupted upload refused: sha256 on the device is {digest[:12]}…, the bundle's "
                f"is {step.sha256[:12]}…; removed {step.path.name}, deploy again to upload it afresh"
            )

    async def _undo_switch(self, sha: str, exc: DeviceError) -> None:
        """``activate`` failed after switching ``current`` (the reload failed): switch back.

        The daemon never left the old model, so the links are put back without a reload;
        otherwise the next restart of the daemon would load a model nobody checked.
        """
        try:
            if (await self.remote.facts()).active_sha != sha:
                return  # refused before the switch: nothing to undo
            await self.remote.rollback("none")
        except DoorstepError as again:  # a DeviceError, or an answer that does not validate
            why = again.reason if isinstance(again, DeviceError) else str(again)
            raise StepFailedError(
                f"{exc.reason}; `current` was switched and could not be switched back: {why}"
            ) from None
        raise StepFailedError(
            f"{exc.reason}; the switch was undone (the daemon kept serving the old model)"
        ) from None

    def _check_reloaded(self, out: dict[str, Any]) -> None:
        if out.get("reloaded") == "none":
            raise StepFailedError(
                "activated, but no daemon was reloaded (none is running): start doorstep-device "
                "on the device and deploy again"
            )

    async def _health(self, step: HealthCheck) -> None:
        before = self.facts.daemon
        self._phase("health check", "waiting for the daemon to reload")
        verdict = await self._wait_for(step.sha, self.bundle.model_sha256, before, step.deadline)
        if verdict.outcome == "ok":
            self.switched = False
            return
        why = verdict.reason
        if verdict.outcome == "wait":
            why = f"not healthy within {step.deadline:g} s ({verdict.reason})"
        await self._rollback(why, step.rollback_to)

    async def _wait_for(
        self, sha: str, model_sha: str, before: DaemonFacts | None, deadline: float
    ) -> Verdict:
        return await wait_healthy(
            self.remote,
            sha,
            model_sha,
            before,
            deadline,
            self.policy.health_interval,
            lambda reason: self._phase("health check", reason),
        )

    async def _rollback(self, why: str, rollback_to: str | None) -> None:
        self._phase("rolling back", why)
        before = await self.remote.daemon()
        try:
            await self.remote.rollback(self.remote.device.reload)
        except DeviceError as exc:
            raise StepFailedError(f"{why}; rolling back failed too: {exc.reason}") from None
        self.switched = False
        self.result.outcome, self.result.active = "rolled back", rollback_to
        back = f"{rollback_to[:12]}…" if rollback_to else "the previous model"
        if rollback_to is None:
            self.result.detail = f"{why}; rolled back"
            raise StepFailedError(self.result.detail)
        verdict = await self._wait_for(rollback_to, "", before, self.policy.health_deadline)
        serving = (
            f"{back} serving again"
            if verdict.outcome == "ok"
            else f"{back} activated but not confirmed ({verdict.reason})"
        )
        self.result.detail = f"{why}; rolled back: {serving}"
        raise StepFailedError(self.result.detail)

    async def _prune(self, step: Prune) -> None:
        self._phase("pruning")
        try:
            await self.remote.prune(step.keep)
        except DeviceError as exc:  # the deploy succeeded; an old model left behind is no failure
            self.result.detail = f"deployed, but pruning old models failed: {exc.reason}"


async def wait_healthy(
    remote: RemoteDoorstep,
    sha: str,
    model_sha: str,
    before: DaemonFacts | None,
    deadline: float,
    interval: float,
    on_wait: Callable[[str], None] | None = None,
) -> Verdict:
    """Poll the daemon's record until :func:`health_verdict` decides, or ``deadline`` passes."""
    end = time.monotonic() + deadline
    while True:
        verdict = health_verdict(before, await remote.daemon(), sha, model_sha)
        if verdict.done or time.monotonic() >= end:
            return verdict
        if on_wait is not None:
            on_wait(verdict.reason)
        await asyncio.sleep(min(interval, max(end - time.monotonic(), 0.0)))
