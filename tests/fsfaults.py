"""Real filesystem faults for the tests: a small tmpfs that fills up, is freed, or goes read-only.

Nothing is simulated: the kernel's tmpfs returns ENOSPC when it is full and EROFS when it is
mounted read-only, exactly as an SD card would. Mounting needs root (CI runs as root); as any
other user the tests that need it are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

FILLER = ".filler"


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size_kib: int = 1024) -> Iterator[Path]:
    """Mount a ``size_kib`` tmpfs on ``mountpoint`` (created) for the ``with`` block."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    if shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs the mount command (util-linux)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = _run(
        "mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(mountpoint)
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if _run("umount", str(mountpoint)).returncode != 0:
            _run("umount", "-l", str(mountpoint))  # something still holds a file: detach it


def fill(directory: Path) -> Path:
    """Write a filler file into ``directory`` until its filesystem has no byte left."""
    path = directory / FILLER
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return path


def free(directory: Path) -> None:
    """Remove what ``fill`` wrote: the space is back."""
    (directory / FILLER).unlink(missing_ok=True)


def remount(mountpoint: Path, *, read_only: bool) -> None:
    """Remount the tmpfs read-only or read-write (read-only fails while a file is open for
    writing: the kernel refuses with EBUSY)."""
    mode = "ro" if read_only else "rw"
    done = _run("mount", "-o", f"remount,{mode}", str(mountpoint))
    if done.returncode != 0:
        raise RuntimeError(f"cannot remount {mountpoint} {mode}: {done.stderr.strip()}")
