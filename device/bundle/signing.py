"""Ed25519 signatures over a bundle's manifest: the host signs, the device verifies.

``manifest.json`` pins the sha256 and size of every other file, so a signature over its exact
bytes covers the whole bundle; ``load_bundle`` then checks the files against it. A device
therefore accepts a bundle only when both checks pass: :func:`load_signed_bundle` does the two.

Formats (all text, all small):

- **public key file**: one key per line, ``doorstep-ed25519 <base64 of the 32 raw key bytes>
  [comment]``; blank lines and ``#`` comments are ignored, so a device may trust several keys
  (key rotation) by listing them.
- **private key file**: PKCS#8 PEM (``openssl pkey -in FILE`` reads it), mode 0600, optionally
  encrypted with a passphrase.
- **key id**: the first 16 hex digits of sha256 of the 32 raw public key bytes.
- **manifest.sig** (beside ``manifest.json``, never listed in it): a JSON object
  ``{"format": "doorstep-signature/1", "algorithm": "ed25519", "key_id": ...,
  "manifest_sha256": ..., "signature": <base64 of 64 bytes>}``. The signature is over the raw
  bytes of ``manifest.json`` (``openssl pkeyutl -verify -rawin`` can check it);
  ``manifest_sha256`` only lets an error say "the manifest changed" rather than "bad signature".
- **bundle id**: sha256 (hex) of the ``manifest.json`` bytes: one stable id for the whole bundle,
  the same for its directory and its tar, unchanged by signing.

``cryptography`` is imported only inside the functions that sign or verify, so importing this
module stays cheap on a device.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from device.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from device.bundle.store import Bundle

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "doorstep-signature/1"
KEY_TYPE = "doorstep-ed25519"

_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(BundleError):
    """A bundle that is unsigned, signed by an untrusted key, or whose signature does not verify."""


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key: its 32 raw bytes, its id, and where it was read from."""

    raw: bytes
    comment: str = ""
    source: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def line(self) -> str:
        """The key as one line of a public key file."""
        text = f"{KEY_TYPE} {base64.b64encode(self.raw).decode('ascii')}"
        return f"{text} {self.comment}" if self.comment else text


@dataclass(frozen=True)
class Signature:
    """The parsed content of ``manifest.sig``."""

    key_id: str
    manifest_sha256: str
    signature: bytes

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": SIGNATURE_FORMAT,
                    "algorithm": "ed25519",
                    "key_id": self.key_id,
                    "manifest_sha256": self.manifest_sha256,
                    "signature": base64.b64encode(self.signature).decode("ascii"),
                },
                indent=2,
            )
            + "\n"
        )


def key_id(raw_public_key: bytes) -> str:
    """First 16 hex digits of sha256 of the raw public key: short, stable, shown in errors."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def bundle_id(bundle: str | Path) -> str:
    """sha256 (hex) of the bundle's ``manifest.json`` bytes, for a bundle directory or ``.tar``.

    The manifest pins every file's sha256 and size, so this one digest names the whole content;
    ``manifest.sig`` is not part of it, so signing (or re-signing) keeps the id.
    """
    return hashlib.sha256(_manifest_bytes(Path(bundle))).hexdigest()


# ------------------------------------------------------------------------------------ keys


def generate_keypair(
    private_path: str | Path,
    public_path: str | Path,
    *,
    comment: str = "",
    passphrase: bytes | None = None,
) -> PublicKey:
    """Create an Ed25519 key pair: private key PEM (mode 0600) and a one-line public key file.

    Refuses to overwrite either file: losing a signing key locks out every device that trusts
    it. Returns the public key (its ``key_id`` is what devices report).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private, public = Path(private_path), Path(public_path)
    if private.resolve() == public.resolve():
        raise ConfigError(f"{private}: the private and public key files must differ")
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path}: already exists; refusing to overwrite a key (move it away)")
    if "\n" in comment:
        raise ConfigError("a key comment must be a single line")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pub = PublicKey(raw=raw, comment=comment, source=str(public))
    private.parent.mkdir(parents=True, exist_ok=True)
    public.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    try:
        fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(pub.line() + "\n")
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return pub


def parse_public_keys(text: str, source: str = "") -> list[PublicKey]:
    """Parse a public key file's text: one ``doorstep-ed25519 <base64> [comment]`` per line."""
    keys: list[PublicKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}" if source else f"line {number}"
        kind, _, rest = line.partition(" ")
        encoded, _, comment = rest.strip().partition(" ")
        if kind != KEY_TYPE:
            raise ConfigError(
                f"{where}: expected '{KEY_TYPE} <base64> [comment]', got a line starting {kind!r}"
            )
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"{where}: not a base64 Ed25519 public key (32 bytes)")
        keys.append(PublicKey(raw=raw, comment=comment.strip(), source=where))
    return keys


