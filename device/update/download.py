"""A bundle tar fetched over HTTP(S) into the store, resuming where it stopped.

The bytes go to ``<name>.part`` beside the store; a stalled or dropped transfer leaves the part
for the next attempt, which asks for the rest (``Range: bytes=N-``). The finished file must have
exactly the announced size and sha256, or it is deleted. Only the standard library is used:
``urllib`` and ``ssl`` (a Pi installs nothing more for pull mode).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from device.errors import DoorstepError

CHUNK = 64 * 1024


class DownloadError(DoorstepError):
    """The download failed; ``resumable``: the part kept is good and the rest can be asked for."""

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def _context(ca_file: Path | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def download(
    url: str,
    part: Path,
    size: int,
    sha256: str,
    *,
    ca_file: Path | None = None,
    timeout_s: float = 30.0,
    rate_kbps: float | None = None,
    progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    allowed_prefixes: Sequence[str] = (),
) -> Path:
    """Complete ``part`` from ``url`` (``size`` bytes with this ``sha256``) and return it.

    Raises :class:`DownloadError` naming what went wrong: an HTTP error status, a body that
    ends early (resumable), one that is longer than ``size``, nothing received for
    ``timeout_s`` (resumable), a sha256 that does not match (the part is deleted), no space."""
    have = _part_size(part)
    if have > size:  # not this bundle's bytes
        part.unlink()
        have = 0
    free = shutil.disk_usage(part.parent).free
    if free < size - have:
        raise DownloadError(
            f"{part.parent}: {free} bytes free, the download needs {size - have} more"
        )
    if have < size:
        have = _fetch(
            url, part, have, size, ca_file, timeout_s, rate_kbps, progress, stop, allowed_prefixes
        )
    digest = hashlib.sha256()
    with os.fdopen(os.open(part, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        part.unlink()
        raise DownloadError(
            f"{url}: sha256 {digest.hexdigest()[:16]}... of the {size} bytes received is not the "
            f"announced {sha256[:16]}...: the origin serves other bytes (deleted)"
        )
    return part


def _fetch(
    url: str,
    part: Path,
    have: int,
    size: int,
    ca_file: Path | None,
    timeout_s: float,
    rate_kbps: float | None,
    progress: Callable[[int], None] | None,
    stop: threading.Event | None,
    allowed_prefixes: Sequence[str],
) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": "doorstep-device"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    handlers: list[urllib.request.BaseHandler] = [_Redirects(allowed_prefixes)]
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=_context(ca_file)))
    opener = urllib.request.build_opener(*handlers)
    try:
        response = opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have == size:
            return have
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect: {reason}", resumable=True) from None
    with response:
        status = response.status
        if status == 200 and have:  # the origin ignored the range: start over
            have = 0
        elif status == 206:
            first = _range_start(response.headers.get("Content-Range", ""))
            if first != have:
                raise DownloadError(
                    f"{url}: asked for bytes {have}- and got a range starting at {first}"
                )
        elif status != 200:
            raise DownloadError(f"{url}: HTTP {status}")
        started, sent_at_start = time.monotonic(), have
        last_report = 0.0
        with _open_part(part, append=bool(have)) as out:
            while True:
                if stop is not None and stop.is_set():
                    raise DownloadError(f"{url}: stopped at {have} of {size} bytes", True)
                try:
                    # read1: what has arrived (read() would wait for a whole chunk and lose a
                    # partial one to a stall)
                    block = response.read1(min(CHUNK, size + 1 - have))
                except TimeoutError:
                    raise DownloadError(
                        f"{url}: nothing received for {timeout_s:g} s at {have} of {size} bytes "
                        "(the part is kept; the next attempt resumes from there)",
                        resumable=True,
                    ) from None
                except OSError as exc:
                    raise DownloadError(
                        f"{url}: connection lost at {have} of {size} bytes: {exc}", True
                    ) from None
                if not block:
                    break
                out.write(block)
                have += len(block)
                if have > size:
                    out.truncate(0)
                    raise DownloadError(
                        f"{url}: the origin sends more than the announced {size} bytes: "
                        "not the announced bundle"
                    )
                now = time.monotonic()
                if progress is not None and now - last_report >= 1.0:
                    last_report = now
                    progress(have)
                if rate_kbps:  # ahead of the allowed rate: wait (a stop ends the wait)
                    ahead = (have - sent_at_start) / (rate_kbps * 1000) - (now - started)
                    if ahead > 0:
                        (stop or threading.Event()).wait(ahead)
            out.flush()
            os.fsync(out.fileno())
    if progress is not None:
        progress(have)
    if have < size:
        raise DownloadError(
            f"{url}: the body ended at {have} of {size} bytes (truncated; the part is kept and "
            "the next attempt asks for the rest)",
            resumable=True,
        )
    return have


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL under the allowed prefixes (an origin may move its
    files, not send the device to another network)."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.allowed = tuple(allowed)

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if self.allowed and not newurl.startswith(self.allowed):
            raise DownloadError(
                f"{req.full_url}: redirected to {newurl}, outside update.allowed_url_prefixes"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _part_size(part: Path) -> int:
    """Bytes already in ``part``: 0 when absent; a link or a non-file there is refused."""
    try:
        info = os.lstat(part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(info.st_mode):
        raise DownloadError(f"{part}: not a regular file (a link or other planted there?)")
    return info.st_size


def _open_part(part: Path, append: bool) -> BinaryIO:
    """``part`` for writing, never through a link, private (0600) while incomplete."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(os.open(part, flags, 0o600), "ab" if append else "wb")


def _range_start(header: str) -> int | None:
    """The first byte of ``Content-Range: bytes A-B/N``."""
    try:
        unit, _, rest = header.partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None
