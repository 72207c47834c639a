"""Mutated-model campaign: damaged copies of real models must be refused or run, never crash.

    python tests/model_mutants.py [--mutants 300] [--seed 1] [--model ssd|default|all] [--jobs 2]
    (or: scripts/run mutants; run it once in each environment for both runtimes)

Each mutant is a real model (the COCO SSD from ../shared, doorstep's default parcel model) with
one to four bytes or words changed, mostly in the flatbuffer's structure (tables, vtables,
offsets, the header, strings: everything but the weights' bytes, where a change is harmless
data) and sometimes anywhere, or the file cut short. A forked child then does what a doorbell
and a user do with a model: ``inspect`` it, build a :class:`Detector` on it and detect once in a
real photo. The outcome of each is one of

    refused    a doorstep error of one line (what was wrong, and where)
    ran        everything worked (the damage was harmless, or only changed the numbers)
    traceback  any other exception, or an error message of several lines
    crash      the child died (a signal: the runtime segfaulted or aborted)
    hang       the child was still busy after the time limit

and the table counts them. The promise is 0 tracebacks, crashes and hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from device.bundle.store import Bundle, load_bundle  # noqa: E402
from device.detect.flatbuffer import _Reader  # noqa: E402
from device.errors import DoorstepError  # noqa: E402

BAD = ("traceback", "crash", "hang")


@dataclass(frozen=True)
class Target:
    """A real model to damage, and the bundle (manifest, anchors) it runs with."""

    name: str
    data: bytes
    bundle: Bundle
    structure: np.ndarray  # byte positions outside the weights' data
    options: np.ndarray  # custom ops' option bytes (FlexBuffers their Init reads unchecked)


def weight_ranges(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each buffer's data: the bytes a flip only changes numbers in."""
    r = _Reader(data)
    model = r.table(r.ref(0), "model")
    ranges = []
    for buf in r.tables(model, 4, "buffers"):
        start, n = r.vector(buf, 0, 1, "data")
        if n:
            ranges.append((start, start + n))
    return ranges


def option_positions(data: bytes) -> np.ndarray:
    r = _Reader(data)
    model = r.table(r.ref(0), "model")
    spans = []
    for graph in r.tables(model, 2, "subgraphs"):
        for op in r.tables(graph, 3, "operators"):
            start, n = r.vector(op, 5, 1, "custom options")
            spans.append(np.arange(start, start + n))
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


def structure_positions(data: bytes) -> np.ndarray:
    mask = np.ones(len(data), dtype=bool)
    for start, end in weight_ranges(data):
        mask[start:end] = False
    return np.flatnonzero(mask)


def ssd_target(workdir: Path) -> Target:
    from device.bundle.build import describe_model
    from device.bundle.store import write_bundle

    model = SHARED / "models" / "ssd_mobilenet_v1_coco_quant" / "detect.tflite"
    if not model.is_file():
        raise SystemExit(f"{model} is missing: the campaign needs ../shared")
    manifest, files = describe_model(model, model.with_name("labels.txt"), runtime="auto")
    bundle = write_bundle(workdir / "ssd-bundle", manifest, files)
    data = model.read_bytes()
    return Target("coco-ssd", data, bundle, structure_positions(data), option_positions(data))


def default_target() -> Target:
    from device.models import default_bundle

    bundle = load_bundle(default_bundle())
    data = bundle.model_path.read_bytes()
    return Target("default", data, bundle, structure_positions(data), option_positions(data))


def mutate(target: Target, rng: np.random.Generator) -> tuple[bytes, str]:
    """One damaged copy of the target's model and a short description of the damage."""
    data = target.data
    if rng.random() < 0.04:
        cut = int(rng.integers(8, len(data)))
        return data[:cut], f"cut at {cut}"
    out = bytearray(data)
    what = []
    for _ in range(int(rng.integers(1, 5))):
        where = rng.random()
        if where < 0.15:
            pos = int(rng.integers(0, len(data)))
        elif where < 0.25 and len(target.options):
            pos = int(rng.choice(target.options))
        else:
            pos = int(rng.choice(target.structure))
        kind = rng.random()
        if kind < 0.6:
            bit = int(rng.integers(0, 8))
            out[pos] ^= 1 << bit
            what.append(f"flip {pos}.{bit}")
        elif kind < 0.8:
            out[pos] = int(rng.integers(0, 256))
            what.append(f"byte {pos}={out[pos]}")
        else:
            pos -= pos % 4
            word = int(rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, int(rng.integers(0, 1 << 32))]))
            out[pos : pos + 4] = word.to_bytes(4, "little")
            what.append(f"word {pos}={word:#x}")
    return bytes(out), ", ".join(what)


def exercise(path: Path, target: Target, frame: np.ndarray) -> str:
    """What a user and a doorbell do with a model; return how far it got."""
    from device.detect.detector import Detector
    from device.inspect import inspect_model

    report = inspect_model(path)
    report.to_text()
    json.dumps(report.to_json())
    good = target.bundle
    paths = {**good.paths, good.manifest.model_file: path}
    bundle = Bundle(manifest=good.manifest, paths=paths, source=path, verified=False)
    detector = Detector(bundle, num_threads=1)
    detector.detect(frame)
    return "ran"


