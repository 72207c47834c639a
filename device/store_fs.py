"""The model store's file operations, safe in a directory other local users may write to.

The state directory is group-writable (``StateDirectoryMode=2770``), so a group member may
plant anything under a name the store uses. Here nothing is followed:

- temporary names are unpredictable and created exclusively (``mkdtemp``; a link under a
  random name, retried if the name exists), so a planted name is never written through;
- every store entry is looked at with ``lstat``: a bundle ``models/<id>`` that is a link, not a
  directory, or owned by someone other than this user or root is refused; ``current`` and
  ``previous`` must be links (or absent);
- leftovers of a killed install or activate (``.<id>.tmp-<pid>-*``, ``.current.tmp-<pid>-*``)
  are removed by the next install, activate or prune once their pid is gone; only names of
  that pattern, a link or file unlinked, a directory removed without following links.

Durability: files are fsynced before the rename that makes them visible, and the directory
after it (see the README, "What survives a power cut").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from device.errors import DoorstepError
from device.safefile import fsync_dir

BUNDLE_ID = re.compile(r"^[0-9a-f]{64}$")
_LEFTOVER = re.compile(r"^\.([0-9a-f]{64}|current|previous)\.tmp-(\d+)(-[A-Za-z0-9_]+)?$")


class InstallError(DoorstepError):
    """A store operation that could not be done (the state directory is left as it was)."""


def check_id(ident: str, what: str = "--id") -> str:
    if not isinstance(ident, str) or not BUNDLE_ID.match(ident):
        raise InstallError(
            f"{what} {str(ident)[:80]!r} is not a bundle id (64 lowercase hex digits, the "
            "sha256 of its manifest.json: doorstep-host bundle prints it)"
        )
    return ident


def _owner_ok(info: os.stat_result) -> bool:
    return info.st_uid in (os.geteuid(), 0)


def check_bundle_dir(path: Path) -> None:
    """``models/<id>`` must be a real directory owned by this user or root."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise InstallError(f"{path}: no such bundle (install it first)") from None
    if stat.S_ISLNK(info.st_mode):
        raise InstallError(
            f"{path}: is a symbolic link, not an installed bundle: refused (someone planted it; "
            "`doorstep-device prune` removes it)"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise InstallError(f"{path}: not a directory, not an installed bundle: refused")
    if not _owner_ok(info):
        raise InstallError(
            f"{path}: owned by uid {info.st_uid}, neither this user ({os.geteuid()}) nor root: "
            "refused (not installed by doorstep; remove it)"
        )


def check_models_dir(models: Path, create: bool = False) -> None:
    """``models/`` itself: a real directory owned by this user or root (made if asked)."""
    if create:
        models.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(models)
    try:
        info = os.lstat(models)
    except FileNotFoundError:
        raise InstallError(f"{models}: no such directory") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or not _owner_ok(info):
        raise InstallError(
            f"{models}: not a directory of this user or root (a link, a file or another "
            "user's): refused; remove it, install recreates it"
        )


def check_link(link: Path) -> None:
    """``current`` / ``previous``: a symbolic link or absent, never replaced when it is not."""
    try:
        info = os.lstat(link)
    except FileNotFoundError:
        return
    if not stat.S_ISLNK(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a symbolic link"
        raise InstallError(
            f"{link}: is {kind}, not the link to a bundle doorstep keeps there: nothing was "
            f"changed; remove it (rm -r {link}) and activate again"
        )


def open_dir(path: Path) -> int:
    """An fd of the real directory ``path`` owned by this user or root (never through a link
    as its last component): every later step works relative to it, so swapping the directory
    for a link afterwards changes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InstallError(
            f"{path}: not a directory (a link or a file?): refused: {exc.strerror}"
        ) from None
    if not _owner_ok(os.fstat(fd)):
        os.close(fd)
        raise InstallError(f"{path}: owned by another user than this one or root: refused")
    return fd


def temp_dir_at(dir_fd: int, ident: str) -> str:
    """Make a private directory ``.<id>.tmp-<pid>-<random>`` in ``dir_fd`` exclusively (a name
    that exists, planted or not, is never reused); returns its name."""
    while True:
        name = f".{ident}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            return name
        except FileExistsError:
            continue


def relink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically and durably: a link under a random name, then
    renamed over ``link``; the directory fsynced after the rename."""
    check_link(link)
    while True:
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue  # a planted name (or a collision): never reuse it, draw another
    try:
        os.replace(tmp, link)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # e.g. replaced by a directory since check_link
            raise InstallError(f"{link}: cannot switch it: {exc.strerror or exc}") from None
        raise
    fsync_dir(link.parent)


def remove_tree(path: Path) -> None:
    """Remove the real directory ``path`` without following a link in it (or unlink a link)."""
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)  # fd-based on Linux: never follows a link inside
    else:
        os.unlink(path)


def clean_leftovers(directory: Path) -> list[str]:
    """Remove temporary entries of killed installs/activates in ``directory`` (whose pid is no
    longer running); returns their names. Entries of another name are never touched."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    gone = []
    for name in names:
        match = _LEFTOVER.match(name)
        if match is None or _pid_running(int(match.group(2))):
            continue
        with contextlib.suppress(OSError):
            remove_tree(directory / name)
            gone.append(name)
    return gone


def _pid_running(pid: int) -> bool:
    from device.daemon_proc import pid_exists

    return pid == os.getpid() or pid_exists(pid)


def in_dir(path: Path, directory: Path) -> bool:
    """Is ``path``'s entry (not what a link points at) directly in ``directory``?"""
    return os.path.realpath(Path(os.path.abspath(path)).parent) == os.path.realpath(directory)


def unlink_entry(tar: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tar)  # a link itself, never what it points at


@contextlib.contextmanager
def open_upload(tar: Path) -> Iterator[BinaryIO]:
    """The upload opened without following a link or blocking; a regular file only."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(tar, flags)
    except FileNotFoundError:
        raise InstallError(f"{tar}: no such upload") from None
    except OSError as exc:
        why = "is a symbolic link: refused" if exc.errno == errno.ELOOP else exc.strerror
        raise InstallError(f"{tar}: cannot open the upload: {why}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InstallError(f"{tar}: not a regular file: refused")
        yield fh


def sha256_file_object(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def check_space(directory: Path, tar: Path, need: int) -> None:
    """Refuse (before writing) a bundle of ``need`` bytes that ``directory`` has no room for."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if need + 64 * 1024 > free:
        raise InstallError(
            f"{tar}: the bundle needs {need} bytes but {directory} has {free} free: nothing "
            "was written; free space (doorstep-device prune --keep 1) and install again"
        )
