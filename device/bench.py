"""``doorstep-device bench``: where the time of one frame goes, per stage, per thread count."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.detect.detector import Detector
from device.errors import DoorstepError


@dataclass(frozen=True)
class BenchRow:
    threads: int
    runtime: str
    frames: int
    stats: dict[str, tuple[float, float]]  # stage -> (p50, p95) ms

    @property
    def fps(self) -> float:
        p50 = self.stats["total"][0]
        return 1000.0 / p50 if p50 > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "runtime": self.runtime,
            "frames": self.frames,
            "fps": round(self.fps, 1),
            **{
                f"{stage}_ms": {"p50": round(a, 3), "p95": round(b, 3)}
                for stage, (a, b) in self.stats.items()
            },
        }


def synthetic_frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic textured BGR frame (smoothed noise with a few shapes)."""
    rng = np.random.default_rng(seed)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    for _ in range(6):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, -1)
    return frame


def load_frames(source: str | None, size: tuple[int, int], limit: int = 30) -> list[np.ndarray]:
    """Frames to benchmark on, resized to ``size``: an image, a video, a folder, or synthetic."""
    if source is None:
        return [synthetic_frame(*size)]
    path = Path(source)
    frames: list[np.ndarray] = []
    if path.is_dir():
        for f in sorted(path.iterdir()):
            img = cv2.imread(str(f)) if f.is_file() else None
            if img is not None:
                frames.append(img)
            if len(frames) >= limit:
                break
    elif path.is_file():
        img = cv2.imread(str(path))
        if img is not None:
            frames.append(img)
        else:
            cap = cv2.VideoCapture(str(path))
            try:
                while len(frames) < limit:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    frames.append(frame)
            finally:
                cap.release()
    else:
        raise DoorstepError(f"{source}: not found (expected an image, a video file or a folder)")
    if not frames:
        raise DoorstepError(f"{source}: no readable image or video frame")
    return [
        cv2.resize(f, size, interpolation=cv2.INTER_AREA) if f.shape[1::-1] != size else f
        for f in frames
    ]


def _cycle(frames: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    while True:
        yield from frames


def bench(
    model: str | Path,
    frames: Sequence[np.ndarray],
    *,
    labels: str | Path | None = None,
    runtime: str = "auto",
    threads: Sequence[int] | None = None,
    iterations: int = 100,
    warmup: int = 10,
    **model_options: Any,
) -> list[BenchRow]:
    """Time preprocess, invoke and decode over ``iterations`` frames at each thread count."""
    rows = []
    for n in threads or sorted({1, os.cpu_count() or 1}):
        det = Detector.open(model, labels, runtime=runtime, num_threads=n, **model_options)
        source = _cycle(frames)
        for _ in range(warmup):
            det.detect(next(source))
        times = np.empty((iterations, 3))
        for i in range(iterations):
            det.detect(next(source))
            t = det.last_times
            times[i] = (t.preprocess, t.invoke, t.decode)
        stages = {
            "preprocess": times[:, 0],
            "invoke": times[:, 1],
            "decode": times[:, 2],
            "total": times.sum(axis=1),
        }
        stats = {
            k: (float(np.percentile(v, 50)), float(np.percentile(v, 95))) for k, v in stages.items()
        }
        rows.append(BenchRow(n, det.runtime_version, iterations, stats))
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    head = f"{'threads':>7}  {'stage':<11} {'p50 ms':>8} {'p95 ms':>8}"
    lines = [f"runtime: {rows[0].runtime}" if rows else "", head, "-" * len(head)]
    for row in rows:
        for stage, (p50, p95) in row.stats.items():
            lines.append(f"{row.threads:>7}  {stage:<11} {p50:>8.2f} {p95:>8.2f}")
        pre, dec, inv = row.stats["preprocess"][0], row.stats["decode"][0], row.stats["invoke"][0]
        share = (pre + dec) / inv * 100 if inv else float("nan")
        lines.append(
            f"{row.threads:>7}  {'fps':<11} {row.fps:>8.1f}   (preprocess+decode = {share:.1f}% of invoke)"
        )
    return "\n".join(lines)
