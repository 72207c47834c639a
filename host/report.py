"""``doorstep-host report``: the daemons' JSON-lines logs as one HTML page with plots.

Reads each device's ``doorstep.jsonl`` (local files, or fetched over SFTP with ``--fleet``) and
writes ``DIR/index.html`` with its plots (PNG, matplotlib) and the parcel snapshots beside it:
nothing is fetched from the network when the page is opened.

* a fleet table: model, p95 pipeline ms, fps, mean watts, mJ per inference, events, errors,
  last seen; sortable, the worst device (most errors, then slowest) on top;
* per device: pipeline and per-stage latency over time, frame rates with motion-skipped and
  dropped frames, CPU and temperature with throttling marked, power and energy per inference
  (labelled estimated when the meter is a board profile), outbox depth and broker connection;
  an event timeline, and the arrivals' snapshots where the device saved them.

Logs come from devices, so nothing in them is trusted: every string is escaped, a line that is
not a JSON object is counted and skipped, and a snapshot is only ever read by its event's id
from the snapshot folder (``<name>.jpg``, a hex id), never from a path a log names.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from device.errors import DoorstepError

EVENT_COLOURS = {
    "arrived": "#2e7d32",
    "reminder": "#1565c0",
    "removed": "#6d4c41",
    "possible_theft": "#c62828",
}
ERROR_KINDS = {
    "source_failed",
    "source_stalled",
    "storage_degraded",
    "reload_failed",
    "events_dropped",
    "log_degraded",
}
# The pipeline's stages (capture_wait, the time spent waiting for a frame, is not work: left out)
STAGES = ("motion", "preprocess", "invoke", "decode", "presence", "publish")
SNAPSHOT_NAME = re.compile(r"^[0-9a-f]{32}\.jpg$")
SNAPSHOT_MAX = 2 << 20
LOG_MAX = 64 << 20
DEFAULT_LOG = "/var/log/doorstep/doorstep.jsonl"


@dataclass
class DeviceLog:
    """One device's records (oldest first) and the snapshots found for its arrivals."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[str, bytes] = field(default_factory=dict)  # file name -> JPEG
    bad_lines: int = 0
    error: str | None = None  # why it could not be read (then it has no records)

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("log") in kinds]


def parse_since(text: str | None) -> float | None:
    """``24h``, ``90m``, ``7d``, ``3600`` (seconds) -> seconds; None: everything."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise DoorstepError(f"--since {text!r}: expected a duration such as 90m, 24h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_lines(data: bytes, cutoff: float | None) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines log at or after ``cutoff`` (Unix time), and how many lines
    were not a JSON object with a numeric time."""
    records, bad = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        t = rec.get("t") if isinstance(rec, dict) else None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            bad += 1
            continue
        if cutoff is None or t >= cutoff:
            records.append(rec)
    records.sort(key=lambda r: r["t"])
    return records, bad


def _name_of(records: Sequence[dict[str, Any]], fallback: str) -> str:
    for r in records:
        if isinstance(r.get("device_id"), str) and r["device_id"]:
            return str(r["device_id"])
    return fallback


def _wanted_snapshots(records: Iterable[dict[str, Any]]) -> list[str]:
    names = []
    for r in records:
        name = r.get("snapshot")
        if r.get("log") == "event" and isinstance(name, str) and SNAPSHOT_NAME.match(name):
            names.append(name)
    return names


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def read_local(path: Path, cutoff: float | None, snapshots: Path | None = None) -> DeviceLog:
    """A log file on this machine (and its rotated ``.1``); snapshots from ``snapshots``, or
    the ``snapshots`` folder beside the log's folder (the daemon's default layout)."""
    try:
        data = b""
        rotated = path.with_name(path.name + ".1")
        if rotated.is_file():
            data += rotated.read_bytes()[-LOG_MAX:] + b"\n"
        data += path.read_bytes()[-LOG_MAX:]
    except OSError as exc:
        return DeviceLog(path.stem, error=f"{path}: cannot read: {exc.strerror or exc}")
    records, bad = parse_lines(data, cutoff)
    log = DeviceLog(_name_of(records, path.stem), records, bad_lines=bad)
    folder = snapshots or path.resolve().parent.parent / "snapshots"
    for name in _wanted_snapshots(records):
        file = folder / name
        try:
            if file.is_symlink() or not file.is_file() or file.stat().st_size > SNAPSHOT_MAX:
                continue
            jpeg = file.read_bytes()
        except OSError:
            continue
        if _is_jpeg(jpeg):
            log.snapshots[name] = jpeg
    return log


