"""The model store against a local group member and a hostile upload (issue 11, sections 1-2).

The state directory is group-writable, so these tests plant what a group member could: links
under the names install and activate use, links and foreign directories where bundles belong,
a directory where ``current`` belongs, leftovers of killed commands. And they upload what a
hostile host could: members the manifest does not list (a 2 GiB declared size, 20,000 empty
ones, duplicates), a gzip tar, a 100,000-deep manifest that is validly signed, a bundle larger
than the free space. Real files, real tars, real signatures; nothing is mocked (the fsync test
only records the real calls).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from test_install import variant

from device.bundle.signing import bundle_id, generate_keypair, key_id, sign_bundle
from device.bundle.store import load_bundle, pack_bundle
from device.errors import DoorstepError
from device.install import Store, activate, install, prune, rollback, trusted_keys
from device.models import DEFAULT_BUNDLE

pytestmark = pytest.mark.timeout(120)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def place(store: Store, tar: Path, ident: str) -> Path:
    """Where deploy uploads: ``models/<id>.tar.part``."""
    store.models.mkdir(parents=True, exist_ok=True)
    part = store.models / f"{ident}.tar.part"
    shutil.copy(tar, part)
    return part


def installed(store: Store, bundle: Path, tmp_path: Path, keys: list[Any] | None = None) -> Path:
    tar = pack_bundle(bundle, tmp_path / f"{bundle.name}.tar")
    ident = bundle_id(bundle)
    return install(store, place(store, tar, ident), ident, sha(tar), keys or [])


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.communicate(timeout=60)
    return child.pid


def store_entries(store: Store) -> list[str]:
    return sorted(os.listdir(store.models))


def device_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device.cli", *args], capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------- 1. a local group member


def test_install_and_activate_never_write_through_a_planted_temp_name(tmp_path: Path) -> None:
    """The names the old code used (``.<id>.tmp-<pid>``, ``.current.tmp-<pid>``) planted as
    links into another directory: nothing lands there, the bundle and links are real."""
    store = Store(tmp_path / "state")
    bundle = variant(tmp_path, "v1")
    ident = bundle_id(bundle)
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir()
    store.models.mkdir(parents=True)
    planted = [store.models / f".{ident}.tmp-{os.getpid()}"]
    planted += [store.state_dir / f".{n}.tmp-{os.getpid()}" for n in ("current", "previous")]
    for link in planted:
        os.symlink(elsewhere, link)
    final = installed(store, bundle, tmp_path)
    assert os.listdir(elsewhere) == []
    assert final.is_dir() and not final.is_symlink() and load_bundle(final).verified
    second = installed(store, variant(tmp_path, "v2"), tmp_path)
    activate(store, final, [])
    activate(store, second, [])
    assert os.readlink(store.current) == f"models/{second.name}"
    assert os.readlink(store.previous) == f"models/{final.name}"
    assert os.listdir(elsewhere) == [] and all(p.is_symlink() for p in planted)


def test_a_planted_bundle_link_is_refused_and_prune_removes_only_the_link(tmp_path: Path) -> None:
    """``models/<id>`` as a link (to a real bundle elsewhere): install does not take it for
    installed, activate refuses it, prune unlinks it and says so; what it points at stays."""
    store = Store(tmp_path / "state")
    installed(store, variant(tmp_path, "v0"), tmp_path)
    bundle = variant(tmp_path, "v1")
    ident = bundle_id(bundle)
    os.symlink(bundle, store.model_dir(ident))
    tar = pack_bundle(bundle, tmp_path / "v1.tar")
    with pytest.raises(DoorstepError, match="is a symbolic link, not an installed bundle"):
        install(store, place(store, tar, ident), ident, sha(tar), [])
    with pytest.raises(DoorstepError, match="is a symbolic link, not an installed bundle"):
        activate(store, store.model_dir(ident), [])
    assert not os.path.lexists(store.current)
    gone = prune(store, keep=5)
    assert any(g.startswith(ident) and "symbolic link" in g for g in gone), gone
    assert not os.path.lexists(store.model_dir(ident))
    assert load_bundle(bundle).verified  # the link's target is untouched


def test_a_bundle_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root; CI runs as root")
    store = Store(tmp_path / "state")
    final = installed(store, variant(tmp_path, "v1"), tmp_path)
    os.chown(final, 65534, 65534)
    with pytest.raises(DoorstepError, match="owned by uid 65534"):
        activate(store, final, [])
    assert not os.path.lexists(store.current)


def test_current_replaced_by_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    final = installed(store, variant(tmp_path, "v1"), tmp_path)
    store.current.mkdir()
    (store.current / "model.tflite").write_bytes(b"planted")
    for args in (("activate", str(final)), ("rollback",)):
        out = device_cli(*args, "--state-dir", str(store.state_dir), "--reload", "none")
        assert out.returncode == 2, out.stderr
        assert f"{store.current}: is a directory" in out.stderr and "Traceback" not in out.stderr
        assert "nothing was changed" in out.stderr
    assert (store.current / "model.tflite").read_bytes() == b"planted"


def test_leftovers_of_killed_commands_are_cleaned_without_following_links(
    tmp_path: Path,
) -> None:
    """A killed install leaves ``.<id>.tmp-<pid>-*``, a killed activate ``.current.tmp-*``:
    the next install, activate and prune remove them (their pid is gone), never what a link
    inside them points at, never an entry of another name."""
    store = Store(tmp_path / "state")
    keep = tmp_path / "precious"
    keep.write_text("mine")

    def plant() -> list[Path]:
        pid = dead_pid()
        hexid = hashlib.sha256(str(pid).encode()).hexdigest()
        half = store.models / f".{hexid}.tmp-{pid}-k1ll3d"
        half.mkdir(parents=True)
        (half / "model.tflite").write_bytes(b"half")
        os.symlink(keep, half / "anchors.npy")
        old_style = store.models / f".{hexid}.tmp-{pid}"
        os.symlink(keep, old_style)
        link = store.state_dir / f".current.tmp-{pid}-abcdef"
        os.symlink("models/x", link)
        return [half, old_style, link]

    store.models.mkdir(parents=True)
    (store.models / ".unrelated").mkdir()
    left = plant()
    final = installed(store, variant(tmp_path, "v1"), tmp_path)  # cleans models/
    assert not any(os.path.lexists(p) for p in left[:2]) and os.path.lexists(left[2])
    activate(store, final, [])  # cleans the state directory
    assert not os.path.lexists(left[2])
    left = plant()
    gone = prune(store, keep=3)
    assert sorted(gone) == sorted(p.name for p in left)
    assert not any(os.path.lexists(p) for p in left)
    assert keep.read_text() == "mine" and (store.models / ".unrelated").is_dir()


def test_install_and_activate_fsync_before_making_things_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every extracted file and the bundle directory are fsynced before the rename that makes
    the bundle visible, ``models/`` after it; a link switch fsyncs the state directory after
    its rename. (The real calls are made; they are only recorded.)"""
    store = Store(tmp_path / "state")
    bundle = variant(tmp_path, "v1")
    tar = pack_bundle(bundle, tmp_path / "v1.tar")
    ident = bundle_id(bundle)
    part = place(store, tar, ident)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def at(name: Any, fd: int | None) -> str:
        return str(name) if fd is None else os.path.join(os.readlink(f"/proc/self/fd/{fd}"), name)

    def rename(src: Any, dst: Any, **kw: Any) -> None:
        src_at, dst_at = at(src, kw.get("src_dir_fd")), at(dst, kw.get("dst_dir_fd"))
        events.append(("rename", f"{src_at} -> {dst_at}"))
        real_rename(src, dst, **kw)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    final = install(store, part, ident, sha(tar), [])
    renames = [i for i, (kind, what) in enumerate(events) if what.endswith(f"-> {final}")]
    assert len(renames) == 1, events
    done = renames[0]
    tmp = events[done][1].split(" -> ")[0]
    synced_before = {what for kind, what in events[:done] if kind == "fsync"}
    for name in ("manifest.json", *load_bundle(final).manifest.files):
        assert f"{tmp}/{name}" in synced_before, (name, events)
    assert tmp in synced_before
    assert ("fsync", str(store.models)) in events[done + 1 :]
    events.clear()
    activate(store, final, [])
    done = next(i for i, (_, what) in enumerate(events) if what.endswith(f"-> {store.current}"))
    assert ("fsync", str(store.state_dir)) in events[done + 1 :], events


