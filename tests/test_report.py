"""``doorstep-host report`` on logs of real daemon runs (real parcel photos and the real video in
``../shared``), opened in a real browser: Debian's headless Chromium loads the page, takes a
screenshot, and its DOM shows every plot and snapshot decoded and the fleet table's rows.
Also over SFTP from loopback doorbells (``--fleet``), with one device that cannot be reached."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml
from conftest import SHARED
from test_fleet_deploy import Lab, make_lab  # noqa: F401 (the fixture)

from host.report import parse_since

pytestmark = [pytest.mark.host, pytest.mark.timeout(300)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CONFIG = """
device_id: {name}
state_dir: state
presence:
  arrive_hits: 3
  arrive_window: 5
  remove_after_s: 2
  reminder_every_s: null
motion:
  enabled: false
telemetry:
  interval_s: 0.5
"""


def daemon_run(work: Path, name: str, video: Path, fps: int) -> Path:
    """``doorstep-device run`` on ``video`` replayed live; the path of its JSON-lines log."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "device.yaml").write_text(CONFIG.format(name=name))
    cmd = [sys.executable, "-m", "device.cli", "run", "--config", str(work / "device.yaml"),
           "--source", str(video), "--live", "--fps", str(fps), "--log-format", "json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return work / "state" / "log" / "doorstep.jsonl"


def parcel_video(path: Path) -> Path:
    """A fixed view made of real photos: no parcel, a real doorstep parcel, no parcel."""
    parcels = SHARED / "data" / "packages-v6" / "test" / "images"
    empty_photo = SHARED / "data" / "coco-samples" / "owl.jpg"
    if not parcels.is_dir() or not empty_photo.is_file():
        pytest.skip(f"needs {parcels} and {empty_photo} (the project's shared data)")
    empty = cv2.resize(cv2.imread(str(empty_photo)), (640, 480))
    parcel = cv2.resize(cv2.imread(str(sorted(parcels.glob("*.jpg"))[0])), (640, 480))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (640, 480))
    for image in [empty] * 3 + [parcel] * 6 + [empty] * 14:
        writer.write(image)
    writer.release()
    return path


class Page(HTMLParser):
    """What a DOM dump holds: the images (with what the page's script recorded about them),
    the fleet table's rows, and any script elements."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.rows: list[list[str]] = []
        self.scripts = 0
        self.body: dict[str, str | None] = {}
        self._table = self._cell = False
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts += 1
        elif tag == "table" and a.get("id") == "fleet":
            self._table = True
        elif self._table and tag == "tr":
            self.rows.append([])
        elif self._table and tag == "td":
            self._cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = False
        elif tag == "td":
            self._cell = False

    def handle_data(self, data: str) -> None:
        if self._table and self._cell:
            self.rows[-1][-1] += data


def chromium(index: Path, shot: Path) -> Page:
    """Load ``index`` in headless Chromium: a screenshot, and the DOM after the page's load."""
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={shot.parent / 'chromium-profile'}",
             "--virtual-time-budget=10000", "--window-size=1280,2400"]  # fmt: skip
    url = index.resolve().as_uri()
    shot_run = subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert shot_run.returncode == 0 and shot.stat().st_size > 10_000, shot_run.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page()
    page.feed(dom.stdout)
    return page


