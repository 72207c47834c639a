"""What a person sees on a terminal: ``doorstep-device run`` with a live status line on a TTY
(a real pseudo-terminal here), and today's one line per report in a pipe or the journal."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import cv2
from test_daemon import daemon_cmd

from host.render import render_demo


def human_cmd(tmp_path: Path) -> list[str]:
    """The rendered parcel scene as a video replayed live (4 s; the parcel arrives at 0.8 s and
    is still there at the end), people's lines (not JSON)."""
    video = tmp_path / "porch.avi"
    frames = render_demo(frames=40, arrive=8, leave=40)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for f in frames:
        writer.write(f.image)
    writer.release()
    cmd = daemon_cmd(tmp_path, "--source", str(video), "--live", drain=0.2)
    i = cmd.index("--log-format")
    return cmd[:i] + cmd[i + 2 :]


def run_on_a_terminal(cmd: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run ``cmd`` with stdout on a pseudo-terminal; everything it wrote there, and its exit."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # rows, columns
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
        assert proc.stderr is not None
        proc.stderr.close()
    return proc.returncode, out.decode(errors="replace")


def test_a_terminal_gets_one_live_status_line(tmp_path: Path) -> None:
    code, text = run_on_a_terminal(human_cmd(tmp_path), tmp_path)
    assert code == 0, text[-2000:]
    # Each draw erases the line it is on; the status draws are the ones with the figures.
    draws = [d.split("\r\n")[0] for d in text.split("\r\x1b[K")[1:]]
    status = [d for d in draws if " fps | pipeline " in d]
    assert len(set(status)) >= 2, draws  # redrawn in place, with changing figures
    # The last draw (at the end of the run) is what stays on screen.
    final = text.rstrip("\r\n").rsplit("\r\n", 1)[-1].rsplit("\r\x1b[K", 1)[-1]
    assert " ms | parcel: yes (doorstep) | broker: disconnected | outbox " in final, final
    # Events still get their own lines (above the status line); telemetry lines give way to it.
    assert "parcel arrived" in text
    assert "inferences/s" not in text


def test_a_pipe_gets_plain_lines(tmp_path: Path) -> None:
    proc = subprocess.run(
        human_cmd(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stdout and "\r" not in proc.stdout
    assert "inferences/s" in proc.stdout  # one line per telemetry report, as in the journal
    assert "parcel arrived" in proc.stdout
