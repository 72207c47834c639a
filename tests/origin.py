"""HTTP origins for pull-mode tests: a real nginx on loopback, and a tiny server that stalls.

:class:`Nginx` serves a directory the way any static web server or CDN does (Range requests,
ETag), started from a temporary config, stopped by the fixture. :class:`StallingOrigin` is the
one fault nginx cannot be told to make: it sends the first bytes of a file, then nothing (the
connection stays open) until the test releases it; it honours Range, so a client resumes.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from brokers import HOST, find_tool, free_port, terminate


class NginxMissingError(RuntimeError):
    pass


class Nginx:
    def __init__(self, root: Path, work: Path) -> None:
        exe = find_tool("nginx")
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


class StallingOrigin:
    """Serves ``data`` at ``/bundle.tar``; the first response stops after ``stall_at`` bytes
    and sends nothing more until :meth:`release` (or the server stops). Later requests, and
    requests with a Range, are served in full."""

    def __init__(self, data: bytes, stall_at: int) -> None:
        self.data, self.stall_at = data, stall_at
        self.released = threading.Event()
        self.stalled = threading.Event()  # set once a client got the first bytes and waits
        self.ranges: list[str | None] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                wanted = self.headers.get("Range")
                origin.ranges.append(wanted)
                start = 0
                if wanted and wanted.startswith("bytes="):
                    start = int(wanted[6:].split("-", 1)[0])
                body = origin.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    end = len(origin.data) - 1
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(origin.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                first_request = len(origin.ranges) == 1
                if first_request:
                    self.wfile.write(body[: origin.stall_at])
                    self.wfile.flush()
                    origin.stalled.set()
                    origin.released.wait(60)
                    return  # the connection closes without the rest
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}/bundle.tar"

    def start(self) -> None:
        self.thread.start()

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
