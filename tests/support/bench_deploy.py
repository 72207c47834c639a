"""The deploy benchmark: how a deploy's time grows with the fleet (``scripts/run bench``).

Test support, not shipped: it needs the loopback fleet of ``support.loopback`` and
``support.doorbell``. Run from the checkout::

    PYTHONPATH=tests .venv/bin/python -m support.bench_deploy [--devices N] [--repeat R]

Starts N loopback doorbells (real sshd, real ``doorstep-device run`` daemons, as the fleet
tests do), then times the whole ``deploy``: facts, upload of the shipped bundle's tar, verify,
install, activate, reload, health gate, prune. Each deploy ships a bundle the devices do not
have yet (the shipped model under a new version number), so no device is skipped. Figures:

- 1 device;
- N devices in one wave (``--canary 0 --batch 100%``): what parallelism buys;
- N devices with the default shape, a canary and then the rest: what the canary costs.

On loopback every device shares this machine's CPUs, which a real fleet does not: each Pi does
its own hashing, unpacking and model reload. The table shows the CPU count for that reason.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from host.fleet.inventory import Device, RolloutPolicy
from host.fleet.plan import BundleInfo
from host.fleet.progress import QuietView, table

if TYPE_CHECKING:
    from support.doorbell import DoorbellDaemon
    from support.loopback import SshFleet


def _bundles(root: Path, key: Path, count: int) -> list[BundleInfo]:
    """``count`` signed tars of the shipped bundle, each with its own version (its own id)."""
    from device.bundle.signing import sign_bundle
    from device.bundle.store import load_bundle, pack_bundle, write_bundle
    from device.models import default_bundle

    src = load_bundle(default_bundle())
    out = []
    for i in range(count):
        manifest = src.manifest.model_copy(update={"version": f"{src.manifest.version}+bench{i}"})
        folder = write_bundle(root / f"b{i}", manifest, dict(src.paths)).source
        sign_bundle(folder, key)
        out.append(BundleInfo.from_tar(pack_bundle(folder, root / f"b{i}.tar")))
    return out


def _devices(fleet: SshFleet, daemons: Sequence[DoorbellDaemon]) -> list[Device]:
    return [
        d.inventory_device(known_hosts=fleet.known_hosts, config=PurePosixPath(dm.config))
        for d, dm in zip(fleet.devices, daemons, strict=True)
    ]


def bench_deploy(count: int = 10, repeat: int = 3) -> dict[str, Any]:
    """Time deploys to 1 and to ``count`` loopback devices; ``repeat`` runs of each."""
    from device.bundle.signing import generate_keypair
    from host.fleet.deploy import deploy
    from support.doorbell import start_daemons, write_still_image
    from support.loopback import start_fleet

    shapes: list[tuple[str, int, RolloutPolicy]] = [
        ("1", 1, RolloutPolicy(canary=0, batch="100%")),
        (f"{count}, one wave", count, RolloutPolicy(canary=0, batch="100%", parallel=count)),
        (
            f"{count}, canary + rest",
            count,
            RolloutPolicy(canary=1, batch="100%", parallel=count),
        ),
    ]
    timings: dict[str, list[float]] = {label: [] for label, _, _ in shapes}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in shapes}
    other: dict[str, list[float]] = {label: [] for label, _, _ in shapes}
    host_cpu: dict[str, list[float]] = {label: [] for label, _, _ in shapes}
    with tempfile.TemporaryDirectory(prefix="doorstep-bench-deploy-") as tmp:
        root = Path(tmp)
        key, pub = root / "signing.key", root / "signing.pub"
        generate_keypair(key, pub)
        bundles = iter(_bundles(root / "bundles", key, repeat * len(shapes)))
        fleet = start_fleet(root / "fleet", count)
        daemons: list[DoorbellDaemon] = []
        try:
            daemons = start_daemons(fleet, write_still_image(root / "still.jpg"), [pub])
            devices = _devices(fleet, daemons)
            size = 0
            for run in range(repeat):
                for label, n, shape in shapes:
                    policy = shape.with_overrides(
                        health_interval=0.2, health_deadline=60, keep_models=2
                    )
                    bundle = next(bundles)
                    size = bundle.size
                    ours0, busy0 = _our_cpu(fleet, daemons), _machine_busy_s()
                    mine0 = time.process_time()
                    t0 = time.perf_counter()
                    report = asyncio.run(deploy(devices[:n], bundle, policy, QuietView()))
                    elapsed = time.perf_counter() - t0
                    host_cpu[label].append(time.process_time() - mine0)
                    time.sleep(0.3)  # let the SSH session processes exit and be counted
                    used = _our_cpu(fleet, daemons) - ours0
                    busy = _machine_busy_s() - busy0
                    if not report.ok:
                        raise RuntimeError(f"benchmark deploy failed:\n{report.summary()}")
                    timings[label].append(elapsed)
                    cpu[label].append(used)
                    other[label].append(max(busy - used, 0.0) / (elapsed + 0.3))
                    print(
                        f"run {run + 1}/{repeat}: {label:<22} {elapsed:6.2f} s, "
                        f"{used:5.2f} CPU-s used by the deploy",
                        file=sys.stderr,
                    )
        finally:
            for daemon in daemons:
                daemon.stop()
            fleet.stop()
    medians = {label: statistics.median(ts) for label, ts in timings.items()}
    one = medians["1"]
    cpus = os.cpu_count() or 1
    return {
        "devices": count,
        "repeat": repeat,
        "bundle_bytes": size,
        "cpus": cpus,
        "rows": [
            {
                "fleet": label,
                "devices": n,
                "median_s": round(medians[label], 3),
                "runs_s": [round(t, 3) for t in timings[label]],
                "ratio_to_one": round(medians[label] / one, 2),
                "cpu_s": round(statistics.median(cpu[label]), 2),
                "cpu_floor_s": round(statistics.median(cpu[label]) / cpus, 2),
                "other_load_cpus": round(statistics.median(other[label]), 2),
                "host_cpu_s": round(statistics.median(host_cpu[label]), 3),
            }
            for label, n, _ in shapes
        ],
    }


def _our_cpu(fleet: SshFleet, daemons: Sequence[DoorbellDaemon]) -> float:
    """CPU seconds used so far by the devices (their SSH sessions and daemons) and by us."""
    return (
        sum(d.session_cpu_s() for d in fleet.devices)
        + sum(d.cpu_s() for d in daemons)
        + time.process_time()
    )


def _machine_busy_s() -> float:
    """CPU seconds this machine has been busy (all processes), from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def format_table(figures: dict[str, Any]) -> str:
    cpus = figures["cpus"]
    rows = [
        [
            r["fleet"],
            f"{r['median_s']:.2f} s",
            f"{r['ratio_to_one']:.2f}x",
            f"{r['cpu_s']:.2f} CPU-s",
            f"{r['host_cpu_s']:.2f} CPU-s",
            f"{r['cpu_floor_s']:.2f} s",
            f"{r['other_load_cpus']:.1f}",
        ]
        for r in figures["rows"]
    ]
    one, wave = figures["rows"][0], figures["rows"][1]
    estimate = one["median_s"] + wave["host_cpu_s"] - one["host_cpu_s"]
    head = (
        f"deploy of the shipped bundle ({figures['bundle_bytes'] / (1 << 20):.1f} MiB tar) to "
        f"loopback doorbells (real sshd + doorstep daemons), median of {figures['repeat']} "
        f"run(s), on {cpus} CPU(s) that every device shares"
    )
    body = table(
        [
            "DEVICES",
            "TIME",
            "VS 1 DEVICE",
            "CPU USED",
            "OF IT HOST",
            f"CPU FLOOR ({cpus} CPUs)",
            "OTHER LOAD",
        ],
        rows,
    )
    notes = (
        "CPU USED: the deploy's CPU time on devices and host together (SSH sessions, the\n"
        "doorstep-device commands, the daemons' reloads, this process). CPU FLOOR: the least wall\n"
        "time that work needs on this machine; OTHER LOAD: CPUs busy with unrelated work meanwhile.\n"
        f"target: {figures['devices']} devices in at most 2x the time of 1. On real doorbells each "
        "device does its\nshare on its own CPU; here they queue for the same ones, so TIME cannot "
        "drop below the floor.\n"
        f"estimate (not measured) with a CPU per device: the 1-device time plus the extra host CPU, "
        f"{estimate:.2f} s ({estimate / one['median_s']:.2f}x)"
    )
    return f"{head}\n\n{body}\n\n{notes}"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m support.bench_deploy",
        description="Start N sshd daemons on loopback, each with its own doorstep daemon, and "
        "time a real deploy of the shipped bundle to one device and to all N. Prints a table; "
        "nothing passes or fails. Needs sshd (openssh-server) installed.",
        epilog="examples (from the checkout):\n"
        "  PYTHONPATH=tests .venv/bin/python -m support.bench_deploy\n"
        "  PYTHONPATH=tests .venv/bin/python -m support.bench_deploy --devices 20 --json b.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=10, metavar="N", help="fleet size (10)")
    parser.add_argument("--repeat", type=int, default=3, metavar="R", help="runs per size (3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.devices < 2 or args.repeat < 1:
        parser.error("--devices must be at least 2 and --repeat at least 1")
    figures = bench_deploy(args.devices, args.repeat)
    print(format_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
