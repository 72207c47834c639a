"""The SSH connector against real sshd daemons on loopback (tests/sshd.py), one per doorbell."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from pathlib import Path

import pytest
from sshd import ROOT, SshDevice, SshFleet, free_port, keygen

from host.fleet.ssh import (
    AuthError,
    CommandError,
    Connection,
    HostKeyError,
    Target,
    UnreachableError,
    connect,
    run_all,
)

pytestmark = pytest.mark.host  # the device-only environment does not collect it (conftest)

MiB = 1 << 20


def _payload(path: Path, size: int = 5 * MiB, seed: int = 6) -> str:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_commands_run_on_three_devices_in_parallel(ssh_fleet: SshFleet) -> None:
    async def probe(device: SshDevice) -> tuple[str, str, int]:
        async with connect(device) as conn:
            where = await conn.run("echo $SSH_CONNECTION")
            py = await conn.run(
                [device.python, "-c", "import sys, device; print(sys.executable, device.__file__)"]
            )
            cli = await conn.run([*device.device_command, "--help"])
            return where.stdout, py.stdout, cli.exit_status

    outcomes = asyncio.run(run_all(ssh_fleet, probe, limit=3))

    assert [o.item for o in outcomes] == ssh_fleet.devices  # input order, whatever finished first
    for outcome in outcomes:
        assert outcome.ok, outcome.error
        assert outcome.value is not None
        where, py, cli_status = outcome.value
        assert where.split()[-1] == str(outcome.item.port)  # each answered by its own sshd
        executable, device_init = py.split()
        assert executable == outcome.item.python
        assert Path(device_init).is_relative_to(ROOT)  # this checkout's device code
        assert cli_status == 0


def test_failed_command_names_device_exit_code_and_stderr(ssh_fleet: SshFleet) -> None:
    device = ssh_fleet[0]

    async def go() -> tuple[int, str, str]:
        async with connect(device) as conn:
            with pytest.raises(CommandError) as failed:
                await conn.run("echo fine; echo 'disk on fire' >&2; exit 3")
            assert failed.value.exit_status == 3
            assert failed.value.device == device.name
            assert str(failed.value).startswith(f"{device.name}: ")
            assert "exit code 3" in str(failed.value)
            assert "disk on fire" in str(failed.value)
            return await conn.run("echo out; echo err >&2; exit 4", check=False)

    assert asyncio.run(go()) == (4, "out\n", "err\n")


def test_command_timeout_is_a_command_error(ssh_fleet: SshFleet) -> None:
    async def go() -> None:
        async with connect(ssh_fleet[0]) as conn:
            with pytest.raises(CommandError, match=r"did not finish within 0\.3 s") as failed:
                await conn.run("sleep 3", timeout=0.3)
            assert failed.value.exit_status is None

    asyncio.run(go())


def test_upload_5mb_and_device_sha_matches(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    device = ssh_fleet[1]
    local = tmp_path / "bundle.tar"
    want = _payload(local)
    remote = str(device.state_dir / "incoming" / "bundle.tar")  # incoming/ does not exist yet
    seen: list[tuple[int, int]] = []

    async def go() -> tuple[str, int, int]:
        async with connect(device) as conn:
            up = await conn.upload(local, remote, progress=lambda d, t: seen.append((d, t)))
            assert up.part == remote + ".part"
            digest = await conn.sha256(up.part)
            await conn.rename(up.part, remote)
            return digest, up.size, up.resumed_from

    digest, size, resumed_from = asyncio.run(go())
    assert digest == want
    assert (size, resumed_from) == (5 * MiB, 0)
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert Path(remote).is_file() and not Path(remote + ".part").exists()


class _UnpluggedError(Exception):
    """Raised from a progress callback to cut an upload off midway."""


def test_interrupted_upload_resumes_where_it_stopped(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    device = ssh_fleet[2]
    local = tmp_path / "bundle.tar"
    want = _payload(local, seed=7)
    remote = str(device.state_dir / "bundle.tar")

    def unplug_after_2mib(done: int, total: int) -> None:
        if done >= 2 * MiB:
            raise _UnpluggedError

    async def first() -> None:
        async with connect(device) as conn:
            await conn.upload(local, remote, progress=unplug_after_2mib, chunk_size=256 * 1024)

    with pytest.raises(_UnpluggedError):
        asyncio.run(first())
    partial = Path(remote + ".part").stat().st_size
    assert partial == 2 * MiB  # everything acknowledged before the cut is on the device

    seen: list[int] = []

    async def again() -> tuple[int, str]:  # a new connection, as a re-run would make
        async with connect(device) as conn:
            up = await conn.upload(local, remote, progress=lambda d, t: seen.append(d))
            return up.resumed_from, await conn.sha256(up.part)

    resumed_from, digest = asyncio.run(again())
    assert resumed_from == partial
    assert seen[0] == partial  # the first 2 MiB were not sent again
    assert digest == want


def test_stale_part_of_another_file_is_not_resumed(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    device = ssh_fleet[0]
    local = tmp_path / "bundle.tar"
    want = _payload(local, size=3 * MiB, seed=8)
    remote = device.state_dir / "bundle.tar"
    other = random.Random(9).randbytes(MiB)
    longer = local.read_bytes() + b"tail"

    async def upload() -> tuple[int, str]:
        async with connect(device) as conn:
            up = await conn.upload(local, str(remote))
            return up.resumed_from, await conn.sha256(up.part)

    for stale in (other, longer, b""):  # different bytes; longer than the file; empty
        Path(str(remote) + ".part").write_bytes(stale)
        assert asyncio.run(upload()) == (0, want)


def test_unknown_host_key_is_refused_naming_the_device(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    device = ssh_fleet[0]
    empty = tmp_path / "known_hosts"
    empty.write_text("")

    async def attempt(target: Target) -> None:
        async with connect(target) as conn:
            await conn.run("true")

    with pytest.raises(HostKeyError) as unknown:
        asyncio.run(attempt(device.target(known_hosts=empty)))
    assert unknown.value.device == device.name
    assert str(unknown.value).startswith(f"{device.name}: ")
    assert "is unknown" in str(unknown.value)
    assert f"ssh-keyscan -p {device.port} 127.0.0.1" in str(unknown.value)

    missing = tmp_path / "nope" / "known_hosts"
    with pytest.raises(HostKeyError, match=f"{device.name}: known_hosts file .* does not exist"):
        asyncio.run(attempt(device.target(known_hosts=missing)))


def test_changed_host_key_is_refused_as_a_mismatch(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    device, impostor = ssh_fleet[0], ssh_fleet[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{device.host}]:{device.port} {impostor.host_public_key}\n")

    async def attempt() -> None:
        async with connect(device.target(known_hosts=wrong)) as conn:
            await conn.run("true")

    with pytest.raises(HostKeyError, match=f"^{device.name}: host key .* does NOT match"):
        asyncio.run(attempt())


def test_fleet_known_hosts_trusts_every_device(ssh_fleet: SshFleet) -> None:
    async def ok(target: Target) -> int:
        async with connect(target) as conn:
            return (await conn.run("true")).exit_status

    outcomes = asyncio.run(run_all(ssh_fleet.targets(known_hosts=ssh_fleet.known_hosts), ok))
    assert [o.value for o in outcomes] == [0] * len(ssh_fleet)


def test_wrong_client_key_is_an_auth_failure(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    device, neighbour = ssh_fleet[0], ssh_fleet[1]
    stranger = tmp_path / "stranger_ed25519"
    keygen([stranger])

    async def attempt(target: Target) -> Connection:
        return await connect(target)

    # A key nobody knows, and a key another doorbell trusts: each device has its own.
    for key in (stranger, neighbour.key_file):
        with pytest.raises(AuthError) as refused:
            asyncio.run(attempt(device.target(key_file=key)))
        assert refused.value.device == device.name
        assert f"refused the login of {device.user} with {key}" in str(refused.value)

    with pytest.raises(AuthError, match="cannot read client key"):
        asyncio.run(attempt(device.target(key_file=tmp_path / "absent")))


def test_unreachable_devices_are_reported_while_the_others_succeed(ssh_fleet: SshFleet) -> None:
    refused = Target(
        name="door-off", host="127.0.0.1", port=free_port(), known_hosts=ssh_fleet.known_hosts
    )
    # Accepts TCP (the kernel does, from the backlog) but never says a word: a hung device.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = Target(
            name="door-hung",
            host="127.0.0.1",
            port=silent.getsockname()[1],
            known_hosts=ssh_fleet.known_hosts,
        )
        targets: list[Target | SshDevice] = [
            ssh_fleet[0],
            refused,
            ssh_fleet[1],
            hung,
            ssh_fleet[2],
        ]

        # What happened, in order: when each device's work began and when the hung one gave up.
        log: list[tuple[str, str]] = []

        async def hello(target: Target | SshDevice) -> str:
            log.append(("began", target.name))
            # 1 s for the hung device, plenty for the live ones (a busy machine is slow to
            # shake hands, and their success is not what this test times).
            timeout = 1.0 if target is hung else 60.0
            try:
                async with connect(target, connect_timeout=timeout) as conn:
                    return (await conn.run(["echo", target.name])).stdout.strip()
            except UnreachableError:
                log.append(("failed", target.name))
                raise

        outcomes = asyncio.run(run_all(targets, hello, limit=5))

    # The hung device did not hold up the fleet: every device's work began before it gave up
    # (door3 comes after it in the list), and it gave up after its own 1 s connect timeout.
    gave_up = log.index(("failed", "door-hung"))
    assert {name for what, name in log[:gave_up] if what == "began"} == {t.name for t in targets}
    by_name = {o.item.name: o for o in outcomes}
    for device in ssh_fleet:
        assert by_name[device.name].value == device.name
    off, stuck = by_name["door-off"].error, by_name["door-hung"].error
    assert isinstance(off, UnreachableError) and isinstance(stuck, UnreachableError)
    assert str(off).startswith("door-off: connection refused by 127.0.0.1:")
    assert str(stuck).startswith("door-hung: no SSH answer from 127.0.0.1:")
    assert "within 1 s" in str(stuck)


def test_a_stopped_device_is_unreachable_until_it_comes_back(ssh_fleet: SshFleet) -> None:
    async def hello(device: SshDevice) -> str:
        async with connect(device, connect_timeout=60.0) as conn:  # refused at once when down
            return (await conn.run("echo up")).stdout.strip()

    ssh_fleet[1].stop()
    first = asyncio.run(run_all(ssh_fleet, hello))
    assert [o.ok for o in first] == [True, False, True]
    assert isinstance(first[1].error, UnreachableError)

    ssh_fleet[1].start()  # same port, keys and state directory: a re-run completes the job
    ssh_fleet[1].wait_ready()
    again = asyncio.run(run_all([ssh_fleet[1]], hello))
    assert again[0].value == "up"


def test_run_all_bounds_parallelism_and_keeps_order() -> None:
    active = peak = 0

    async def work(i: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01 * (5 - i % 5))
        active -= 1
        return i * i

    outcomes = asyncio.run(run_all(range(12), work, limit=3))
    assert peak == 3
    assert [o.value for o in outcomes] == [i * i for i in range(12)]
    with pytest.raises(ValueError, match="limit must be at least 1"):
        asyncio.run(run_all([1], work, limit=0))


@pytest.mark.parametrize("ssh_fleet", [10], indirect=True)
def test_ten_devices_answer_at_once(ssh_fleet: SshFleet) -> None:
    async def hello(device: SshDevice) -> str:
        async with connect(device) as conn:
            return (await conn.run(["echo", device.name])).stdout.strip()

    outcomes = asyncio.run(run_all(ssh_fleet, hello, limit=10))
    assert [o.value for o in outcomes] == [d.name for d in ssh_fleet]
    assert len({d.port for d in ssh_fleet}) == len({d.state_dir for d in ssh_fleet}) == 10