def load_public_keys(paths: str | Path | Iterable[str | Path]) -> list[PublicKey]:
    """Read every key from one public key file or several; refuse files that hold none."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    keys: list[PublicKey] = []
    for item in items:
        path = Path(item)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ConfigError(f"{path}: public key file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read public key file: {exc}") from None
        found = parse_public_keys(text, str(path))
        if not found:
            raise ConfigError(f"{path}: holds no '{KEY_TYPE}' public key")
        keys += found
    return keys


def _load_private_key(path: Path, passphrase: bytes | None) -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: private key not found (make one with `doorstep-host keygen`)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read private key: {exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise ConfigError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: is a {type(key).__name__}, not an Ed25519 private key")
    return key


# ------------------------------------------------------------------------------------ signing


def sign_bundle(
    bundle_dir: str | Path, private_key_path: str | Path, *, passphrase: bytes | None = None
) -> Signature:
    """Verify the bundle's files, then write ``manifest.sig`` over its exact manifest bytes.

    Only a directory can be signed (pack it into a tar afterwards); an existing signature is
    replaced atomically.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device.bundle.store import load_bundle

    src = Path(bundle_dir)
    if not src.is_dir():
        raise BundleError(f"{src}: sign a bundle directory (then pack it), not {src.name}")
    load_bundle(src)  # never sign files that do not match their manifest
    key = _load_private_key(Path(private_key_path), passphrase)
    assert isinstance(key, Ed25519PrivateKey)
    data = (src / MANIFEST).read_bytes()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = Signature(
        key_id=key_id(raw),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        signature=key.sign(data),
    )
    part = src / f".{SIGNATURE}.part"
    part.write_text(sig.to_json(), encoding="ascii")
    part.replace(src / SIGNATURE)
    return sig


