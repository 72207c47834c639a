"""The daemon record (``daemon.json``) as a typed document: hostile records never crash or hang
``status`` and ``activate``, writes are atomic and survive a full or read-only disk.

The state directory is group-writable, so any of these may be planted as ``daemon.json``. Each
command runs in a child process with a timeout: a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from childproc import default_signals

from device.install import (
    RecordWriteError,
    Store,
    activate,
    read_daemon_record,
    write_daemon_record,
)
from device.record import DaemonRecord, RecordError, parse_record, parse_status

GOOD: dict[str, Any] = {
    "pid": 4242,
    "state": "running",
    "systemd": False,
    "model_sha256": "e" * 64,
    "bundle_id": "b" * 64,
    "model": {"name": "doorstep-parcel-ssd", "version": "1.0.0"},
    "self_test": {"ok": True, "ms": 12.5, "time": 1000.0, "error": None},
    "last_reload": {"ok": False, "error": "collapsed scores", "time": 1001.0},
    "last_event": {"event": "arrived", "id": "ab12", "zone": "porch", "wall_time": 1002.0},
    "started": 999.0,
    "updated": 1003.0,
}


def _json(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def _deep(n: int) -> str:
    return "[" * n + "]" * n


CONTENTS: dict[str, bytes] = {
    "null": b"null",
    "a list": b"[1, 2]",
    "a string": b'"running"',
    "an empty object": b"{}",
    "missing keys": json.dumps({"pid": 4242, "state": "running"}).encode(),
    "pid true": _json(pid=True),
    "pid -1": _json(pid=-1),
    "pid 0": _json(pid=0),
    "pid a string": _json(pid="4242"),
    "pid a float": _json(pid=4242.0),
    "self_test a string": _json(self_test="ok"),
    "self_test.ok a string": _json(self_test={**GOOD["self_test"], "ok": "yes"}),
    "an unknown state": _json(state="exploded"),
    "a bundle id that is a path": _json(bundle_id="../../etc"),
    "100,000-deep nesting": _deep(100_000).encode(),
    "deep nesting in a field": _json(model={"name": "x", "version": "1"}).replace(
        b'"x"', _deep(20_000).encode()
    ),
    "not JSON": b"\xff\xfe not json {",
    "empty": b"",
    "too large": b" " * (128 << 10) + _json(),
}


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _link_to_a_good_record(path: Path) -> None:
    elsewhere = path.parent.parent / "elsewhere.json"
    elsewhere.write_bytes(_json())
    path.symlink_to(elsewhere)


def _directory(path: Path) -> None:
    path.mkdir()


SPECIAL: dict[str, Callable[[Path], None]] = {
    "a FIFO": _fifo,
    "a link to /dev/zero": _link_to_dev_zero,
    "a link to a valid record": _link_to_a_good_record,
    "a directory": _directory,
}
HOSTILE = sorted([*CONTENTS, *SPECIAL])


def plant(store: Store, kind: str) -> None:
    store.state_dir.mkdir(parents=True, exist_ok=True)
    if kind in CONTENTS:
        store.daemon_file.write_bytes(CONTENTS[kind])
    else:
        SPECIAL[kind](store.daemon_file)


def device_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``doorstep-device ARGS`` in a child; a hang fails after 60 s instead of stalling."""
    return subprocess.run(
        [sys.executable, "-m", "device.cli", *args], capture_output=True, text=True, timeout=60
    )


# ------------------------------------------------------------------------------ the model


def test_a_record_as_the_daemon_writes_it_parses_and_old_and_newer_ones_too() -> None:
    record = parse_record(_json(), "daemon.json")
    assert record.model.name == "doorstep-parcel-ssd" and record.self_test.ok
    assert record.last_reload is not None and record.last_reload.error == "collapsed scores"
    assert record.last_event is not None and record.last_event.zone == "porch"
    # A record from before source/storage/outbox existed: the new fields take their defaults.
    assert (record.source, record.storage, record.storage_error, record.outbox) == (
        None,
        "ok",
        None,
        None,
    )
    # A newer daemon's record with fields this version does not know still parses.
    newer = parse_record(
        _json(
            source={"status": "stalled", "last_frame_age_s": 12.5, "error": None},
            storage="degraded",
            storage_error="No space left on device",
            outbox={"depth": 3, "dropped_full": 1},
            some_future_field={"x": 1},
        ),
        "daemon.json",
    )
    assert newer.source is not None and newer.source.status == "stalled"
    assert newer.outbox is not None and (newer.outbox.depth, newer.outbox.dropped_full) == (3, 1)
    assert newer.outbox.dropped_expired == 0 and newer.storage == "degraded"
    # The JSON it writes is what it reads.
    assert parse_record(newer.model_dump_json(), "x") == newer


