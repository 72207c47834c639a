"""Deploy planning, pyinfra-style: facts about a device in, a list of typed steps out.

Everything here is pure: no network, no files (except :meth:`BundleInfo.from_tar`, which reads
the bundle being deployed). A connector gathers :class:`DeviceFacts` (``host.fleet.facts``),
asks :func:`plan_device` for the steps and runs them (``host.fleet.executor``);
``deploy --dry-run`` prints :func:`render_plan` instead.

The device's state directory (see :class:`Layout`)::

    <state_dir>/models/<bundle id>/            installed bundles, content-addressed
    <state_dir>/models/<bundle id>.tar.part    an upload in progress (resumable)
    <state_dir>/current -> models/<bundle id>  the active bundle (switched by rename)
    <state_dir>/previous -> models/<bundle id> what ``current`` was before; the rollback target
    <state_dir>/daemon.json                    what the running daemon serves (its health)

The bundle id is sha256 of the bundle's ``manifest.json`` bytes (:func:`bundle_id`): the
manifest pins every file's sha256, so one digest names the whole bundle, and signing it
(``manifest.sig`` beside the manifest) does not change it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from device.bundle.signing import bundle_id, read_signature
from device.errors import BundleError
from host.fleet.inventory import DEFAULT_STATE_DIR, Device, RolloutPolicy
from host.fleet.steps import (
    Activate,
    BadDaemonRecord,
    DaemonDown,
    HealthCheck,
    Install,
    InsufficientSpace,
    NotInstalled,
    Prune,
    Refusal,
    Reload,
    Skip,
    Step,
    Unreachable,
    Upload,
    VerifyUpload,
    actionable,
    human_size,
)
from host.safe_text import printable

__all__ = [
    "Activate",
    "BadDaemonRecord",
    "BundleInfo",
    "DaemonDown",
    "DaemonFacts",
    "DeviceFacts",
    "HealthCheck",
    "Install",
    "InsufficientSpace",
    "Layout",
    "NotInstalled",
    "Prune",
    "Refusal",
    "Reload",
    "Skip",
    "Step",
    "Unreachable",
    "Upload",
    "VerifyUpload",
    "actionable",
    "bundle_id",
    "plan_device",
    "plan_fleet",
    "plan_rollout",
    "render_plan",
    "stop_reason",
]

DaemonState = Literal["running", "stopped", "unknown"]


@dataclass(frozen=True)
class Layout:
    """Where things live in a device's state directory."""

    state_dir: PurePosixPath = DEFAULT_STATE_DIR

    @property
    def models(self) -> PurePosixPath:
        return self.state_dir / "models"

    @property
    def current(self) -> PurePosixPath:
        return self.state_dir / "current"

    @property
    def previous(self) -> PurePosixPath:
        return self.state_dir / "previous"

    def model_dir(self, sha: str) -> PurePosixPath:
        return self.models / sha

    def upload_target(self, sha: str) -> PurePosixPath:
        """What the connector is asked to upload to (it writes ``<this>.part``)."""
        return self.models / f"{sha}.tar"

    def part_file(self, sha: str) -> PurePosixPath:
        return self.models / f"{sha}.tar.part"

    @property
    def daemon_record(self) -> PurePosixPath:
        return self.state_dir / "daemon.json"


@dataclass(frozen=True)
class BundleInfo:
    """The bundle being deployed: its id, its tar (what is uploaded) and what to call it."""

    sha: str
    size: int
    name: str
    version: str
    path: Path
    tar_sha256: str = ""
    signed_by: str | None = None
    model_sha256: str = ""
    """sha256 of its model file: what the daemon reports once it serves this bundle"""

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @classmethod
    def from_tar(cls, tar: str | Path) -> BundleInfo:
        """Describe a bundle ``.tar`` after verifying every file in it (never ship a bad one)."""
        from device.bundle.store import load_bundle

        path = Path(tar)
        if not path.is_file():
            raise BundleError(f"{path}: deploy uploads a bundle .tar; pack the directory first")
        bundle = load_bundle(path)
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        sig = read_signature(path)
        manifest = bundle.manifest
        model = manifest.files.get(manifest.model_file)
        return cls(
            sha=bundle_id(path),
            size=path.stat().st_size,
            name=manifest.name,
            version=manifest.version,
            path=path,
            tar_sha256=digest.hexdigest(),
            signed_by=sig.key_id if sig else None,
            model_sha256=model.sha256 if model is not None else "",
        )


