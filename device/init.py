"""``doorstep-device init`` and ``unit``: the files a fresh install needs, from the ones shipped.

The package carries the commented ``device.yaml`` template and the systemd unit under
``device/share/`` (``configs/device.yaml`` and ``systemd/`` in a checkout link to them), so a
Pi that installed only the wheel can write both. Neither ever replaces an existing file
unless asked (``--force``; the old file is kept as ``.bak``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device.config import config_from_text
from device.errors import ConfigError, DoorstepError
from device.safefile import fsync_dir

SHARE = Path(__file__).parent / "share"
TEMPLATE = SHARE / "device.yaml"
UNIT = SHARE / "doorstep-device.service"
UNIT_PREFIX = "/opt/doorstep"  # where the shipped unit expects the venv
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Written:
    path: Path
    backup: Path | None


def default_device_id() -> str:
    """This machine's host name, made a valid device id (``raspberrypi`` stays as it is)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-_")
    return name[:64] if name and ID_PATTERN.match(name[:64]) else "doorbell"


def _replace_block(text: str, key: str, block: str) -> str:
    """Replace the top-level ``key:`` line of ``text`` and its indented lines with ``block``."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{key}:", line)), None)
    if start is None:
        raise DoorstepError(f"{TEMPLATE}: the template has no top-level {key!r}")
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep the blank lines after it
        end -= 1
    return "".join([*lines[:start], block.rstrip("\n") + "\n", *lines[end:]])


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar that reads back as the same string (JSON is YAML)."""
    return json.dumps(value)


def render_config(
    device_id: str | None = None,
    broker: str | None = None,
    source: str | None = None,
    state_dir: str | None = None,
    public_keys: list[str] | None = None,
) -> str:
    """The shipped template with these values in; checked as a config before it is returned.

    ``source``: ``picamera2`` (the template's), ``still:PATH`` (one image as a live camera:
    demos and tests), else an OpenCV camera index, stream URL or video file."""
    text = TEMPLATE.read_text(encoding="utf-8")
    device_id = device_id or default_device_id()
    if not ID_PATTERN.match(device_id):
        raise ConfigError(
            f"--device-id {device_id!r}: 1..64 letters, digits, - and _, starting with a letter "
            "or digit (it is part of the MQTT topics)"
        )
    text = _replace_block(text, "device_id", f"device_id: {device_id}")
    if state_dir is not None:
        text = _replace_block(text, "state_dir", f"state_dir: {_scalar(state_dir)}")
    if broker is not None:
        if broker == "none":
            text = _replace_block(text, "mqtt", "mqtt: null   # events are only logged")
        else:
            text = re.sub(r"(?m)^  url: .*$", f"  url: {_scalar(broker)}", text, count=1)
    if public_keys:
        keys = ", ".join(_scalar(k) for k in public_keys)
        text = re.sub(r"(?m)^  public_keys: \[\].*$", f"  public_keys: [{keys}]", text, count=1)
    if source is not None and source.startswith("still:"):
        text = _replace_block(
            text,
            "source",
            "source:                           # one image as a live camera (demos, tests)\n"
            "  type: still\n"
            f"  path: {_scalar(source.removeprefix('still:'))}\n"
            "  fps: 10",
        )
    elif source is not None and source != "picamera2":
        uri: str | int = int(source) if source.isdigit() else source
        text = _replace_block(
            text,
            "source",
            "source:\n"
            "  type: opencv\n"
            f"  uri: {json.dumps(uri)}\n"
            "  fps: 10\n"
            "  stall_s: 10                     # seconds without a frame: reported stalled, "
            "then restarted",
        )
    config_from_text(text, "the generated config")  # a value that cannot work fails here
    return text


def write_new(path: Path, data: bytes, force: bool, mode: int = 0o644) -> Written:
    """Write ``path`` durably; refuse an existing one unless ``force`` (then keep ``.bak``).

    Without ``force`` the file is linked into place, so a file that appeared meanwhile is
    never replaced either."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DoorstepError(f"{directory}: cannot create it: {exc.strerror}") from None
    exists = path.exists() or path.is_symlink()
    if exists and not force:
        raise DoorstepError(f"{path} exists: not replaced (--force replaces it, keeping a .bak)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise DoorstepError(f"{directory}: cannot write here: {exc.strerror}") from None
    backup = None
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
        if exists:
            if path.is_file() and not path.is_symlink():  # the old file stays until replaced
                backup = path.with_name(path.name + ".bak")
                _copy(path, backup)
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except FileExistsError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DoorstepError(f"{path} appeared while writing: not replaced") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DoorstepError(f"{path}: cannot write it: {exc.strerror}") from None
    fsync_dir(directory)
    return Written(path, backup)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (never through a symlink planted at ``dst``)."""
    data = src.read_bytes()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, os.stat(src).st_mode & 0o777)
        _write_all(fd, data)
    finally:
        os.close(fd)


def render_unit(
    prefix: str | None = None, config: str | None = None, state_dir: str | None = None
) -> str:
    """The shipped unit, with ``ExecStart`` pointing at the venv ``prefix`` (default: the one
    running this command), and at ``config`` and ``state_dir`` when given."""
    text = UNIT.read_text(encoding="utf-8")
    prefix = prefix or sys.prefix
    if any(c.isspace() for c in prefix) or "%" in prefix or "$" in prefix:
        raise DoorstepError(f"{prefix!r}: a unit's command line cannot hold this venv path")
    if prefix != UNIT_PREFIX:
        text = text.replace(f"{UNIT_PREFIX}/bin/", f"{prefix}/bin/")
    for flag, value in (("--config", config), ("--state-dir", state_dir)):
        if value is not None:
            if any(c.isspace() for c in value) or "%" in value or "$" in value:
                raise DoorstepError(f"{flag} {value!r}: a unit's command line cannot hold it")
            text = re.sub(rf"(?m)^(ExecStart=.* {flag} )\S+", rf"\g<1>{value}", text, count=1)
    return text


def unit_warnings(prefix: str) -> list[str]:
    problems = []
    if prefix.startswith(("/home/", "/root/", "/run/user/")):
        problems.append(
            f"{prefix} is under a home directory: the unit's ProtectHome=yes hides it from the "
            f"service; install into {UNIT_PREFIX} (python3 -m venv --system-site-packages "
            f"{UNIT_PREFIX})"
        )
    if not Path(prefix, "bin", "doorstep-device").exists():
        problems.append(f"{prefix}/bin/doorstep-device does not exist")
    return problems
