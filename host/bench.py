"""``doorstep-host bench``: size and invoke latency of models side by side (float vs int8)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.bundle.store import MANIFEST, load_bundle
from device.detect.runtime import open_interpreter, runtime_version


@dataclass(frozen=True)
class ModelTiming:
    model: str
    size: int
    dtype: str
    latency: dict[int, tuple[float, float]]  # threads -> (p50, p95) ms
    runtime: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size_bytes": self.size,
            "input_dtype": self.dtype,
            "runtime": self.runtime,
            "latency_ms": {
                str(t): {"p50": round(a, 3), "p95": round(b, 3)}
                for t, (a, b) in self.latency.items()
            },
        }


def model_file(path: str | Path) -> Path:
    p = Path(path)
    if (p.is_dir() and (p / MANIFEST).exists()) or p.suffix == ".tar":
        return load_bundle(p).model_path
    return p


def time_invoke(
    path: str | Path,
    threads: Sequence[int] | None = None,
    iterations: int = 50,
    warmup: int = 5,
    runtime: str = "auto",
) -> ModelTiming:
    """Invoke latency on a fixed random input, p50/p95 per thread count."""
    file = model_file(path)
    latency: dict[int, tuple[float, float]] = {}
    dtype, name = "", ""
    for n in threads or sorted({1, os.cpu_count() or 1}):
        interp, name = open_interpreter(file, runtime, n)
        detail = interp.get_input_details()[0]
        dtype = np.dtype(detail["dtype"]).name
        rng = np.random.default_rng(0)
        if dtype == "float32":
            data = rng.uniform(-1, 1, detail["shape"]).astype(np.float32)
        else:
            info = np.iinfo(np.dtype(detail["dtype"]))
            data = rng.integers(info.min, info.max, detail["shape"], endpoint=True).astype(
                detail["dtype"]
            )
        interp.set_tensor(detail["index"], data)
        for _ in range(warmup):
            interp.invoke()
        times = np.empty(iterations)
        for i in range(iterations):
            t0 = time.perf_counter()
            interp.invoke()
            times[i] = (time.perf_counter() - t0) * 1e3
        latency[n] = (float(np.percentile(times, 50)), float(np.percentile(times, 95)))
    return ModelTiming(str(path), file.stat().st_size, dtype, latency, runtime_version(name))


def format_table(rows: Sequence[ModelTiming]) -> str:
    threads = sorted({t for r in rows for t in r.latency})
    head = f"{'model':<32} {'input':>7} {'size':>10} {'vs first':>8}" + "".join(
        f" {f'{t} thr p50':>10} {'p95':>8} {'speed-up':>8}" for t in threads
    )
    lines = [f"runtime: {rows[0].runtime}" if rows else "", head, "-" * len(head)]
    base = rows[0] if rows else None
    for r in rows:
        assert base is not None
        line = f"{Path(r.model).name[:32]:<32} {r.dtype:>7} {r.size / 1e6:>8.2f}MB {r.size / base.size * 100:>7.1f}%"
        for t in threads:
            p50, p95 = r.latency[t]
            line += f" {p50:>8.2f}ms {p95:>6.2f}ms {base.latency[t][0] / p50:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)


def write_json(rows: Sequence[ModelTiming], path: str | Path) -> None:
    Path(path).write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
