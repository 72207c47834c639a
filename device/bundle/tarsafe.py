"""A bundle tar from an untrusted upload: manifest first, signature checked, then only its files.

What ``doorstep-device install`` unpacks came over the network, so nothing in it is spent on
before it is known to be wanted. :class:`BundleTar` reads the first members only, bounded:
``manifest.json`` (at most :data:`~device.bundle.store.MANIFEST_MAX_BYTES`, nesting bounded)
and ``manifest.sig`` (as ``pack_bundle`` writes them, in that order). The caller checks the
signature and the bundle id on those bytes; :meth:`BundleTar.extract_into` then writes exactly
the files the manifest lists, each of exactly its declared size and sha256, and refuses the
first member that is anything else (an extra or duplicate file, a link, a sparse file, a
directory), before reading its data. A compressed tar is refused outright: models barely
compress, and an inflating archive is a way to spend a disk before any check.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any, BinaryIO

from device.bundle.manifest import Manifest
from device.bundle.store import MANIFEST, MANIFEST_MAX_BYTES, SIGNATURE, manifest_from_bytes
from device.errors import BundleError

SIGNATURE_MAX_BYTES = 4096
EXT_HEADER_MAX_BYTES = 64 * 1024
"""pax / GNU long-name headers: tarfile reads them whole into memory, so they are bounded"""
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
_EXT_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_CHUNK = 1 << 20


class BundleTar:
    """The first members of an open, uncompressed bundle tar (``fh`` is seekable, positioned
    at 0). ``manifest_bytes``, ``signature_bytes`` (None when unsigned) and ``manifest`` are
    read on construction; raises :class:`BundleError` naming ``where``."""

    def __init__(self, fh: BinaryIO, where: str) -> None:
        self.fh, self.where = fh, where
        head = fh.read(8)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                raise BundleError(
                    f"{where}: a {kind}-compressed archive: a bundle tar is uncompressed "
                    "(pack it with doorstep-host bundle / deploy)"
                )
        fh.seek(0)
        self._peek(0)
        try:
            # the caller owns (and closes) fh; tarfile on a fileobj holds nothing else
            self.tar = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 (reads 1 header)
        except tarfile.TarError as exc:
            raise BundleError(f"{where}: damaged or not a tar: {exc}") from None
        first = self._next()
        if first is None or first.name != MANIFEST:
            name = "nothing" if first is None else repr(first.name)
            raise BundleError(
                f"{where}: starts with {name}, not {MANIFEST}: not a bundle tar as doorstep "
                "packs it (pack it with doorstep-host bundle / deploy)"
            )
        self.manifest_bytes = self._read(first, MANIFEST_MAX_BYTES)
        self.signature_bytes: bytes | None = None
        self._pending = self._next()
        if self._pending is not None and self._pending.name == SIGNATURE:
            self.signature_bytes = self._read(self._pending, SIGNATURE_MAX_BYTES)
            self._pending = self._next()
        self.manifest: Manifest = manifest_from_bytes(self.manifest_bytes, f"{where}[{MANIFEST}]")
        if self.manifest.model_file not in self.manifest.files:
            raise BundleError(
                f"{where}[{MANIFEST}]: files does not list the model {self.manifest.model_file}"
            )
        for name in self.manifest.files:
            if name != os.path.basename(name) or name.startswith(".") or name in ("", MANIFEST):
                raise BundleError(f"{where}[{MANIFEST}]: file name {name!r} is not a plain name")

    @property
    def total_bytes(self) -> int:
        """What extracting writes: the manifest, the signature and every listed file."""
        sig = len(self.signature_bytes or b"")
        return len(self.manifest_bytes) + sig + sum(e.size for e in self.manifest.files.values())

    @property
    def max_tar_bytes(self) -> int:
        """The most a tar of exactly this bundle can take: each member's header (with room for
        pax records), its data padded to a block, and the end-of-archive record."""
        sizes = [len(self.manifest_bytes), len(self.signature_bytes or b"")]
        sizes += [e.size for e in self.manifest.files.values()]
        per_member = 4 * tarfile.BLOCKSIZE
        return (
            sum(per_member + n + (-n % tarfile.BLOCKSIZE) for n in sizes) + 2 * tarfile.RECORDSIZE
        )

    def extract_into(self, dir_fd: int) -> None:
        """Write the bundle into the (empty, private) directory ``dir_fd``: every file created
        exclusively, never through a link, checked against its manifest entry and fsynced."""
        self._write(dir_fd, MANIFEST, [self.manifest_bytes])
        if self.signature_bytes is not None:
            self._write(dir_fd, SIGNATURE, [self.signature_bytes])
        wanted = dict(self.manifest.files)
        member = self._pending
        while member is not None:
            entry = wanted.pop(member.name, None)
            if entry is None:
                seen = member.name in self.manifest.files or member.name in (MANIFEST, SIGNATURE)
                raise BundleError(
                    f"{self.where}: member {member.name!r} "
                    + ("appears twice" if seen else "is not listed in its manifest")
                    + ": refused before reading it (a bundle tar holds its listed files only)"
                )
            if member.size != entry.size:
                raise BundleError(
                    f"{self.where}: member {member.name!r} is {member.size} bytes, its manifest "
                    f"says {entry.size}: refused before reading it"
                )
            src = self.tar.extractfile(member)
            if src is None:  # _next() let only regular files through
                raise BundleError(f"{self.where}: member {member.name!r} has no data")
            digest = hashlib.sha256()
            self._write(dir_fd, member.name, _chunks(src, member.size, digest))
            if digest.hexdigest() != entry.sha256:
                raise BundleError(
                    f"{self.where}: member {member.name!r}: sha256 {digest.hexdigest()[:12]}… "
                    f"does not match the manifest's {entry.sha256[:12]}…: refused"
                )
            member = self._next()
        if wanted:
            raise BundleError(
                f"{self.where}: lacks {', '.join(sorted(wanted))}, listed in its manifest"
            )
        os.fsync(dir_fd)

    # ----------------------------------------------------------------------------- helpers

    def _next(self) -> tarfile.TarInfo | None:
        """The next member's header (never its data), refusing anything but a plain file."""
        self._peek(self.tar.offset)
        try:
            member = self.tar.next()
        except tarfile.TarError as exc:
            raise BundleError(f"{self.where}: damaged tar: {exc}") from None
        if member is None:
            return None
        if not member.isreg() or member.issparse() or member.name != os.path.basename(member.name):
            raise BundleError(
                f"{self.where}: unexpected entry {member.name!r}: a bundle tar holds plain "
                "files only"
            )
        # Nothing kept per member (tarfile's list of seen members; not in its type stubs).
        self.tar.members = []  # type: ignore[attr-defined]
        return member

    def _peek(self, offset: int) -> None:
        """Refuse an oversized pax / long-name header (or a chain of them) before tarfile
        reads it into memory."""
        start = offset
        try:
            while True:
                self.fh.seek(offset)
                block = self.fh.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE or block[156:157] not in _EXT_TYPES:
                    return
                field = block[124:136]
                try:  # octal; a base-256 size (first byte 0x80 or more) is always too large
                    size = 1 << 64 if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
                except ValueError:
                    return  # tarfile itself reports the damaged header
                if size > EXT_HEADER_MAX_BYTES:
                    raise BundleError(
                        f"{self.where}: an extended tar header of {size} bytes (more than "
                        f"{EXT_HEADER_MAX_BYTES}): refused"
                    )
                offset += tarfile.BLOCKSIZE + size + (-size % tarfile.BLOCKSIZE)
        finally:
            self.fh.seek(start)

    def _read(self, member: tarfile.TarInfo, limit: int) -> bytes:
        if member.size > limit:
            raise BundleError(
                f"{self.where}: {member.name} is {member.size} bytes, more than the {limit} "
                "allowed: refused unread"
            )
        src = self.tar.extractfile(member)
        data = src.read(member.size) if src is not None else b""
        if len(data) != member.size:
            raise BundleError(f"{self.where}: {member.name} is truncated")
        return data

    def _write(self, dir_fd: int, name: str, chunks: Iterable[bytes]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)


def _chunks(src: IO[bytes], size: int, digest: Any) -> Iterator[bytes]:
    """``size`` bytes of a member in chunks, hashed on the way (``digest``: a hashlib object)."""
    left = size
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise BundleError("a tar member is truncated")
        digest.update(chunk)
        left -= len(chunk)
        yield chunk
