"""Small files in a directory other local users may write to: read safely, write atomically.

The state directory is group-writable (``StateDirectoryMode=2770``), so a member of the group
may plant anything under a name doorstep reads: a symbolic link (to ``/dev/zero``, to a file of
root's), a FIFO that blocks a reader forever, a file of gigabytes. :func:`read_small_file`
refuses all of them before reading a byte: it opens without following a link and without
blocking, accepts a regular file only (``fstat`` of what was opened, so there is no race
between a check and the open), and reads at most ``limit`` bytes.

:func:`write_atomic` replaces a file so that a reader (or a power cut) sees the old contents or
the new, never a mix: a temporary file with an unpredictable name created exclusively beside the
target (never an existing file or a planted link), written and fsynced, renamed over the target,
and the directory fsynced so the rename itself is on disk.

Standard library only: ``doorstep-device status`` reads the daemon record through this module
and must start fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from device.errors import DoorstepError


class UnsafeFileError(DoorstepError):
    """A file that is a link, not a regular file, too large, or unreadable: refused unread."""


def read_small_file(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file ``path`` (at most ``limit``), or None when it does not exist.

    Raises :class:`UnsafeFileError` naming the path for a symbolic link, a FIFO, a device, a
    directory, a file larger than ``limit`` or one that cannot be read. Never blocks.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path}: is a symbolic link: refused (remove it)") from None
        raise UnsafeFileError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path}: not a regular file ({_kind(info.st_mode)}): refused")
        if info.st_size > limit:
            raise UnsafeFileError(
                f"{path}: {info.st_size} bytes, more than the {limit} allowed: refused"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow after fstat: never read past the limit
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise UnsafeFileError(f"{path}: more than the {limit} bytes allowed: refused")
        return b"".join(chunks)
    except OSError as exc:
        raise UnsafeFileError(f"{path}: cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"mode {mode:o}"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably; raise ``OSError`` on failure.

    On any failure (a full disk, a read-only or foreign-owned directory) the target is left as
    it was and the temporary file is removed. The new file gets the permissions ``open()``
    would give it under the process's umask (a temporary file starts private).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so renames and new entries in it survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, racing threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
