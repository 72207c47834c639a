"""``doorstep-host publish`` and ``doorstep-host rollout`` (pull mode)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from device.cliutil import formatter


def add_parsers(sub: Any) -> None:
    add_bench_parser(sub)
    p = sub.add_parser(
        "publish",
        formatter_class=formatter,
        help="write a signed bundle as <id>.tar + <id>.json for any HTTP origin (pull mode)",
        description="Pack a signed bundle into DIR/<id>.tar (named by content) and describe it "
        "in DIR/<id>.json (id, name, version, size, sha256 of the tar, signing key id, URL). "
        "Serve DIR with any static web server, CDN or object store; devices fetch the tar and "
        "check its sha256 and signature. Unsigned bundles are refused.",
        epilog="examples:\n"
        "  doorstep-host publish parcel-int8/ --to /srv/doorstep/\n"
        "  doorstep-host publish parcel-int8/ --to site/ --base-url https://models.example.com/doorstep/",
    )
    p.add_argument("bundle", metavar="BUNDLE_DIR", help="a signed bundle directory")
    p.add_argument("--to", required=True, metavar="DIR", help="the directory the origin serves")
    p.add_argument("--base-url", metavar="URL", help="where DIR is served (written as url)")

    p = sub.add_parser(
        "rollout",
        formatter_class=formatter,
        help="roll a published bundle out over MQTT: devices pull it (canary, waves, rollback)",
        description="Write each device's retained <prefix>/<device_id>/desired message as its "
        "wave opens (a canary wave, then batches, as deploy), watch the devices' retained "
        "update reports, and stop when a canary or more than --max-fail devices fail (their "
        "agents roll back themselves). Killed and started again with the same arguments, it "
        "continues. Exit 0: all serving; 1: stopped or failures; 3: some devices never "
        "answered (offline: they pick the message up when they return).",
        epilog="examples:\n"
        "  doorstep-host rollout https://models.example.com/doorstep/ID.json --fleet fleet.yaml "
        "--broker mqtts://broker:8883\n"
        "  doorstep-host rollout site/ID.json --base-url http://10.0.0.5/doorstep/ --fleet "
        "fleet.yaml --broker mqtt://10.0.0.5 --canary 2 --batch 25% --rate 60\n"
        "  doorstep-host rollout site/ID.json --fleet fleet.yaml --broker mqtt://b --dry-run\n"
        "  doorstep-host rollout --status ROLLOUT_ID --fleet fleet.yaml --broker mqtt://b\n"
        "  doorstep-host rollout --abort ROLLOUT_ID --fleet fleet.yaml --broker mqtt://b",
    )
    p.add_argument(
        "descriptor",
        nargs="?",
        metavar="BUNDLE",
        help="<id>.json (URL or file), the tar's URL, or the bundle id with --base-url",
    )
    p.add_argument("--fleet", required=True, metavar="FILE", help="fleet.yaml (devices by id)")
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://host[:port], mqtts://")
    p.add_argument("--prefix", default="doorstep", help="topic prefix (default: doorstep)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--username")
    p.add_argument("--password-file", metavar="FILE")
    p.add_argument("--ca-file", metavar="FILE")
    p.add_argument("--group", metavar="G", help="only the devices of this group")
    p.add_argument("--base-url", metavar="URL", help="where the descriptor's tar is served")
    p.add_argument("--rollout-id", metavar="ID", help="default: NAME-VERSION-IDPREFIX")
    p.add_argument("--canary", type=int, metavar="N", help="devices in the first wave")
    p.add_argument("--batch", metavar="N|P%", help="devices per later wave")
    p.add_argument("--max-fail", type=int, metavar="N", help="failures tolerated")
    p.add_argument("--health-deadline", type=float, metavar="S", help="seconds to serve")
    p.add_argument("--rate", type=float, metavar="N", help="desired messages per minute")
    p.add_argument("--wave-timeout", type=float, metavar="S", help="default: deadline + 600")
    p.add_argument("--allow-downgrade", action="store_true", help="roll an older version out")
    p.add_argument("--journal", metavar="FILE", help="default: ~/.local/state/doorstep/rollouts/")
    p.add_argument("--dry-run", action="store_true", help="print the waves, write nothing")
    p.add_argument("--json", action="store_true", help="--status as JSON")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", metavar="ROLLOUT_ID", help="where each device stands")
    what.add_argument("--abort", metavar="ROLLOUT_ID", help="desired back to what it was")


def add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench-rollout",
        formatter_class=formatter,
        help="benchmark a pull rollout to N update agents on loopback (no camera, no detector)",
        description="Start a real Mosquitto and a real nginx on loopback and N update agents (the "
        "real device/update code, many per worker process, each with its own MQTT connection "
        "and store; no camera and no detector), roll the shipped bundle out to them with the "
        "real rollout, and print time to converge, broker messages, origin bytes and CPU per N. "
        "A table, not a pass/fail. Each agent downloads and unpacks the bundle on this disk.",
        epilog="examples:\n  doorstep-host bench-rollout --devices 10 100 1000\n"
        "  doorstep-host bench-rollout --devices 100 --workers 4 --json rollout.json",
    )
    p.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000], metavar="N")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="K",
                   help="agent worker processes (default: one per CPU, and at least one per 250 agents)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def cmd_bench_rollout(args: argparse.Namespace) -> int:
    from device.errors import DoorstepError
    from host.pull.bench import bench_rollout, format_rows, to_json

    if any(n < 1 or n > 100_000 for n in args.devices) or args.workers < 1:
        raise DoorstepError("--devices must be 1..100000 each, --workers at least 1")
    rows = bench_rollout(args.devices, args.workers)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(rows), indent=2) + "\n")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from host.pull.publish import publish

    d = publish(args.bundle, args.to, args.base_url)
    print(json.dumps(d, indent=2))
    print(f"published {d['name']} {d['version']} as {Path(args.to) / d['file']}", file=sys.stderr)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from device.alerts.mqtt import BrokerSettings
    from device.errors import DoorstepError
    from host.fleet.inventory import load_fleet
    from host.fleet.plan import plan_rollout
    from host.fleet.progress import make_view
    from host.pull.rollout import (
        FleetView,
        abort_rollout,
        default_rollout_id,
        journal_path,
        load_descriptor,
        run_rollout,
        status_rows,
    )

    fleet = load_fleet(args.fleet)
    devices = fleet.select(args.group)
    policy = fleet.rollout.with_overrides(
        canary=args.canary,
        batch=args.batch,
        max_fail=args.max_fail,
        health_deadline=args.health_deadline,
    )
    if args.rate is not None and args.rate <= 0:
        raise DoorstepError(f"--rate {args.rate}: must be above 0 (messages per minute)")
    broker = BrokerSettings(
        url=args.broker,
        protocol=args.protocol,
        username=args.username,
        password_file=Path(args.password_file) if args.password_file else None,
        ca_file=Path(args.ca_file) if args.ca_file else None,
    )
    broker.address()  # a bad URL is refused before anything connects
    if args.status is None and args.abort is None and args.descriptor is None:
        raise DoorstepError("give the bundle descriptor (<id>.json), or --status / --abort ID")
    descriptor = load_descriptor(args.descriptor, args.base_url) if args.descriptor else None
    rollout_id = (
        args.status or args.abort or args.rollout_id or default_rollout_id(descriptor or {})
    )
    if args.dry_run and descriptor is not None:
        waves = plan_rollout(devices, policy)
        print(f"rollout {rollout_id}: {descriptor['name']} {descriptor['version']} from "
              f"{descriptor['url']}")  # fmt: skip
        for i, wave in enumerate(waves, 1):
            print(f"  {'canary' if i == 1 and policy.canary else f'wave {i}'}: {', '.join(wave)}")
        print("(dry run: nothing written; devices already serving it are skipped when run)")
        return 0
    view = FleetView(broker, args.prefix, [d.device_id for d in devices])
    view.start()
    try:
        journal = journal_path(rollout_id, args.journal)
        if args.status:
            rows = status_rows(view, devices, rollout_id)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    print(f"{r['device']:<16} desired {r['desired']:<28} {r['state']:<12} "
                          f"active {r['active_version'] or '-'}"
                          + (f"  ({r['reason']})" if r["reason"] else ""))  # fmt: skip
            return 0
        if args.abort:
            return abort_rollout(view, devices, rollout_id, journal)
        assert descriptor is not None
        print(f"rollout {rollout_id}: {descriptor['name']} {descriptor['version']} to "
              f"{len(devices)} device(s); journal {journal}", file=sys.stderr)  # fmt: skip
        progress = make_view(args.json)  # rich's live rows on a terminal, else plain lines
        try:
            result = run_rollout(
                view,
                devices,
                descriptor,
                rollout_id,
                policy,
                rate_per_min=args.rate,
                allow_downgrade=args.allow_downgrade,
                wave_timeout=args.wave_timeout,
                journal=journal,
                say=progress.note,
                progress=progress,
            )
        finally:
            progress.close()
        print(
            json.dumps(
                {
                    "rollout_id": rollout_id,
                    "serving": result.serving,
                    "failed": result.failed,
                    "pending": result.pending,
                    "not_started": result.not_started,
                    "stopped": result.stopped,
                }
            )
        )
        return result.exit_code
    finally:
        view.stop()


COMMANDS = {"publish": cmd_publish, "rollout": cmd_rollout, "bench-rollout": cmd_bench_rollout}