async def fetch_fleet(
    devices: Sequence[Any],
    cutoff: float | None,
    limit: int = 10,
    say: Callable[[str], None] = lambda s: None,
) -> list[DeviceLog]:
    """Each device's log over SFTP: the path its daemon record names (else the systemd
    default), its rotated ``.1``, and the snapshots of its arrivals. A device that cannot be
    read gives a ``DeviceLog`` whose ``error`` says why; the others are read all the same."""
    from host.fleet.ssh import connect

    gate = asyncio.Semaphore(limit)
    done = 0

    async def one(device: Any) -> DeviceLog:
        nonlocal done
        async with gate:
            try:
                async with connect(device, connect_timeout=device.connect_timeout) as conn:
                    log = await _fetch_one(conn, device, cutoff)
            except DoorstepError as exc:  # unreachable, refused, a transfer that failed
                log = DeviceLog(device.name, error=str(exc))
        done += 1
        state = f"error: {log.error}" if log.error else f"{len(log.records)} records"
        say(f"[{done}/{len(devices)}] {device.name}: {state}")
        return log

    return list(await asyncio.gather(*(one(d) for d in devices)))


async def _fetch_one(conn: Any, device: Any, cutoff: float | None) -> DeviceLog:
    from device.record import parse_record
    from host.fleet.plan import Layout

    log_path = DEFAULT_LOG
    record_path = str(Layout(device.state_dir).daemon_record)
    raw = await conn.read_file(record_path, limit=1 << 20, regular_only=True)
    if raw is not None:
        try:
            record = parse_record(json.loads(raw), f"{device.name}: daemon.json")
            log_path = record.log_file or DEFAULT_LOG
        except (ValueError, DoorstepError):
            pass  # an old or damaged record: the default path
    # At most LOG_MAX each (telemetry.log_max_mb is 10 by default): a bigger file is refused
    # by name, that device's row says so.
    rotated = await conn.read_file(log_path + ".1", limit=LOG_MAX, regular_only=True)
    current = await conn.read_file(log_path, limit=LOG_MAX, regular_only=True)
    if current is None and rotated is None:
        return DeviceLog(device.name, error=f"{log_path}: no log on the device")
    data = (rotated or b"") + b"\n" + (current or b"")
    records, bad = parse_lines(data, cutoff)
    log = DeviceLog(device.name, records, bad_lines=bad)
    folder = PurePosixPath(str(device.state_dir)) / "snapshots"
    for name in _wanted_snapshots(records):
        try:
            jpeg = await conn.read_file(str(folder / name), limit=SNAPSHOT_MAX, regular_only=True)
        except DoorstepError:
            continue
        if jpeg is not None and _is_jpeg(jpeg):
            log.snapshots[name] = jpeg
    return log


# ------------------------------------------------------------------------------ the figures


@dataclass(frozen=True)
class Row:
    """One device's line in the fleet table."""

    device: str
    model: str
    p95_ms: float | None
    fps: float | None
    watts: float | None
    mj: float | None
    events: int
    errors: int
    last_seen: float | None
    estimated: bool = False
    error: str | None = None

    def badness(self) -> tuple[float, ...]:
        """Sort key: unreadable first, then most errors, then slowest."""
        return (self.error is None, -self.errors, -(self.p95_ms or 0.0))


