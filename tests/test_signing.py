"""Bundle signatures: the shipped parcel bundle signed and verified; tampering and strangers refused."""

from __future__ import annotations

import json
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

import device
from device.bundle.signing import (
    SIGNATURE,
    PublicKey,
    SignatureError,
    bundle_id,
    generate_keypair,
    load_public_keys,
    load_signed_bundle,
    read_signature,
    sign_bundle,
    verify_bundle_signature,
)
from device.bundle.store import load_bundle
from device.errors import BundleError, ConfigError

SHIPPED = Path(device.__file__).parent / "models" / "parcel-ssd"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A copy of the default bundle (the repository's copy is never touched)."""
    return Path(shutil.copytree(SHIPPED, tmp_path / "parcel-ssd"))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, PublicKey]:
    private, public = tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "signing.pub"
    key = generate_keypair(private, public, comment="test key")
    return private, public, key


def _tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for path in sorted(src.iterdir()):
            tar.add(path, arcname=path.name)
    return dest


def test_keygen_writes_a_private_pem_0600_and_a_one_line_public_key(
    keys: tuple[Path, Path, PublicKey],
) -> None:
    private, public, key = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    line = public.read_text()
    assert line.count("\n") == 1 and line.startswith("doorstep-ed25519 ")
    assert line.rstrip().endswith(" test key")
    assert [k.key_id for k in load_public_keys(public)] == [key.key_id]
    assert len(key.key_id) == 16
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(private, public.with_name("other.pub"))
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(private.with_name("other.pem"), public)
    assert not private.with_name("other.pem").exists()


def test_sign_and_verify_round_trip(bundle: Path, keys: tuple[Path, Path, PublicKey]) -> None:
    private, public, key = keys
    before = bundle_id(bundle)
    sig = sign_bundle(bundle, private)
    assert sig.key_id == key.key_id
    assert sig.manifest_sha256 == before == bundle_id(bundle)  # signing keeps the bundle id
    raw = json.loads((bundle / SIGNATURE).read_text())
    assert raw["format"] == "doorstep-signature/1" and raw["algorithm"] == "ed25519"
    assert verify_bundle_signature(bundle, public) == key.key_id
    assert verify_bundle_signature(bundle, [key]) == key.key_id
    # manifest.sig is not listed in the manifest, and the hash check does not mind it.
    assert SIGNATURE not in load_bundle(bundle).manifest.files
    loaded, signer = load_signed_bundle(bundle, public)
    assert signer == key.key_id and loaded.manifest.name == "doorstep-parcel-ssd"


def test_a_signed_tar_verifies_and_has_the_same_id(
    bundle: Path, keys: tuple[Path, Path, PublicKey], tmp_path: Path
) -> None:
    private, public, key = keys
    sign_bundle(bundle, private)
    tar = _tar(bundle, tmp_path / "parcel.tar")
    assert bundle_id(tar) == bundle_id(bundle)
    assert verify_bundle_signature(tar, public) == key.key_id
    sig = read_signature(tar)
    assert sig is not None and sig.key_id == key.key_id
    assert load_signed_bundle(tar, public)[1] == key.key_id


def test_a_tampered_manifest_is_refused(bundle: Path, keys: tuple[Path, Path, PublicKey]) -> None:
    private, public, _ = keys
    sign_bundle(bundle, private)
    manifest = bundle / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["thresholds"]["score"] = 0.01
    manifest.write_text(json.dumps(raw, indent=2) + "\n")
    with pytest.raises(SignatureError, match="changed after it was signed"):
        verify_bundle_signature(bundle, public)


def test_a_forged_signature_is_refused(bundle: Path, keys: tuple[Path, Path, PublicKey]) -> None:
    """Even when the attacker also fixes the recorded manifest digest."""
    private, public, _ = keys
    sign_bundle(bundle, private)
    manifest = bundle / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"1.0.0"', b'"1.0.1"'))
    raw = json.loads((bundle / SIGNATURE).read_text())
    raw["manifest_sha256"] = bundle_id(bundle)
    (bundle / SIGNATURE).write_text(json.dumps(raw))
    with pytest.raises(SignatureError, match="bad signature"):
        verify_bundle_signature(bundle, public)


