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
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from device.daemon_proc import daemon_alive
from device.errors import DoorstepError
from device.reload import (  # re-exported: the commands import them from here
    ReloadMethod as ReloadMethod,
)
from device.reload import ReloadTarget as ReloadTarget
from device.reload import reload_daemon as reload_daemon
from device.reload import reload_target as reload_target
from device.reload import send_reload as send_reload
from device.safefile import UnsafeFileError, fsync_dir, read_small_file, write_atomic
from device.store_fs import (
    BUNDLE_ID,
    InstallError,
    check_bundle_dir,
    check_id,
    check_link,
    check_models_dir,
    check_space,
    clean_leftovers,
    in_dir,
    open_dir,
    open_upload,
    relink,
    remove_tree,
    sha256_file_object,
    temp_dir_at,
    unlink_entry,
)

if TYPE_CHECKING:  # the bundle and signing modules load pydantic, numpy, cryptography: only
    from device.bundle.store import Bundle  # the commands that verify a bundle import them
    from device.bundle.tarsafe import BundleTar
    from device.record import DaemonRecord  # pydantic: only once there is a record to read

MANIFEST_MAX_BYTES = 1 << 20
RECORD_MAX_BYTES = 64 * 1024
"""A real daemon record is under 2 KiB; a larger ``daemon.json`` is refused unread"""


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
            if stat.S_ISDIR(info.st_mode) and BUNDLE_ID.match(name)
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
    """Turn an uploaded tar into ``models/<ident>``.

    In order, spending nothing on a bundle before it is known to be wanted: the id is a bundle
    id; the tar (a regular file, not a link) has the expected sha256; its manifest (read first,
    bounded) has the id and, with trusted keys, a valid signature; the files fit in the free
    space. Only then are the listed files extracted, each hashed as written and fsynced, into a
    private directory of an unpredictable name in ``models/`` (fsynced), renamed into place
    (``models/`` fsynced), all relative to one fd of ``models/``. The tar is removed
    afterwards, or when corrupt, only if it is in the store: a file elsewhere is never deleted.
    """
    from device.bundle.tarsafe import BundleTar

    check_id(ident)
    check_models_dir(store.models, create=True)
    clean_leftovers(store.models)
    final = store.model_dir(ident)
    in_store = in_dir(tar, store.models)
    if os.path.lexists(final):
        check_bundle_dir(final)
        load_checked(final, keys)  # already installed: still must verify
        if in_store:
            unlink_entry(tar)
        return final
    with open_upload(tar) as fh:
        _check_upload_size(fh, tar)
        actual = sha256_file_object(fh)
        if actual != tar_sha256:
            if in_store:
                unlink_entry(tar)  # a resumed upload must not build on corrupt bytes
            raise InstallError(
                f"{tar}: sha256 {actual[:16]}… does not match the expected {tar_sha256[:16]}…: "
                "the upload is corrupt or incomplete; "
                + ("it was removed, upload it again" if in_store else "it was left as it is")
            )
        fh.seek(0)
        bundle = BundleTar(fh, str(tar))
        got = hashlib.sha256(bundle.manifest_bytes).hexdigest()
        if got != ident:
            raise InstallError(f"{tar}: holds bundle {got[:16]}…, not the expected {ident[:16]}…")
        if keys:
            from device.bundle.signing import verify_manifest_signature

            verify_manifest_signature(bundle.manifest_bytes, bundle.signature_bytes, keys, str(tar))
        check_space(store.models, tar, bundle.total_bytes)
        _unpack(store, tar, bundle, ident)
    if in_store:
        unlink_entry(tar)
    return final


def _check_upload_size(fh: BinaryIO, tar: Path) -> None:
    """Refuse, before hashing it, an upload larger than the bundle its manifest describes (a
    tar with gigabytes appended). A manifest that cannot be read is left to the checks after
    the sha256, so a corrupt upload is still reported (and removed) as such."""
    from device.bundle.tarsafe import BundleTar

    size = os.fstat(fh.fileno()).st_size
    try:
        bound = BundleTar(fh, str(tar)).max_tar_bytes
    except DoorstepError:
        bound = None
    fh.seek(0)
    if bound is not None and size > bound:
        raise InstallError(
            f"{tar}: {size} bytes, more than the {bound} a tar of the bundle its manifest "
            "describes can take: it holds something else too; refused unread (nothing written)"
        )


def _unpack(store: Store, tar: Path, bundle: BundleTar, ident: str) -> None:
    """Extract into a new private directory of ``models/`` and rename it to ``ident``, all
    relative to one fd of ``models/`` (fsynced after the rename)."""
    models_fd = open_dir(store.models)
    tmp = None
    try:
        tmp = temp_dir_at(models_fd, ident)
        dir_fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=models_fd)
        try:
            os.fchmod(dir_fd, 0o755)  # private while written, then readable like any bundle
            bundle.extract_into(dir_fd)  # each file hashed as written and fsynced, then the dir
        finally:
            os.close(dir_fd)
        os.rename(tmp, ident, src_dir_fd=models_fd, dst_dir_fd=models_fd)
        tmp = None
        os.fsync(models_fd)
    except OSError as exc:
        raise InstallError(
            f"{tar}: cannot install into {store.models}: {exc.strerror or exc}; nothing was "
            "installed"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True, dir_fd=models_fd)
        os.close(models_fd)


