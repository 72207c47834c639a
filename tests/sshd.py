"""The ``ssh_fleet`` fixture: real OpenSSH daemons on loopback, one per simulated doorbell.

The harness itself is ``support.loopback`` (the deploy benchmark uses it too); names are
re-exported here for the tests. ``ssh_fleet`` starts 3 devices; ``@pytest.mark.parametrize(
"ssh_fleet", [10], indirect=True)`` starts another count. Every daemon is stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loopback import (
    LOOPBACK,
    ROOT,
    SshdError,
    SshDevice,
    SshdNotInstalledError,
    SshFleet,
    free_port,
    keygen,
    start_fleet,
)

__all__ = [
    "LOOPBACK",
    "ROOT",
    "SshDevice",
    "SshFleet",
    "free_port",
    "keygen",
    "ssh_fleet",
    "start_fleet",
]


@pytest.fixture
def ssh_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SshFleet]:
    """Three (or ``request.param``) real sshd "doorbells" on loopback, stopped at teardown."""
    count = int(getattr(request, "param", 3))
    try:
        fleet = start_fleet(tmp_path / "fleet", count)
    except SshdNotInstalledError as exc:
        pytest.skip(str(exc))
    except SshdError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield fleet
    finally:
        fleet.stop()
