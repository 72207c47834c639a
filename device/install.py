"""Models on the device: the content-addressed store, the ``current`` link, the daemon record.

Layout of the state directory (what ``doorstep-host deploy`` drives over SSH)::

    <state_dir>/models/<bundle id>/            installed bundles, named by sha256 of manifest.json
    <state_dir>/models/<bundle id>.tar.part    an upload in progress (resumable)
    <state_dir>/current -> models/<bundle id>  the active bundle
    <state_dir>/previous -> models/<bundle id> what ``current`` was before: the rollback target
    <state_dir>/daemon.json                    the running daemon's pid, model and self-test

Links are switched by making the new link under a temporary name and renaming it over the old
one (``rename(2)`` is atomic), never by ``ln -sfn`` (unlink, then link: a moment with none).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from device.errors import DoorstepError
from device.hashing import sha256_file

if TYPE_CHECKING:  # the bundle and signing modules load pydantic, numpy, cryptography: only
    from device.bundle.store import Bundle  # the commands that verify a bundle import them

ReloadMethod = Literal["auto", "systemd", "signal", "none"]


class InstallError(DoorstepError):
    """A store operation that could not be done (the state directory is left as it was)."""


@dataclass(frozen=True)
class Store:
    state_dir: Path

    @property
    def models(self) -> Path:
        return self.state_dir / "models"

    @property
    def current(self) -> Path:
        return self.state_dir / "current"

    @property
    def previous(self) -> Path:
        return self.state_dir / "previous"

    @property
    def daemon_file(self) -> Path:
        return self.state_dir / "daemon.json"

    def model_dir(self, ident: str) -> Path:
        return self.models / ident

    def linked(self, link: Path) -> str | None:
        """The bundle id a link points at, or None."""
        try:
            target = os.readlink(link)
        except OSError:
            return None
        return Path(target).name

    def stored(self) -> list[str]:
        """Installed bundle ids, oldest first."""
        if not self.models.is_dir():
            return []
        dirs = [p for p in self.models.iterdir() if p.is_dir() and len(p.name) == 64]
        return [p.name for p in sorted(dirs, key=lambda p: (p.stat().st_mtime, p.name))]

    def partials(self) -> dict[str, int]:
        if not self.models.is_dir():
            return {}
        return {
            p.name.removesuffix(".tar.part"): p.stat().st_size
            for p in self.models.glob("*.tar.part")
        }


# ------------------------------------------------------------------------- signing and loading


def trusted_keys(paths: list[Path]) -> list[Any]:
    if not paths:
        return []
    from device.bundle.signing import load_public_keys

    return load_public_keys(paths)


def load_checked(path: Path, keys: list[Any]) -> Bundle:
    """Load and verify a bundle; with trusted keys, its signature must verify too."""
    from device.bundle.signing import load_signed_bundle
    from device.bundle.store import load_bundle

    if keys:
        bundle, _ = load_signed_bundle(path, keys)
        return bundle
    return load_bundle(path)


# ---------------------------------------------------------------------------------- commands


def install(store: Store, tar: Path, ident: str, tar_sha256: str, keys: list[Any]) -> Path:
    """Turn an uploaded tar into ``models/<ident>``: check its sha256, extract it beside the
    store, verify every file (and the signature), check its id, rename it into place."""
    from device.bundle.signing import bundle_id
    from device.bundle.store import extract_tar

    final = store.model_dir(ident)
    if final.is_dir():
        load_checked(final, keys)  # already installed: still must verify
        tar.unlink(missing_ok=True)
        return final
    if not tar.is_file():
        raise InstallError(f"{tar}: no such upload")
    actual = sha256_file(tar)
    if actual != tar_sha256:
        tar.unlink()  # a resumed upload must not build on corrupt bytes
        raise InstallError(
            f"{tar}: sha256 {actual[:16]}… does not match the expected {tar_sha256[:16]}…: the "
            "upload is corrupt or incomplete; it was removed, upload it again"
        )
    tmp = store.models / f".{ident}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extract_tar(tar, tmp)
        got = bundle_id(tmp)
        if got != ident:
            raise InstallError(f"{tar}: holds bundle {got[:16]}…, not the expected {ident[:16]}…")
        load_checked(tmp, keys)
        tmp.replace(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tar.unlink(missing_ok=True)
    return final


def _relink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def activate(store: Store, bundle_dir: Path, keys: list[Any]) -> dict[str, str | None]:
    """Point ``current`` at ``bundle_dir`` (under ``models/``), ``previous`` at the old one."""
    bundle_dir = bundle_dir.resolve()
    if bundle_dir.parent != store.models.resolve():
        raise InstallError(
            f"{bundle_dir}: not in {store.models}; install it first (doorstep-device install)"
        )
    load_checked(bundle_dir, keys)  # verify (and check the signature) before switching
    new = bundle_dir.name
    old = store.linked(store.current)
    if old == new:
        return {"active": new, "previous": store.linked(store.previous)}
    if old is not None:
        _relink(store.previous, f"models/{old}")
    _relink(store.current, f"models/{new}")
    return {"active": new, "previous": old}


def rollback(store: Store, keys: list[Any]) -> dict[str, str | None]:
    """Swap ``current`` and ``previous``."""
    prev, cur = store.linked(store.previous), store.linked(store.current)
    if prev is None or not store.model_dir(prev).is_dir():
        if cur is None:
            raise InstallError(f"{store.state_dir}: no deployed model to roll back from")
        # The first deployment failed: drop `current`, so the daemon falls back to the model
        # its config names (or the one shipped with doorstep).
        store.current.unlink()
        return {"active": None, "previous": cur}
    load_checked(store.model_dir(prev), keys)
    _relink(store.current, f"models/{prev}")
    if cur is not None:
        _relink(store.previous, f"models/{cur}")
    return {"active": prev, "previous": cur}


def prune(store: Store, keep: int, stale_part_s: float = 86_400) -> list[str]:
    """Delete the oldest bundles beyond ``keep`` (never current or previous) and old uploads."""
    if keep < 1:
        raise InstallError("--keep must be at least 1")
    protected = {store.linked(store.current), store.linked(store.previous)}
    stored = store.stored()
    removable = [i for i in stored if i not in protected]
    excess = max(0, len(stored) - keep)
    gone = removable[:excess]
    for ident in gone:
        shutil.rmtree(store.model_dir(ident))
    now = time.time()
    for part in store.models.glob("*.tar.part") if store.models.is_dir() else []:
        if now - part.stat().st_mtime > stale_part_s:
            part.unlink()
            gone.append(part.name)
    return gone


# --------------------------------------------------------------------------- the daemon record


def write_daemon_record(store: Store, record: dict[str, Any]) -> None:
    store.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = store.daemon_file.with_name(f".daemon.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, store.daemon_file)


def read_daemon_record(store: Store) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(store.daemon_file.read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid")
    alive = False
    if isinstance(pid, int) and record.get("state") != "stopped":
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's process: it exists
            alive = True
    record["state"] = "running" if alive else "stopped"
    return record


def reload_daemon(store: Store, method: ReloadMethod, service: str) -> str:
    """Ask the daemon to load ``current`` again; returns how (or "none" if no daemon runs)."""
    record = read_daemon_record(store)
    if method == "none":
        return "none"
    if method == "systemd" or (method == "auto" and record and record.get("systemd")):
        cmd = ["systemctl", "reload", service]
        if os.geteuid() != 0:
            cmd = ["sudo", "-n", *cmd]  # the sudo rule in the README allows just this
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
        return "systemd"
    if record is None or record["state"] != "running":
        return "none"
    try:
        os.kill(int(record["pid"]), signal.SIGHUP)
    except OSError as exc:
        raise InstallError(f"cannot signal the daemon (pid {record['pid']}): {exc}") from None
    return "signal"


def _describe(store: Store, ident: str | None) -> dict[str, Any] | None:
    """Name, version and model sha256 of a stored bundle, read straight from its manifest (the
    status command must stay cheap: no schema validation, no hashing)."""
    if ident is None:
        return None
    out: dict[str, Any] = {"id": ident, "name": None, "version": None, "model_sha256": None}
    try:
        m = json.loads((store.model_dir(ident) / "manifest.json").read_text())
        out.update(
            name=m.get("name"),
            version=m.get("version"),
            model_sha256=m["files"][m.get("model_file", "model.tflite")]["sha256"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        out["error"] = f"unreadable manifest: {exc}"
    return out


def status(store: Store) -> dict[str, Any]:
    from device import __version__

    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(store.state_dir).free
    return {
        "doorstep_version": __version__,
        "state_dir": str(store.state_dir),
        "active": _describe(store, store.linked(store.current)),
        "previous": _describe(store, store.linked(store.previous)),
        "stored": store.stored(),
        "partials": store.partials(),
        "free_bytes": free,
        "daemon": read_daemon_record(store),
    }