@dataclass(frozen=True)
class DaemonFacts:
    """What the device's running daemon last reported about itself (its ``daemon.json``)."""

    state: DaemonState = "unknown"
    pid: int | None = None
    systemd: bool = False
    bundle_id: str | None = None
    model_sha256: str | None = None
    self_test_ok: bool | None = None
    self_test_error: str | None = None
    updated: float | None = None
    """Unix time (device clock) the daemon wrote this: at start and after every reload"""
    last_reload_ok: bool | None = None
    last_reload_error: str | None = None
    last_reload_time: float | None = None
    error: str | None = None
    """set when the record exists but is invalid (``daemon.json: invalid record: ...``)"""

    def serves(self, sha: str, model_sha256: str = "") -> bool:
        """True when it serves bundle ``sha`` (by model sha when it does not report bundle ids)."""
        if self.bundle_id is not None:
            return self.bundle_id == sha
        return bool(model_sha256) and self.model_sha256 == model_sha256


@dataclass(frozen=True)
class DeviceFacts:
    """What a connector found on one device (the only input the planner trusts).

    ``stored`` lists the complete bundles in ``models/`` oldest first (by install time);
    ``partials`` maps a bundle id to the bytes of its ``.tar.part`` upload.
    """

    reachable: bool = True
    error: str = ""
    active_sha: str | None = None
    active_label: str | None = None
    previous_sha: str | None = None
    free_bytes: int | None = None
    """None when the device could not say (the space check is then left to the device)"""
    doorstep_version: str | None = None
    stored: tuple[str, ...] = ()
    partials: Mapping[str, int] = field(default_factory=dict)
    daemon: DaemonFacts | None = None

    @property
    def daemon_state(self) -> DaemonState:
        return self.daemon.state if self.daemon is not None else "unknown"


# ------------------------------------------------------------------------------------ planning


def plan_device(
    facts: DeviceFacts, bundle: BundleInfo, policy: RolloutPolicy, device: Device | None = None
) -> list[Step]:
    """The steps that bring one device onto ``bundle``, or a single refusal or skip.

    Already active and served by a healthy daemon: skip. Active but not (yet) served: an earlier
    run was cut off before its health check, so reload and check. A bundle already in the store
    is activated without uploading; an interrupted upload resumes where it stopped. Space needed
    is the rest of the upload plus room to unpack it (about 2 x the tar). A device whose daemon
    is not running, or whose record is invalid, is refused: nothing could confirm the new model
    works. Pruning comes last, after the health check: ``keep_models`` in all, never the new
    current or the previous.
    ``device`` supplies the state directory and the reload method (defaults if None).
    """
    device = device or Device(name="device", host="localhost", device_id="device")
    layout = Layout(device.state_dir)
    if not facts.reachable:
        return [Unreachable(facts.error or "no connection")]
    if facts.doorstep_version is None:
        return [NotInstalled(" ".join(device.doorstep_argv()), facts.error)]
    daemon = facts.daemon
    if daemon is not None and daemon.error:
        return [BadDaemonRecord(daemon.error)]
    if daemon is None or daemon.state != "running":
        return [DaemonDown(daemon.state if daemon is not None else "no daemon.json")]
    health = HealthCheck(bundle.sha, policy.health_deadline, rollback_to=facts.active_sha)
    if facts.active_sha == bundle.sha:
        if daemon.serves(bundle.sha, bundle.model_sha256) and daemon.self_test_ok:
            return [Skip(f"{bundle.label} is already active")]
        # Activated by an interrupted run but never confirmed healthy: finish that run.
        return [
            Reload(layout.model_dir(bundle.sha), device.reload),
            HealthCheck(bundle.sha, policy.health_deadline, facts.previous_sha),
        ]

    steps: list[Step] = []
    if bundle.sha not in facts.stored:
        part = layout.part_file(bundle.sha)
        have = facts.partials.get(bundle.sha, 0)
        if have > bundle.size:  # not a prefix of this tar: start again
            have = 0
        needed = (bundle.size - have) + bundle.size
        if facts.free_bytes is not None and facts.free_bytes < needed:
            return [InsufficientSpace(needed, facts.free_bytes, layout.state_dir)]
        if have < bundle.size:
            steps.append(Upload(bundle.path, part, bundle.size, resume_from=have))
        steps += [
            VerifyUpload(part, bundle.size, bundle.tar_sha256),
            Install(part, layout.model_dir(bundle.sha), bundle.sha, bundle.tar_sha256),
        ]
    steps += [
        Activate(bundle.sha, layout.model_dir(bundle.sha), facts.active_sha, device.reload),
        health,
    ]
    prune = _prune(facts, bundle.sha, policy.keep_models)
    if prune is not None:
        steps.append(prune)
    return steps


