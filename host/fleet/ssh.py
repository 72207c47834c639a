"""SSH to the doorbells: connect with checked host keys, run commands, upload with resume.

A thin layer over asyncssh that turns its many exceptions into one family, :class:`DeviceError`,
whose message names the device, says what failed and what to do. Host keys are always checked
against a known_hosts file (``~/.ssh/known_hosts`` unless the target names another); there is no
switch to turn that off: add the device's key to known_hosts instead.

Typical use::

    async with connect(target) as conn:
        await conn.upload("bundle.tar", "/var/lib/doorstep/incoming/bundle.tar")
        digest = await conn.sha256("/var/lib/doorstep/incoming/bundle.tar.part")

and for many devices, :func:`run_all` with a bound on how many run at once.

A device is not trusted: what a command prints is read up to :data:`OUTPUT_MAX_BYTES` per
stream (more is that command's error), and an upload never writes through a link or a file
someone else planted at its ``.part`` (see :meth:`Connection.upload`).
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import shlex
import stat
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import asyncssh
from asyncssh import FXF_CREAT, FXF_EXCL, FXF_READ, FXF_WRITE

from host.fleet.errors import (
    AuthError,
    CommandError,
    DeviceError,
    HostKeyError,
    TransferError,
    UnreachableError,
)
from host.fleet.parallel import Outcome, run_all

__all__ = [  # the errors and the fan-out live in their own modules; importable from here too
    "AuthError",
    "CommandError",
    "CommandResult",
    "Connection",
    "DeviceError",
    "HostKeyError",
    "Outcome",
    "SshTarget",
    "Target",
    "TransferError",
    "UnreachableError",
    "UploadResult",
    "connect",
    "run_all",
]

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
#: How much of the end of a partial upload is compared with the local file before resuming.
RESUME_CHECK_BYTES = 64 * 1024
#: The most a command may print on stdout, and on stderr, before it is refused (and stopped).
OUTPUT_MAX_BYTES = 4 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ProgressFn = Callable[[int, int], None]
"""Called with (bytes on the device so far, total bytes) as an upload advances."""


class SshTarget(Protocol):
    """Where a device is and how to log in to it.

    ``host.fleet.inventory.Device`` satisfies this as it is; :class:`Target` is a plain one.
    """

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str | None:
        """login user; None uses ~/.ssh/config or the local user name, as ``ssh`` does"""

    @property
    def key_file(self) -> Path | None:
        """private key to log in with; None uses the ssh agent and the default ~/.ssh/id_* keys"""

    @property
    def known_hosts(self) -> Path | None:
        """file of trusted host keys; None means ~/.ssh/known_hosts"""


@dataclass(frozen=True)
class Target:
    """A plain :class:`SshTarget`."""

    name: str
    host: str
    port: int = 22
    user: str | None = None
    key_file: Path | None = None
    known_hosts: Path | None = None


class CommandResult(NamedTuple):
    exit_status: int
    stdout: str
    stderr: str


class UploadResult(NamedTuple):
    part: str
    """the remote ``.part`` file now holding the whole upload (not yet verified or renamed)"""
    size: int
    resumed_from: int
    """bytes that were already on the device and not sent again"""


# -------------------------------------------------------------------------------- connection


class Connection:
    """An open SSH connection to one device. Close it, or use it as ``async with``."""

    def __init__(self, target: SshTarget, conn: asyncssh.SSHClientConnection) -> None:
        self.target = target
        self._conn = conn
        self._sftp: asyncssh.SFTPClient | None = None
        self._uid: int | None = None

    @property
    def name(self) -> str:
        return self.target.name

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        self._conn.close()
        await self._conn.wait_closed()

    async def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 300.0,
        input: str | None = None,
        max_output: int = OUTPUT_MAX_BYTES,
    ) -> CommandResult:
        """Run ``command`` on the device (a shell string, or an argv list that is quoted for you).

        With ``check`` a non-zero exit raises :class:`CommandError` with the exit code and the
        tail of stderr; without it the result is returned whatever the exit status. At most
        ``max_output`` bytes of stdout and of stderr are read: a device that prints more is
        that command's :class:`CommandError` (its channel is closed), not the host's memory.
        """
        line = command if isinstance(command, str) else shlex.join(command)
        shown = _shorten(line)
        output = _Output(max_output)
        try:
            async with asyncio.timeout(timeout):
                status, signal_name = await self._run(line, input, output)
        except TimeoutError as exc:
            if timeout is None:  # not our bound: the connection's
                raise _connection_lost(self.name, f"running `{shown}`", exc) from None
            raise CommandError(
                self.name,
                f"`{shown}` did not finish within {timeout:g} s",
                command=line,
                exit_status=None,
                stderr=output.text("stderr"),
            ) from None
        except _TooMuchOutputError as exc:
            raise CommandError(
                self.name,
                f"`{shown}` printed more than {max_output} bytes on {exc}: refused (a device "
                "answers in a few KiB; is something wrong on it?)",
                command=line,
                exit_status=None,
                stderr=output.text("stderr")[-2000:],
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise _connection_lost(self.name, f"running `{shown}`", exc) from None
        stdout, stderr = output.text("stdout"), output.text("stderr")
        if signal_name is not None:
            raise CommandError(
                self.name,
                f"`{shown}` was killed by signal {signal_name}{_tail(stderr)}",
                command=line,
                exit_status=None,
                stderr=stderr,
            )
        if check and status != 0:
            raise CommandError(
                self.name,
                f"`{shown}` failed with exit code {status}{_tail(stderr)}",
                command=line,
                exit_status=status,
                stderr=stderr,
            )
        return CommandResult(status, stdout, stderr)

    async def _run(self, line: str, input: str | None, output: _Output) -> tuple[int, str | None]:
        """Start ``line``, feed ``input``, read both streams into ``output`` (bounded) until
        the command ends; its exit status and the signal that killed it, if one did."""
        proc = await self._conn.create_process(line, encoding=None)
        try:
            if input is not None:
                proc.stdin.write(input.encode())
            proc.stdin.write_eof()
            readers = [
                asyncio.ensure_future(output.read(name, stream))
                for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
            ]
            try:
                await asyncio.gather(*readers)
            finally:
                for reader in readers:
                    reader.cancel()
            await proc.wait_closed()
        finally:
            proc.close()  # on an error or too much output: stop the command's channel
        signal = proc.exit_signal[0] if proc.exit_signal is not None else None
        return (proc.exit_status if proc.exit_status is not None else -1), signal

    async def upload(
        self,
        local_path: str | Path,
        remote_path: str,
        *,
        progress: ProgressFn | None = None,
        resume: bool = True,
        chunk_size: int = 1 << 20,
    ) -> UploadResult:
        """Copy ``local_path`` to ``remote_path + ".part"`` over SFTP; return where it landed.

        With ``resume``, a ``.part`` already on the device that is no longer than the file and
        whose last bytes match the file at that offset is continued rather than sent again (a
        cheap check, not a proof: verify the whole file with :meth:`sha256` before using it).
        The caller verifies and renames; this never touches ``remote_path`` itself.

        The directory may be writable by others (the store is group-writable), so nothing
        planted there is written through: the ``.part`` must be absent or a regular file
        owned by the login user, else :class:`TransferError` names it; a new one is created
        exclusively (``O_CREAT|O_EXCL``, which never follows a link), an existing one is
        checked again once open, before a byte is written. SFTP v3 (OpenSSH) has no
        ``O_NOFOLLOW``, so this is the check that protocol allows.
        """
        local = Path(local_path)
        try:
            size = local.stat().st_size
        except OSError as exc:
            raise TransferError(self.name, f"cannot read {local}: {exc.strerror}") from None
        part = remote_path + ".part"
        try:
            sftp = await self._sftp_client()
            parent = posixpath.dirname(part)
            if parent and not await self._is_directory(sftp, parent):  # absent: made here
                await sftp.makedirs(parent, exist_ok=True)
                await self._is_directory(sftp, parent, made=True)
            existing = await self._existing_part(sftp, part)
            offset = 0
            if existing is not None and resume:
                offset = await self._resume_offset(sftp, local, part, existing, size)
            if existing is not None and offset == 0:
                await sftp.remove(part)  # unlinks the name itself, whatever it is
                existing = None
            with local.open("rb") as src:
                src.seek(offset)
                flags = FXF_READ | FXF_WRITE if existing else FXF_WRITE | FXF_CREAT | FXF_EXCL
                async with sftp.open(part, flags, encoding=None) as dst:
                    if existing is not None:
                        await self._still_the_same(sftp, part, existing, dst)
                    done = offset
                    if progress is not None:
                        progress(done, size)
                    while chunk := src.read(chunk_size):
                        await dst.write(chunk, done)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, size)
        except asyncssh.SFTPError as exc:
            raise TransferError(
                self.name, f"uploading {local.name} to {part} failed: {exc.reason}"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise _connection_lost(
                self.name, f"uploading {local.name} to {part} (a re-run resumes it)", exc
            ) from None
        return UploadResult(part=part, size=size, resumed_from=offset)

    async def login_uid(self) -> int:
        """The uid the device runs this login's commands as (``id -u``, asked once)."""
        if self._uid is None:
            out = (await self.run(["id", "-u"], timeout=30.0)).stdout.strip()
            if not out.isdigit():
                raise CommandError(
                    self.name,
                    f"`id -u` printed {out[:40]!r}, not a uid",
                    command="id -u",
                    exit_status=0,
                    stderr="",
                )
            self._uid = int(out)
        return self._uid

    async def _is_directory(
        self, sftp: asyncssh.SFTPClient, path: str, *, made: bool = False
    ) -> bool:
        """True when ``path`` is a directory itself (not a link to one, nor a dangling link),
        False when nothing is there (before it is ``made``); anything else is refused."""
        try:
            mode = (await sftp.lstat(path)).permissions or 0
        except asyncssh.SFTPNoSuchFile:
            if made:
                raise TransferError(self.name, f"{path}: vanished once made: refused") from None
            return False
        if not stat.S_ISDIR(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
            raise TransferError(
                self.name, f"{path}: {kind}: refused (nothing is uploaded through it)"
            )
        return True

    async def _existing_part(
        self, sftp: asyncssh.SFTPClient, part: str
    ) -> asyncssh.SFTPAttrs | None:
        """The attributes of ``part`` (not following a link), None if absent; refused unless
        a regular file owned by the login user."""
        try:
            attrs = await sftp.lstat(part)
        except asyncssh.SFTPNoSuchFile:
            return None
        self._check_own_regular(part, attrs, await self.login_uid())
        return attrs

    def _check_own_regular(self, part: str, attrs: asyncssh.SFTPAttrs, uid: int) -> None:
        mode = attrs.permissions or 0
        if not stat.S_ISREG(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise TransferError(
                self.name,
                f"{part}: {kind}: refused (an upload never writes through it); "
                "remove it on the device and deploy again",
            )
        if attrs.uid != uid:
            raise TransferError(
                self.name,
                f"{part}: owned by uid {attrs.uid}, not by the login user (uid {uid}): refused; "
                "remove it on the device and deploy again",
            )

    async def _still_the_same(
        self,
        sftp: asyncssh.SFTPClient,
        part: str,
        before: asyncssh.SFTPAttrs,
        handle: asyncssh.SFTPClientFile,
    ) -> None:
        """The file opened is the one checked: what the handle points at and what the name
        now holds are both our regular file, unchanged (a link swapped in between is caught
        here, before anything is written)."""
        uid = await self.login_uid()
        opened, now = await handle.stat(), await sftp.lstat(part)
        for attrs in (opened, now):
            self._check_own_regular(part, attrs, uid)
        same = [(a.size, a.mtime, a.uid, a.permissions) for a in (before, opened, now)]
        if len(set(same)) != 1:
            raise TransferError(
                self.name, f"{part}: changed while it was opened: refused; deploy again"
            )

    async def sha256(self, remote_path: str) -> str:
        """The sha256 of a file on the device, computed there (``sha256sum``, from coreutils)."""
        result = await self.run(f"sha256sum < {shlex.quote(remote_path)}", timeout=600.0)
        digest = result.stdout.split(maxsplit=1)[0] if result.stdout.strip() else ""
        if not _SHA256.match(digest):
            raise CommandError(
                self.name,
                f"sha256sum of {remote_path} printed {result.stdout.strip()[:80]!r}, not a digest",
                command="sha256sum",
                exit_status=result.exit_status,
                stderr=result.stderr,
            )
        return digest

    async def read_file(
        self, remote_path: str, limit: int = 1 << 20, *, regular_only: bool = False
    ) -> bytes | None:
        """The bytes of a small file on the device over SFTP (no process started there), or
        None when it does not exist. Reads at most ``limit`` bytes.

        With ``regular_only`` (for a file in a directory others may write to), a symbolic link,
        a FIFO (whose open would block the SFTP server), a device or a file larger than
        ``limit`` is refused with :class:`TransferError` before it is opened.
        """
        try:
            sftp = await self._sftp_client()
            if regular_only:
                attrs = await sftp.lstat(remote_path)
                mode = attrs.permissions or 0
                if not stat.S_ISREG(mode):
                    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                    raise TransferError(self.name, f"{remote_path}: {kind}: refused")
                if (attrs.size or 0) > limit:
                    raise TransferError(
                        self.name, f"{remote_path}: {attrs.size} bytes, more than {limit}: refused"
                    )
            async with sftp.open(remote_path, "rb") as fh:
                data: object = await fh.read(limit)
        except asyncssh.SFTPNoSuchFile:
            return None
        except asyncssh.SFTPError as exc:
            raise TransferError(self.name, f"reading {remote_path} failed: {exc.reason}") from None
        except (asyncssh.Error, OSError) as exc:
            raise _connection_lost(self.name, f"reading {remote_path}", exc) from None
        return data if isinstance(data, bytes) else str(data).encode()

    async def exists(self, remote_path: str) -> bool:
        """Whether a path exists on the device (an SFTP stat; no process started there)."""
        try:
            sftp = await self._sftp_client()
            return bool(await sftp.exists(remote_path))
        except asyncssh.SFTPError as exc:
            raise TransferError(self.name, f"checking {remote_path} failed: {exc.reason}") from None
        except (asyncssh.Error, OSError) as exc:
            raise _connection_lost(self.name, f"checking {remote_path}", exc) from None

    async def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` on the device atomically, replacing ``dst`` if it exists."""
        try:
            sftp = await self._sftp_client()
            await sftp.posix_rename(src, dst)
        except asyncssh.SFTPError as exc:
            raise TransferError(
                self.name, f"renaming {src} to {dst} failed: {exc.reason}"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise _connection_lost(self.name, f"renaming {src}", exc) from None

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            self._sftp = await self._conn.start_sftp_client()
        return self._sftp

    @staticmethod
    async def _resume_offset(
        sftp: asyncssh.SFTPClient, local: Path, part: str, attrs: asyncssh.SFTPAttrs, size: int
    ) -> int:
        existing = attrs.size or 0
        if existing == 0 or existing > size:
            return 0
        window = min(existing, RESUME_CHECK_BYTES)
        async with sftp.open(part, "rb") as remote:
            theirs: object = await remote.read(window, existing - window)  # bytes: 'rb'
        with local.open("rb") as src:
            src.seek(existing - window)
            ours = src.read(window)
        return existing if theirs == ours else 0


class _TooMuchOutputError(Exception):
    """A command printed more than its bound on a stream (the stream's name)."""


class _Output:
    """What a command printed, stdout and stderr each at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._sizes = {"stdout": 0, "stderr": 0}

    async def read(self, name: str, stream: asyncssh.SSHReader[bytes]) -> None:
        while data := await stream.read(64 * 1024):
            self._sizes[name] += len(data)
            if self._sizes[name] > self.limit:
                raise _TooMuchOutputError(name)
            self._chunks[name].append(data)

    def text(self, name: str) -> str:
        return b"".join(self._chunks[name]).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------ connect


class _Connecting:
    """What :func:`connect` returns: ``await`` it for a :class:`Connection`, or ``async with`` it."""

    def __init__(self, target: SshTarget, connect_timeout: float) -> None:
        self._target = target
        self._timeout = connect_timeout
        self._conn: Connection | None = None

    def __await__(self) -> Generator[Any, None, Connection]:
        return _connect(self._target, self._timeout).__await__()

    async def __aenter__(self) -> Connection:
        self._conn = await _connect(self._target, self._timeout)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()


def connect(target: SshTarget, *, connect_timeout: float = 10.0) -> _Connecting:
    """Open an SSH connection to ``target``, its host key checked against known_hosts.

    ``connect_timeout`` bounds the TCP connect, the SSH handshake and the login together.
    Raises :class:`UnreachableError`, :class:`HostKeyError` or :class:`AuthError`.
    """
    return _Connecting(target, connect_timeout)


async def _connect(target: SshTarget, connect_timeout: float) -> Connection:
    known_hosts_file = (target.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    known_hosts = _read_known_hosts(target.name, known_hosts_file)
    options: dict[str, object] = {
        "known_hosts": known_hosts,  # always given: None would turn checking off
        "connect_timeout": connect_timeout,
        "keepalive_interval": 15,
        "keepalive_count_max": 3,
    }
    if target.user:
        options["username"] = target.user
    if target.key_file is not None:
        options["client_keys"] = [_read_client_key(target.name, target.key_file)]
        options["agent_path"] = None  # like IdentitiesOnly: exactly the configured key
    try:
        conn = await asyncssh.connect(target.host, target.port, **options)
    except asyncssh.HostKeyNotVerifiable:
        raise _host_key_error(target, known_hosts, known_hosts_file) from None
    except asyncssh.PermissionDenied:
        key = target.key_file or "the default keys and ssh agent"
        user = target.user or "the default user"
        raise AuthError(
            target.name,
            f"{_address(target)} refused the login of {user} with {key}: add the matching .pub "
            "to that user's ~/.ssh/authorized_keys on the device, or fix user/key_file",
        ) from None
    except TimeoutError:
        raise UnreachableError(
            target.name,
            f"no SSH answer from {_address(target)} within {connect_timeout:g} s: is the device on "
            "and on the network?",
        ) from None
    except ConnectionRefusedError:
        raise UnreachableError(
            target.name,
            f"connection refused by {_address(target)}: the device is up but nothing listens on "
            f"port {target.port} (is sshd running? is the port right?)",
        ) from None
    except OSError as exc:  # no route, name not resolved, ...
        raise UnreachableError(
            target.name, f"cannot reach {_address(target)}: {exc.strerror or exc}"
        ) from None
    except asyncssh.Error as exc:
        raise _connection_lost(target.name, f"connecting to {_address(target)}", exc) from None
    return Connection(target, conn)


def _read_known_hosts(device: str, path: Path) -> asyncssh.SSHKnownHosts:
    try:
        return asyncssh.read_known_hosts(str(path))
    except FileNotFoundError:
        raise HostKeyError(
            device,
            f"known_hosts file {path} does not exist, so no host key can be trusted: record the "
            "device's key there (ssh-keyscan, then compare its fingerprint with the device's)",
        ) from None
    except (OSError, ValueError) as exc:
        raise HostKeyError(device, f"cannot read known_hosts file {path}: {exc}") from None


def _read_client_key(device: str, path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(path.expanduser()))
    except OSError as exc:
        raise AuthError(device, f"cannot read client key {path}: {exc.strerror}") from None
    except asyncssh.KeyImportError as exc:
        raise AuthError(device, f"client key {path} is not a usable private key: {exc}") from None


def _host_key_error(
    target: SshTarget, known_hosts: asyncssh.SSHKnownHosts, path: Path
) -> HostKeyError:
    port = None if target.port == 22 else target.port
    trusted = asyncssh.match_known_hosts(known_hosts, target.host, target.host, port)[0]
    entry = f"[{target.host}]:{target.port}" if port else target.host
    scan = f"ssh-keyscan -p {target.port} {target.host}"
    if trusted:
        return HostKeyError(
            target.name,
            f"host key of {_address(target)} does NOT match the one recorded for {entry} in {path}: "
            "the device was reinstalled, or someone is in the middle; if you know it was "
            "reinstalled, replace that line (check the new fingerprint on the device first)",
        )
    return HostKeyError(
        target.name,
        f"host key of {_address(target)} is unknown: {path} has no entry for {entry}; add one "
        f"(`{scan}`, and compare the fingerprint with the device's own)",
    )


def _address(target: SshTarget) -> str:
    user = f"{target.user}@" if target.user else ""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{user}{host}:{target.port}"


def _connection_lost(device: str, doing: str, exc: BaseException) -> DeviceError:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    if isinstance(exc, asyncssh.ConnectionLost | OSError):
        return UnreachableError(device, f"connection lost while {doing}: {reason}")
    return DeviceError(device, f"SSH failed while {doing}: {reason}")


def _shorten(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 1] + "…"


def _tail(stderr: str, lines: int = 5, chars: int = 600) -> str:
    text = "\n".join(stderr.strip().splitlines()[-lines:])[-chars:]
    return f"; stderr:\n{text}" if text else " (no stderr)"
