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
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from device.errors import DoorstepError
from device.hashing import sha256_file
from device.safefile import UnsafeFileError, read_small_file, write_atomic

if TYPE_CHECKING:  # the bundle and signing modules load pydantic, numpy, cryptography: only
    from device.bundle.store import Bundle  # the commands that verify a bundle import them
    from device.record import DaemonRecord  # pydantic: only once there is a record to read

ReloadMethod = Literal["auto", "systemd", "signal", "none"]
_BUNDLE_ID = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_MAX_BYTES = 1 << 20
RECORD_MAX_BYTES = 64 * 1024
"""A real daemon record is under 2 KiB; a larger ``daemon.json`` is refused unread"""


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
        """Installed bundle ids (real directories named by a sha256, not links), oldest first."""
        found = [
            (info.st_mtime, name)
            for name, info in self._entries()
            if stat.S_ISDIR(info.st_mode) and _BUNDLE_ID.match(name)
        ]
        return [name for _, name in sorted(found)]

    def partials(self) -> dict[str, int]:
        """Uploads in progress: bundle id -> bytes so far (regular files only, not links)."""
        return {
            name.removesuffix(".tar.part"): info.st_size
            for name, info in self._entries()
            if name.endswith(".tar.part") and stat.S_ISREG(info.st_mode)
        }

    def _entries(self) -> list[tuple[str, os.stat_result]]:
        """``models/``'s entries with their ``lstat`` (an entry gone meanwhile is left out)."""
        try:
            names = os.listdir(self.models)
        except OSError:
            return []
        out = []
        for name in names:
            with contextlib.suppress(OSError):
                out.append((name, os.lstat(self.models / name)))
        return out


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


