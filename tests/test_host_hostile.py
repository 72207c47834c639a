"""The host does not trust what a device or a broker sends it.

Against a real Mosquitto (``doorstep-host watch``, ``status --broker``) and real sshd doorbells
on loopback (uploads, command output, what ``status`` and ``deploy`` print): garbage is that
message's or that device's error, reported once; nothing crashes, hangs or reaches the
operator's terminal as an escape sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from childproc import LineReader, default_signals, stop
from paho.mqtt.enums import CallbackAPIVersion
from test_tools import event

from host.cli import main as host_main
from host.safe_text import printable

pytestmark = pytest.mark.host  # the device-only environment does not collect it (conftest)

ESC = "\x1b"
CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home: what a hostile text might send


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(*args: str | Path) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = host_main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())




def state(device_id: str, **changes: Any) -> dict[str, Any]:
    """A complete, valid retained ``state`` payload."""
    return {
        "device_id": device_id,
        "present": False,
        "zones": {"doorstep": False},
        "count": 0,
        "since": None,
        "model": {"name": "parcel", "version": "1.0.0", "sha256": "a" * 64},
        "self_test": {"ok": True, "ms": 10.0, "time": 1.0},
        "doorstep_version": "0.1",
        "runtime": "tflite-runtime",
        "updated": 2.0,
        **changes,
    }


def deep(levels: int) -> bytes:
    """A JSON object nested ``levels`` deep, small enough to pass the size cap."""
    return ('{"a":' + "[" * levels + "]" * levels + "}").encode()


@contextlib.contextmanager
def publisher(url: str) -> Iterator[Any]:
    """A plain paho client; ``send(topic, payload, retain)`` returns once the broker has it."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()

    def send(topic: str, payload: bytes | str | Any, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
        info = client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(timeout=30)
        assert info.is_published(), topic

    try:
        yield send
    finally:
        client.disconnect()
        client.loop_stop()


GARBAGE: dict[str, bytes | Any] = {
    # a retained state that is not an object at all
    "doorstep/door1/state": [1, 2],
    "doorstep/door2/events": {},  # an event without fields
    "doorstep/door3/events": event(["a", "list"], "door3"),  # type: ignore[arg-type]
    "doorstep/door4/events": event("e4", "door4", wall_time="yesterday"),
    "doorstep/door5/state": deep(30_000),
    "doorstep/door6/events": b"[" * 100_000 + b"]" * 100_000,  # past the size cap
    "doorstep/door7/availability": "maybe",
    "doorstep/door8/events": b"\xff\xfe not utf-8",
    "doorstep/door9/state": state("door9", present="perhaps", count=-3),
}


def test_watch_skips_garbage_once_each_and_keeps_printing(mosquitto: Any) -> None:
    with publisher(mosquitto.url) as send:
        send("doorstep/door1/state", json.dumps([1, 2]), retain=True)  # there before watch is
        watch = subprocess.Popen(
            [sys.executable, "-m", "host.cli", "watch", "--broker", mosquitto.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_signals,  # Ctrl-C as at a terminal, however the suite was started
        )
        out, err = LineReader(watch.stdout, "watch stdout"), LineReader(watch.stderr, "stderr")
        try:
            err.until(lambda line: "subscribed" in line, timeout=60)
            for topic, payload in GARBAGE.items():
                send(topic, payload)
                send(topic, payload)  # twice: reported once
            # A valid event whose zone carries escape sequences: printed, the escapes shown.
            send("doorstep/door10/events", event("good", "door10", zone=f"front{CLEAR}"))
            line = out.until(lambda text: "door10" in text, timeout=30)
            send("doorstep/door11/events", event("good2", "door11"))  # and it keeps going
            out.until(lambda text: "door11" in text, timeout=30)
            assert watch.poll() is None
            watch.send_signal(signal.SIGINT)  # Ctrl-C: it says how many it skipped
            summary = err.until(lambda text: "invalid message(s) skipped" in text, timeout=30)
            assert watch.wait(30) == 0
        finally:
            stop(watch)
    assert ESC not in line and "front\\x1b[2J\\x1b[H" in line, line
    errors = err.text()
    assert ESC not in errors and ESC not in out.text()
    reasons = {
        "door1/state": "Input should be an object",
        "door2/events": "event: Field required",
        "door3/events": "id: Input should be a valid string",
        "door4/events": "wall_time: Input should be a valid number",
        "door5/state": "recursion limit exceeded",
        "door6/events": "200000 bytes, more than 65536",
        "door7/availability": "not 'online' or 'offline'",
        "door8/events": "Invalid JSON",
        "door9/state": "present: Input should be a valid boolean",
    }
    for where, why in reasons.items():
        shown = [x for x in errors.splitlines() if f"invalid message on doorstep/{where}:" in x]
        assert len(shown) == 1, (where, errors)  # once, though it came twice
        assert why in shown[0] and shown[0].endswith("(skipped)"), shown[0]
    assert summary == "19 invalid message(s) skipped"  # 1 retained + 9 x 2


def test_watch_in_process_counts_and_never_loses_its_network_thread(mosquitto: Any) -> None:
    """The Watcher as the demo and status use it: an ``on_message`` that raises (a bug, a
    closed pipe) is that message's problem; the thread keeps delivering."""
    from device.alerts.mqtt import BrokerSettings
    from host.watch import Message, Watcher

    def explode(msg: Message) -> None:
        if msg.device == "boom":
            raise BrokenPipeError("stdout closed")

    watcher = Watcher(BrokerSettings(mosquitto.url), on_message=explode).start()
    try:
        assert watcher.subscribed.wait(30)
        with publisher(mosquitto.url) as send:
            send("doorstep/boom/events", event("b1", "boom"))
            send("doorstep/door1/events", event("x", "door1", wall_time="yesterday"))
            send("doorstep/door2/events", event("ok", "door2"))
        assert watcher.wait(lambda w: [e["id"] for e in w.events()] == ["b1", "ok"], timeout=30)
        assert watcher.client._thread is not None and watcher.client._thread.is_alive()
    finally:
        watcher.stop()
    assert watcher.invalid_count == 2
    reasons = {bad.topic: bad.reason for bad in watcher.invalid}
    assert "BrokenPipeError: stdout closed" in reasons["doorstep/boom/events"]
    assert "wall_time" in reasons["doorstep/door1/events"]


def _fleet_file(path: Path, names: list[str]) -> Path:
    doc = {"devices": [{"name": n, "host": "127.0.0.1"} for n in names]}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_status_from_the_broker_skips_invalid_state(mosquitto: Any, tmp_path: Path) -> None:
    fleet = _fleet_file(tmp_path / "fleet.yaml", ["door1", "door2", "door3", "door4"])
    model = {"name": f"parcel{CLEAR}", "version": "1.0\x9b31m", "sha256": "b" * 64}
    with publisher(mosquitto.url) as send:
        send("doorstep/door1/state", state("door1", present="perhaps", zones=[]), retain=True)
        send("doorstep/door2/state", deep(30_000), retain=True)
        send("doorstep/door3/state", state("door3", model=model), retain=True)
        send("doorstep/door4/state", [1, 2], retain=True)
        for n in (1, 2, 3):
            send(f"doorstep/door{n}/availability", "online", retain=True)
        send("doorstep/door4/availability", {"online": True}, retain=True)
    run = cli("status", "--fleet", fleet, "--broker", mosquitto.url, "--json")
    assert run.code == 1, run.err  # door4 is not known to be online
    rows = {r["device"]: r for r in json.loads(run.out)["devices"]}
    assert rows["door1"]["daemon"] == "online, invalid state"
    assert "present: Input should be a valid boolean" in rows["door1"]["last_event"]
    assert "recursion limit exceeded" in rows["door2"]["last_event"]
    assert rows["door3"]["daemon"] == "online, self-test ok"
    assert rows["door3"]["model"].startswith(f"parcel{CLEAR} 1.0")  # JSON keeps the data
    assert not rows["door4"]["reachable"] and "invalid state" in rows["door4"]["daemon"]
    for where in ("door1/state", "door2/state", "door4/state", "door4/availability"):
        assert f"invalid message on doorstep/{where}:" in run.err, run.err
    human = cli("status", "--fleet", fleet, "--broker", mosquitto.url)
    assert ESC not in human.out and "\x9b" not in human.out and ESC not in human.err
    assert "parcel\\x1b[2J\\x1b[H 1.0\\x9b31m" in human.out, human.out


@pytest.mark.parametrize("prefix", ["#", "doorstep/+", "a//b", "door step", "x" * 65, ""])
def test_a_wildcard_or_malformed_prefix_is_a_usage_error(prefix: str, tmp_path: Path) -> None:
    fleet = _fleet_file(tmp_path / "fleet.yaml", ["door1"])
    # Port 9 (discard) on loopback: nothing is contacted, the prefix is refused before.
    for args in (
        ["watch", "--broker", "mqtt://127.0.0.1:9", "--prefix", prefix],
        ["status", "--fleet", str(fleet), "--broker", "mqtt://127.0.0.1:9", "--prefix", prefix],
    ):
        run = cli(*args)
        assert run.code == 2, run
        assert "not a topic prefix" in run.err and "no wildcards" in run.err, run.err
        assert "no answer from the broker" not in run.err and "Traceback" not in run.err


def test_printable_escapes_control_characters_and_keeps_text() -> None:
    assert printable("café 📦 ok") == "café 📦 ok"
    assert printable("a\x1b[31mred\x07") == "a\\x1b[31mred\\x07"
    assert printable("c1 \x9b2J del \x7f") == "c1 \\x9b2J del \\x7f"
    assert printable("bidi \u202etxt.exe") == "bidi \\u202etxt.exe"
    assert printable("two\nlines\tand\r") == "two\nlines\tand\\x0d"
    assert printable("two\nlines\t", newlines=False) == "two\\x0alines\\x09"


# ------------------------------------------------------------------ devices over SSH


# ------------------------------------------------------------------ devices over SSH

SHIPPED = Path(__file__).resolve().parents[1] / "device" / "models" / "parcel-ssd"


def _fake_device(path: Path, script: str) -> str:
    """An executable standing in for the device's Python (the fleet file's ``python``): what
    a broken or hostile doorbell answers to every ``doorstep-device`` command."""
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def hostile_fleet(ssh_fleet: Any, tmp_path: Path) -> Path:
    """door1 is honest; door2 prints 100 MB; door3 reports a bundle and a daemon error full of
    escape sequences; door4 refuses with escapes in its error line."""
    status = {
        "doorstep_version": f"0.1{CLEAR}",
        "state_dir": "/x",
        "active": {"id": "c" * 64, "name": f"evil{CLEAR}", "version": "1\x9b2J"},
        "daemon_error": f"record {CLEAR} gone",
    }
    doc = tmp_path / "status.json"
    doc.write_text(json.dumps(status))  # JSON carries the escapes as \u001b
    fakes = {
        "door2": _fake_device(tmp_path / "loud", "head -c 100000000 /dev/zero | tr '\\0' x\n"),
        "door3": _fake_device(tmp_path / "escapes", f"cat {doc}\n"),
        "door4": _fake_device(
            tmp_path / "refuses",
            "printf 'doorstep-device: error: no \\033[2J\\033[1;1Hdeployed\\n' >&2; exit 2\n",
        ),
    }
    entries = [d.fleet_entry(python=fakes.get(d.name, d.python)) for d in ssh_fleet]
    fleet = tmp_path / "hostile-fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": entries}))
    return fleet