def _num(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def _stage(rec: dict[str, Any], stage: str, key: str) -> float | None:
    stages = rec.get("stages_ms")
    st = stages.get(stage) if isinstance(stages, dict) else None
    return _num(st.get(key)) if isinstance(st, dict) else None


def _power(rec: dict[str, Any], key: str) -> Any:
    p = rec.get("power")
    return p.get(key) if isinstance(p, dict) else None


def _median(values: Iterable[float | None]) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def summarize(log: DeviceLog) -> Row:
    if log.error is not None:
        return Row(log.name, "-", None, None, None, None, 0, 0, None, error=log.error)
    tel = log.of("telemetry")
    starts = log.of("start", "reloaded")
    model = "-"
    if starts:
        last = starts[-1]
        model = f"{last.get('model', last.get('name', '?'))} {last.get('version', '')}".strip()
    return Row(
        device=log.name,
        model=model,
        p95_ms=_median(_stage(r, "pipeline", "p95") for r in tel),
        fps=_median(_num(r.get("fps")) for r in tel),
        watts=_mean(_num(_power(r, "watts")) for r in tel),
        mj=_median(_num(_power(r, "mj_per_inference")) for r in tel),
        events=len(log.of("event")),
        errors=len(log.of(*ERROR_KINDS)) + log.bad_lines,
        last_seen=log.records[-1]["t"] if log.records else None,
        estimated=any(_power(r, "estimated") is True for r in tel),
    )


def _plots(log: DeviceLog, folder: Path) -> list[tuple[str, str]]:
    """Render the device's figures into ``folder``; ``[(file name, caption)]``."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    if not log.records:
        return []
    tel = log.of("telemetry")

    def arr(values: Iterable[float | None]) -> np.ndarray:
        """Floats for matplotlib; a missing value is a gap (NaN)."""
        return np.array([math.nan if v is None else v for v in values], dtype=float)

    def when(ts: float) -> float:
        return float(mdates.date2num(datetime.fromtimestamp(ts)))  # type: ignore[no-untyped-call]

    t = arr([when(r["t"]) for r in tel])
    out: list[tuple[str, str]] = []

    # Every plot spans the same window: the log's first to last record.
    first, last = log.records[0]["t"], log.records[-1]["t"]
    pad = max((last - first) * 0.02, 1.0)
    span = (when(first - pad), when(last + pad))

    def save(fig: Any, name: str, caption: str) -> None:
        for ax in fig.axes:
            ax.set_xlim(*span)
            ax.xaxis_date()
            locator = ax.xaxis.get_major_locator()
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
        out.append((name, caption))

    if tel:
        fig, ax = plt.subplots(figsize=(10, 3.2))
        ax.plot(t, arr([_stage(r, "pipeline", "p95") for r in tel]), lw=2.2, label="pipeline p95")
        ax.plot(t, arr([_stage(r, "pipeline", "p50") for r in tel]), lw=2.2, label="pipeline p50")
        for stage in STAGES:
            values = [_stage(r, stage, "p50") for r in tel]
            if any(v is not None for v in values):
                ax.plot(t, arr(values), lw=1, alpha=0.8, label=f"{stage} p50")
        ax.set_ylabel("ms")
        ax.set_title("Latency per frame")
        ax.legend(fontsize=7, ncol=5, loc="upper left")
        save(fig, "latency.png", "Pipeline p50/p95 and each stage's p50 (ms)")

        fig, ax = plt.subplots(figsize=(10, 3.2))
        ax.plot(t, arr([_num(r.get("fps")) for r in tel]), label="frames/s")
        ax.plot(t, arr([_num(r.get("inference_fps")) for r in tel]), label="inferences/s")
        ax.set_ylabel("per second")
        ax2 = ax.twinx()
        skipped = [_num(r.get("skipped_by_motion")) for r in tel]
        ax2.plot(
            t, arr([100 * s if s is not None else None for s in skipped]), "g:", label="skipped %"
        )
        ax2.step(t, arr([_num(r.get("dropped")) or 0 for r in tel]), "r-", where="post", alpha=0.7,
                 label="dropped frames")  # fmt: skip
        ax2.set_ylabel("skipped % / dropped")
        ax.set_title("Frame rate, motion-skipped and dropped frames")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
        save(fig, "rates.png", "Frames and inferences per second; share skipped by the motion gate")

        fig, ax = plt.subplots(figsize=(10, 3.2))
        ax.plot(t, arr([_num(r.get("cpu_percent")) for r in tel]), label="CPU % (one core)")
        ax.set_ylabel("CPU %")
        temps = [_num(r.get("cpu_temp_c")) for r in tel]
        if any(v is not None for v in temps):
            ax2 = ax.twinx()
            ax2.plot(t, arr(temps), "r-", label="temperature °C")
            ax2.set_ylabel("°C")
        throttled = False
        for i, r in enumerate(tel):
            flags = r.get("throttled")
            if isinstance(flags, dict) and any(
                v is True for k, v in flags.items() if k.endswith("_now")
            ):
                end = t[i + 1] if i + 1 < len(t) else t[i]
                ax.axvspan(float(t[i]), float(end), color="orange", alpha=0.3, lw=0)
                throttled = True
        ax.set_title("CPU and temperature" + (" (orange: throttled)" if throttled else ""))
        save(fig, "cpu.png", "CPU use and temperature; throttled windows in orange")

        watts = [_num(_power(r, "watts")) for r in tel]
        if any(w is not None for w in watts):
            est = " (estimated)" if any(_power(r, "estimated") is True for r in tel) else ""
            fig, ax = plt.subplots(figsize=(10, 3.2))
            ax.plot(t, arr(watts), label="W")
            ax.set_ylabel("W")
            ax2 = ax.twinx()
            ax2.plot(t, arr([_num(_power(r, "mj_per_inference")) for r in tel]), "m-", label="mJ")
            ax2.set_ylabel("mJ per inference")
            ax.set_title(f"Power and energy per inference{est}")
            save(fig, "power.png", f"Watts and millijoules per inference{est}")

        fig, ax = plt.subplots(figsize=(10, 2.6))
        ax.step(t, arr([_num(r.get("outbox")) or 0 for r in tel]), where="post", label="outbox")
        ax.set_ylabel("events waiting")
        broker = [r.get("broker") for r in tel]
        for i, state in enumerate(broker):
            if state == "disconnected":
                end = t[i + 1] if i + 1 < len(t) else t[i]
                ax.axvspan(float(t[i]), float(end), color="#c62828", alpha=0.2, lw=0)
        ax.set_title("Outbox depth (red: broker disconnected)")
        save(fig, "outbox.png", "Events waiting for the broker; red where it was disconnected")

    events = log.of("event")
    if events:
        fig, ax = plt.subplots(figsize=(10, 2.2))
        kinds = list(EVENT_COLOURS)
        for kind in kinds:
            xs = [when(e["t"]) for e in events if _event_type(e) == kind]
            if xs:
                ax.scatter(xs, [kinds.index(kind)] * len(xs), color=EVENT_COLOURS[kind], s=40,
                           label=kind, zorder=3)  # fmt: skip
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_ylim(-0.5, len(kinds) - 0.5)
        ax.set_title("Events")
        save(fig, "events.png", "Parcel events over time")
    return out


def _event_type(e: dict[str, Any]) -> str:
    kind = e.get("event_type") or e.get("event")
    if kind == "removed" and e.get("possible_theft") is True:
        return "possible_theft"
    return str(kind)


# ------------------------------------------------------------------------------ the page


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60].strip(".") or "device"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}-{n}"
    taken.add(slug)
    return slug


PAGE_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2;cursor:pointer;user-select:none}
td:first-child,th:first-child,td.text{text-align:left}
tr.bad td{background:#fdecea}
img.plot{display:block;max-width:100%;margin:0.4em 0}
img.thumb{height:90px;border:1px solid #999}
img.broken{outline:3px solid #c62828}
.note{color:#666}
"""

# Sorting by a column header click, and a mark on any image that failed to load (a missing
# plot or snapshot shows as such, and data-natural records what the browser decoded).
PAGE_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.from(body.rows);
    var asc = th.dataset.asc !== '1';
    th.dataset.asc = asc ? '1' : '0';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
function mark(img) {
  img.dataset.natural = img.naturalWidth + 'x' + img.naturalHeight;
  if (!img.naturalWidth) { img.classList.add('broken'); }
}
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(mark);
  document.body.dataset.ready = '1';
});
"""


def _cell(text: str, sort: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f'<td{attr} data-v="{html.escape(str(sort), quote=True)}">{html.escape(text)}</td>'


def render(
    logs: Sequence[DeviceLog], out: Path, say: Callable[[str], None] = lambda s: None
) -> Path:
    """Write ``out/index.html`` with its plots and snapshots; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted((summarize(log) for log in logs), key=Row.badness)
    by_name = {log.name: log for log in logs}
    taken: set[str] = set()
    slugs = {row.device: _slug(row.device, taken) for row in rows}
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>doorstep fleet report</title>",
        f"<style>{PAGE_STYLE}</style></head><body>",
        "<h1>doorstep fleet report</h1>",
        f"<p class='note'>{len(rows)} device(s); written {e(_when(time.time()))}. "
        "Click a column to sort.</p>",
        "<table class='sortable' id='fleet'><thead><tr>",
        "".join(
            f"<th>{h}</th>"
            for h in (
                "device",
                "model",
                "p95 pipeline ms",
                "fps",
                "mean W",
                "mJ/inference",
                "events",
                "errors",
                "last seen",
            )
        ),
        "</tr></thead><tbody>",
    ]
    for row in rows:
        bad = row.error is not None or row.errors > 0
        link = f"<a href='#{slugs[row.device]}'>{e(row.device)}</a>"
        watts = _fmt(row.watts, 2) + (" (est.)" if row.estimated and row.watts is not None else "")
        parts += [
            f"<tr class='{'bad' if bad else ''}'>",
            f"<td data-v='{e(row.device, quote=True)}'>{link}</td>",
            _cell(row.error or row.model, row.model, "text"),
            _cell(_fmt(row.p95_ms), row.p95_ms if row.p95_ms is not None else -1),
            _cell(_fmt(row.fps), row.fps if row.fps is not None else -1),
            _cell(watts, row.watts if row.watts is not None else -1),
            _cell(_fmt(row.mj), row.mj if row.mj is not None else -1),
            _cell(str(row.events), row.events),
            _cell("unreadable" if row.error else str(row.errors), 1e9 if row.error else row.errors),
            _cell(_when(row.last_seen), row.last_seen or 0),
            "</tr>",
        ]
    parts.append("</tbody></table>")
    for i, row in enumerate(rows, 1):
        log, slug = by_name[row.device], slugs[row.device]
        say(f"[{i}/{len(rows)}] rendering {row.device}")
        parts.append(f"<h2 id='{slug}'>{e(row.device)}</h2>")
        if log.error is not None:
            parts.append(f"<p class='note'>could not be read: {e(log.error)}</p>")
            continue
        if log.bad_lines:
            parts.append(f"<p class='note'>{log.bad_lines} line(s) of the log were not records "
                         "and were skipped.</p>")  # fmt: skip
        plots = _plots(log, out / slug)
        if not plots:
            parts.append("<p class='note'>no telemetry or events in this window</p>")
        for name, caption in plots:
            parts.append(f"<img class='plot' src='{slug}/{name}' alt='{e(caption, quote=True)}'>")
        events = log.of("event")
        if events:
            parts.append("<table><thead><tr><th>time</th><th>event</th><th>zone</th>"
                         "<th>score</th><th>snapshot</th></tr></thead><tbody>")  # fmt: skip
            for ev in events[-200:]:
                snap = ev.get("snapshot")
                img = ""
                if isinstance(snap, str) and snap in log.snapshots:
                    (out / slug / snap).write_bytes(log.snapshots[snap])
                    img = f"<img class='thumb' src='{slug}/{snap}' alt='snapshot'>"
                scores = ev.get("scores")
                top = max((s for s in scores if _num(s) is not None), default=None) if isinstance(
                    scores, list) else None  # fmt: skip
                parts.append(
                    f"<tr><td class='text'>{e(_when(ev['t']))}</td>"
                    f"<td class='text'>{e(_event_type(ev))}</td>"
                    f"<td class='text'>{e(str(ev.get('zone', '')))}</td>"
                    f"<td>{_fmt(_num(top), 2)}</td><td>{img}</td></tr>"
                )
            parts.append("</tbody></table>")
        problems = log.of(*ERROR_KINDS)
        if problems:
            parts.append("<h3>Problems</h3><ul>")
            for p in problems[-50:]:
                what = p.get("error") or p.get("source") or ""
                parts.append(f"<li>{e(_when(p['t']))} {e(str(p['log']))}: {e(str(what))}</li>")
            parts.append("</ul>")
    parts.append(f"<script>{PAGE_SCRIPT}</script></body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


def run(
    logs: Sequence[str],
    fleet: str | None,
    since: str | None,
    out: Path,
    snapshots: Path | None = None,
    say: Callable[[str], None] = lambda s: print(s, flush=True),
) -> tuple[Path, list[DeviceLog]]:
    """What the command does: read, render, say where it went."""
    window = parse_since(since)
    cutoff = None if window is None else time.time() - window
    if not logs and fleet is None:
        raise DoorstepError("give one or more daemon logs (doorstep.jsonl), or --fleet FILE")
    found: list[DeviceLog] = []
    for i, name in enumerate(logs, 1):
        log = read_local(Path(name), cutoff, snapshots)
        state = f"error: {log.error}" if log.error else f"{len(log.records)} records"
        say(f"[{i}/{len(logs)}] {name}: {state}")
        found.append(log)
    if fleet is not None:
        from host.fleet.inventory import load_fleet

        devices = load_fleet(fleet).devices
        say(f"fetching the logs of {len(devices)} device(s) over SFTP ...")
        found += asyncio.run(fetch_fleet(devices, cutoff, say=say))
    index = render(found, out, say)
    unreadable = [log for log in found if log.error]
    for log in unreadable:
        print(f"doorstep-host report: {log.name}: {log.error}", file=sys.stderr)
    say(f"wrote {index}")
    return index, found