# ----------------------------------------------------------- 2. resources before the signature


def _signed(tmp_path: Path) -> tuple[Path, list[Any]]:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    bundle = variant(tmp_path, "signed")
    sign_bundle(bundle, tmp_path / "k.key")
    return bundle, trusted_keys([tmp_path / "k.pub"])


def _retar(bundle: Path, out: Path, extra: list[tarfile.TarInfo], mode: str = "w") -> Path:
    """The bundle as pack_bundle packs it, then ``extra`` headers (declared sizes, no data)."""
    packed = pack_bundle(bundle, out.with_suffix(".plain.tar"))
    with tarfile.open(packed) as src, tarfile.open(out, mode) as dst:  # type: ignore[call-overload]
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for info in extra:
            if info.size == 0:
                dst.addfile(info, io.BytesIO(b""))
    if extra and extra[0].size:  # a huge declared size: the header only, its data never sent
        with tarfile.open(out) as done:
            last = done.getmembers()[-1]
        end = last.offset_data + last.size + (-last.size % tarfile.BLOCKSIZE)
        with out.open("r+b") as fh:
            fh.seek(end)
            fh.write(extra[0].tobuf(tarfile.GNU_FORMAT))
            fh.truncate()
    return out


def _refused(store: Store, tar: Path, ident: str, keys: list[Any], match: str) -> None:
    part = place(store, tar, ident)
    with pytest.raises(DoorstepError, match=match):
        install(store, part, ident, sha(tar), keys)
    assert not os.path.lexists(store.model_dir(ident))
    assert [n for n in store_entries(store) if not n.endswith(".tar.part")] == []