@pytest.mark.parametrize("ssh_fleet", [4], indirect=True)
@pytest.mark.timeout(300)
def test_a_device_that_floods_or_sends_escapes_is_its_own_error(hostile_fleet: Path) -> None:
    run = cli("status", "--fleet", hostile_fleet, "--json")
    rows = {r["device"]: r for r in json.loads(run.out)["devices"]}
    assert rows["door1"]["reachable"] and rows["door1"]["model"] == "shipped default"
    assert not rows["door2"]["reachable"]
    assert "printed more than 4194304 bytes on stdout: refused" in rows["door2"]["detail"]
    assert rows["door3"]["model"].startswith(f"evil{CLEAR} 1")
    assert "no \x1b[2J" in rows["door4"]["detail"]  # the data, kept as data in JSON

    outputs = {
        "status": cli("status", "--fleet", hostile_fleet),
        "dry run": cli("deploy", SHIPPED, "--fleet", hostile_fleet, "--dry-run"),
        "deploy": cli("deploy", SHIPPED, "--fleet", hostile_fleet),
    }
    for what, done in outputs.items():
        for text in (done.out, done.err):
            assert ESC not in text and "\x9b" not in text, (what, text)
        assert done.code == 1, (what, done.err)
    status = outputs["status"].out
    assert "evil\\x1b[2J\\x1b[H 1\\x9b2J" in status, status
    assert "printed more than 4194304 bytes" in status
    plan = outputs["dry run"].out
    assert "printed more than 4194304 bytes" in plan  # door2's refusal; the others planned
    assert "no \\x1b[2J\\x1b[1;1Hdeployed" in plan, plan
    assert "no \\x1b[2J\\x1b[1;1Hdeployed" in outputs["deploy"].out