def test_report_of_real_runs_in_a_real_browser(tmp_path: Path, traffic_video: Path) -> None:
    porch = daemon_run(tmp_path / "porch", "porch", parcel_video(tmp_path / "porch.avi"), 5)
    street = daemon_run(tmp_path / "street", "street", traffic_video, 5)
    # A log from a device that lies: markup in its name, garbage lines, a snapshot path that
    # points elsewhere (never read: snapshots are found by event id in their own folder).
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_text(
        "not json at all\n[1, 2]\n"
        + json.dumps({"t": 1e9, "log": "start", "device_id": "<img src=x onerror=alert(1)>"})
        + "\n"
        + json.dumps(
            {
                "t": 1e9 + 1,
                "log": "event",
                "event": "arrived",
                "id": "e1",
                "snapshot": "/etc/passwd",
                "zone": "<b>z</b>",
            }
        )
        + "\n"
    )
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "host.cli", "report", str(porch), str(street), str(hostile),
           str(tmp_path / "missing.jsonl"), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr  # one log could not be read: said, the rest done
    assert "missing.jsonl" in proc.stderr and "cannot read" in proc.stderr
    assert "[4/4]" in proc.stdout and "rendering porch" in proc.stdout  # progress
    page = chromium(out / "index.html", tmp_path / "report.png")
    keep = os.environ.get("DOORSTEP_SCREENSHOT_DIR")  # to look at it: set, then run with -s
    if keep:
        shutil.copy(tmp_path / "report.png", Path(keep) / "doorstep-report.png")
        print(f"screenshot: {Path(keep) / 'doorstep-report.png'}")

    assert page.body.get("data-ready") == "1"  # the page's load handler ran
    assert page.scripts == 1  # the page's own; the hostile name did not become an element
    assert not any(img.get("src") == "x" for img in page.images)
    plots = [img for img in page.images if "plot" in (img.get("class") or "")]
    thumbs = [img for img in page.images if "thumb" in (img.get("class") or "")]
    # porch and street: latency, rates, CPU, outbox; porch also its events
    assert len(plots) >= 9, plots
    assert thumbs, "the porch arrival's snapshot"
    for img in plots + thumbs:
        w, h = (int(v) for v in str(img.get("data-natural")).split("x"))
        assert w > 0 and h > 0, img  # decoded by the browser
    rows = [r for r in page.rows if r]  # the header row has no td
    devices = [r[0] for r in rows]
    assert set(devices) == {"porch", "street", "<img src=x onerror=alert(1)>", "missing"}
    assert devices[0] == "missing"  # the worst on top: it could not be read
    by_name = {r[0]: r for r in rows}
    assert int(by_name["porch"][6]) == 2  # arrived, removed
    assert float(by_name["porch"][2]) > 0 and float(by_name["porch"][3]) > 0  # p95 ms, fps
    assert int(by_name["<img src=x onerror=alert(1)>"][7]) >= 2  # two lines were not records
    assert "doorstep-parcel-ssd" in by_name["street"][1]
    html = (out / "index.html").read_text()
    assert "<b>z</b>" not in html and "&lt;b&gt;z&lt;/b&gt;" in html
    assert not any("passwd" in p.name for p in out.rglob("*"))


def test_report_over_sftp_from_the_fleet(make_lab: Any, tmp_path: Path) -> None:  # noqa: F811
    lab: Lab = make_lab()
    for daemon in lab.daemons:  # started and ready: the record names its log
        record = daemon.record()
        assert record is not None and str(record["log_file"]).endswith("doorstep.jsonl")
    unreachable = {"name": "gone", "host": "127.0.0.1", "port": 9, "connect_timeout": 3}
    doc = yaml.safe_load(lab.fleet_file.read_text())
    doc["devices"].append({**doc["devices"][0], **unreachable})
    lab.fleet_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "fleet-report"
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "report", "--fleet", str(lab.fleet_file),
         "--since", "1h", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # "gone" could not be read; the rest are reported
    assert "gone:" in proc.stderr
    assert "fetching the logs of 4 device(s)" in proc.stdout
    html = (out / "index.html").read_text()
    for d in lab.fleet:
        assert re.search(rf"\[\d/4\] {re.escape(d.name)}: \d+ records", proc.stdout), proc.stdout
        assert f"<h2 id='{d.name}'>" in html
    assert "could not be read" in html


def test_since_takes_durations_and_refuses_nonsense() -> None:
    assert (
        parse_since("90m") == 5400 and parse_since("24h") == 86400 and parse_since("7d") == 604800
    )
    assert parse_since("30") == 30 and parse_since(None) is None
    with pytest.raises(Exception, match="--since 'soon'"):
        parse_since("soon")