def parse_signature(text: bytes, where: str) -> Signature:
    """Parse ``manifest.sig``; raise ``SignatureError`` naming what is malformed."""

    def bad(reason: str) -> SignatureError:
        return SignatureError(f"{where}: malformed signature file: {reason}; re-sign the bundle")

    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise bad("expected a JSON object")
    expected = {"format", "algorithm", "key_id", "manifest_sha256", "signature"}
    if set(raw) != expected:
        missing, extra = sorted(expected - set(raw)), sorted(set(raw) - expected)
        raise bad(
            ", ".join(
                ([f"missing {missing}"] if missing else [])
                + ([f"unknown {extra}"] if extra else [])
            )
        )
    if raw["format"] != SIGNATURE_FORMAT:
        raise bad(f"format {raw['format']!r} is not {SIGNATURE_FORMAT!r}")
    if raw["algorithm"] != "ed25519":
        raise bad(f"algorithm {raw['algorithm']!r} is not 'ed25519'")
    if not isinstance(raw["key_id"], str) or not _HEX16.match(raw["key_id"]):
        raise bad(f"key_id {raw['key_id']!r} is not 16 lowercase hex digits")
    if not isinstance(raw["manifest_sha256"], str) or not _HEX64.match(raw["manifest_sha256"]):
        raise bad("manifest_sha256 is not 64 lowercase hex digits")
    try:
        signature = base64.b64decode(str(raw["signature"]), validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if len(signature) != 64:
        raise bad("signature is not the base64 of a 64-byte Ed25519 signature")
    return Signature(raw["key_id"], raw["manifest_sha256"], signature)


def read_signature(bundle: str | Path) -> Signature | None:
    """The bundle's parsed ``manifest.sig`` (directory or tar), or None when it is unsigned."""
    src = Path(bundle)
    data = _read_member(src, SIGNATURE, required=False)
    return None if data is None else parse_signature(data, _where(src, SIGNATURE))


def verify_bundle_signature(
    bundle: str | Path, trusted: str | Path | Sequence[str | Path] | Sequence[PublicKey]
) -> str:
    """Check ``manifest.sig`` against the trusted keys; return the id of the key that signed.

    ``bundle`` is a directory or ``.tar``; ``trusted`` is a public key file, several, or keys
    already loaded. This checks the manifest only: the files are checked against the manifest
    by ``load_bundle`` (see :func:`load_signed_bundle`, which does both).
    """
    src = Path(bundle)
    data = _manifest_bytes(src)
    sig_bytes = _read_member(src, SIGNATURE, required=False)
    return verify_manifest_signature(data, sig_bytes, trusted, str(src), src.is_file())


def verify_manifest_signature(
    data: bytes,
    sig_bytes: bytes | None,
    trusted: str | Path | Sequence[str | Path] | Sequence[PublicKey],
    where: str,
    in_tar: bool = True,
) -> str:
    """Check ``manifest.sig`` (its bytes, None when absent) over the manifest bytes ``data``;
    return the signing key's id. ``where`` names the bundle in errors. What the device's
    ``install`` calls on the two members it read from a tar before extracting anything."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = _trusted_keys(trusted)
    if not keys:
        raise ConfigError("no trusted public key given: cannot verify a bundle signature")

    def member(name: str) -> str:
        return f"{where}[{name}]" if in_tar else str(Path(where) / name)

    if sig_bytes is None:
        raise SignatureError(
            f"{where}: no {SIGNATURE}; this device requires signed bundles "
            "(sign it on the host: doorstep-host sign BUNDLE)"
        )
    sig = parse_signature(sig_bytes, member(SIGNATURE))
    by_id = {k.key_id: k for k in keys}
    key = by_id.get(sig.key_id)
    if key is None:
        raise SignatureError(
            f"{where}: signed with key {sig.key_id}, which this device does not trust "
            f"(trusted: {', '.join(sorted(by_id))}); add that public key to the device's "
            "config or re-sign the bundle with a trusted key"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != sig.manifest_sha256:
        raise SignatureError(
            f"{member(MANIFEST)}: changed after it was signed by key {sig.key_id} "
            f"(signed sha256 {sig.manifest_sha256[:12]}…, now {actual[:12]}…); refusing it"
        )
    try:
        Ed25519PublicKey.from_public_bytes(key.raw).verify(sig.signature, data)
    except InvalidSignature:
        raise SignatureError(
            f"{where}: bad signature: {SIGNATURE} does not verify with key {sig.key_id}; "
            "the manifest or the signature was altered; refusing it"
        ) from None
    return sig.key_id


def load_signed_bundle(
    bundle: str | Path, trusted: str | Path | Sequence[str | Path] | Sequence[PublicKey]
) -> tuple[Bundle, str]:
    """Verify the signature, then load and verify every file: what ``activate`` needs.

    Returns the loaded bundle and the signing key's id.
    """
    from device.bundle.store import load_bundle

    signer = verify_bundle_signature(bundle, trusted)
    loaded = load_bundle(bundle)
    # The manifest load_bundle parsed (a tar's is a private extracted copy) must be the one the
    # signature covered: refuse a swap between the two reads.
    used = (loaded.model_path.parent / MANIFEST).read_bytes()
    signed = read_signature(bundle)
    if signed is None or hashlib.sha256(used).hexdigest() != signed.manifest_sha256:
        raise SignatureError(f"{bundle}: manifest changed while it was being verified; retry")
    return loaded, signer


# ------------------------------------------------------------------------------------ helpers


def _trusted_keys(
    trusted: str | Path | Sequence[str | Path] | Sequence[PublicKey],
) -> list[PublicKey]:
    if isinstance(trusted, str | Path):
        return load_public_keys(trusted)
    items = list(trusted)
    if all(isinstance(k, PublicKey) for k in items):
        return [k for k in items if isinstance(k, PublicKey)]
    if any(isinstance(k, PublicKey) for k in items):
        raise TypeError("trusted: pass key files or PublicKey objects, not a mix")
    return load_public_keys([k for k in items if isinstance(k, str | Path)])


def _where(src: Path, member: str) -> str:
    return f"{src}[{member}]" if src.is_file() else str(src / member)


def _manifest_bytes(src: Path) -> bytes:
    data = _read_member(src, MANIFEST, required=True)
    assert data is not None
    return data


def _read_member(src: Path, member: str, *, required: bool) -> bytes | None:
    """``member`` of a bundle directory or tar, or None when absent and not required."""
    if src.is_dir():
        try:
            return (src / member).read_bytes()
        except FileNotFoundError:
            if required:
                raise BundleError(f"{src / member}: missing: not a doorstep bundle") from None
            return None
    if src.is_file() and tarfile.is_tarfile(src):
        try:
            with tarfile.open(src) as tar:
                try:
                    info = tar.getmember(member)
                except KeyError:
                    if required:
                        raise BundleError(
                            f"{src}: has no {member}: not a doorstep bundle"
                        ) from None
                    return None
                fh = tar.extractfile(info) if info.isfile() else None
                if fh is None:
                    raise BundleError(f"{src}: {member} is not a plain file")
                return fh.read()
        except tarfile.TarError as exc:
            raise BundleError(f"{src}: damaged tar: {exc}") from None
    raise BundleError(
        f"{src}: not a bundle directory or .tar" + ("" if src.exists() else " (not found)")
    )