async def _upload(device: Any, local: Path, remote: str) -> Any:
    from host.fleet.ssh import connect

    async with connect(device) as conn:
        return await asyncio.wait_for(conn.upload(local, remote), timeout=60)


def test_an_upload_never_writes_through_what_is_planted_at_its_part(
    ssh_fleet: Any, tmp_path: Path
) -> None:
    """A group member plants ``models/<id>.tar.part``: a link to a file of the login user's,
    a dangling link, a FIFO, a file of another user; or ``models`` itself as a link. Each is
    refused naming the path, nothing is written through it; removed, the upload works."""
    from host.fleet.ssh import TransferError

    device = ssh_fleet[0]
    models = device.state_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    remote = str(models / f"{'d' * 64}.tar")
    part = Path(remote + ".part")
    local = tmp_path / "bundle.tar"
    local.write_bytes(os.urandom(300_000))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")

    def plant(kind: str) -> None:
        if part.is_symlink() or part.exists():
            part.unlink()
        if kind == "link":
            part.symlink_to(victim)
        elif kind == "dangling":
            part.symlink_to(tmp_path / "created-through-a-link")
        elif kind == "fifo":
            os.mkfifo(part)
        elif kind == "foreign":
            part.write_bytes(local.read_bytes()[:1000])  # looks resumable
            os.chown(part, 65534, 65534)

    expected = {
        "link": "a symbolic link: refused",
        "dangling": "a symbolic link: refused",
        "fifo": "not a regular file: refused",
        "foreign": "owned by uid 65534, not by the login user",
    }
    for kind, why in expected.items():
        plant(kind)
        for _ in range(2):  # a re-run is refused the same way
            with pytest.raises(TransferError) as refused:
                asyncio.run(_upload(device, local, remote))
            assert f"{part}: {why}" in str(refused.value), (kind, refused.value)
        assert victim.read_bytes() == b"precious"
        assert not (tmp_path / "created-through-a-link").exists()

    plant("none")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    models.rename(tmp_path / "models-real")
    models.symlink_to(elsewhere)  # the whole directory swapped for a link
    with pytest.raises(TransferError) as refused:
        asyncio.run(_upload(device, local, remote))
    assert f"{models}: a symbolic link: refused" in str(refused.value)
    assert list(elsewhere.iterdir()) == []
    models.unlink()
    models.symlink_to(tmp_path / "nowhere")  # dangling: not made through the link either
    with pytest.raises(TransferError) as refused:
        asyncio.run(_upload(device, local, remote))
    assert f"{models}: a symbolic link: refused" in str(refused.value)
    assert not (tmp_path / "nowhere").exists()
    models.unlink()
    (tmp_path / "models-real").rename(models)

    done = asyncio.run(_upload(device, local, remote))  # nothing planted: it works
    assert done.resumed_from == 0 and part.read_bytes() == local.read_bytes()
    assert not part.is_symlink() and part.stat().st_uid == os.getuid()


