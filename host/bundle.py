"""``doorstep-host bundle``: wrap a third-party .tflite into a bundle (no TensorFlow needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from device.bundle.build import describe_model, parse_normalization
from device.bundle.manifest import Thresholds
from device.bundle.store import Bundle, pack_bundle, write_bundle
from device.errors import DoorstepError


def bundle_model(args: argparse.Namespace) -> Bundle:
    """Describe, write and report a bundle as the command-line arguments ask."""
    try:
        thresholds = Thresholds(score=args.threshold, iou=args.iou)
    except ValueError as exc:
        raise DoorstepError(f"--threshold/--iou: {exc}") from None
    manifest, files = describe_model(
        args.model,
        args.labels,
        decoder=args.decoder,
        anchors=args.anchors,
        resize=args.resize,
        channel_order=args.channel_order,
        normalization=parse_normalization(args.normalization) if args.normalization else None,
        roles=args.role,
        thresholds=thresholds,
        name=args.name,
        version=args.model_version,
    )
    d = manifest.decoder
    i = manifest.input
    print(f"detected layout: {d.kind} ({d.detected_as})", file=sys.stderr)
    for role, t in d.outputs.items():
        print(f"  {role:<12} {t.name} {t.shape}", file=sys.stderr)
    quant = f", scale {i.scale:.6g}, zero point {i.zero_point}" if i.scale is not None else ""
    print(
        f"input: {i.width}x{i.height} {i.layout} {i.channel_order} {i.dtype}{quant}, "
        f"{i.resize}, normalization mean {list(i.normalization.mean)} std {list(i.normalization.std)}",
        file=sys.stderr,
    )
    roles = ", ".join(
        f"{r}={[manifest.labels.names[c] for c in ids]}" for r, ids in manifest.labels.roles.items()
    )
    print(
        f"labels: {len(manifest.labels.names)} classes; roles: {roles or 'none'}", file=sys.stderr
    )
    bundle = write_bundle(args.out, manifest, files, overwrite=args.force)
    print(f"wrote {bundle.source}/ ({', '.join(sorted(bundle.manifest.files))} + manifest.json)")
    if args.tar:
        tar = pack_bundle(args.out, Path(str(args.out).rstrip("/") + ".tar"))
        print(f"wrote {tar}")
    return bundle
