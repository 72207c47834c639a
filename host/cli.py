"""``doorstep-host``: the workstation's commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from device import __version__
from device.cliutil import formatter, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorstep-host",
        formatter_class=formatter,
        description="Prepare detectors for doorstep doorbells: wrap, quantize, evaluate, deploy.",
        epilog="examples:\n"
        "  doorstep-host bundle detect.tflite --labels labels.txt --out ssd-bundle/\n"
        "  doorstep-host demo --out demo/",
    )
    parser.add_argument("--version", action="version", version=f"doorstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "bundle",
        formatter_class=formatter,
        help="wrap an existing .tflite detector into a verified model bundle",
        description="Wrap a third-party .tflite detector into a bundle: detect its output layout "
        "(TFLite_Detection_PostProcess, YOLO v5/v8/11 and end-to-end, raw SSD), read its input "
        "spec and quantization, record labels, roles and thresholds, hash every file. "
        "Needs no TensorFlow.",
        epilog="examples:\n"
        "  doorstep-host bundle detect.tflite --labels labels.txt --out ssd-bundle/\n"
        "  doorstep-host bundle yolo11n_float32.tflite --labels coco.txt --out yolo/ \\\n"
        "      --role package=suitcase --threshold 0.4\n"
        "  doorstep-host bundle head.tflite --labels labels.txt --anchors anchors.npy --out b/ --tar",
    )
    p.add_argument("model", metavar="MODEL.tflite")
    p.add_argument("--labels", required=True, metavar="FILE", help="one class name per line")
    p.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument(
        "--decoder",
        default="auto",
        choices=("auto", "tflite_postprocess", "yolo_v8", "yolo_v5", "yolo_e2e", "ssd_raw"),
        help="output layout (default: auto, detected and reported)",
    )
    p.add_argument(
        "--anchors", metavar="FILE.npy", help="anchors [N, 4] (yc, xc, h, w) for a raw SSD head"
    )
    p.add_argument(
        "--normalization",
        metavar="N",
        help="float inputs: yolo (0..1), ssd (-1..1), MEAN,STD or 3 means + 3 stds "
        "(default: by detected family)",
    )
    p.add_argument(
        "--resize",
        choices=("letterbox", "stretch"),
        help="default: letterbox for YOLO, stretch for SSD",
    )
    p.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB", help="default: RGB")
    p.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="ROLE=NAMES",
        help="class roles, e.g. package=suitcase,book or person=person (repeatable); "
        "by default classes named package/parcel and person",
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, metavar="T", help="recommended score threshold"
    )
    p.add_argument("--iou", type=float, default=0.45, metavar="T", help="NMS IoU threshold")
    p.add_argument("--name", help="bundle name (default: the model file's stem)")
    p.add_argument("--version", dest="model_version", default="0.0.0", help="bundle version")
    p.add_argument("--tar", action="store_true", help="also write DIR.tar for transport")
    p.add_argument("--force", action="store_true", help="replace an existing DIR")

    p = sub.add_parser(
        "demo",
        formatter_class=formatter,
        help="build the self-made demo detector and image and run them end to end",
        description="Generate a small hand-built detector (it finds red boxes) and a synthetic "
        "porch image, bundle the model, inspect it and detect on the image. Everything is made "
        "here: no photo or third-party model involved.",
        epilog="example:\n  doorstep-host demo --out demo/",
    )
    p.add_argument("--out", default="demo", metavar="DIR", help="where to write (default: demo/)")
    return parser


def cmd_bundle(args: argparse.Namespace) -> int:
    from host.bundle import bundle_model

    bundle_model(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from host.demo import run_demo

    return run_demo(args.out)


COMMANDS = {"bundle": cmd_bundle, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
