"""A fleet of doorbells on loopback: real sshd daemons, each with its own doorstep daemon.

For the fleet tests and the deploy benchmark: nothing is simulated but the network distance.
Each :class:`SshDevice` is an ``sshd -D`` from Debian's openssh-server on 127.0.0.1 with its own
free port, its own Ed25519 host key, its own authorized client key and its own state directory.
The host side talks to it exactly as to a Pi: asyncssh, host keys checked against known_hosts,
SFTP. Logins are as the current user (root in the sandbox, ``PermitRootLogin
prohibit-password``), and commands on the "device" run this interpreter
(:attr:`SshDevice.python`), so ``<python> -m device.cli ...`` runs this checkout's device code.
:meth:`SshDevice.start_daemon` starts the real ``doorstep-device run`` for the device (a still
image as its camera), which deploys reload and health-check.

:func:`start_fleet` starts N devices; :meth:`SshFleet.stop` stops every process it started.
A failed start says why, with the tail of that process's log. (tests/sshd.py wraps this in the
``ssh_fleet`` pytest fixture.)
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from host.fleet.inventory import Device
    from host.fleet.ssh import Target

ROOT = Path(__file__).resolve().parents[2]  # the checkout (for PYTHONPATH)
LOOPBACK = "127.0.0.1"
# Debian's compiled-in privilege separation directory; sshd run as root refuses to start without.
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT_S = 10.0


class SshdNotInstalledError(Exception):
    """sshd or ssh-keygen is not installed: the fleet tests are skipped, saying so."""


class SshdError(RuntimeError):
    """sshd is installed but a daemon could not be started; the message says why."""


def find_sshd() -> str:
    """Absolute path of sshd (it refuses to run from a relative path: it re-executes itself)."""
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())
    raise SshdNotInstalledError(
        "sshd is not installed (apt-get install openssh-server; CI installs it): "
        "the fleet tests need real SSH daemons"
    )


def find_keygen() -> str:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise SshdNotInstalledError("ssh-keygen is not installed (apt-get install openssh-client)")
    return exe


def ensure_privsep_dir() -> None:
    """sshd started as root needs /run/sshd (systemd makes it at boot; here nothing has)."""
    if os.geteuid() != 0 or PRIVSEP_DIR.is_dir():
        return  # sshd run by an ordinary user does not use it
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise SshdError(
            f"sshd runs as root here and needs its privilege separation directory {PRIVSEP_DIR}, "
            f"which is missing and cannot be made ({exc.strerror}): "
            f"`install -d -m 0755 {PRIVSEP_DIR}`, or run the tests as an ordinary user"
        ) from None


def keygen(paths: list[Path], comment: str = "doorstep-test") -> None:
    """Make an Ed25519 key pair (``path`` and ``path.pub``, no passphrase) for every path, at once."""
    exe = find_keygen()
    procs = []
    for path in paths:
        path.unlink(missing_ok=True)
        cmd = [exe, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for path, proc in zip(paths, procs, strict=True):
        out, _ = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise SshdError(f"ssh-keygen for {path} failed: {out.decode(errors='replace')}")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, however it dies."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _check_config_path(path: Path) -> Path:
    # sshd_config splits arguments on whitespace and expands %-tokens in several paths.
    if any(c.isspace() for c in str(path)) or "%" in str(path):
        raise SshdError(f"{path}: sshd_config cannot hold a path with spaces or '%'")
    return path


@dataclass(eq=False)
class SshDevice:
    """One simulated doorbell: a real sshd on loopback, and what a host needs to reach it.

    ``name``, ``host``, ``port``, ``user``, ``key_file`` and ``known_hosts`` are the fields of
    ``host.fleet.ssh.SshTarget``, so a device can be handed to ``connect`` as it is.
    """

    name: str
    host: str
    port: int
    user: str
    key_file: Path
    """the client's private key; its .pub is the device's only authorized key"""
    known_hosts: Path
    """a known_hosts file holding just this device's host key"""
    state_dir: Path
    """the device's doorstep state directory (empty at start)"""
    python: str
    """the interpreter to run device code with: ``[python, "-m", "device.cli", ...]``"""
    workdir: Path = field(repr=False)
    sshd: str = field(repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)

    @property
    def host_key(self) -> Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.workdir / "authorized_keys"

    @property
    def config(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def home(self) -> Path:
        """``$HOME`` of commands run on the device (empty: no dotfiles)."""
        return self.workdir / "home"

    @property
    def log(self) -> Path:
        return self.workdir / "sshd.log"

    @property
    def host_public_key(self) -> str:
        """``ssh-ed25519 AAAA...`` of the host key."""
        algo, blob, *_ = self.host_key.with_suffix(".pub").read_text().split()
        return f"{algo} {blob}"

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_public_key}"

    @property
    def device_command(self) -> list[str]:
        """argv prefix that runs ``doorstep-device`` on this device."""
        return [self.python, "-m", "device.cli"]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def target(self, **changes: Any) -> Target:
        """This device as a ``host.fleet.ssh.Target``, with any field changed."""
        from host.fleet.ssh import Target

        return Target(**{**self._ssh_fields(), **changes})

    def _ssh_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_file": self.key_file,
            "known_hosts": self.known_hosts,
        }

    def inventory_device(self, **changes: Any) -> Device:
        """This device as the fleet inventory's ``host.fleet.inventory.Device``."""
        from host.fleet.inventory import Device

        fields = {
            **self._ssh_fields(),
            "device_id": self.name,
            "state_dir": PurePosixPath(self.state_dir),
            "python": self.python,
        }
        return Device(**{**fields, **changes})

    def fleet_entry(self, **extra: Any) -> dict[str, Any]:
        """This device as a ``devices:`` entry of fleet.yaml (plain YAML-able values)."""
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
            "state_dir": str(self.state_dir),
            "python": self.python,
            **extra,
        }

    def write_config(self) -> None:
        for path in (self.host_key, self.authorized_keys, self.home, self.state_dir):
            _check_config_path(path)
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            "PidFile none",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # tmp directories are not owned and locked down like ~/.ssh
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            "Subsystem sftp internal-sftp",
            "AllowTcpForwarding no",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "PermitUserRC no",
            "MaxStartups 64:30:128",
            "MaxSessions 32",
            "LogLevel INFO",
        ]
        # Each device has its own empty HOME: commands must not depend on (or pay for) the
        # dotfiles of whoever runs the tests (bash sources ~/.bashrc for commands run by sshd).
        env = [f"HOME={self.home}"]
        if not any(c.isspace() for c in str(ROOT)):
            # Device commands find this checkout's `device` package even if it is not installed.
            env.append(f"PYTHONPATH={ROOT}")
        lines.append("SetEnv " + " ".join(env))
        self.config.write_text("\n".join(lines) + "\n")
        self.known_hosts.write_text(self.known_hosts_line + "\n")

    def start(self) -> None:
        """Launch sshd (returns at once; :meth:`wait_ready` waits for it to listen)."""
        if self.running:
            return
        self.write_config()
        with self.log.open("ab") as log:
            self._log_start = log.tell()  # before sshd runs: it may log "listening" at once
            self._proc = subprocess.Popen(
                [self.sshd, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,  # no stray daemons if pytest is killed
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until sshd listens; raise :class:`SshdError` with its log if it does not."""
        assert self._proc is not None, "start() first"
        ready = f"Server listening on {self.host} port {self.port}.".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in self._new_log():
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.005)
        how = "timed out" if self._proc.poll() is None else f"exit code {self._proc.returncode}"
        self.stop()
        raise SshdError(
            f"{self.name}: sshd on {self.host}:{self.port} did not start ({how}); "
            f"{self.log}:\n{self.log_tail()}"
        )

    def port_in_use(self) -> bool:
        """True when the last start failed because another process took the port first."""
        return b"Address already in use" in self._new_log()

    def stop(self) -> None:
        """Stop the daemon (as a powered-off doorbell); :meth:`start` brings it back."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def session_cpu_s(self) -> float:
        """CPU seconds of every finished SSH session (commands included) this sshd served."""
        return _children_cpu_s(self._proc.pid) if self._proc is not None else 0.0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _new_log(self) -> bytes:
        try:
            with self.log.open("rb") as fh:
                fh.seek(self._log_start)
                return fh.read()
        except OSError:
            return b""


@dataclass(eq=False)
class SshFleet:
    """Running devices, and one known_hosts file that trusts all of them (as a workstation's)."""

    devices: list[SshDevice]
    known_hosts: Path
    root: Path

    def __iter__(self) -> Iterator[SshDevice]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, key: int | str) -> SshDevice:
        if isinstance(key, int):
            return self.devices[key]
        for device in self.devices:
            if device.name == key:
                return device
        raise KeyError(key)

    def targets(self, **changes: Any) -> list[Target]:
        return [d.target(**changes) for d in self.devices]

    def write_known_hosts(self) -> None:
        self.known_hosts.write_text("".join(d.known_hosts_line + "\n" for d in self.devices))

    def stop(self) -> None:
        for device in self.devices:
            device.stop()


def start_fleet(root: Path, count: int = 3, *, prefix: str = "door") -> SshFleet:
    """Start ``count`` devices under ``root`` in parallel; return once every one listens.

    Raises :class:`SshdNotInstalledError` without sshd/ssh-keygen, :class:`SshdError` if one fails.
    """
    sshd = find_sshd()
    find_keygen()
    ensure_privsep_dir()
    user = pwd.getpwuid(os.getuid()).pw_name
    root.mkdir(parents=True, exist_ok=True)
    devices = []
    for i in range(1, count + 1):
        name = f"{prefix}{i}"
        workdir = root / name
        for sub in ("state", "home"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        devices.append(
            SshDevice(
                name=name,
                host=LOOPBACK,
                port=0,
                user=user,
                key_file=workdir / "client_ed25519",
                known_hosts=workdir / "known_hosts",
                state_dir=workdir / "state",
                python=sys.executable,
                workdir=workdir,
                sshd=sshd,
            )
        )
    keygen([d.host_key for d in devices] + [d.key_file for d in devices])
    for device in devices:
        shutil.copyfile(device.key_file.with_suffix(".pub"), device.authorized_keys)
    fleet = SshFleet(devices=devices, known_hosts=root / "known_hosts", root=root)
    try:
        pending = devices
        for _attempt in range(3):  # a port picked free can be taken before sshd binds it
            for device in pending:
                device.port = free_port()
                device.start()
            retry = []
            for device in pending:
                try:
                    device.wait_ready()
                except SshdError:
                    if not device.port_in_use():
                        raise
                    retry.append(device)
            pending = retry
            if not pending:
                break
        else:
            raise SshdError(f"no free loopback port for {', '.join(d.name for d in pending)}")
    except BaseException:
        fleet.stop()
        raise
    fleet.write_known_hosts()
    return fleet


def _children_cpu_s(pid: int) -> float:
    """cutime + cstime of a process: the CPU of its waited-for descendants, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