def activate(store: Store, bundle_dir: Path, keys: list[Any]) -> dict[str, str | None]:
    """Point ``current`` at ``bundle_dir`` (under ``models/``), ``previous`` at the old one."""
    bundle_dir = Path(os.path.abspath(bundle_dir))
    in_models = os.path.realpath(bundle_dir.parent) == os.path.realpath(store.models)
    if not in_models or not BUNDLE_ID.match(bundle_dir.name):
        raise InstallError(
            f"{bundle_dir}: not in {store.models}; install it first (doorstep-device install)"
        )
    target = store.model_dir(bundle_dir.name)
    check_bundle_dir(target)
    check_link(store.current)
    check_link(store.previous)
    clean_leftovers(store.state_dir)
    load_checked(target, keys)  # verify (and check the signature) before switching
    new = target.name
    old = store.linked(store.current)
    if old == new:
        return {"active": new, "previous": store.linked(store.previous)}
    if old is not None:
        relink(store.previous, f"models/{old}")
    relink(store.current, f"models/{new}")
    return {"active": new, "previous": old}


def rollback(store: Store, keys: list[Any]) -> dict[str, str | None]:
    """Swap ``current`` and ``previous``."""
    check_link(store.current)
    check_link(store.previous)
    clean_leftovers(store.state_dir)
    prev, cur = store.linked(store.previous), store.linked(store.current)
    if prev is None or not os.path.lexists(store.model_dir(prev)):
        if cur is None:
            raise InstallError(f"{store.state_dir}: no deployed model to roll back from")
        # The first deployment failed: drop `current`, so the daemon falls back to the model
        # its config names (or the one shipped with doorstep).
        store.current.unlink()
        fsync_dir(store.state_dir)
        return {"active": None, "previous": cur}
    check_id(prev, f"{store.previous} points at")
    check_bundle_dir(store.model_dir(prev))
    load_checked(store.model_dir(prev), keys)
    relink(store.current, f"models/{prev}")
    if cur is not None:
        relink(store.previous, f"models/{cur}")
    return {"active": prev, "previous": cur}


def prune(store: Store, keep: int, stale_part_s: float = 86_400) -> list[str]:
    """Delete the oldest bundles beyond ``keep`` (never current or previous), old uploads,
    leftovers of killed installs and activates, and links planted where a bundle belongs
    (the link is removed, never what it points at)."""
    if keep < 1:
        raise InstallError("--keep must be at least 1")
    if not os.path.lexists(store.models):
        return clean_leftovers(store.state_dir)
    os.close(open_dir(store.models))  # refuse a models/ that is a link or another user's
    gone = clean_leftovers(store.models) + clean_leftovers(store.state_dir)
    protected = {store.linked(store.current), store.linked(store.previous)}
    entries = store._entries()
    for name, info in entries:
        if BUNDLE_ID.match(name) and stat.S_ISLNK(info.st_mode):
            unlink_entry(store.model_dir(name))
            gone.append(f"{name} (a symbolic link, not a bundle: the link was removed)")
    stored = store.stored()
    removable = [i for i in stored if i not in protected]
    excess = max(0, len(stored) - keep)
    for ident in removable[:excess]:
        try:
            check_bundle_dir(store.model_dir(ident))
            remove_tree(store.model_dir(ident))
        except (InstallError, OSError):
            continue  # another user's directory: not doorstep's to delete
        gone.append(ident)
    now = time.time()
    for name, info in entries:
        if name.endswith(".tar.part") and now - info.st_mtime > stale_part_s:
            unlink_entry(store.models / name)
            gone.append(name)
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


def read_daemon_record(store: Store, live: bool = True) -> DaemonRecord | None:
    """The daemon's record with ``state`` as it really is: "running" only while its pid is a
    live doorstep daemon (:func:`daemon_alive`; with ``live=False``, ``state`` as written).
    None when there is no record.

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
    if not live:
        return record
    alive = record.state != "stopped" and daemon_alive(record.pid, record.pid_start_ticks)
    return record.model_copy(update={"state": "running" if alive else "stopped"})


def daemon_status(store: Store) -> tuple[dict[str, Any] | None, str | None]:
    """For ``status``: the record as JSON data (or None) and why it is missing if invalid."""
    try:
        record = read_daemon_record(store)
    except DoorstepError as exc:  # RecordError: unsafe or invalid, say so and go on
        return None, str(exc)
    return (record.model_dump(mode="json") if record is not None else None), None


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