def test_command_output_is_bounded_and_the_connection_survives(ssh_fleet: Any) -> None:
    from host.fleet.ssh import CommandError, connect

    async def go() -> tuple[str, str, str]:
        async with connect(ssh_fleet[0]) as conn:
            with pytest.raises(CommandError) as out:
                await asyncio.wait_for(conn.run("head -c 100000000 /dev/zero"), timeout=60)
            with pytest.raises(CommandError) as err:
                await asyncio.wait_for(
                    conn.run("head -c 3000 /dev/zero >&2; echo fine", max_output=1000), 60
                )
            after = await conn.run("echo still here")
            return str(out.value), str(err.value), after.stdout

    out, err, after = asyncio.run(go())
    assert "printed more than 4194304 bytes on stdout: refused" in out
    assert "printed more than 1000 bytes on stderr: refused" in err
    assert after == "still here\n"


def test_an_error_message_quoting_a_hostile_name_prints_no_escape(tmp_path: Path) -> None:
    fleet = _fleet_file(tmp_path / "fleet.yaml", ["door1"])
    bundle = tmp_path / f"parcel{CLEAR}.tar"  # e.g. a bundle file received from elsewhere
    run = cli("deploy", bundle, "--fleet", fleet)
    assert run.code == 2 and "doorstep-host: error: " in run.err
    assert ESC not in run.err and "parcel\\x1b[2J\\x1b[H.tar: not found" in run.err, run.err


def test_a_flood_of_messages_keeps_the_watcher_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a watcher keeps (messages, event ids, reported topics) is bounded: a publisher
    sending ever new events or garbage topics cannot grow it without end. (The bounds made
    small here; the messages are handed over as paho's thread would.)"""
    import host.watch as watch
    from device.alerts.mqtt import BrokerSettings

    monkeypatch.setattr(watch, "KEEP_MESSAGES", 50)
    monkeypatch.setattr(watch, "KEEP_EVENT_IDS", 20)
    monkeypatch.setattr(watch, "REPORT_INVALID_TOPICS", 5)
    watcher = watch.Watcher(BrokerSettings("mqtt://127.0.0.1:9"))  # never started

    def deliver(topic: str, payload: Any) -> None:
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = json.dumps(payload).encode()
        watcher._on_message(watcher.client, None, msg)

    for i in range(200):
        deliver("doorstep/door1/events", event(f"e{i}", "door1"))
        deliver(f"doorstep/junk{i}/events", {"id": [i]})
    assert len(watcher.messages) == 50 and watcher.events()[-1]["id"] == "e199"
    assert len(watcher._seen) == 20
    assert watcher.invalid_count == 200 and len(watcher.invalid) == 5
    deliver("doorstep/door1/events", event("e199", "door1"))  # a recent redelivery: dropped
    assert watcher.events()[-1]["id"] == "e199" and len(watcher.messages) == 50
    assert [e["id"] for e in watcher.events()].count("e199") == 1
