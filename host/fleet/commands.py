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
        "provision",
        formatter_class=formatter,
        help="take Pis reachable over SSH to running doorbells (install, configure, start)",
        description="Gather facts from each selected device over SSH (OS, Python, free space, "
        "picamera2, the doorstep user, the install, config, unit and service), plan what is "
        "still needed (each step skipped when already true) and do it as root (sudo -n): apt "
        "packages, the doorstep user and groups, a venv per wheel under "
        "/opt/doorstep-venvs/ with /opt/doorstep switched to it atomically, "
        "/etc/doorstep/device.yaml from `doorstep-device init` with the fleet's device_id "
        "(kept if it exists, unless --reconfigure), the signing key, the deploy user's sudo "
        "rule (checked with visudo -c first), the unit (systemd-analyze verify), the service; "
        "then a health gate: the daemon runs with a passing self-test. A new install that fails "
        "it is switched back to the previous one (/opt/doorstep.previous). Re-running changes "
        "nothing that is already as asked; a newer wheel upgrades in place. Exit code 0 only "
        "when every selected device ends provisioned or unchanged.",
        epilog="examples:\n"
        "  scripts/run wheel    # dist/doorstep-0.1.0-py3-none-any.whl\n"
        "  doorstep-host provision --fleet configs/fleet.yaml --wheel dist/doorstep-0.1.0-py3-none-any.whl \\\n"
        "      --broker mqtt://192.168.1.20:1883 --signing-key keys/doorstep-signing.pub --dry-run\n"
        "  doorstep-host provision --fleet configs/fleet.yaml --device front-door \\\n"
        "      --wheel dist/doorstep-0.1.0-py3-none-any.whl --broker mqtt://192.168.1.20:1883",
    )
    _selection(p)
    p.add_argument("--wheel", required=True, metavar="WHL", help="the device wheel to install")
    p.add_argument("--broker", metavar="URL", help="mqtt://host[:port] for a new device.yaml")
    p.add_argument(
        "--source",
        metavar="picamera2|URI",
        help="camera for a new device.yaml (default: picamera2)",
    )
    p.add_argument("--signing-key", metavar="K.pub", help="trusted signing key for bundles")
    p.add_argument(
        "--deploy-user",
        metavar="USER",
        help="the user deploy logs in as: doorstep group and sudo rule (default: the SSH user)",
    )
    p.add_argument("--reconfigure", action="store_true", help="replace an existing device.yaml")
    p.add_argument(
        "--service",
        choices=("systemd", "detached"),
        default="systemd",
        help="systemd (default), or detached: start `doorstep-device run` in the background "
        "on a device without systemd",
    )
    p.add_argument("--python", default="python3", metavar="PY", help="the device's Python")
    p.add_argument("--find-links", metavar="DIR|URL", help="pip --find-links on the device")
    p.add_argument("--no-index", action="store_true", help="pip --no-index on the device")
    p.add_argument(
        "--prefix",
        default="/",
        metavar="DIR",
        help="install under this root on the device (tests; {name} is the device's name); "
        "default /",
    )
    p.add_argument("--health-deadline", type=float, default=120.0, metavar="S")
    p.add_argument(
        "--health-over-mqtt",
        action="store_true",
        help="also require the device's retained `online` and a passing self-test on --broker "
        "(as this host reaches it); without it the gate reads the daemon's daemon.json",
    )
    p.add_argument("--parallel", type=int, metavar="N", help="devices worked on at once")
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
    return _report(args, report)


def _report(args: argparse.Namespace, report: Any) -> int:
    """Print a deploy or provision report (JSON, the plan of a dry run, or the table)."""
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


def cmd_provision(args: argparse.Namespace) -> int:
    from pathlib import PurePosixPath

    from host.fleet.progress import QuietView, make_view
    from host.fleet.provision import ProvisionOptions, Wheel
    from host.fleet.provision_run import provision

    fleet, devices = _load(args)
    prefix = PurePosixPath(args.prefix)
    if not prefix.is_absolute():
        raise ConfigError(f"--prefix {args.prefix}: must be an absolute path on the device")
    key = Path(args.signing_key) if args.signing_key else None
    if key is not None and not key.is_file():
        raise ConfigError(f"--signing-key {key}: not found")
    if key is not None:
        from device.bundle.signing import load_public_keys

        load_public_keys(key)  # a file that is not a public key fails here, not on the device
    options = ProvisionOptions(
        wheel=Wheel.read(args.wheel),
        prefix=prefix,
        python=args.python,
        broker=args.broker,
        source=args.source,
        signing_key=key,
        deploy_user=args.deploy_user,
        find_links=args.find_links,
        no_index=args.no_index,
        service=args.service,
        reconfigure=args.reconfigure,
        health_deadline=args.health_deadline,
        health_over_mqtt=args.health_over_mqtt,
    )
    if args.health_over_mqtt and (not args.broker or args.broker == "none"):
        raise ConfigError("--health-over-mqtt needs --broker URL")
    if not args.json:
        print(
            printable(
                f"provisioning {len(devices)} device(s) from {fleet.source} with "
                f"{options.wheel.path.name} (sha256 {options.wheel.sha256[:12]}…)"
            ),
            file=sys.stderr,
        )
    view = QuietView() if args.dry_run else make_view(args.json)
    report = asyncio.run(
        provision(
            devices,
            options,
            view,
            dry_run=args.dry_run,
            parallel=args.parallel or fleet.rollout.parallel,
        )
    )
    return _report(args, report)


COMMANDS = {
    "provision": cmd_provision,
    "keygen": cmd_keygen,
    "sign": cmd_sign,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "status": cmd_status,
}
