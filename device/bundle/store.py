"""Write, read and verify model bundles: a directory (or its .tar) with model and manifest.

Writing stages everything in a temporary sibling directory and renames it into place, so a
failed write never leaves a half bundle. Reading verifies the size and sha256 of every file
the manifest lists and refuses any mismatch, saying which file and how it differs.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from device.bundle.manifest import SCHEMA_VERSION, FileEntry, Manifest
from device.errors import BundleError, format_validation_error
from device.hashing import sha256_file

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


@dataclass(frozen=True)
class Bundle:
    """A manifest and where its files are on disk."""

    manifest: Manifest
    paths: Mapping[str, Path]
    source: Path
    verified: bool

    @property
    def model_path(self) -> Path:
        return self.paths[self.manifest.model_file]

    def file(self, name: str) -> Path:
        try:
            return self.paths[name]
        except KeyError:
            raise BundleError(f"{self.source}: bundle has no file {name!r}") from None


def write_bundle(
    out_dir: str | Path,
    manifest: Manifest,
    files: Mapping[str, Path | bytes],
    *,
    overwrite: bool = False,
) -> Bundle:
    """Write ``files`` (name -> source path or bytes) and a manifest with their hashes.

    The model must be among ``files`` under ``manifest.model_file``.
    """
    out = Path(out_dir)
    if manifest.model_file not in files:
        raise BundleError(f"bundle for {out} lacks its model file {manifest.model_file}")
    for name in files:
        if name != Path(name).name or name in (MANIFEST, "manifest.sig"):
            raise BundleError(
                f"bundle file name {name!r} must be a plain file name, not {MANIFEST}"
            )
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists: choose another --out or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        stage.chmod(0o755)  # mkdtemp makes it private; a bundle is readable like any directory
        entries: dict[str, FileEntry] = {}
        for name, src in files.items():
            dest = stage / name
            if isinstance(src, bytes):
                dest.write_bytes(src)
            else:
                shutil.copyfile(src, dest)
            entries[name] = FileEntry(sha256=sha256_file(dest), size=dest.stat().st_size)
        final = manifest.model_copy(update={"files": entries})
        data = json.dumps(final.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
        with (stage / MANIFEST).open("w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if out.exists():
            aside = out.with_name(f".{out.name}.old")
            shutil.rmtree(aside, ignore_errors=True)
            out.rename(aside)
            stage.rename(out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return load_bundle(out)


def pack_bundle(bundle_dir: str | Path, tar_path: str | Path) -> Path:
    """Pack a bundle into an uncompressed tar for transport (models barely compress).

    Only the manifest, its signature (if signed) and the files it lists go in, so the tar loads
    wherever the directory does.
    """
    src, dest = Path(bundle_dir), Path(tar_path)
    bundle = load_bundle(src)  # never ship a bundle that does not verify
    part = dest.with_name(dest.name + ".part")
    try:
        with tarfile.open(part, "w") as tar:
            tar.add(src / MANIFEST, arcname=MANIFEST, recursive=False)
            if (src / SIGNATURE).is_file():  # the signature travels with the manifest it signs
                tar.add(src / SIGNATURE, arcname=SIGNATURE, recursive=False)
            for name in sorted(bundle.manifest.files):
                tar.add(src / name, arcname=name, recursive=False)
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


MANIFEST_MAX_BYTES = 1 << 20
"""A real manifest is a few KiB; a larger one is refused unread"""
MANIFEST_MAX_DEPTH = 32
"""A real manifest nests 4 deep; deeper JSON is refused before it is parsed"""
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes, limit: int) -> int:
    """How deep ``data``'s arrays and objects nest, counting no further than ``limit + 1``
    (strings skipped): checked before ``json.loads``, which recurses once per level."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", data)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def manifest_from_bytes(data: bytes, where: str) -> Manifest:
    """Parse and validate a manifest's bytes (bounded size and nesting); refuse unknown schema
    versions. Raises :class:`BundleError` naming ``where``."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise BundleError(f"{where}: more than {MANIFEST_MAX_BYTES} bytes: not a doorstep manifest")
    if json_depth(data, MANIFEST_MAX_DEPTH) > MANIFEST_MAX_DEPTH:
        raise BundleError(
            f"{where}: nested more than {MANIFEST_MAX_DEPTH} deep: not a doorstep manifest"
        )
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON: {exc}") from None
    except RecursionError:
        raise BundleError(f"{where}: nested too deeply: not a doorstep manifest") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: expected a JSON object")
    version = raw.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema_version {version} is newer than this doorstep understands "
            f"({SCHEMA_VERSION}): upgrade doorstep on this device"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(format_validation_error(exc, where)) from None


def read_manifest(path: Path) -> Manifest:
    """Read, parse and validate ``manifest.json`` (see :func:`manifest_from_bytes`)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing: not a doorstep bundle") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return manifest_from_bytes(data, str(path))


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Load a bundle directory or ``.tar``; verify every file's size and sha256."""
    src = Path(path)
    if src.is_file() and tarfile.is_tarfile(src):
        return _load_tar(src, verify)
    if not src.is_dir():
        raise BundleError(
            f"{src}: not a bundle directory or .tar" + ("" if src.exists() else " (not found)")
        )
    manifest = read_manifest(src / MANIFEST)
    if manifest.model_file not in manifest.files:
        raise BundleError(f"{src / MANIFEST}: files does not list the model {manifest.model_file}")
    paths: dict[str, Path] = {}
    for name, entry in manifest.files.items():
        if name != Path(name).name or name.startswith("."):
            raise BundleError(f"{src / MANIFEST}: file name {name!r} is not a plain file name")
        file = src / name
        paths[name] = file
        if verify:
            _verify_file(file, entry)
    return Bundle(manifest=manifest, paths=paths, source=src, verified=verify)


def _verify_file(file: Path, entry: FileEntry) -> None:
    if not file.is_file():
        raise BundleError(f"{file}: listed in the manifest but missing from the bundle")
    size = file.stat().st_size
    if size != entry.size:
        raise BundleError(
            f"{file}: size {size} bytes, manifest says {entry.size}: truncated or replaced; "
            "re-copy the bundle"
        )
    digest = sha256_file(file)
    if digest != entry.sha256:
        raise BundleError(
            f"{file}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…: "
            "the file was altered after the bundle was written; refusing it"
        )


def extract_tar(src: Path, dest: Path) -> None:
    """Unpack a bundle tar into ``dest`` (created), refusing anything but plain top-level files."""
    try:
        with tarfile.open(src) as tar:
            members = tar.getmembers()
            for m in members:
                if not m.isfile() or m.name != Path(m.name).name:
                    raise BundleError(
                        f"{src}: unexpected entry {m.name!r}: a bundle tar holds plain files only"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, filter="data")
    except tarfile.TarError as exc:
        raise BundleError(f"{src}: damaged tar: {exc}") from None


def _load_tar(src: Path, verify: bool) -> Bundle:
    dest = Path(tempfile.mkdtemp(prefix="doorstep-bundle-"))
    atexit.register(shutil.rmtree, dest, True)  # the model is read from here while in use
    try:
        extract_tar(src, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    bundle = load_bundle(dest, verify=verify)
    return Bundle(manifest=bundle.manifest, paths=bundle.paths, source=src, verified=verify)
