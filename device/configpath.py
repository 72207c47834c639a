"""Which device.yaml a command reads when none is named (no pydantic here: the store commands
import this before they know whether there is a config to validate)."""

from __future__ import annotations

import os
from pathlib import Path

from device.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/doorstep/device.yaml")  # what the service runs with
CONFIG_ENV = "DOORSTEP_CONFIG"


def find_config(given: str | Path | None) -> Path | None:
    """The config a command uses: ``given`` (``--config``), else ``$DOORSTEP_CONFIG``, else
    ``/etc/doorstep/device.yaml`` when it exists, else ``None``."""
    if given is not None:
        return Path(given)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def config_path(given: str | Path | None) -> Path:
    """:func:`find_config`, or a ``ConfigError`` naming the three places looked at."""
    path = find_config(given)
    if path is None:
        raise ConfigError(
            f"no configuration: no --config FILE, ${CONFIG_ENV} is not set, and {SYSTEM_CONFIG} "
            "does not exist; write one with `doorstep-device init` (or pass --config FILE)"
        )
    return path


def init_target(given: str | Path | None) -> Path:
    """Where ``init`` writes: ``given``, else ``$DOORSTEP_CONFIG``, else the system config."""
    env = os.environ.get(CONFIG_ENV)
    return Path(given) if given is not None else Path(env) if env else SYSTEM_CONFIG


SYSTEM_STATE = Path("/var/lib/doorstep")  # the unit's StateDirectory=


def user_state_dir(configured: Path) -> Path | None:
    """Where ``run`` keeps state when started by hand by a user who cannot write the system's
    state directory: ``$XDG_STATE_HOME/doorstep`` (``~/.local/state/doorstep``). ``None`` when
    ``configured`` is another directory, is writable, or systemd gave the service its own."""
    if configured != SYSTEM_STATE or os.environ.get("STATE_DIRECTORY") or _writable(configured):
        return None
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "doorstep"


def _writable(directory: Path) -> bool:
    """Whether this user may create files in ``directory`` (or create it, when missing)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)