def test_members_the_manifest_does_not_list_are_refused_before_their_data(
    tmp_path: Path,
) -> None:
    bundle, keys = _signed(tmp_path)
    ident = bundle_id(bundle)
    store = Store(tmp_path / "state")
    huge = tarfile.TarInfo("junk.bin")
    huge.size = 2 << 30  # declared 2 GiB: refused at its header, nothing of it read or written
    big = _retar(bundle, tmp_path / "huge.tar", [huge])
    assert big.stat().st_size < 8 << 20
    _refused(store, big, ident, keys, "'junk.bin' is not listed in its manifest")
    many = [tarfile.TarInfo(f"e{i}") for i in range(20_000)]
    many_tar = _retar(bundle, tmp_path / "many.tar", many)  # 10 MB more than the bundle
    _refused(store, many_tar, ident, keys, "can take: it holds something else too")
    twice = tarfile.TarInfo("anchors.npy")
    twice.size = 0
    _refused(store, _retar(bundle, tmp_path / "dup.tar", [twice]), ident, keys, "appears twice")
    # the same member with its 2 GiB really there (a sparse file): refused before hashing it
    part = place(store, big, ident)
    os.truncate(part, part.stat().st_size + (2 << 30))
    with pytest.raises(DoorstepError, match="can take: it holds something else too"):
        install(store, part, ident, "0" * 64, keys)  # the sha256 is not even computed
    assert store_entries(store) == [part.name]
    part.unlink()
    # the signature is checked first: unsigned, the same huge tar is refused for that
    plain = variant(tmp_path, "unsigned")
    unsigned = _retar(plain, tmp_path / "unsigned.tar", [huge])
    _refused(store, unsigned, bundle_id(plain), keys, "requires signed bundles")


def test_a_compressed_tar_is_refused(tmp_path: Path) -> None:
    bundle, keys = _signed(tmp_path)
    store = Store(tmp_path / "state")
    gz = _retar(bundle, tmp_path / "b.tar.gz", [], mode="w:gz")
    _refused(store, gz, bundle_id(bundle), keys, "gzip-compressed archive")