class RecordWriteError(DoorstepError):
    """The daemon record could not be written (full disk, read-only or foreign-owned state
    directory); the record on disk is left as it was. ``errno`` is the OSError's."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


def write_daemon_record(store: Store, record: DaemonRecord | Mapping[str, Any]) -> None:
    """Write ``<state_dir>/daemon.json`` atomically and durably (see :func:`write_atomic`).

    ``record`` is a :class:`~device.record.DaemonRecord`, or a plain dict that is validated
    into one (a dict that does not validate is a bug: :class:`~device.record.RecordError`).
    A storage failure raises :class:`RecordWriteError` only, never ``OSError``: the caller
    degrades (the record is never worth the daemon's life).
    """
    from device.record import DaemonRecord, parse_record

    if not isinstance(record, DaemonRecord):
        record = parse_record(record, f"{store.daemon_file} (to be written)")
    data = record.model_dump_json(indent=1).encode()
    try:
        store.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(store.daemon_file, data)
    except OSError as exc:
        raise RecordWriteError(
            f"{store.daemon_file}: cannot write the daemon record: {exc.strerror or exc}",
            exc.errno,
        ) from None


def read_daemon_record(store: Store) -> DaemonRecord | None:
    """The daemon's record with ``state`` as it really is: "running" only while its pid is a
    live doorstep daemon (:func:`daemon_alive`). None when there is no record.

    Raises :class:`~device.record.RecordError` ``"<path>: invalid record: <why>"`` for a record
    that is a link, a FIFO or another non-regular file, larger than
    :data:`RECORD_MAX_BYTES`, or not a valid record (wrong JSON, types, nesting).
    Without a record file, pydantic is never imported (``status`` stays fast).
    """
    path = store.daemon_file
    try:
        raw = read_small_file(path, RECORD_MAX_BYTES)
    except UnsafeFileError as exc:
        from device.record import RecordError

        raise RecordError(f"{path}: invalid record: {str(exc).removeprefix(f'{path}: ')}") from None
    if raw is None:
        return None
    from device.record import parse_record

    record = parse_record(raw, str(path))
    alive = record.state != "stopped" and daemon_alive(record.pid)
    return record.model_copy(update={"state": "running" if alive else "stopped"})


def daemon_alive(pid: int) -> bool:
    """Is ``pid`` (> 0) a live process that looks like ``doorstep-device run``?

    Alive: it exists (``kill(pid, 0)``; another user's process counts). When its command line
    is readable (``/proc/<pid>/cmdline``), it must also be a doorstep daemon, so a stale record
    whose pid went to another process (or a planted record naming init) does not count. A
    plausibility check, not a proof: the start time and the owner are not compared.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists
    except OSError:
        return False
    try:
        raw = read_small_file(Path(f"/proc/{pid}/cmdline"), 64 * 1024)
    except UnsafeFileError:
        return True  # cannot look (hidepid, not Linux): trust that it exists
    if raw is None:
        return False  # gone meanwhile
    return _looks_like_daemon(raw.split(b"\0"))


def _looks_like_daemon(argv: list[bytes]) -> bool:
    """``.../doorstep-device run ...`` or ``python -m device.cli run ...``."""
    for i, arg in enumerate(argv):
        if arg.endswith(b"doorstep-device") or (arg == b"device.cli" and argv[i - 1 : i] == [b"-m"]):
            return b"run" in argv[i + 1 :]
    return False


def daemon_status(store: Store) -> tuple[dict[str, Any] | None, str | None]:
    """For ``status``: the record as JSON data (or None) and why it is missing if invalid."""
    try:
        record = read_daemon_record(store)
    except DoorstepError as exc:  # RecordError: unsafe or invalid, say so and go on
        return None, str(exc)
    return (record.model_dump(mode="json") if record is not None else None), None


@dataclass(frozen=True)
class ReloadTarget:
    """How ``activate``/``rollback`` will reload the daemon, decided before anything switches."""

    how: Literal["systemd", "signal", "none"]
    service: str = "doorstep-device"
    pid: int | None = None


def reload_target(store: Store, method: ReloadMethod, service: str) -> ReloadTarget:
    """Decide how to reload: call this *before* switching links, so an unreadable record stops
    the command while nothing has changed yet (:class:`InstallError` saying what to do)."""
    if method == "none":
        return ReloadTarget("none", service)
    if method == "systemd":
        return ReloadTarget("systemd", service)
    try:
        record = read_daemon_record(store)
    except DoorstepError as exc:
        raise InstallError(
            f"{exc}: cannot tell which daemon to reload, so nothing was changed; restart the "
            f"daemon (it rewrites its record), or pass --reload systemd or --reload none"
        ) from None
    if method == "auto" and record is not None and record.systemd:
        return ReloadTarget("systemd", service)
    if record is None or record.state != "running":
        return ReloadTarget("none", service)
    return ReloadTarget("signal", service, record.pid)


def send_reload(target: ReloadTarget) -> str:
    """Carry out a :class:`ReloadTarget`; returns how ("systemd", "signal" or "none")."""
    if target.how == "systemd":
        cmd = ["systemctl", "reload", target.service]
        if os.geteuid() != 0:
            cmd = ["sudo", "-n", *cmd]  # the sudo rule in the README allows just this
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
        return "systemd"
    if target.how == "signal" and target.pid is not None and target.pid > 0:
        try:
            os.kill(target.pid, signal.SIGHUP)
        except OSError as exc:
            raise InstallError(f"cannot signal the daemon (pid {target.pid}): {exc}") from None
        return "signal"
    return "none"


def reload_daemon(store: Store, method: ReloadMethod, service: str) -> str:
    """Ask the daemon to load ``current`` again; returns how (or "none" if no daemon runs).
    Prefer :func:`reload_target` before the switch and :func:`send_reload` after it."""
    return send_reload(reload_target(store, method, service))


def _describe(store: Store, ident: str | None) -> dict[str, Any] | None:
    """Name, version and model sha256 of a stored bundle, read straight from its manifest (the
    status command must stay cheap: no schema validation, no hashing). A manifest that is a
    link, too big, nested too deep or of the wrong shape is reported, never raised."""
    if ident is None:
        return None
    out: dict[str, Any] = {"id": ident, "name": None, "version": None, "model_sha256": None}
    path = store.model_dir(ident) / "manifest.json"
    try:
        raw = read_small_file(path, MANIFEST_MAX_BYTES)
        if raw is None:
            raise UnsafeFileError(f"{path}: no such file")
        m = json.loads(raw)
        if not isinstance(m, dict):
            raise TypeError("not a JSON object")
        files, model_file = m.get("files"), m.get("model_file", "model.tflite")
        entry = files.get(model_file) if isinstance(files, dict) else None
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        out.update(
            name=_text(m.get("name")), version=_text(m.get("version")), model_sha256=_text(sha)
        )
    except UnsafeFileError as exc:
        out["error"] = f"unreadable manifest: {exc}"
    except (ValueError, TypeError, RecursionError) as exc:
        out["error"] = f"unreadable manifest: {path}: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def _text(value: Any) -> str | None:
    return value[:4096] if isinstance(value, str) else None


def status(store: Store) -> dict[str, Any]:
    """``doorstep-device status --json`` (the document :class:`~device.record.StoreStatus`
    describes). An invalid daemon record gives ``daemon: null`` and ``daemon_error``."""
    from device import __version__

    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(store.state_dir).free
    daemon, daemon_error = daemon_status(store)
    return {
        "doorstep_version": __version__,
        "state_dir": str(store.state_dir),
        "active": _describe(store, store.linked(store.current)),
        "previous": _describe(store, store.linked(store.previous)),
        "stored": store.stored(),
        "partials": store.partials(),
        "free_bytes": free,
        "daemon": daemon,
        "daemon_error": daemon_error,
    }