@pytest.mark.parametrize("kind", sorted(CONTENTS))
def test_an_invalid_record_is_one_clear_error(kind: str) -> None:
    with pytest.raises(RecordError) as caught:
        parse_record(CONTENTS[kind], "/s/daemon.json")
    message = str(caught.value)
    assert message.startswith("/s/daemon.json: invalid record: ") and "\n" not in message
    assert len(message) < 600


def test_the_errors_say_which_key_and_what_is_wrong() -> None:
    def why(data: bytes) -> str:
        with pytest.raises(RecordError) as caught:
            parse_record(data, "d.json")
        return str(caught.value)

    assert why(_json(pid=True)) == (
        "d.json: invalid record: pid: Input should be a valid integer (got True)"
    )
    assert "pid: Input should be greater than 0 (got -1)" in why(_json(pid=-1))
    assert "recursion limit exceeded" in why(CONTENTS["deep nesting in a field"])
    assert why(CONTENTS["100,000-deep nesting"]) == "d.json: invalid record: more than 65536 bytes"
    assert "self_test: Input should be an object" in why(_json(self_test="ok"))


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("kind", HOSTILE)
def test_read_daemon_record_refuses_every_hostile_record(tmp_path: Path, kind: str) -> None:
    store = Store(tmp_path / "state")
    plant(store, kind)
    with pytest.raises(RecordError, match=r"daemon\.json: invalid record: "):
        read_daemon_record(store)


