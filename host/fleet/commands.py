"""The fleet commands of ``doorstep-host``: keygen, sign, deploy, rollback, status.

``host.cli`` adds these parsers (:func:`add_parsers`) and dispatches to :data:`COMMANDS`.
Exit codes: 0 when every selected device ended as asked; 1 when some did not (the table says
which and why); 2 for bad input (a bad fleet file, a bundle that does not verify, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from device.cliutil import formatter
from device.errors import BundleError, ConfigError
from host.safe_text import printable

FLEET_OPTIONS_HELP = "fleet.yaml or an Ansible YAML inventory"


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", required=True, metavar="FILE", help=FLEET_OPTIONS_HELP)
    p.add_argument("--group", metavar="G", help="only the devices in this group")
    p.add_argument("--device", metavar="NAME", help="only this device")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def add_parsers(sub: Any) -> None:
    """Add the fleet subcommands to ``doorstep-host``'s subparsers."""
    p = sub.add_parser(
        "keygen",
        formatter_class=formatter,
        help="make an Ed25519 key pair for signing bundles",
        description="Write PREFIX.key (the private key, PEM, mode 0600: keep it on the build "
        "machine) and PREFIX.pub (one line; copy it to every device and list it under "
        "signing.public_keys in its device.yaml). Existing files are never overwritten.",
        epilog="examples:\n"
        "  doorstep-host keygen --out keys/doorstep-signing\n"
        "  DOORSTEP_KEY_PASS=... doorstep-host keygen --out keys/ci --passphrase-env DOORSTEP_KEY_PASS",
    )
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key, PREFIX.pub")
    p.add_argument("--comment", default="", help="a label stored with the public key")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with $VAR")

    p = sub.add_parser(
        "sign",
        formatter_class=formatter,
        help="sign a bundle directory (manifest.sig) and optionally pack it",
        description="Verify every file of the bundle against its manifest, then write "
        "manifest.sig: an Ed25519 signature over manifest.json, which pins every file's sha256. "
        "Devices that list the public key in signing.public_keys refuse anything else.",
        epilog="examples:\n"
        "  doorstep-host sign parcel-int8/ --key keys/doorstep-signing.key\n"
        "  doorstep-host sign parcel-int8/ --key keys/doorstep-signing.key --tar parcel-int8.tar",
    )
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--key", required=True, metavar="FILE", help="private key (from keygen)")
    p.add_argument("--passphrase-env", metavar="VAR", help="the key's passphrase is in $VAR")
    p.add_argument(
        "--tar",
        nargs="?",
        const="",
        metavar="OUT.tar",
        help="also pack the signed bundle (default name: BUNDLE_DIR.tar)",
    )

    p = sub.add_parser(
        "deploy",
        formatter_class=formatter,
        help="push a signed bundle to the fleet: canary, batches, health gate, rollback",
        description="Gather facts from every selected device over SSH (host keys checked against "
        "known_hosts), plan each one (skip devices already on the bundle, resume partial "
        "uploads), then go wave by wave: upload to a .part file, verify its size and sha256 on "
        "the device, install, activate (the device checks the signature and switches `current` "
        "atomically) and wait until the daemon serves the new model with a passing self-test; "
        "otherwise roll that device back. A failed canary or more than --max-fail failures "
        "stop the rollout. Re-running finishes what a failed or interrupted run left. Exit "
        "code 0 only when every selected device ends on the bundle.",
        epilog="examples:\n"
        "  doorstep-host deploy parcel-int8/ --fleet configs/fleet.yaml --dry-run\n"
        "  doorstep-host deploy parcel-int8.tar --fleet configs/fleet.yaml\n"
        "  doorstep-host deploy parcel-int8/ --fleet hosts.yml --group house --canary 2 \\\n"
        "      --batch 50% --max-fail 1\n"
        "  doorstep-host deploy parcel-int8/ --fleet configs/fleet.yaml --device front-door --json",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a signed bundle directory or its .tar")
    _selection(p)
    p.add_argument("--canary", type=int, metavar="N", help="devices in the first wave")
    p.add_argument("--batch", metavar="N|P%", help="devices per later wave: a count or a share")
    p.add_argument("--max-fail", type=int, metavar="N", help="failures tolerated before stopping")
    p.add_argument("--parallel", type=int, metavar="N", help="devices worked on at once")
    p.add_argument("--health-deadline", type=float, metavar="S", help="seconds to report healthy")
    p.add_argument(
        "--dry-run", action="store_true", help="gather facts, print the plan, change nothing"
    )

    p = sub.add_parser(
        "rollback",
        formatter_class=formatter,
        help="switch devices back to their previous model",
        description="On each selected device, swap `current` and `previous`, reload the daemon "
        "and wait until it serves the previous model again.",
        epilog="examples:\n"
        "  doorstep-host rollback --fleet configs/fleet.yaml --device front-door\n"
        "  doorstep-host rollback --fleet configs/fleet.yaml --group house",
    )
    _selection(p)

    p = sub.add_parser(
        "status",
        formatter_class=formatter,
        help="per device: reachable, active model, daemon state, last seen, last event",
        description="Without --broker, run `doorstep-device status` on each device over SSH. "
        "With --broker, read each device's retained MQTT state and availability instead (no "
        "SSH; what the daemons last published). The output says which source it used.",
        epilog="examples:\n"
        "  doorstep-host status --fleet configs/fleet.yaml\n"
        "  doorstep-host status --fleet configs/fleet.yaml --broker mqtt://broker.local:1883 --json",
    )
    _selection(p)
    p.add_argument("--broker", metavar="URL", help="mqtt://host:port or mqtts://")
    p.add_argument("--prefix", default="doorstep", help="topic prefix (default: doorstep)")
    p.add_argument("--username")
    p.add_argument("--password-file", metavar="FILE")
    p.add_argument("--ca-file", metavar="FILE")


# ------------------------------------------------------------------------------------ keys


def _passphrase(var: str | None) -> bytes | None:
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"--passphrase-env {var}: that environment variable is not set")
    return value.encode()