def child(path: Path, target: Target, frame: np.ndarray, out: int) -> None:
    try:
        result = {"outcome": exercise(path, target, frame)}
    except DoorstepError as exc:
        message = str(exc)
        outcome = "refused" if message and "\n" not in message.strip() else "traceback"
        result = {"outcome": outcome, "error": message}
    except BaseException as exc:  # what the campaign is here to find
        result = {
            "outcome": "traceback",
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc()[-2000:],
        }
    os.write(out, json.dumps(result).encode() + b"\n")


@dataclass
class Running:
    pid: int
    fd: int
    started: float
    meta: dict[str, Any]  # which model and mutant, and the damage done
    buf: bytes = b""


def start(path: Path, target: Target, frame: np.ndarray, meta: dict[str, Any]) -> Running:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        os.close(read_fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)  # the runtimes print their own complaints; the result is the pipe
        try:
            child(path, target, frame, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    return Running(pid, read_fd, time.monotonic(), meta)


def finish(run: Running, timed_out: bool) -> dict[str, Any]:
    if timed_out:
        os.kill(run.pid, signal.SIGKILL)
    _, status = os.waitpid(run.pid, 0)
    while True:  # whatever is left in the pipe
        chunk = os.read(run.fd, 65536)
        if not chunk:
            break
        run.buf += chunk
    os.close(run.fd)
    if timed_out:
        return {"outcome": "hang"}
    if os.WIFSIGNALED(status):
        return {
            "outcome": "crash",
            "error": f"killed by {signal.Signals(os.WTERMSIG(status)).name}",
        }
    line = run.buf.decode("utf-8", "replace").strip()
    if not line:
        return {"outcome": "crash", "error": f"exited {os.WEXITSTATUS(status)} without a result"}
    result: dict[str, Any] = json.loads(line)
    return result


def campaign(
    targets: list[Target],
    mutants: int,
    seed: int,
    workdir: Path,
    jobs: int = 2,
    timeout: float = 60.0,
    progress: bool = False,
    keep: Path | None = None,
) -> list[dict[str, Any]]:
    """Run ``mutants`` damaged copies of each target; return one result per mutant."""
    import cv2

    frame = cv2.imread(str(SHARED / "data" / "coco-samples" / "pets.jpg"))
    if frame is None:
        raise SystemExit(
            "../shared/data/coco-samples/pets.jpg is missing: the campaign needs ../shared"
        )
    plan: list[tuple[Target, int]] = [(t, i) for t in targets for i in range(mutants)]
    results: list[dict[str, Any]] = []
    running: list[Running] = []
    rngs = {t.name: np.random.default_rng([seed, n]) for n, t in enumerate(targets)}

    pending = iter(plan)
    exhausted = False
    while running or not exhausted:
        while not exhausted and len(running) < jobs:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            target, i = item
            data, damage = mutate(target, rngs[target.name])
            path = workdir / f"{target.name}-{i}.tflite"
            path.write_bytes(data)
            meta = {"model": target.name, "mutant": i, "damage": damage}
            running.append(start(path, target, frame, meta))
        ready, _, _ = select.select([r.fd for r in running], [], [], 0.5)
        now = time.monotonic()
        for run in list(running):
            timed_out = now - run.started > timeout
            if run.fd not in ready and not timed_out:
                continue
            if run.fd in ready:
                chunk = os.read(run.fd, 65536)
                if chunk:
                    run.buf += chunk
                    if not run.buf.endswith(b"\n"):
                        continue
            result = {**run.meta, **finish(run, timed_out and run.fd not in ready)}
            running.remove(run)
            path = workdir / f"{result['model']}-{result['mutant']}.tflite"
            if keep is not None and result["outcome"] in BAD:
                keep.mkdir(parents=True, exist_ok=True)
                path.replace(keep / path.name)
            path.unlink(missing_ok=True)
            results.append(result)
            if progress and len(results) % 50 == 0:
                print(f"  {len(results)}/{len(plan)} mutants", file=sys.stderr, flush=True)
    return results


def table(results: list[dict[str, Any]], runtime: str) -> str:
    outcomes = ("refused", "ran", *BAD)
    lines = [
        f"runtime: {runtime}",
        f"{'model':<10} {'mutants':>8} " + " ".join(f"{o:>9}" for o in outcomes),
    ]
    for model in sorted({r["model"] for r in results}):
        rows = [r for r in results if r["model"] == model]
        counts = Counter(r["outcome"] for r in rows)
        lines.append(f"{model:<10} {len(rows):>8} " + " ".join(f"{counts[o]:>9}" for o in outcomes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tests/model_mutants.py --mutants 300 --json mutants.json",
    )
    parser.add_argument("--mutants", type=int, default=300, help="per model (default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", choices=("ssd", "default", "all"), default="all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--keep", type=Path, help="keep the mutants that broke something here")
    args = parser.parse_args(argv)
    from device.detect.runtime import resolve_runtime, runtime_version

    runtime = runtime_version(resolve_runtime())
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        targets = []
        if args.model in ("ssd", "all"):
            targets.append(ssd_target(work))
        if args.model in ("default", "all"):
            targets.append(default_target())
        started = time.monotonic()
        results = campaign(
            targets, args.mutants, args.seed, work, args.jobs, progress=True, keep=args.keep
        )
    print(table(results, runtime))
    print(f"({time.monotonic() - started:.0f} s)")
    for r in results:
        if r["outcome"] in BAD:
            print(
                f"{r['outcome']}: {r['model']} #{r['mutant']} ({r['damage']}): {r.get('error', '')}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["outcome"] in BAD for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
