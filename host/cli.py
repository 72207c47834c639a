"""``doorstep-host``: the workstation's commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from device import __version__
from device.cliutil import formatter, parse_threads, run
from device.errors import DoorstepError
from host.fleet.commands import COMMANDS as FLEET_COMMANDS
from host.fleet.commands import add_parsers as add_fleet_parsers
from host.pull.commands import COMMANDS as PULL_COMMANDS
from host.pull.commands import add_parsers as add_pull_parsers
from host.safe_text import printable

DECODER_CHOICES = (
    "auto", "tflite_postprocess", "yolo_v8", "yolo_v5", "yolo_e2e", "ssd_raw", "nanodet"
)  # fmt: skip


def _compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compare-runtimes",
        action="store_true",
        help="also run the model on one frame under every installed runtime (tflite-runtime, "
        "LiteRT) and fail (exit 1) when their outputs or detections differ materially",
    )
    p.add_argument(
        "--frame", metavar="IMAGE", help="the frame for --compare-runtimes (default: synthetic)"
    )


def _compare(model: str, labels: str | None, frame: str | None) -> bool:
    """Print the runtime comparison of ``model``; whether the runtimes agree."""
    import tempfile
    from pathlib import Path

    from host.runtimes import compare_runtimes

    with tempfile.TemporaryDirectory(prefix="doorstep-compare-") as tmp:
        image = Path(frame) if frame else Path(tmp) / "frame.png"
        if frame is None:
            import cv2

            from device.bench import synthetic_frame

            cv2.imwrite(str(image), synthetic_frame(640, 480, seed=7))
        elif not image.is_file():
            raise DoorstepError(f"--frame {frame}: not found")
        result = compare_runtimes(model, image, labels)
    print(result.text())
    return result.ok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorstep-host",
        formatter_class=formatter,
        description="Prepare detectors for doorstep doorbells (train, quantize, evaluate, bundle, "
        "bench) and run the fleet (sign, deploy, rollback, status, watch, report).",
        epilog="examples:\n"
        "  doorstep-host bundle detect.tflite --labels labels.txt --out ssd-bundle/\n"
        "  doorstep-host quantize detector.keras --labels labels.txt --calib photos/ --out int8/\n"
        "  doorstep-host evaluate int8/ --data labeled/\n"
        "  doorstep-host bench float.tflite int8/\n"
        "  doorstep-host demo --out demo/\n"
        "  doorstep-host export device/models/parcel-ssd --out frigate-model/\n"
        "  doorstep-host sign int8/ --key keys/signing.key\n"
        "  doorstep-host deploy int8/ --fleet configs/fleet.yaml --dry-run",
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
        choices=DECODER_CHOICES,
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
    p.add_argument(
        "--channel-order",
        choices=("RGB", "BGR"),
        help="default: the family's (BGR for NanoDet, RGB for the others)",
    )
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
    _compare_options(p)

    p = sub.add_parser(
        "quantize",
        formatter_class=formatter,
        help="quantize a float detector to a full-integer int8 bundle, with checks and a quality gate",
        description="Quantize a Keras (.keras, .h5) or SavedModel detector to full-integer int8 TFLite "
        "(int8 weights per channel and activations, uint8 input) calibrated on real images run "
        "through the device's own preprocessing. Checks calibration stability, ops left in float "
        "and collapsed scores; with --eval, measures float vs int8 AP and fails when the drop "
        "exceeds --max-drop (--fix keeps the most sensitive layers in float). Writes a bundle; a "
        "failure leaves none.",
        epilog="examples:\n"
        "  doorstep-host quantize detector.keras --labels labels.txt --calib photos/ --out parcel-int8/\n"
        "  doorstep-host quantize saved_model/ --labels labels.txt --anchors anchors.npy \\\n"
        "      --calib day/ night/ --eval labeled/ --max-drop 1.0 --fix --out parcel-int8/",
    )
    p.add_argument(
        "model", metavar="MODEL", help="Keras .keras/.h5 file, SavedModel folder or float .tflite"
    )
    p.add_argument(
        "--calib", nargs="+", required=True, metavar="DIR", help="folders of calibration images"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    p.add_argument(
        "--labels", metavar="FILE", help="class names, one per line (required: models carry none)"
    )
    p.add_argument("--anchors", metavar="FILE.npy", help="anchors [N, 4] for a raw SSD head")
    p.add_argument(
        "--decoder", default="auto", choices=DECODER_CHOICES, help="output layout (default: detect)"
    )
    p.add_argument(
        "--input-type",
        default="uint8",
        choices=("uint8", "int8"),
        help="model input type (default uint8)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=300,
        metavar="N",
        help="calibration images used (default 300)",
    )
    p.add_argument(
        "--normalization", metavar="N", help="yolo, ssd, MEAN,STD (default: by detected family)"
    )
    p.add_argument(
        "--resize",
        choices=("letterbox", "stretch"),
        help="default: letterbox (YOLO), stretch (SSD)",
    )
    p.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB")
    p.add_argument(
        "--role", action="append", default=[], metavar="ROLE=NAMES", help="e.g. package=parcel"
    )
    p.add_argument(
        "--threshold", type=float, default=0.5, metavar="T", help="recommended score threshold"
    )
    p.add_argument("--iou", type=float, default=0.45, metavar="T", help="NMS IoU threshold")
    p.add_argument(
        "--eval", metavar="DIR", help="labeled set (YOLO, COCO json, VOC) for the quality gate"
    )
    p.add_argument(
        "--label-map",
        action="append",
        default=[],
        metavar="M=D",
        help="score model label M as dataset class D (repeatable)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="largest allowed AP@0.5 drop, in points (default 1.0)",
    )
    p.add_argument(
        "--fix",
        action="store_true",
        help="on a failed gate, keep the most sensitive layers in float",
    )
    p.add_argument("--name", help="bundle name (default: the model file's stem)")
    p.add_argument("--version", dest="model_version", default="0.0.0", help="bundle version")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = sub.add_parser(
        "train",
        formatter_class=formatter,
        help="fine-tune an SSD parcel detector on YOLO-labeled photos",
        description="Fine-tune a pretrained TFLite SSD (its weights dequantized into Keras, a new class "
        "head) on YOLO-labeled photos (Label Studio, CVAT, Roboflow exports). Validation photos are "
        "held out by scene. Shows epoch, loss and validation AP; resumable; seeded. Writes a float "
        "Keras model, its anchors and labels; quantize it with doorstep-host quantize.",
        epilog="examples:\n"
        "  doorstep-host train --data ../shared/data/packages-v6/train ../shared/data/porch-2211 \\\n"
        "      --init ../shared/models/ssd_mobilenet_v1_coco_quant/detect.tflite --out parcel-model/\n"
        "  doorstep-host train --data my-photos/ --init detect.tflite --out parcel-model/ --resume",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="YOLO-labeled folders")
    p.add_argument("--out", required=True, metavar="DIR", help="where the model and checkpoints go")
    p.add_argument(
        "--init",
        required=True,
        metavar="PRETRAINED.tflite",
        help="pretrained TF OD API SSD to start from",
    )
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="epochs in all (default 30)")
    p.add_argument(
        "--head-epochs", type=int, default=5, metavar="N", help="first epochs train the heads only"
    )
    p.add_argument("--batch", type=int, default=8, metavar="N")
    p.add_argument(
        "--lr", type=float, default=1e-3, metavar="LR", help="learning rate of the head phase"
    )
    p.add_argument(
        "--input-size", type=int, default=300, metavar="S", help="input size (the SSD's: 300)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.2, metavar="F", help="photos held out, by scene"
    )
    p.add_argument(
        "--val-data", nargs="+", metavar="DIR", help="validate on these sets instead of a split"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--synthetic-negatives",
        type=int,
        default=20,
        metavar="N",
        help="add N rendered parcel-free doorsteps as negatives (default 20; 0: none)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")

    p = sub.add_parser(
        "evaluate",
        formatter_class=formatter,
        help="COCO-style AP, precision, recall and F1 of models on a labeled set",
        description="Evaluate models (bundles, or .tflite with --labels) on a labeled set (YOLO txt, "
        "COCO json or Pascal VOC xml) through the device's own detector. Prints AP@0.5, "
        "AP@[.5:.95] (pycocotools) and precision/recall/F1 at each bundle's operating threshold, "
        "per class and overall, models side by side.",
        epilog="examples:\n"
        "  doorstep-host evaluate float-bundle/ int8-bundle/ --data ../shared/data/packages-v6/test\n"
        "  doorstep-host evaluate detect.tflite --labels coco.txt --data porch/ \\\n"
        "      --label-map suitcase=package --json eval.json --plot pr.png",
    )
    p.add_argument("models", nargs="+", metavar="MODEL_OR_BUNDLE")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="YOLO folder, VOC folder or COCO .json"
    )
    p.add_argument("--labels", metavar="FILE", help="label file for bare .tflite models")
    p.add_argument("--anchors", metavar="FILE.npy", help="anchors for bare raw-SSD .tflite models")
    p.add_argument(
        "--label-map",
        action="append",
        default=[],
        metavar="M=D",
        help="score model label M as dataset class D, e.g. suitcase=package (repeatable)",
    )
    p.add_argument(
        "--threshold", type=float, metavar="T", help="operating threshold (default: the bundle's)"
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write precision-recall curves")

    p = sub.add_parser(
        "bench",
        formatter_class=formatter,
        help="size and invoke latency of models side by side",
        description="Size on disk and invoke latency (p50/p95) at 1 thread and all cores; speed-up "
        "relative to the first model. A table, not a pass/fail.",
        epilog="example:\n  doorstep-host bench float.tflite int8-bundle/ --json bench.json",
    )
    p.add_argument("models", nargs="+", metavar="MODEL_OR_BUNDLE")
    p.add_argument("--iterations", type=int, default=50, metavar="N")
    p.add_argument("--threads", metavar="N[,N]", help="thread counts (default: 1 and all cores)")
    p.add_argument("--json", metavar="FILE", help="also write JSON")
    _compare_options(p)

    p = sub.add_parser(
        "demo",
        formatter_class=formatter,
        help="render a synthetic doorstep, quantize the default model, detect, show a contact sheet",
        description="Render a synthetic doorstep sequence (a parcel arrives, stays, is taken), "
        "quantize the default parcel detector with those frames as calibration, run the device's "
        "detector on every frame and write an annotated contact sheet and an HTML page with the "
        "figures. Then run the doorbell daemon on those frames with an embedded MQTT broker "
        "(mosquitto if installed, else amqtt in-process) and print the alerts as a subscriber "
        "receives them, with the per-stage latency. Nothing is downloaded; no photo is involved.",
        epilog="example:\n  doorstep-host demo --out demo/",
    )
    p.add_argument("--out", default="demo", metavar="DIR", help="where to write (default: demo/)")

    p = sub.add_parser(
        "export",
        formatter_class=formatter,
        help="write a bundle's SSD as one detect.tflite for Frigate and the picamera2 examples",
        description="Write DIR/detect.tflite and DIR/labelmap.txt: the bundle's int8 SSD ending "
        "in TFLite_Detection_PostProcess, as Frigate's CPU detector and the picamera2 TensorFlow "
        "examples load it: a uint8 [1, H, W, 3] input fed raw RGB pixels stretched to the input "
        "size, and four float outputs in this fixed order: boxes [1, M, 4] (ymin, xmin, ymax, "
        "xmax, 0..1), classes [1, M], scores [1, M], count [1]. The network's weights are the "
        "bundle's own; the file is run once before it is reported written. With --eval, the "
        "bundle and the exported file are scored side by side on a labeled set.",
        epilog="examples:\n"
        "  doorstep-host export device/models/parcel-ssd --out frigate-model/\n"
        "  doorstep-host export int8-bundle/ --size 320 --out frigate-model/\n"
        "  doorstep-host export int8-bundle/ --out out/ --eval parcel-model/val",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory or .tar with an SSD")
    p.add_argument("--format", choices=("ssd-postprocess",), default="ssd-postprocess")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write")
    p.add_argument(
        "--size",
        type=int,
        metavar="N",
        help="input N x N (e.g. 320), resized inside the model to the network's own size "
        "(default: the network's size, 300 for the parcel model)",
    )
    p.add_argument(
        "--max-detections", type=int, default=20, metavar="M", help="rows M (default: 20)"
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.01,
        metavar="S",
        help="lowest score kept by the op (default: 0.01; the tools apply their own threshold)",
    )
    p.add_argument("--eval", metavar="DATA", help="a labeled set: AP of the bundle and the export")

    p = sub.add_parser(
        "wheel",
        formatter_class=formatter,
        help="build the device wheel a Pi installs (device code only)",
        description="Build doorstep-VERSION-py3-none-any.whl from this checkout's device/ only "
        "(no host code, no float model, no doorstep-host command), in a temporary directory, "
        "and print its path and size. `scripts/run wheel` runs this.",
        epilog="example:\n  doorstep-host wheel --out dist/",
    )
    p.add_argument("--out", default="dist", metavar="DIR", help="where to write (default: dist/)")

    p = sub.add_parser(
        "watch",
        formatter_class=formatter,
        help="print the fleet's live parcel events (the simplest alert subscriber)",
        description="Subscribe to every doorbell's events, availability and state on a broker and "
        "print them as they arrive: one line each, or JSON lines with --json. Events are "
        "de-duplicated by id.",
        epilog="examples:\n"
        "  doorstep-host watch --broker mqtt://broker.local:1883\n"
        "  doorstep-host watch --broker mqtts://broker.local:8883 --ca-file ca.crt --json | jq .",
    )
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://host:port or mqtts://")
    p.add_argument("--prefix", default="doorstep", help="topic prefix (default: doorstep)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--username")
    p.add_argument("--password-file", metavar="FILE")
    p.add_argument("--ca-file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="JSON lines: device, kind, payload")
    p.add_argument(
        "--telemetry", action="store_true", help="also show telemetry reports (JSON only)"
    )

    p = sub.add_parser(
        "report",
        formatter_class=formatter,
        help="an HTML page with plots from the daemons' JSON-lines logs (local, or the fleet's)",
        description="Read daemon logs (doorstep.jsonl: local files, or each device's over SFTP "
        "with --fleet) and write DIR/index.html: a sortable fleet table (worst device on top) "
        "and, per device, latency, frame rate, CPU and temperature with throttling, power and "
        "energy per inference, outbox and broker connection over time, and the events with "
        "their snapshots. Plots are PNG files beside the page; nothing is loaded from the "
        "network. A device whose log cannot be read is reported as such; the others still are.",
        epilog="examples:\n"
        "  doorstep-host report /var/log/doorstep/doorstep.jsonl --out report/\n"
        "  doorstep-host report --fleet fleet.yaml --since 24h --out report/\n"
        "  doorstep-host report porch.jsonl garage.jsonl --snapshots porch-state/snapshots --out r/",
    )
    p.add_argument("logs", nargs="*", metavar="LOG", help="daemon JSON-lines log files")
    p.add_argument("--fleet", metavar="FILE", help="fetch each device's log over SFTP")
    p.add_argument(
        "--since", metavar="DURATION", help="only the last DURATION: 90m, 24h, 7d (default: all)"
    )
    p.add_argument(
        "--snapshots",
        metavar="DIR",
        help="where local logs' arrival snapshots are (default: ../snapshots beside the log's "
        "folder, the daemon's own layout)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where to write index.html")

    add_fleet_parsers(sub)  # keygen, sign, deploy, rollback, status
    add_pull_parsers(sub)  # publish, rollout (pull mode)
    return parser


def cmd_bundle(args: argparse.Namespace) -> int:
    from host.bundle import bundle_model

    bundle = bundle_model(args)
    if args.compare_runtimes and not _compare(str(bundle.source), None, args.frame):
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from host.report import run as run_report

    snapshots = Path(args.snapshots) if args.snapshots else None
    _, logs = run_report(args.logs, args.fleet, args.since, Path(args.out), snapshots)
    return 1 if any(log.error for log in logs) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from host.demo import run_demo

    return run_demo(args.out)


def cmd_export(args: argparse.Namespace) -> int:
    from host.export import export_ssd_postprocess

    result = export_ssd_postprocess(
        args.bundle, args.out, args.size, args.max_detections, args.score_threshold
    )
    print(result.text())
    if args.eval:
        from device.detect.detector import Detector
        from host.datasets import load_dataset
        from host.evaluate import evaluate_detector, evaluate_function, format_table
        from host.export import ExportedDetector

        dataset = load_dataset(args.eval)
        bundle = Detector.open(args.bundle)
        exported = ExportedDetector(result.model)
        rows = [
            evaluate_detector(bundle, dataset, name=f"bundle {args.bundle}"),
            evaluate_function(
                exported.detect,
                bundle.labels,
                dataset,
                None,
                bundle.score_threshold,
                f"export {result.model}",
            ),
        ]
        print(format_table(rows))
    return 0


def cmd_wheel(args: argparse.Namespace) -> int:
    from pathlib import Path

    from host.wheel import build_device_wheel, check_device_wheel

    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "device").is_dir():
        raise DoorstepError(f"{root}: not a doorstep checkout (the wheel is built from one)")
    wheel = build_device_wheel(root, Path(args.out))
    names = check_device_wheel(wheel)
    size = wheel.stat().st_size
    print(f"{wheel}: {size / 1e6:.1f} MB, {len(names)} files, device code only")
    print(f'install it on a Pi with: pip install "./{wheel.name}[device]"')
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import json
    import threading
    from pathlib import Path

    from device.alerts.mqtt import BrokerSettings
    from host.watch import Invalid, Message, Watcher, check_prefix, describe

    check_prefix(args.prefix)  # before connecting: `--prefix '#'` is a usage error
    settings = BrokerSettings(
        args.broker,
        args.protocol,
        args.username,
        Path(args.password_file) if args.password_file else None,
        ca_file=Path(args.ca_file) if args.ca_file else None,
    )

    def show(msg: Message) -> None:
        if args.json:
            payload = msg.payload if msg.kind != "snapshot" else len(msg.payload)
            print(json.dumps({"device": msg.device, "kind": msg.kind, "payload": payload}))
        else:
            line = describe(msg)
            if line is not None:
                print(line)
        sys.stdout.flush()

    def bad(invalid: Invalid) -> None:  # once per topic; the payload itself is not shown
        print(f"doorstep-host: {invalid.describe()}", file=sys.stderr, flush=True)

    kinds = ("events", "availability", "state") + (("telemetry",) if args.telemetry else ())
    watcher = Watcher(settings, args.prefix, show, kinds, on_invalid=bad).start()
    print(f"connecting to {args.broker} ...", file=sys.stderr)
    if not watcher.subscribed.wait(10):
        watcher.stop()
        print(f"doorstep-host: error: no answer from the broker at {args.broker}", file=sys.stderr)
        return 2
    # Said once the broker acknowledged the subscription: from here on nothing is missed
    # (a script, or a test, waits for this line before it publishes).
    topics = f"{args.prefix}/+/{{{','.join(kinds)}}}"
    print(f"watching {args.broker} {topics} (subscribed); Ctrl-C to stop", file=sys.stderr)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
        if watcher.invalid_count:
            print(f"{watcher.invalid_count} invalid message(s) skipped", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from host.quantize import quantize

    quantize(args)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from host.train import TrainError, train

    if args.input_size != 300:
        raise TrainError(
            f"--input-size {args.input_size}: the SSD MobileNet starting point takes 300x300 inputs"
        )
    train(args)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from device.detect.detector import Detector
    from host.datasets import load_dataset
    from host.evaluate import (
        evaluate_detector,
        format_table,
        parse_label_map,
        plot_curves,
        write_json,
    )

    dataset = load_dataset(args.data)
    label_map = parse_label_map(args.label_map)
    print(
        f"{dataset.format} set {dataset.root}: {len(dataset.samples)} images, classes {dataset.names}",
        file=sys.stderr,
    )

    def model(m: str) -> Detector:
        if not m.endswith(".tflite"):
            return Detector.open(m)
        return Detector.open(m, args.labels, **({"anchors": args.anchors} if args.anchors else {}))

    scores = [
        evaluate_detector(
            model(m),
            dataset,
            label_map,
            args.threshold,
            name=m,
        )
        for m in args.models
    ]
    print(format_table(scores))
    if args.json:
        write_json(scores, args.json)
    if args.plot:
        print(f"precision-recall curves: {plot_curves(scores, args.plot)}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from host.bench import format_table, time_invoke, write_json

    threads = parse_threads(args.threads)
    rows = []
    for m in args.models:
        print(f"timing {m}", file=sys.stderr)
        rows.append(time_invoke(m, threads, args.iterations))
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
    if args.compare_runtimes:
        agree = []
        for m in args.models:
            if m.endswith(".tflite"):  # no labels or decoder to read its detections by
                print(f"{m}: a bare .tflite, not compared (bundle it first)", file=sys.stderr)
                continue
            agree.append(_compare(m, None, args.frame))
        return 0 if all(agree) else 1
    return 0


COMMANDS = {
    "bundle": cmd_bundle,
    "train": cmd_train,
    "quantize": cmd_quantize,
    "evaluate": cmd_evaluate,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "wheel": cmd_wheel,
    "export": cmd_export,
    "watch": cmd_watch,
    "report": cmd_report,
    **FLEET_COMMANDS,
    **PULL_COMMANDS,
}


def _printable_errors(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``command`` whose error message, which may quote a device, a bundle or a broker, is
    printed with its control characters escaped (``host.safe_text``)."""

    def safely(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except DoorstepError as exc:
            raise DoorstepError(printable(str(exc))) from None

    return safely


def main(argv: Sequence[str] | None = None) -> int:
    commands = {name: _printable_errors(cmd) for name, cmd in COMMANDS.items()}
    return run(build_parser(), commands, argv)


if __name__ == "__main__":
    sys.exit(main())
