"""A dead, wedged or vanished camera is noticed: the watchdog stops, the run ends non-zero.

Real daemons in child processes, a real sd_notify datagram socket, a real OpenCV source on a
real MJPEG stream over loopback HTTP that goes away, and the picamera2 stand-in (no camera
here) dying or wedging inside ``capture_request``.
"""

from __future__ import annotations

import http.server
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from daemonproc import DaemonProc, NotifySocket

CONFIG = """
device_id: cam-fault
state_dir: state
presence: {{arrive_hits: 3, arrive_window: 5, remove_after_s: 3, reminder_every_s: null}}
motion: {{max_idle_s: 0.5}}
telemetry: {{interval_s: 1}}
source:
{source}
"""


class MjpegServer:
    """An MJPEG-over-HTTP camera (as IP cameras serve ``/video.mjpg``) on a loopback port,
    streaming one real photo at 10 fps until :meth:`stop` takes it away for good."""

    def __init__(self, image_path: Path) -> None:
        ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(image_path)))
        assert ok
        frame = jpeg.tobytes()
        gone = self.gone = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not gone.wait(0.1):
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                            % len(frame)
                            + frame
                            + b"\r\n"
                        )
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.gone.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _config(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "device.yaml"
    path.write_text(CONFIG.format(source=source))
    return path


def _pets_after(messages: list[str], marker: str) -> list[str]:
    """The watchdog pets sent after the first message starting with ``marker``."""
    for i, m in enumerate(messages):
        if m.startswith(marker):
            return [x for x in messages[i:] if x == "WATCHDOG=1"]
    raise AssertionError(f"no {marker!r} among {messages}")


def test_a_stream_that_disappears_stops_the_watchdog_and_ends_the_run(
    tmp_path: Path, coco_samples: Path, notify: NotifySocket
) -> None:
    server = MjpegServer(coco_samples / "pets.jpg")
    source = f"  type: opencv\n  uri: {server.url}\n  stall_s: 1"
    daemon = DaemonProc(_config(tmp_path, source), notify=notify, watchdog_s=1.0)
    try:
        daemon.record("start")
        assert notify.wait_for(lambda m: "WATCHDOG=1" in m, 60), notify.snapshot()
        server.stop()  # the camera is unplugged: its stream is gone and reconnects fail
        stalled = daemon.record("source_stalled", timeout=60)
        assert server.url in stalled["source"]
        failed = daemon.record("source_failed", timeout=60)
        assert server.url in failed["error"] and "no frame for" in failed["error"]
        assert daemon.wait(60) == 1  # non-zero: systemd's Restart=on-failure restarts it
    finally:
        daemon.kill9()
        server.stop()
    messages = notify.snapshot()
    assert _pets_after(messages, "STATUS=source stalled") == [], messages
    assert messages[-1] == "STOPPING=1"


def test_a_camera_that_dies_in_capture_request_ends_the_run(
    tmp_path: Path, coco_samples: Path, notify: NotifySocket
) -> None:
    source = "  type: picamera2\n  main_size: [640, 480]\n  lores_size: [320, 240]\n  fps: 10"
    daemon = DaemonProc(
        _config(tmp_path, source),
        notify=notify,
        watchdog_s=1.0,
        standin={"image": coco_samples / "pets.jpg", "fail_after": 15},
    )
    try:
        failed = daemon.record("source_failed", timeout=120)
        assert "camera 0 (picamera2)" in failed["error"]
        assert "Camera frontend has timed out!" in failed["error"]
        assert daemon.wait(60) == 1
    finally:
        daemon.kill9()
    messages = notify.snapshot()
    assert "WATCHDOG=1" in messages  # it was petted while frames came ...
    assert messages[-1] == "STOPPING=1"  # ... and nothing after the camera died but the stop


def test_a_wedged_camera_is_reported_stalled_and_the_run_ends(
    tmp_path: Path, coco_samples: Path, notify: NotifySocket
) -> None:
    source = (
        "  type: picamera2\n  main_size: [640, 480]\n  lores_size: [320, 240]\n  fps: 10\n"
        "  stall_s: 1"
    )
    daemon = DaemonProc(
        _config(tmp_path, source),
        notify=notify,
        watchdog_s=1.0,
        standin={"image": coco_samples / "pets.jpg", "hang_after": 15},
    )
    try:
        daemon.record("source_stalled", timeout=120)
        telemetry = daemon.record("telemetry", timeout=60)
        assert telemetry["source"]["status"] == "stalled", telemetry
        assert telemetry["source"]["last_frame_age_s"] >= 1.0
        daemon.record("source_failed", timeout=60)
        assert daemon.wait(60) == 1
    finally:
        daemon.kill9()
    assert _pets_after(notify.snapshot(), "STATUS=source stalled") == []


def test_a_live_replay_of_a_file_ends_at_its_end(tmp_path: Path, traffic_video: Path) -> None:
    """``--live`` plays a file as a camera would; at its end the run ends (exit 0), instead of
    polling a closed source for ever."""
    source = f"  type: opencv\n  uri: {traffic_video}\n  live: true"
    daemon = DaemonProc(_config(tmp_path, source))
    try:
        stop = daemon.record("stop", timeout=120)
        assert stop["frames"] >= 1
        assert daemon.wait(60) == 0
    finally:
        daemon.kill9()