def test_a_tampered_model_passes_the_signature_but_not_the_hashes(
    bundle: Path, keys: tuple[Path, Path, PublicKey]
) -> None:
    private, public, _ = keys
    sign_bundle(bundle, private)
    model = bundle / "model.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    verify_bundle_signature(bundle, public)  # the manifest itself is intact...
    with pytest.raises(BundleError, match="does not match the manifest"):
        load_signed_bundle(bundle, public)  # ...but activation checks the files too


def test_an_unsigned_bundle_is_refused(bundle: Path, keys: tuple[Path, Path, PublicKey]) -> None:
    with pytest.raises(
        SignatureError, match="no manifest.sig; this device requires signed bundles"
    ):
        verify_bundle_signature(bundle, keys[1])


def test_a_bundle_signed_by_another_key_is_refused_naming_the_key(
    bundle: Path, keys: tuple[Path, Path, PublicKey], tmp_path: Path
) -> None:
    _, public, trusted = keys
    stranger = generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    sign_bundle(bundle, tmp_path / "other.pem")
    with pytest.raises(SignatureError) as info:
        verify_bundle_signature(bundle, public)
    assert f"signed with key {stranger.key_id}" in str(info.value)
    assert trusted.key_id in str(info.value)  # and says which keys it does trust


def test_several_trusted_keys_allow_rotation(
    bundle: Path, keys: tuple[Path, Path, PublicKey], tmp_path: Path
) -> None:
    _, public, _ = keys
    new = generate_keypair(tmp_path / "new.pem", tmp_path / "new.pub")
    both = tmp_path / "trusted.pub"
    both.write_text(f"# old and new\n{public.read_text()}\n{(tmp_path / 'new.pub').read_text()}")
    sign_bundle(bundle, tmp_path / "new.pem")
    assert verify_bundle_signature(bundle, both) == new.key_id
    assert verify_bundle_signature(bundle, [public, tmp_path / "new.pub"]) == new.key_id


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"format": "doorstep-signature/1"}', "missing"),
        ("SIG", "unknown \\['extra'\\]"),
        ("BADB64", "signature is not the base64 of a 64-byte"),
        ("BADALG", "algorithm 'rsa'"),
    ],
)
def test_a_malformed_signature_file_is_refused(
    bundle: Path, keys: tuple[Path, Path, PublicKey], content: str, expected: str
) -> None:
    private, public, _ = keys
    good = json.loads(sign_bundle(bundle, private).to_json())
    if content == "SIG":
        content = json.dumps({**good, "extra": 1})
    elif content == "BADB64":
        content = json.dumps({**good, "signature": "AAAA"})
    elif content == "BADALG":
        content = json.dumps({**good, "algorithm": "rsa"})
    (bundle / SIGNATURE).write_text(content)
    with pytest.raises(SignatureError, match=f"malformed signature file: {expected}"):
        verify_bundle_signature(bundle, public)


def test_bad_key_files_are_config_errors(tmp_path: Path, bundle: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 AAAA user@host\n")
    with pytest.raises(ConfigError, match=r"bad.pub:1: expected 'doorstep-ed25519"):
        load_public_keys(bad)
    bad.write_text("doorstep-ed25519 AAAA\n")
    with pytest.raises(ConfigError, match="not a base64 Ed25519 public key"):
        load_public_keys(bad)
    bad.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no"):
        load_public_keys(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_public_keys(tmp_path / "missing.pub")
    with pytest.raises(ConfigError, match="private key not found"):
        sign_bundle(bundle, tmp_path / "missing.pem")
    assert not (bundle / SIGNATURE).exists()


def test_an_encrypted_private_key_needs_its_passphrase(bundle: Path, tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub", passphrase=b"s3cret")
    with pytest.raises(ConfigError, match="encrypted"):
        sign_bundle(bundle, tmp_path / "k.pem")
    assert sign_bundle(bundle, tmp_path / "k.pem", passphrase=b"s3cret").key_id == key.key_id


def test_signing_refuses_a_bundle_whose_files_do_not_verify(
    bundle: Path, keys: tuple[Path, Path, PublicKey]
) -> None:
    (bundle / "anchors.npy").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="anchors.npy"):
        sign_bundle(bundle, keys[0])
    assert not (bundle / SIGNATURE).exists()
