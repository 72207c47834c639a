"""A real nginx serving a directory on loopback, started from a temporary config.

Pull mode needs only a static HTTP origin; this is the one the tests and
``doorstep-host bench-rollout`` start (Debian's ``nginx-light`` is enough: Range requests,
ETag). It is host-side tooling: nothing here runs on a doorbell.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from host.broker import free_port, terminate

HOST = "127.0.0.1"


def find_nginx() -> str | None:
    """``nginx`` on PATH or in /usr/sbin (Debian installs it there, not always on PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


class NginxMissingError(RuntimeError):
    pass


class Nginx:
    def __init__(self, root: Path, work: Path) -> None:
        exe = find_nginx()
        if exe is None:
            raise NginxMissingError(
                "nginx is not installed (apt-get install nginx-light; .ci/run installs it)"
            )
        self.exe, self.root, self.work = exe, root, work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        work.mkdir(parents=True, exist_ok=True)
        self.conf = work / "nginx.conf"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def url(self, name: str) -> str:
        return self.base_url + name

    def _config(self) -> str:
        w = self.work
        # Run as root, nginx's workers would drop to `nobody`, who cannot read pytest's
        # private temporary folders; keep the test's own user.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""\
{user}daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {w}/access.log;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    server {{
        listen {HOST}:{self.port};
        root {self.root};
        location / {{ }}
    }}
}}
"""

    def start(self, timeout: float = 10.0) -> None:
        self.conf.write_text(self._config())
        with (self.work / "stderr.log").open("ab") as err:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf), "-p", str(self.work)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.02)
        log = "".join(
            (self.work / name).read_text()
            for name in ("error.log", "stderr.log")
            if (self.work / name).exists()
        )
        self.stop()
        raise RuntimeError(f"nginx did not start on {HOST}:{self.port}\n{log[-2000:]}")

    def served_bytes(self) -> int:
        """Body bytes nginx sent, from its access log ($body_bytes_sent, the 10th field)."""
        total = 0
        log = self.work / "access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            parts = line.split('"')
            if len(parts) >= 3:
                fields = parts[2].split()
                if len(fields) >= 2 and fields[1].isdigit():
                    total += int(fields[1])
        return total

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