def _prune(facts: DeviceFacts, new: str, keep: int) -> Prune | None:
    """What ``doorstep-device prune --keep K`` will delete once ``new`` is current.

    As the device does it: the oldest bundles beyond ``keep`` in all, never the current one
    (``new``) nor the previous one (today's active), plus uploads unfinished for over a day
    (which of the other ``.tar.part`` files that is, only the device knows by their age).
    """
    order = [s for s in facts.stored if s != new] + [new]  # oldest first, the new one newest
    protected = {new} | ({facts.active_sha} if facts.active_sha else set())
    removable = [s for s in order if s not in protected]
    drop = tuple(removable[: max(0, len(order) - keep)])
    other_parts = tuple(sorted(s for s in facts.partials if s != new))
    return Prune(keep, drop, other_parts) if drop or other_parts else None


def plan_fleet(
    devices: Sequence[Device],
    facts: Mapping[str, DeviceFacts],
    bundle: BundleInfo,
    policy: RolloutPolicy,
) -> dict[str, list[Step]]:
    """:func:`plan_device` for each device (a device without facts counts as unreachable)."""
    missing = DeviceFacts(reachable=False, error="no facts gathered")
    return {d.name: plan_device(facts.get(d.name, missing), bundle, policy, d) for d in devices}


def plan_rollout(devices: Sequence[Device], policy: RolloutPolicy) -> list[list[str]]:
    """Waves of device names: one canary wave, then batches, in a deterministic order.

    Give it the devices that have work to do (see :func:`actionable`): a canary must be a
    device that really takes the bundle. Canaries are the first ``canary`` devices, taking
    members of ``canary_group`` first; the rest keep file order. A percentage batch is a share
    of the devices given (rounded down, at least 1), as Ansible's ``serial`` does.
    """
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ValueError("device names must be unique")
    group = policy.canary_group
    preferred = [d.name for d in devices if group is not None and group in d.groups]
    ordered = preferred + [n for n in names if n not in preferred]
    waves: list[list[str]] = []
    canaries = ordered[: policy.canary]
    if canaries:
        waves.append(canaries)
    rest = [n for n in names if n not in canaries]
    size = policy.batch_size(len(names))
    waves += [rest[i : i + size] for i in range(0, len(rest), size)]
    return waves


def stop_reason(failed: int, canary_failed: bool, policy: RolloutPolicy) -> str | None:
    """Why no further wave may start, or None to go on."""
    if canary_failed:
        return "a canary device failed: rollout stopped before the other devices"
    if failed > policy.max_fail:
        return f"{failed} device(s) failed, more than max_fail={policy.max_fail}: rollout stopped"
    return None


# ------------------------------------------------------------------------------------ dry run


def render_plan(
    bundle: BundleInfo,
    waves: Sequence[Sequence[str]],
    plans: Mapping[str, Sequence[Step]],
    devices: Sequence[Device] = (),
    policy: RolloutPolicy | None = None,
    *,
    dry_run: bool = True,
) -> str:
    """The plan as text: the bundle, the waves, then each device's numbered steps.

    Devices in ``plans`` but in no wave (skipped or refused) follow the waves, in order.
    """
    where = {d.name: d.address for d in devices}
    signed = (
        f"signed by key {bundle.signed_by}"
        if bundle.signed_by
        else "UNSIGNED (devices that trust a signing key will refuse it)"
    )
    lines = [
        f"bundle {bundle.label}  id {bundle.sha[:16]}…  {human_size(bundle.size)}  {signed}",
        f"  {bundle.path}",
    ]
    if policy is not None:
        lines.append(
            f"rollout: canary {policy.canary}, batch {policy.batch}, max_fail {policy.max_fail}, "
            f"health deadline {policy.health_deadline:g} s, keep {policy.keep_models} models, "
            f"{policy.parallel} at once"
        )
    lines.append("")
    canary = policy.canary if policy is not None else None
    for i, wave in enumerate(waves, 1):
        label = " (canary)" if i == 1 and canary and len(wave) <= canary else ""
        lines.append(f"wave {i}{label}: {', '.join(wave)}")
    if not waves:
        lines.append("no device needs a change")
    in_waves = [n for wave in waves for n in wave]
    order = in_waves + [n for n in plans if n not in in_waves]
    counts = {"change": 0, "skip": 0, "refused": 0}
    for name in order:
        steps = plans.get(name, [])
        address = f"  ({where[name]})" if name in where else ""
        lines += ["", f"{name}{address}"]
        if steps and isinstance(steps[0], Refusal):
            counts["refused"] += 1
            lines.append(f"  REFUSED {steps[0].describe()}")
            continue
        if steps and isinstance(steps[0], Skip):
            counts["skip"] += 1
            lines.append(f"  {steps[0].describe()}")
            continue
        counts["change"] += 1
        lines += [f"  {n}. {step.describe()}" for n, step in enumerate(steps, 1)]
    tail = " (dry run: nothing was changed)" if dry_run else ""
    lines += [
        "",
        f"{counts['change']} to change, {counts['skip']} already on the bundle, "
        f"{counts['refused']} refused{tail}",
    ]
    return printable("\n".join(lines))  # names, labels and reasons came from devices and bundles
