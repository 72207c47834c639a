"""HTTP origins for pull-mode tests: a real nginx on loopback, and a tiny server that stalls.

:class:`Nginx` serves a directory the way any static web server or CDN does (Range requests,
ETag), started from a temporary config, stopped by the fixture. :class:`StallingOrigin` is the
one fault nginx cannot be told to make: it sends the first bytes of a file, then nothing (the
connection stays open) until the test releases it; it honours Range, so a client resumes.
"""

from __future__ import annotations

import http.server
import threading
from typing import Any

from brokers import HOST

from host.pull.origin import Nginx, NginxMissingError  # noqa: F401 (re-exported)


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