def test_a_deep_manifest_signed_validly_is_refused_without_recursion_error(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    keys = trusted_keys([tmp_path / "k.pub"])
    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    text = json.dumps(manifest)
    data = (text[:-1] + ', "calibration": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}").encode()
    key: Any = load_pem_private_key((tmp_path / "k.key").read_bytes(), None)
    raw = key.public_key().public_bytes_raw()
    sig = {
        "format": "doorstep-signature/1",
        "algorithm": "ed25519",
        "key_id": key_id(raw),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(key.sign(data)).decode(),
    }
    tar = tmp_path / "deep.tar"
    with tarfile.open(tar, "w") as out:
        for name, blob in (("manifest.json", data), ("manifest.sig", json.dumps(sig).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            out.addfile(info, io.BytesIO(blob))
        for name in manifest["files"]:
            out.add(DEFAULT_BUNDLE / name, arcname=name)
    ident = hashlib.sha256(data).hexdigest()
    _refused(Store(tmp_path / "state"), tar, ident, keys, "nested more than 32 deep")
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(data)
    with pytest.raises(DoorstepError, match="nested more than 32 deep"):
        load_bundle(folder)


def test_a_bundle_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    from fsfaults import small_tmpfs

    bundle = variant(tmp_path, "v1")
    tar = pack_bundle(bundle, tmp_path / "v1.tar")
    ident = bundle_id(bundle)
    size_kib = tar.stat().st_size // 1024 + 256  # room for the upload, not for a second copy
    with small_tmpfs(tmp_path / "mnt", size_kib=size_kib) as mnt:
        store = Store(mnt / "state")
        part = place(store, tar, ident)
        with pytest.raises(DoorstepError, match=r"the bundle needs \d+ bytes but .* free"):
            install(store, part, ident, sha(tar), [])
        assert store_entries(store) == [part.name]


def test_install_never_deletes_a_file_outside_the_store(tmp_path: Path) -> None:
    bundle = variant(tmp_path, "v1")
    tar = pack_bundle(bundle, tmp_path / "v1.tar")
    ident = bundle_id(bundle)
    store = Store(tmp_path / "state")
    with pytest.raises(DoorstepError, match="it was left as it is"):
        install(store, tar, ident, "0" * 64, [])
    assert tar.is_file()
    final = install(store, tar, ident, sha(tar), [])
    assert final.is_dir() and tar.is_file()  # installed from outside: the file stays


def test_a_planted_upload_link_is_not_followed(tmp_path: Path) -> None:
    bundle = variant(tmp_path, "v1")
    tar = pack_bundle(bundle, tmp_path / "v1.tar")
    ident = bundle_id(bundle)
    store = Store(tmp_path / "state")
    store.models.mkdir(parents=True)
    part = store.models / f"{ident}.tar.part"
    os.symlink(tar, part)
    with pytest.raises(DoorstepError, match="is a symbolic link: refused"):
        install(store, part, ident, sha(tar), [])
    assert tar.is_file() and not os.path.lexists(store.model_dir(ident))


def test_rollback_to_a_planted_previous_link_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    first = installed(store, variant(tmp_path, "v1"), tmp_path)
    activate(store, first, [])
    elsewhere = variant(tmp_path, "v2")
    ident = bundle_id(elsewhere)
    os.symlink(elsewhere, store.model_dir(ident))
    os.symlink(f"models/{ident}", store.previous)
    with pytest.raises(DoorstepError, match="is a symbolic link"):
        rollback(store, [])
    assert os.readlink(store.current) == f"models/{first.name}"


def test_a_models_directory_planted_as_a_link_is_refused(tmp_path: Path) -> None:
    """``models/`` itself replaced by a link (the state directory is group-writable): install
    and prune refuse it and nothing is written where it points."""
    bundle = variant(tmp_path, "v1")
    tar = pack_bundle(bundle, tmp_path / "v1.tar")
    store = Store(tmp_path / "state")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store.state_dir.mkdir()
    os.symlink(elsewhere, store.models)
    with pytest.raises(DoorstepError, match="not a directory of this user or root"):
        install(store, tar, bundle_id(bundle), sha(tar), [])
    with pytest.raises(DoorstepError, match="not a directory"):
        prune(store, keep=1)
    assert os.listdir(elsewhere) == []


def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A pax header declaring 1 GiB (tarfile would read it whole into memory), first or after
    a small one: refused from its 512-byte header."""
    store = Store(tmp_path / "state")
    small = tarfile.TarInfo("././@PaxHeader")
    small.type = tarfile.XHDTYPE
    record = b"20 comment=abcdefgh\n"
    small.size = len(record)
    huge = tarfile.TarInfo("././@PaxHeader")
    huge.type = tarfile.XHDTYPE
    huge.size = 1 << 30
    for name, blocks in (("first", []), ("chained", [small])):
        tar = tmp_path / f"{name}.tar"
        data = b""
        for info in blocks:
            data += info.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (-len(record) % 512)
        tar.write_bytes(data + huge.tobuf(tarfile.USTAR_FORMAT))
        _refused(store, tar, "0" * 64, [], "an extended tar header of 1073741824 bytes")