@pytest.mark.parametrize("kind", HOSTILE)
def test_status_reports_a_hostile_record_and_finishes(tmp_path: Path, kind: str) -> None:
    store = Store(tmp_path / "state")
    plant(store, kind)
    text = device_cli("status", "--state-dir", str(store.state_dir))
    assert text.returncode == 0, text.stderr
    assert f"daemon    : {store.daemon_file}: invalid record: " in text.stdout
    out = device_cli("status", "--state-dir", str(store.state_dir), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["daemon"] is None
    assert doc["daemon_error"].startswith(f"{store.daemon_file}: invalid record: ")
    assert parse_status(out.stdout, "device").daemon_error == doc["daemon_error"]  # the contract


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A store with two installed bundles, ``current`` on the first."""
    from test_install import installed, variant

    tmp = tmp_path_factory.mktemp("store")
    store = Store(tmp / "state")
    first, _ = (installed(store, variant(tmp, v), tmp) for v in ("v1", "v2"))
    activate(store, first, [])
    return store


def _copy(store: Store, tmp_path: Path) -> Store:
    copy = Store(tmp_path / "state")
    shutil.copytree(store.state_dir, copy.state_dir, symlinks=True)
    return copy


@pytest.mark.parametrize("kind", HOSTILE)
def test_activate_with_a_hostile_record_refuses_before_switching(
    two_bundles: Store, tmp_path: Path, kind: str
) -> None:
    store = _copy(two_bundles, tmp_path)
    old = store.linked(store.current)
    new = next(i for i in store.stored() if i != old)
    plant(store, kind)
    out = device_cli("activate", str(store.model_dir(new)), "--state-dir", str(store.state_dir))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"doorstep-device: error: {store.daemon_file}: invalid record: ")
    assert "nothing was changed" in out.stderr and "Traceback" not in out.stderr
    assert store.linked(store.current) == old  # `current` is as it was
    # The record is not needed to switch without a reload.
    out = device_cli(
        "activate",
        str(store.model_dir(new)),
        "--state-dir",
        str(store.state_dir),
        "--reload",
        "none",
    )
    assert out.returncode == 0, out.stderr
    assert store.linked(store.current) == new


def test_a_record_naming_another_process_is_no_daemon_and_is_not_signalled(
    two_bundles: Store, tmp_path: Path
) -> None:
    """A valid record whose pid is a live process that is not ``doorstep-device run`` (a pid
    reused after the daemon died, or planted, or init): ``status`` says stopped and ``activate``
    refuses, sending nothing (SIGHUP would kill this child) and leaving ``current``."""
    store = _copy(two_bundles, tmp_path)
    old = store.linked(store.current)
    new = next(i for i in store.stored() if i != old)
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        for pid in (bystander.pid, 1):
            store.daemon_file.write_bytes(_json(pid=pid))
            record = read_daemon_record(store)
            assert record is not None and record.state == "stopped"
            out = device_cli(
                "activate", str(store.model_dir(new)), "--state-dir", str(store.state_dir)
            )
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
            assert f"pid {pid} is not a doorstep daemon" in out.stderr
            assert "nothing was changed" in out.stderr
            assert store.linked(store.current) == old
        assert bystander.poll() is None  # still alive: no SIGHUP
    finally:
        bystander.kill()
        bystander.communicate(timeout=30)  # closes its stdin pipe too
    assert bystander.returncode == -signal.SIGKILL


def test_only_the_daemon_that_wrote_the_record_is_signalled(
    two_bundles: Store, tmp_path: Path
) -> None:
    """A stand-in process whose command line reads ``doorstep-device run`` (a pid reused by a
    look-alike): signalled only when the record names its start time (field 22 of
    /proc/<pid>/stat, what the daemon records); a record without it or with another is refused
    and ``current`` stays."""
    from device.daemon_proc import process_start_ticks

    store = _copy(two_bundles, tmp_path)
    old = store.linked(store.current)
    new = next(i for i in store.stored() if i != old)
    lookalike = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "doorstep-device", "run"],
        stdin=subprocess.PIPE,
        preexec_fn=default_signals,  # SIGHUP's default action, even under nohup
    )
    try:
        ticks = process_start_ticks(lookalike.pid)
        assert ticks is not None and ticks > 0
        for recorded, why in ((None, "does not say when"), (ticks + 1, "another time")):
            store.daemon_file.write_bytes(_json(pid=lookalike.pid, pid_start_ticks=recorded))
            out = device_cli(
                "activate", str(store.model_dir(new)), "--state-dir", str(store.state_dir)
            )
            assert out.returncode == 2 and why in out.stderr, out.stderr
            assert "nothing was changed" in out.stderr and store.linked(store.current) == old
            assert lookalike.poll() is None
        store.daemon_file.write_bytes(_json(pid=lookalike.pid, pid_start_ticks=ticks))
        out = device_cli(
            "activate", str(store.model_dir(new)), "--state-dir", str(store.state_dir), "--json"
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["reloaded"] == "signal"
        assert store.linked(store.current) == new
        lookalike.communicate(timeout=30)  # SIGHUP ends it (Python's default action)
        assert lookalike.returncode == -signal.SIGHUP
    finally:
        if lookalike.poll() is None:
            lookalike.kill()
            lookalike.communicate(timeout=30)


def test_the_daemon_records_its_own_start_time() -> None:
    from device.daemon_proc import process_start_ticks

    assert DaemonRecord.own_start_ticks() == process_start_ticks(os.getpid()) is not None


def test_status_without_a_record_does_not_import_pydantic(tmp_path: Path) -> None:
    """``status`` stays fast: the typed model (pydantic) loads only when there is a record."""
    code = (
        "import sys\nfrom device.cli import main\n"
        "assert main(['status', '--state-dir', sys.argv[1]]) == 0\n"
        "print('pydantic' in sys.modules)\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code, str(empty)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------------ writing


def test_write_is_atomic_validated_and_replaces_a_planted_link(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.state_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    store.daemon_file.symlink_to(victim)  # planted: the write must not go through it
    write_daemon_record(store, GOOD)  # a dict is validated into the model
    assert victim.read_text() == "precious"
    assert not store.daemon_file.is_symlink()
    assert read_daemon_record(store) == DaemonRecord.model_validate(GOOD).model_copy(
        update={"state": "stopped"}  # pid 4242 is no doorstep daemon here
    )
    umask = os.umask(0o022)
    os.umask(umask)
    assert store.daemon_file.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in store.state_dir.iterdir()] == ["daemon.json"]  # no temp left
    record = DaemonRecord.model_validate({**GOOD, "pid": os.getpid(), "storage": "degraded"})
    write_daemon_record(store, record)
    again = read_daemon_record(store)
    assert again is not None and again.storage == "degraded"
    with pytest.raises(RecordError, match=r"\(to be written\): invalid record: pid"):
        write_daemon_record(store, {**GOOD, "pid": "x"})  # a bug in the caller, said plainly


def test_a_full_or_read_only_disk_gives_record_write_error_and_keeps_the_old_record(
    tmp_path: Path,
) -> None:
    from fsfaults import fill, free, remount, small_tmpfs

    with small_tmpfs(tmp_path / "mnt", size_kib=64) as mnt:
        store = Store(mnt / "state")
        write_daemon_record(store, GOOD)
        before = store.daemon_file.read_bytes()
        fill(mnt)
        with pytest.raises(RecordWriteError) as full:
            write_daemon_record(store, {**GOOD, "updated": 2000.0})
        assert full.value.errno == errno.ENOSPC
        assert str(full.value).startswith(f"{store.daemon_file}: cannot write the daemon record: ")
        assert store.daemon_file.read_bytes() == before
        assert [p.name for p in store.state_dir.iterdir()] == ["daemon.json"]  # no temp left
        free(mnt)
        remount(mnt, read_only=True)
        try:
            with pytest.raises(RecordWriteError) as ro:
                write_daemon_record(store, {**GOOD, "updated": 2000.0})
            assert ro.value.errno == errno.EROFS
            assert store.daemon_file.read_bytes() == before
        finally:
            remount(mnt, read_only=False)
        write_daemon_record(store, {**GOOD, "updated": 2000.0})  # space is back: it writes
        record = read_daemon_record(store)
        assert record is not None and record.updated == 2000.0
