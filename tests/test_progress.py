"""What a person sees while the fleet is worked on: rich's live rows on a terminal, plain lines
in a pipe (a real pseudo-terminal decides, as ``make_view`` does for ``deploy``/``rollout``)."""

from __future__ import annotations

import io
import os
import pty
import re

from rich.console import Console

from host.fleet.progress import LiveView, PlainView, make_view

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_terminal_gets_rich_live_rows_and_a_pipe_plain_lines() -> None:
    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            assert isinstance(make_view(out=tty), LiveView)
            assert isinstance(make_view(json_mode=True, out=tty), PlainView)  # --json: lines
    finally:
        os.close(master)
        os.close(slave)
    assert isinstance(make_view(out=io.StringIO()), PlainView)


def test_live_rows_show_phases_an_upload_bar_and_notes() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, height=30, color_system=None)
    view = LiveView(console=console)
    view.start(["porch", "garage", "[red]evil[/red]\x1b]0;pwned\x07"])
    view.phase("porch", "uploading")
    view.transfer("porch", 0, 4 << 20)
    view.transfer("porch", 2 << 20, 4 << 20)
    view.note("wave 1 of 2: 3 devices")
    view.phase("garage", "health check", "waiting for the first inference")
    view._live.refresh()
    view.transfer("porch", 4 << 20, 4 << 20)
    view.phase("porch", "deployed")
    view.phase("garage", "rolled back", "no inference in 60 s")
    view.close()
    raw = out.getvalue()
    assert "\x1b[" in raw  # redrawn in place (cursor movement), not appended
    text = ANSI.sub("", raw)
    assert " 50% of 4.0 MiB" in text and "━" in text  # the upload bar and its figure
    assert "waiting for the first inference" in text
    assert "wave 1 of 2: 3 devices" in text
    # A device's name is shown as it is: neither rich markup nor a terminal escape.
    assert "[red]evil[/red]" in text and "\x1b]0;" not in raw and "\\x1b]0;pwned" in text
    final = text.rsplit("wave 1 of 2: 3 devices", 1)[1]
    assert "deployed" in final and "rolled back" in final and "no inference in 60 s" in final
    assert "1 deployed, 1 rolled back, 1 waiting" in final


def test_plain_lines_say_each_change_once() -> None:
    out = io.StringIO()
    view = PlainView(out)
    view.start(["porch"])
    for _ in range(3):
        view.phase("porch", "health check", "waiting")
    view.transfer("porch", 1 << 20, 4 << 20)
    view.transfer("porch", 4 << 20, 4 << 20)
    view.phase("porch", "deployed")
    lines = out.getvalue().splitlines()
    assert sum("health check: waiting" in line for line in lines) == 1
    assert any("uploaded 4.0 MiB of 4.0 MiB" in line for line in lines)
    assert lines[-1].endswith("porch: deployed") and "\x1b" not in out.getvalue()