def cmd_keygen(args: argparse.Namespace) -> int:
    from device.bundle.signing import generate_keypair

    prefix = Path(args.out)
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    key = generate_keypair(
        private, public, comment=args.comment, passphrase=_passphrase(args.passphrase_env)
    )
    print(f"private key {private} (keep it secret; back it up)")
    print(f"public key  {public}  id {key.key_id}")
    print(
        "next: copy the .pub to each device and list it in device.yaml:\n"
        f"  signing:\n    public_keys: [/etc/doorstep/{public.name}]"
    )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from device.bundle.signing import bundle_id, sign_bundle
    from device.bundle.store import pack_bundle

    src = Path(args.bundle)
    sig = sign_bundle(src, args.key, passphrase=_passphrase(args.passphrase_env))
    print(f"signed {src} with key {sig.key_id}; bundle id {bundle_id(src)}")
    if args.tar is not None:
        out = Path(args.tar) if args.tar else src.with_name(src.name.rstrip("/") + ".tar")
        pack_bundle(src, out)
        _require_signature_in(out, src)
        print(f"packed {out}")
    return 0


def _require_signature_in(tar: Path, src: Path) -> None:
    from device.bundle.signing import SIGNATURE, read_signature

    if (src / SIGNATURE).exists() and read_signature(tar) is None:
        raise BundleError(f"{tar}: packing dropped {SIGNATURE}; upgrade doorstep on this host")


# ------------------------------------------------------------------------------------ fleet


def _load(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    from host.fleet.inventory import load_fleet

    fleet = load_fleet(args.fleet)
    return fleet, fleet.select(group=args.group, device=args.device)


def resolve_bundle(path: str, workdir: Path) -> Any:
    """A bundle directory (packed into ``workdir``) or a ``.tar``, described and verified."""
    from device.bundle.store import pack_bundle
    from host.fleet.plan import BundleInfo

    src = Path(path)
    if src.is_dir():
        tar = pack_bundle(src, workdir / f"{src.resolve().name}.tar")
        _require_signature_in(tar, src)
        return BundleInfo.from_tar(tar)
    if not src.exists():
        raise BundleError(f"{src}: not found (expected a bundle directory or its .tar)")
    return BundleInfo.from_tar(src)


def cmd_deploy(args: argparse.Namespace) -> int:
    from host.fleet.deploy import deploy
    from host.fleet.progress import QuietView, make_view

    fleet, devices = _load(args)
    policy = fleet.rollout.with_overrides(
        canary=args.canary,
        batch=args.batch,
        max_fail=args.max_fail,
        parallel=args.parallel,
        health_deadline=args.health_deadline,
    )
    with tempfile.TemporaryDirectory(prefix="doorstep-deploy-") as tmp:
        bundle = resolve_bundle(args.bundle, Path(tmp))
        if not args.json:
            signed = f"signed by {bundle.signed_by}" if bundle.signed_by else "UNSIGNED"
            print(
                printable(
                    f"deploying {bundle.label} (id {bundle.sha[:12]}…, {signed}) to "
                    f"{len(devices)} device(s) from {fleet.source}"
                ),
                file=sys.stderr,
            )
        view = QuietView() if args.dry_run else make_view(args.json)
        report = asyncio.run(deploy(devices, bundle, policy, view, dry_run=args.dry_run))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif args.dry_run:
        print(report.plan_text())
    else:
        print(report.summary())
    return 0 if report.ok else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from host.fleet.deploy import rollback, rollback_summary
    from host.fleet.progress import make_view

    fleet, devices = _load(args)
    results = asyncio.run(rollback(devices, fleet.rollout, make_view(args.json)))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(rollback_summary(results))
    return 0 if all(r.outcome == "rolled back" for r in results) else 1


def cmd_status(args: argparse.Namespace) -> int:
    from host.fleet.status import render, status_over_mqtt, status_over_ssh

    fleet, devices = _load(args)
    if args.broker:
        from device.alerts.mqtt import BrokerSettings

        broker = BrokerSettings(
            args.broker,
            username=args.username,
            password_file=Path(args.password_file) if args.password_file else None,
            ca_file=Path(args.ca_file) if args.ca_file else None,
        )
        from host.watch import Invalid, check_prefix

        check_prefix(args.prefix)  # `--prefix '#'` is a usage error, not a silent broker

        def bad(invalid: Invalid) -> None:  # once per topic; the row says so too
            print(f"doorstep-host: {invalid.describe()}", file=sys.stderr, flush=True)

        rows = status_over_mqtt(devices, broker, args.prefix, on_invalid=bad)
        source = f"retained MQTT state on {args.broker}"
    else:
        rows = asyncio.run(status_over_ssh(devices, fleet.rollout.parallel))
        source = "doorstep-device status over SSH"
    if args.json:
        print(json.dumps({"source": source, "devices": [r.to_json() for r in rows]}, indent=2))
    else:
        print(render(rows, source))
    return 0 if all(r.reachable for r in rows) else 1


COMMANDS = {
    "keygen": cmd_keygen,
    "sign": cmd_sign,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "status": cmd_status,
}
