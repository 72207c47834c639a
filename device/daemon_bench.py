"""``doorstep-device bench-daemon``: the running daemon's own figures, measured from outside.

Two runs of the real ``doorstep-device run`` in a child process, read back from its JSON log:

* **moving scene**: a video replayed as a live camera delivers it (30 fps, newest frame only);
  every frame differs, so every frame handled passes the motion gate and is inferred; gives the
  per-frame pipeline time (motion gate + preprocess + invoke + decode + presence + publish)
  against the invoke time alone. As from a camera, the capture thread delivers each frame at
  the model's size too (the lores stream picamera2 gets from the ISP), beside the inference
  of the frame before;
* **static scene**: one image delivered as a live camera at 10 fps for ``seconds``; the motion
  gate skips it and the detector runs every ``max_idle_s``; gives the daemon's CPU use (percent
  of one core) and resident memory.

The figures are printed as a table, with the targets beside them; nothing here passes or fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.bench import synthetic_frame
from device.errors import DoorstepError

CONFIG = """\
device_id: bench
state_dir: {state}
model:
  path: {model}
  runtime: {runtime}
  num_threads: {threads}
source: {source}
motion:
  enabled: true
  max_idle_s: 5
telemetry:
  interval_s: {interval}
  log_file: {log}
"""


@dataclass
class DaemonFigures:
    runtime: str
    threads: int
    frames: int
    stages_ms: dict[str, dict[str, float]]
    static_seconds: float
    static_fps: float
    static_inference_fps: float
    static_cpu_percent: float
    rss_mb: float

    @property
    def pipeline_over_invoke(self) -> float:
        return self.stages_ms["pipeline"]["p50"] / self.stages_ms["invoke"]["p50"]

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "pipeline_over_invoke": round(self.pipeline_over_invoke, 3)}


def _run(config: Path, seconds: float | None, log: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "device.cli", "run", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if seconds is not None:
            time.sleep(seconds)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode != 0:
        raise DoorstepError(f"the daemon failed (exit {proc.returncode}): {err.strip()[-500:]}")
    return [json.loads(line) for line in log.read_text().splitlines()]


def bench_daemon(
    model: str | None,
    runtime: str = "auto",
    threads: int = 1,
    frames: int = 300,
    seconds: float = 30.0,
    progress: bool = True,
) -> DaemonFigures:
    with tempfile.TemporaryDirectory(prefix="doorstep-bench-") as tmp:
        root = Path(tmp)
        moving = root / "moving.avi"
        writer = cv2.VideoWriter(str(moving), cv2.VideoWriter.fourcc(*"MJPG"), 30, (640, 480))
        for i in range(frames):  # every frame differs: the motion gate passes each one
            writer.write(synthetic_frame(640, 480, seed=i))
        writer.release()
        still = root / "still.png"
        cv2.imwrite(str(still), synthetic_frame(640, 480, seed=0))
        common = {
            "state": root / "state",
            "model": json.dumps(str(Path(model).resolve())) if model else "null",
            "runtime": runtime,
            "threads": threads,
        }

        if progress:
            print(
                f"moving scene: {frames} frames from a live camera, each inferred ...",
                file=sys.stderr,
            )
        log1 = root / "moving.jsonl"
        conf1 = root / "moving.yaml"
        conf1.write_text(
            CONFIG.format(
                **common,
                source=json.dumps({"type": "opencv", "uri": str(moving), "fps": 30, "live": True}),
                interval=3600,
                log=log1,
            )
        )
        records = _run(conf1, None, log1)
        start = next(r for r in records if r["log"] == "start")
        stop = next(r for r in records if r["log"] == "stop")

        if progress:
            print(f"static scene: a live camera at 10 fps for {seconds:.0f} s ...", file=sys.stderr)
        log2 = root / "static.jsonl"
        conf2 = root / "static.yaml"
        interval = max(seconds / 4, 1.0)
        conf2.write_text(
            CONFIG.format(
                **common,
                source=json.dumps({"type": "still", "path": str(still), "fps": 10}),
                interval=interval,
                log=log2,
            )
        )
        reports = [r for r in _run(conf2, seconds, log2) if r["log"] == "telemetry"]
        steady = [r for r in reports[1:] if r["window_s"] >= interval * 0.9] or reports
        if not steady:
            raise DoorstepError("the static run gave no telemetry report: raise --seconds")
    return DaemonFigures(
        runtime=start["runtime"],
        threads=threads,
        frames=stop["inferences"],
        stages_ms=stop["stages_ms"],
        static_seconds=round(sum(r["window_s"] for r in steady), 1),
        static_fps=float(np.median([r["fps"] for r in steady])),
        static_inference_fps=float(np.median([r["inference_fps"] for r in steady])),
        static_cpu_percent=float(np.median([r["cpu_percent"] for r in steady])),
        rss_mb=max(r["rss_mb"] for r in reports),
    )


def format_figures(f: DaemonFigures) -> str:
    lines = [
        f"runtime: {f.runtime}, {f.threads} thread(s), {os.cpu_count()} cores",
        "",
        f"moving scene ({f.frames} frames, each inferred), per-frame ms:",
        f"  {'stage':<13}{'p50':>8}{'p95':>8}{'max':>8}",
    ]
    for stage, st in f.stages_ms.items():
        lines.append(f"  {stage:<13}{st['p50']:>8.2f}{st['p95']:>8.2f}{st['max']:>8.2f}")
    lines += [
        "",
        "| figure | measured | target |",
        "| --- | --- | --- |",
        f"| pipeline p50 / invoke p50 | {f.pipeline_over_invoke:.3f} | <= 1.10 |",
        f"| daemon RSS (max) | {f.rss_mb:.1f} MB | <= 100 MB |",
        f"| static scene at {f.static_fps:.1f} fps: CPU, one core | "
        f"{f.static_cpu_percent:.1f} % | <= 10 % |",
        f"| static scene: inferences per second | {f.static_inference_fps:.2f} | "
        "(motion gate: every 5 s) |",
    ]
    return "\n".join(lines)
