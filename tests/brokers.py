"""Real MQTT brokers for the tests: Mosquitto on loopback, plain, with passwords, or with TLS.

Nothing here is a stand-in. The broker is the ``mosquitto`` binary from the distribution, its
password file is written by the real ``mosquitto_passwd`` when it is installed, and the TLS
material is a throwaway certificate authority made with ``cryptography`` at test time.
Every broker listens on 127.0.0.1 on a free port and writes its log into its own folder, so a
failure can be read afterwards (``Mosquitto.log_tail``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from host.broker import terminate

HOST = "127.0.0.1"

# The accounts of the password broker: the doorbell that publishes, a subscriber that listens.
MQTT_USERS = {"doorbell": "correct horse doorbell 42", "listener": "listener-Pa55:word"}


class BrokerMissingError(Exception):
    """The mosquitto binary (or a tool it needs) is not installed: the caller skips."""


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or in the sbin/bin folders Debian installs it to (not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; its last verdict."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(step)
    return True


# ---------------------------------------------------------------- a throwaway PKI


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS listener needs: the CA that clients must be signed by, its cert and key."""

    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class Pki:
    """A test CA with a server certificate for 127.0.0.1/localhost and a client certificate.

    ``other_ca`` is an unrelated CA (it signed nothing the broker uses) and ``misnamed`` a
    server certificate from the right CA for a name that is not 127.0.0.1.
    """

    folder: Path
    ca: Path
    server: TlsFiles
    client_cert: Path
    client_key: Path
    other_ca: Path
    misnamed: TlsFiles


Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _issue(
    common_name: str,
    issuer: Issued | None,
    usage: x509.ObjectIdentifier | None = None,
    names: tuple[x509.GeneralName, ...] = (),
) -> Issued:
    """A certificate and its P-256 key, signed by ``issuer`` (a self-signed CA when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "doorstep tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    is_ca = issuer is None
    usages = {"key_cert_sign": True, "crl_sign": True} if is_ca else {"digital_signature": True}
    flags = "digital_signature content_commitment key_encipherment data_encipherment key_agreement"
    flags += " key_cert_sign crl_sign encipher_only decipher_only"
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
        .add_extension(x509.KeyUsage(**{f: usages.get(f, False) for f in flags.split()}), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), False)
    return builder.sign(signer, hashes.SHA256()), key


def _write(issued: Issued, folder: Path, stem: str) -> tuple[Path, Path]:
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert.write_bytes(issued[0].public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        issued[1].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Generate the CA, server, client, unrelated-CA and misnamed-server material in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _issue("doorstep test CA", None)
    loopback = (x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost"))
    server = _issue(HOST, ca, ExtendedKeyUsageOID.SERVER_AUTH, loopback)
    client = _issue("doorbell-client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    invalid = (x509.DNSName("broker.invalid"),)
    misnamed = _issue("broker.invalid", ca, ExtendedKeyUsageOID.SERVER_AUTH, invalid)
    ca_cert, _ = _write(ca, folder, "ca")
    client_cert, client_key = _write(client, folder, "client")
    return Pki(
        folder=folder,
        ca=ca_cert,
        server=TlsFiles(ca_cert, *_write(server, folder, "server")),
        client_cert=client_cert,
        client_key=client_key,
        other_ca=_write(_issue("some other CA", None), folder, "other-ca")[0],
        misnamed=TlsFiles(ca_cert, *_write(misnamed, folder, "misnamed")),
    )


# ---------------------------------------------------------------- password files


def mosquitto_version(exe: str) -> tuple[int, ...]:
    """The broker's version from ``mosquitto -h`` (which prints it, then exits non-zero)."""
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10)
    found = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    return tuple(int(g) for g in found.groups()) if found else (0,)


def password_line(user: str, password: str, version: tuple[int, ...]) -> str:
    """One password-file line in mosquitto's own format, as ``mosquitto_passwd`` writes it.

    Mosquitto 2.x (and ``mosquitto_passwd`` 2.0 by default) uses ``$7$``: PBKDF2-HMAC-SHA512,
    101 iterations, a 12-byte salt and a 64-byte hash, both base64. Mosquitto 1.x only knows
    ``$6$``: one SHA-512 over password + salt. 2.x reads both.
    """
    salt = os.urandom(12)
    if version >= (2,):
        iterations = 101
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        algo = f"7${iterations}"
    else:
        digest = hashlib.sha512(password.encode() + salt).digest()
        algo = "6"
    b64 = base64.b64encode
    return f"{user}:${algo}${b64(salt).decode()}${b64(digest).decode()}\n"


