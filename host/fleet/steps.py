"""The steps a deploy plan is made of: what to do on one device, and how a dry run says it.

Plain frozen dataclasses (pure data): :mod:`host.fleet.plan` makes them from facts,
:mod:`host.fleet.executor` carries them out. A :class:`Refusal` or a :class:`Skip` is the whole
plan of a device that cannot or need not change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from host.fleet.inventory import ReloadMethod


@dataclass(frozen=True)
class Step:
    """One thing to do on a device; ``describe`` is its line in a dry run."""

    @property
    def kind(self) -> str:
        name = type(self).__name__
        return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Refusal(Step):
    """The device cannot take the bundle; nothing is changed on it."""


@dataclass(frozen=True)
class Unreachable(Refusal):
    reason: str

    def describe(self) -> str:
        return f"cannot connect: {self.reason}"


@dataclass(frozen=True)
class NotInstalled(Refusal):
    command: str
    detail: str = ""

    def describe(self) -> str:
        if self.detail:
            return f"`{self.command}` on the device cannot deploy: {self.detail}"
        return f"`{self.command}` not found on the device: install doorstep[device] there first"


@dataclass(frozen=True)
class DaemonDown(Refusal):
    state: str

    def describe(self) -> str:
        return (
            f"the doorstep daemon is not running ({self.state}), so a new model could not be "
            "health-checked: start it (systemctl start doorstep-device) and deploy again"
        )


@dataclass(frozen=True)
class BadDaemonRecord(Refusal):
    reason: str

    def describe(self) -> str:
        return (
            f"the doorstep daemon's record cannot be read ({self.reason}), so a new model could "
            "not be health-checked: restart the daemon (systemctl restart doorstep-device; it "
            "rewrites the record) and deploy again"
        )


@dataclass(frozen=True)
class InsufficientSpace(Refusal):
    needed: int
    free: int
    where: PurePosixPath

    def describe(self) -> str:
        return (
            f"not enough space in {self.where}: needs {human_size(self.needed)}, "
            f"{human_size(self.free)} free; free some space or lower rollout.keep_models"
        )


@dataclass(frozen=True)
class Skip(Step):
    reason: str

    def describe(self) -> str:
        return f"skip: {self.reason}"


@dataclass(frozen=True)
class Upload(Step):
    source: Path
    dest: PurePosixPath
    size: int
    resume_from: int = 0

    def describe(self) -> str:
        resume = f" (resuming at {human_size(self.resume_from)})" if self.resume_from else ""
        return (
            f"upload {human_size(self.size - self.resume_from)} to {short_ids(self.dest)}{resume}"
        )


@dataclass(frozen=True)
class VerifyUpload(Step):
    path: PurePosixPath
    size: int
    sha256: str

    def describe(self) -> str:
        digest = f"sha256 {self.sha256[:12]}…" if self.sha256 else "sha256"
        return f"verify {short_ids(self.path.name)} on the device: {self.size} bytes, {digest}"


@dataclass(frozen=True)
class Install(Step):
    """``doorstep-device install``: check the tar, unpack beside its place, verify, rename in."""

    archive: PurePosixPath
    dest: PurePosixPath
    sha: str
    tar_sha256: str

    def describe(self) -> str:
        return (
            f"install {short_ids(self.archive.name)} as {short_ids(self.dest)} "
            "(the device checks hashes and signature)"
        )


@dataclass(frozen=True)
class Activate(Step):
    """``doorstep-device activate DIR``: verify, switch ``current`` atomically, reload."""

    sha: str
    path: PurePosixPath
    replaces: str | None
    reload: ReloadMethod = "auto"

    def describe(self) -> str:
        old = f"{self.replaces[:12]}… becomes previous" if self.replaces else "no previous model"
        return (
            f"activate {self.sha[:12]}… (verify signature and files; {old}) and reload the "
            f"daemon ({_reload_words(self.reload)})"
        )


@dataclass(frozen=True)
class Reload(Step):
    """Re-activate the bundle already in ``current`` (keeps ``previous``) to reload the daemon."""

    path: PurePosixPath
    method: ReloadMethod = "auto"

    def describe(self) -> str:
        return f"reload the daemon onto {self.path.name[:12]}… ({_reload_words(self.method)})"


@dataclass(frozen=True)
class HealthCheck(Step):
    sha: str
    deadline: float
    rollback_to: str | None

    def describe(self) -> str:
        back = f"roll back to {self.rollback_to[:12]}…" if self.rollback_to else "roll back"
        return (
            f"health check: the daemon serves {self.sha[:12]}… and its self-test passed within "
            f"{self.deadline:g} s, else {back}"
        )


@dataclass(frozen=True)
class Prune(Step):
    keep: int
    models: tuple[str, ...]
    partials: tuple[str, ...] = ()
    """other uploads on the device; the device deletes those unfinished for over a day"""

    def describe(self) -> str:
        text = f"prune to {self.keep} model(s)"
        if self.models:
            text += f": delete {', '.join(f'{s[:12]}…' for s in self.models)}"
        if self.partials:
            text += f"; {len(self.partials)} other upload(s) deleted if over a day old"
        return text


def _reload_words(method: ReloadMethod) -> str:
    return {
        "auto": "systemctl reload under systemd, else SIGHUP",
        "systemd": "systemctl reload",
        "signal": "SIGHUP",
    }[method]


def actionable(steps: Sequence[Step]) -> bool:
    """True when the steps change the device (not a single skip or refusal)."""
    return bool(steps) and not isinstance(steps[0], Skip | Refusal)


_ID = re.compile(r"[0-9a-f]{64}")


def short_ids(path: PurePosixPath | str) -> str:
    """A path with every bundle id in it cut to 12 digits, for reading."""
    return _ID.sub(lambda m: f"{m.group(0)[:12]}…", str(path))


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exp:.1f} {'KMGT'[exp - 1]}iB"
