"""``doorstep-host bundle``: wrap a third-party .tflite into a bundle (no TensorFlow needed)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from device.bundle.build import describe_model, parse_normalization
from device.bundle.manifest import Thresholds
from device.bundle.store import Bundle, pack_bundle, write_bundle
from device.errors import DoorstepError


def _check_outputs(manifest: Any, files: Any) -> None:
    """Refuse, before anything is written, a model whose outputs no working model gives (the
    daemon's self-test: NaN or inf anywhere, saturated or collapsed scores)."""
    from device.detect.checked import self_test
    from device.detect.detector import Detector

    with tempfile.TemporaryDirectory(prefix="doorstep-bundle-check-") as tmp:
        trial = write_bundle(Path(tmp) / "bundle", manifest, files)
        test = self_test(Detector(trial))
    if not test["ok"]:
        raise DoorstepError(f"not bundled: the self-test failed: {test['error']}")
    print(f"self-test: ok, {test['ms']:.1f} ms on {test['runtime']}", file=sys.stderr)


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
    _check_outputs(manifest, files)
    bundle = write_bundle(args.out, manifest, files, overwrite=args.force)
    print(f"wrote {bundle.source}/ ({', '.join(sorted(bundle.manifest.files))} + manifest.json)")
    if args.tar:
        tar = pack_bundle(args.out, Path(str(args.out).rstrip("/") + ".tar"))
        print(f"wrote {tar}")
    return bundle