def write_password_file(
    path: Path, users: Mapping[str, str], tool: str | None, version: tuple[int, ...]
) -> Path:
    """Write ``users`` with the real ``mosquitto_passwd`` if ``tool`` is given, else in Python."""
    path.unlink(missing_ok=True)
    if tool is not None:
        for n, (user, password) in enumerate(users.items()):
            create = ["-c"] if n == 0 else []
            subprocess.run(
                [tool, *create, "-b", str(path), user, password],
                check=True,
                capture_output=True,
                timeout=30,
            )
    else:
        path.write_text("".join(password_line(u, p, version) for u, p in users.items()))
    path.chmod(0o600)  # newer brokers warn about (and will refuse) readable password files
    return path


# ---------------------------------------------------------------- the broker


class Mosquitto:
    """A real mosquitto broker on 127.0.0.1, started and stopped by the tests.

    ``users`` turns anonymous access off and writes a password file (with ``mosquitto_passwd``
    unless ``hash_in_python``); ``tls`` makes the listener TLS-only; ``require_certificate``
    also demands a client certificate signed by ``tls.cafile`` (mutual TLS); ``persistence``
    keeps sessions, their subscriptions and queued messages, and retained messages across a
    restart (in ``mosquitto.db``), so a subscriber with a persistent session misses nothing
    that was published while it was away, whenever it comes back.
    Files live in ``workdir``: ``mosquitto.conf``, ``mosquitto.log`` (the broker's own log,
    everything), ``mosquitto.out`` (its stdout and stderr) and ``passwd``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        tls: TlsFiles | None = None,
        require_certificate: bool = False,
        hash_in_python: bool = False,
        persistence: bool = False,
        acl: str | None = None,
    ) -> None:
        exe = find_tool("mosquitto")
        if exe is None:
            raise BrokerMissingError(
                "mosquitto is not installed (apt-get install mosquitto; .ci/run does)"
            )
        if require_certificate and tls is None:
            raise ValueError("require_certificate needs a TLS listener")
        self.exe, self.version = exe, mosquitto_version(exe)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.tls, self.require_certificate = tls, require_certificate
        self.persistence = persistence
        self.acl = acl  # the text of an acl_file (Mosquitto's format), or None: no ACL
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.out = workdir / "mosquitto.out"
        self.password_file: Path | None = None
        if users is not None:
            tool = None if hash_in_python else find_tool("mosquitto_passwd")
            self.password_file = write_password_file(
                workdir / "passwd", self.users, tool, self.version
            )
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{HOST}:{self.port}"

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {HOST}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log}",
            "log_type all",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:  # as root it would drop to user "mosquitto", who cannot read tmp
            lines.append("user root")
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")  # 2.x refuses anonymous clients by default
        if self.acl is not None:
            (self.workdir / "acl").write_text(self.acl)
            lines.append(f"acl_file {self.workdir / 'acl'}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        return "\n".join(lines) + "\n"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the broker's log and of its stdout/stderr, for failure messages."""
        parts = []
        for path in (self.log, self.out):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts) or "(mosquitto wrote no log)"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and return once it listens; if it cannot, raise with its log.

        A first start that loses its port to another process picks a new one; a restart keeps
        the port, so clients reconnect to the same URL.
        """
        for _attempt in range(3):
            if self._spawn_and_wait(timeout):
                self._started = True
                return
            if self._started or "Address already in use" not in self.log_tail(lines=5):
                break
            self.port = free_port()
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"mosquitto did not start on {HOST}:{self.port}\n{tail}")

    def _spawn_and_wait(self, timeout: float) -> bool:
        self.stop()
        self.conf.write_text(self._config())
        log_from = self.log.stat().st_size if self.log.exists() else 0
        self._out = self.out.open("ab")
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=self._out, stderr=subprocess.STDOUT
        )
        # Ready once the broker logs "... running" (after it opened its listener). Probing the
        # port instead would leave a failed handshake in a TLS broker's log, so that is only the
        # fallback for a broker that does not say so.
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            if self.proc.poll() is not None:
                self._reap()
                return False
            if self.log.exists():
                with self.log.open("rb") as f:
                    f.seek(log_from)
                    if re.search(rb"mosquitto version \S+ running", f.read()):
                        return True
            if time.monotonic() > started + 1:
                with socket.socket() as s:
                    if s.connect_ex((HOST, self.port)) == 0:
                        return self.proc.poll() is None
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        terminate(self.proc)
        self._reap()

    def _reap(self) -> None:
        self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
