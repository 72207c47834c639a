"""``doorstep-host publish``: a signed bundle as files any static web server, CDN or object
store can serve, named by content.

``DIR/<id>.tar`` is the bundle packed for transport (manifest, signature, listed files);
``DIR/<id>.json`` describes it: id, name, version, size and sha256 of the tar, the signing key
id, and its URL when ``--base-url`` says where DIR is served. No doorstep code runs on the
origin. Both files are written under temporary names and renamed, so an origin never serves a
half-written bundle; publishing the same bundle again rewrites nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from device.bundle.signing import bundle_id, read_signature
from device.bundle.store import load_bundle, pack_bundle
from device.errors import DoorstepError


class PublishError(DoorstepError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(bundle: str | Path, to: str | Path, base_url: str | None = None) -> dict[str, Any]:
    """Write ``<id>.tar`` and ``<id>.json`` into ``to``; return the descriptor."""
    src, out = Path(bundle), Path(to)
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise PublishError(f"--base-url {base_url}: must start with http:// or https://")
    if src.is_dir():
        b = load_bundle(src)  # every file verified against the manifest
        signature = read_signature(src)
    else:
        raise PublishError(f"{src}: not a bundle directory (sign it first: doorstep-host sign)")
    if signature is None:
        raise PublishError(
            f"{src}: not signed: devices pull only signed bundles (doorstep-host sign {src} "
            "--key ...)"
        )
    ident = bundle_id(src)
    out.mkdir(parents=True, exist_ok=True)
    tar = out / f"{ident}.tar"
    if not tar.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{ident}.", suffix=".tar", dir=out)
        os.close(fd)
        try:
            pack_bundle(src, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, tar)
        finally:
            Path(tmp).unlink(missing_ok=True)
    m = b.manifest
    descriptor: dict[str, Any] = {
        "id": ident,
        "name": m.name,
        "version": m.version,
        "size": tar.stat().st_size,
        "sha256": _sha256(tar),
        "key_id": signature.key_id,
        "file": tar.name,
        "url": (base_url.rstrip("/") + "/" + tar.name) if base_url else None,
        "published": round(time.time(), 3),
    }
    desc_path = out / f"{ident}.json"
    if desc_path.exists():
        try:
            old = json.loads(desc_path.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "published"} == {
            k: v for k, v in descriptor.items() if k != "published"
        }:
            return old
    _write_atomic(desc_path, (json.dumps(descriptor, indent=2) + "\n").encode())
    return descriptor
