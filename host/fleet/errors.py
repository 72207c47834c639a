"""The one family of errors the fleet code raises for a device: each names the device, what
failed and what to do."""

from __future__ import annotations

from device.errors import DoorstepError


class DeviceError(DoorstepError):
    """Something failed on one device, or on the way to it; the message starts with its name."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.reason = reason


class UnreachableError(DeviceError):
    """No SSH server answered: the device is off, off the network, or sshd is not running."""


class HostKeyError(DeviceError):
    """The device's host key is not in known_hosts, or differs from the one recorded there."""


class AuthError(DeviceError):
    """The device refused the client key for the configured user."""


class CommandError(DeviceError):
    """A command ran and failed (non-zero exit, a signal, or a timeout)."""

    def __init__(
        self, device: str, reason: str, *, command: str, exit_status: int | None, stderr: str
    ) -> None:
        super().__init__(device, reason)
        self.command = command
        self.exit_status = exit_status
        self.stderr = stderr


class TransferError(DeviceError):
    """An upload failed; the partial file stays on the device so a re-run resumes it."""


# ------------------------------------------------------------------------------------ target
