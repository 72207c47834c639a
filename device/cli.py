"""``doorstep-device``: the commands a doorbell (or its owner at a shell) runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device import __version__
from device.cliutil import formatter, parse_threads, run
from device.configpath import config_path, find_config, user_state_dir
from device.errors import DoorstepError

CONFIG_HELP = "default: $DOORSTEP_CONFIG, else /etc/doorstep/device.yaml"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        metavar="MODEL_OR_BUNDLE",
        help="a bundle directory or .tar, or a bare .tflite (then --labels); "
        "default: the parcel model shipped with doorstep",
    )
    p.add_argument(
        "--labels", metavar="FILE", help="label file for a bare .tflite (one name per line)"
    )
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "ai_edge_litert", "tflite_runtime"),
        help="inference runtime (default: auto, LiteRT first)",
    )
    p.add_argument(
        "--decoder",
        default="auto",
        choices=(
            "auto",
            "tflite_postprocess",
            "yolo_v8",
            "yolo_v5",
            "yolo_e2e",
            "ssd_raw",
            "nanodet",
        ),
        help="output layout of a bare .tflite (default: detect it)",
    )
    p.add_argument("--anchors", metavar="FILE.npy", help="anchors of a raw SSD head (bare .tflite)")


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"runtime": args.runtime}
    if args.model is not None and Path(args.model).suffix == ".tflite":
        kwargs["decoder"] = args.decoder
        if args.anchors:
            kwargs["anchors"] = args.anchors
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorstep-device",
        formatter_class=formatter,
        description="Run a quantized parcel detector on a doorbell.",
        epilog="examples:\n"
        "  doorstep-device inspect model-bundle/\n"
        "  doorstep-device detect porch.jpg --model model-bundle/ --out annotated/\n"
        "  doorstep-device bench --model model-bundle/ --source porch.jpg\n"
        "  doorstep-device check-config /etc/doorstep/device.yaml\n"
        "  doorstep-device run --config /etc/doorstep/device.yaml\n"
        "  doorstep-device capture --count 200 --every 2 --out calib/\n"
        "  doorstep-device status --config /etc/doorstep/device.yaml",
    )
    parser.add_argument("--version", action="version", version=f"doorstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        formatter_class=formatter,
        help="show a model's inputs, outputs, quantization, ops and manifest",
        description="Show what a model or bundle holds: input and output tensors with "
        "dtypes and quantization, op counts, the detected output layout, the manifest.",
        epilog="examples:\n  doorstep-device inspect\n"
        "  doorstep-device inspect detect.tflite --labels labels.txt\n"
        "  doorstep-device inspect model-bundle/ --json",
    )
    p.add_argument(
        "model",
        metavar="MODEL_OR_BUNDLE",
        nargs="?",
        help="default: the model this device runs (the config's model.path, else the active "
        "bundle), else the shipped parcel model",
    )
    p.add_argument("--config", metavar="FILE", help="for the default model; " + CONFIG_HELP)
    p.add_argument(
        "--labels", metavar="FILE", help="label file (checks the class count, for a bare .tflite)"
    )
    p.add_argument(
        "--runtime", default="auto", choices=("auto", "ai_edge_litert", "tflite_runtime")
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "detect",
        formatter_class=formatter,
        help="detect objects in images",
        description="Run the detector on images (or folders of images), print the "
        "detections and optionally write annotated copies.",
        epilog="examples:\n"
        "  doorstep-device detect pets.jpg --model detect.tflite --labels labels.txt\n"
        "  doorstep-device detect photos/ --model model-bundle/ --json --out annotated/",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    _model_options(p)
    p.add_argument(
        "--threshold", type=float, metavar="T", help="minimum score (default: the bundle's)"
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="interpreter threads (default: all cores)"
    )
    p.add_argument("--out", metavar="DIR", help="write annotated images here")
    p.add_argument(
        "--json", action="store_true", help="print one JSON document, detections per image"
    )

    p = sub.add_parser(
        "bench",
        formatter_class=formatter,
        help="time preprocess, invoke and decode",
        description="Benchmark one model: p50/p95 milliseconds of each stage and frames "
        "per second, at 1 thread and at all cores. A table, not a pass/fail.",
        epilog="examples:\n  doorstep-device bench --model detect.tflite --labels labels.txt\n"
        "  doorstep-device bench --model model-bundle/ --source clip.mp4 --frame-size 640x480",
    )
    _model_options(p)
    p.add_argument(
        "--source", metavar="S", help="image, video file or folder (default: a synthetic frame)"
    )
    p.add_argument(
        "--frame-size", default="640x480", metavar="WxH", help="frame size (default: 640x480)"
    )
    p.add_argument(
        "--iterations", type=int, default=100, metavar="N", help="timed frames per setting"
    )
    p.add_argument("--threads", metavar="N[,N]", help="thread counts (default: 1 and all cores)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    p = sub.add_parser(
        "bench-daemon",
        formatter_class=formatter,
        help="measure the running daemon: pipeline vs invoke, CPU on a static scene, memory",
        description="Run the real daemon twice in a child process and read its JSON log: a "
        "moving scene where every frame is inferred (per-stage latency; pipeline time against "
        "invoke time) and a static scene from a 10 fps live source (CPU use and resident memory). "
        "Prints a table with the targets; nothing passes or fails.",
        epilog="examples:\n  doorstep-device bench-daemon\n"
        "  doorstep-device bench-daemon --model model-bundle/ --seconds 60 --json daemon.json",
    )
    p.add_argument("--model", "-m", metavar="BUNDLE", help="default: the shipped parcel model")
    p.add_argument(
        "--runtime", default="auto", choices=("auto", "ai_edge_litert", "tflite_runtime")
    )
    p.add_argument("--threads", type=int, default=1, metavar="N", help="default: 1")
    p.add_argument("--frames", type=int, default=300, metavar="N", help="moving-scene frames")
    p.add_argument(
        "--seconds", type=float, default=30.0, metavar="S", help="static-scene run (default: 30)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")

    p = sub.add_parser(
        "run",
        formatter_class=formatter,
        help="run the doorbell: capture, detect, track parcels, publish alerts",
        description="The service the doorbell runs: frames from the configured source through the motion "
        "gate and the detector into the presence tracker; events go to MQTT through a durable outbox. "
        "Flags override the config. A finite source (video file, image folder) ends the run once the "
        "outbox has drained.",
        epilog="examples:\n"
        "  doorstep-device run --config /etc/doorstep/device.yaml\n"
        "  doorstep-device run --config configs/device.yaml --source clip.mp4 --broker mqtt://127.0.0.1:1883",
    )
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument(
        "--source", metavar="URI", help="image folder, video file, camera index or stream URL"
    )
    p.add_argument("--broker", metavar="URL", help="mqtt://host:port (overrides mqtt.url)")
    p.add_argument("--device-id", metavar="ID")
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument("--fps", type=float, metavar="N", help="frame rate of a file or folder source")
    p.add_argument(
        "--live",
        action="store_true",
        help="replay a video file as a camera would deliver it (real time, newest frame only)",
    )
    p.add_argument(
        "--log-format",
        choices=("human", "json"),
        default="human",
        help="stdout: short lines for people (the journal) or the JSON records (default: human; "
        "the JSON-lines file is always written)",
    )

    p = sub.add_parser(
        "capture",
        formatter_class=formatter,
        help="save camera frames for calibration or labelling",
        description="Save N frames from the configured source (or --source) as image files: "
        "calibration images for quantization, or photos to label. The main stream is saved.",
        epilog="examples:\n"
        "  doorstep-device capture --count 200 --every 2 --out calib/\n"
        "  doorstep-device capture --source rtsp://cam.local/stream --count 50 --out frames/",
    )
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--source", metavar="URI", help="video file, folder, camera index or stream URL")
    p.add_argument("--count", type=int, required=True, metavar="N", help="frames to save")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created)")
    p.add_argument(
        "--every", type=float, default=0.0, metavar="S", help="seconds between saved frames"
    )
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")

    p = sub.add_parser(
        "update",
        formatter_class=formatter,
        help="pull-mode update: fetch and switch to the bundle the broker's desired topic names",
        description="One pass of the pull agent the daemon runs when update.enabled is set: read "
        "the retained <prefix>/<device_id>/desired message, refuse what update.* and the "
        "signing keys do not allow, download the bundle over HTTP(S) (resumed with Range), "
        "install and activate it, reload the daemon (or self-test the model when no daemon "
        "runs), roll back if it does not serve within the message's deadline, and publish the "
        "retained <prefix>/<device_id>/update report (also printed). Exit 0: serving or "
        "nothing desired; 1: failed or rolled back; 2: bad input.",
        epilog="example:\n  doorstep-device update --once --config /etc/doorstep/device.yaml",
    )
    p.add_argument("--once", action="store_true", required=True, help="one pass, then exit")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument(
        "--wait", type=float, default=10.0, metavar="S", help="broker timeouts (default: 10)"
    )

    p = sub.add_parser(
        "schemas",
        formatter_class=formatter,
        help="write the JSON Schemas of the MQTT payloads",
        description="Write a JSON Schema for every payload the daemon publishes (event, state, "
        "telemetry, availability), generated from the code that builds them.",
        epilog="example:\n  doorstep-device schemas --out schemas/",
    )
    p.add_argument("--out", required=True, metavar="DIR")

    store_help = {
        "status": (
            "show the deployed models and the daemon's state",
            "What this device runs: the active and previous bundles, the stored ones, uploads in "
            "progress, free space, and the daemon's record (pid, model sha256, self-test, when "
            "updated). What `doorstep-host deploy` reads over SSH.",
            "  doorstep-device status --config /etc/doorstep/device.yaml\n"
            "  doorstep-device status --state-dir /var/lib/doorstep --json",
        ),
        "install": (
            "install an uploaded bundle tar into the model store",
            "Check the tar's sha256, unpack it safely, verify every file (and the signature when "
            "signing.public_keys is configured) and move it to <state_dir>/models/<ID>.",
            "  doorstep-device install /var/lib/doorstep/models/ID.tar.part --id ID --sha256 SHA \\\n"
            "      --config /etc/doorstep/device.yaml",
        ),
        "activate": (
            "make an installed bundle the active model and reload the daemon",
            "Verify the bundle (and its signature when keys are configured), switch "
            "<state_dir>/current to it atomically, keep the old one as `previous`, then reload "
            "the daemon (systemctl reload under systemd, else SIGHUP).",
            "  doorstep-device activate /var/lib/doorstep/models/ID --config /etc/doorstep/device.yaml",
        ),
        "rollback": (
            "switch back to the previous model and reload the daemon",
            "Swap `current` and `previous` and reload the daemon.",
            "  doorstep-device rollback --config /etc/doorstep/device.yaml",
        ),
        "prune": (
            "delete old models, keeping the newest K (never current or previous)",
            "Delete the oldest stored bundles beyond --keep, never the current or previous one, "
            "and uploads left unfinished for more than a day.",
            "  doorstep-device prune --keep 3 --config /etc/doorstep/device.yaml",
        ),
    }
    for name, (short, long, example) in store_help.items():
        p = sub.add_parser(
            name,
            formatter_class=formatter,
            help=short,
            description=long,
            epilog=f"example{'s' if example.count(chr(10)) > 1 else ''}:\n{example}",
        )
        if name in ("install", "activate"):
            p.add_argument("path", metavar="TAR" if name == "install" else "BUNDLE_DIR")
        if name == "install":
            p.add_argument("--id", required=True, help="the bundle id (sha256 of manifest.json)")
            p.add_argument("--sha256", required=True, help="sha256 of the uploaded tar")
        if name == "prune":
            p.add_argument("--keep", type=int, default=3, metavar="K", help="default: 3")
        p.add_argument(
            "--config", metavar="FILE", help="device.yaml (state_dir, signing keys); " + CONFIG_HELP
        )
        p.add_argument("--state-dir", metavar="DIR", help="overrides the config's state_dir")
        if name in ("install", "activate", "rollback"):
            p.add_argument(
                "--public-key",
                action="append",
                default=[],
                metavar="FILE",
                help="trusted signing key (repeatable; adds to signing.public_keys)",
            )
        if name in ("activate", "rollback"):
            p.add_argument(
                "--reload",
                choices=("auto", "systemd", "signal", "none"),
                default="auto",
                help="how to tell the daemon (default: auto, systemd if it runs under it)",
            )
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "init",
        formatter_class=formatter,
        help="write a commented device.yaml from the shipped template",
        description="Write the shipped, commented device.yaml with this doorbell's values: its "
        "device id, broker and camera. The result is validated before it is written; an "
        "existing file is never replaced unless --force (the old one is kept as .bak).",
        epilog="examples:\n"
        "  sudo doorstep-device init --device-id front-door --broker mqtt://192.168.1.20:1883\n"
        "  doorstep-device init --config ~/doorbell.yaml --source 0 --broker none\n"
        "  doorstep-device init --config test.yaml --source rtsp://cam.local/stream",
    )
    p.add_argument("--config", metavar="FILE", help="where to write it; " + CONFIG_HELP)
    p.add_argument("--device-id", metavar="ID", help="default: this machine's host name")
    p.add_argument(
        "--broker",
        metavar="URL",
        help="mqtt://host[:port] or mqtts://...; `none`: no broker, events only logged "
        "(default: the template's mqtt://127.0.0.1:1883)",
    )
    p.add_argument(
        "--source",
        metavar="picamera2|URI",
        help="picamera2 (the default: the Pi camera), or a USB camera index, an rtsp:// or "
        "http:// stream or a video file, read with OpenCV; still:IMAGE for one image as a "
        "live camera (demos, tests)",
    )
    p.add_argument("--state-dir", metavar="DIR", help="default: /var/lib/doorstep")
    p.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="FILE",
        help="trusted bundle signing key (repeatable): signing.public_keys",
    )
    p.add_argument("--force", action="store_true", help="replace an existing file (kept as .bak)")

    p = sub.add_parser(
        "unit",
        formatter_class=formatter,
        help="print or install the systemd unit",
        description="Print the shipped systemd unit, its ExecStart pointing at this install's "
        "doorstep-device, or write it into a directory (--write; never replaces an existing one "
        "unless --force).",
        epilog="examples:\n  doorstep-device unit\n"
        "  sudo /opt/doorstep/bin/doorstep-device unit --write /etc/systemd/system",
    )
    p.add_argument("--write", metavar="DIR", help="write DIR/doorstep-device.service")
    p.add_argument(
        "--venv", metavar="DIR", help="the install ExecStart runs (default: this one, sys.prefix)"
    )
    p.add_argument(
        "--config", metavar="FILE", help="ExecStart's --config (default: /etc/doorstep/device.yaml)"
    )
    p.add_argument(
        "--state-dir", metavar="DIR", help="ExecStart's --state-dir (default: /var/lib/doorstep)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing file (kept as .bak)")

    p = sub.add_parser(
        "config-path",
        formatter_class=formatter,
        help="print which device.yaml the commands read",
        description="Print the config file the commands use when --config is not given: "
        "$DOORSTEP_CONFIG, else /etc/doorstep/device.yaml when it exists (exit 2 when neither).",
        epilog="example:\n  doorstep-device config-path",
    )

    p = sub.add_parser(
        "check-config",
        formatter_class=formatter,
        help="validate a device.yaml, or print its JSON Schema",
        description="Validate a device configuration and print it with defaults filled in\n"
        "(exit 2 and one line per problem, with its key path, if it does not validate).\n"
        "--schema prints the JSON Schema of device.yaml instead: every key with its type,\n"
        "bounds, unit and description.",
        epilog="examples:\n  doorstep-device check-config configs/device.yaml\n"
        "  doorstep-device check-config --schema > device.schema.json",
    )
    p.add_argument(
        "config", metavar="FILE", nargs="?", help="the device.yaml to validate; " + CONFIG_HELP
    )
    p.add_argument(
        "--schema", action="store_true", help="print the JSON Schema of device.yaml and exit"
    )
    return parser


def _expand_images(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DoorstepError(
                    f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DoorstepError(f"{path}: image not found")
    return paths


def _running_model(config: str | None) -> Path:
    """What the daemon would run: the config's model, else the active bundle, else the shipped
    one (the first of :func:`device.detect.checked.model_candidates`)."""
    from device.models import default_bundle

    path = find_config(config)
    if path is not None:
        from device.config import load_config
        from device.detect.checked import model_candidates

        cfg = load_config(path)
        first = model_candidates(cfg.model, Path(cfg.state_dir))[0]
        if first is not None:
            return first
    return default_bundle()


def cmd_inspect(args: argparse.Namespace) -> int:
    from device.inspect import inspect_model

    model = args.model
    if model is None:
        model = _running_model(args.config)
        print(f"inspecting {model}", file=sys.stderr)
    report = inspect_model(model, labels=args.labels, runtime=args.runtime)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.to_text())
    if report.self_test is not None and not report.self_test["ok"]:
        print(
            f"doorstep-device: the self-test failed: {report.self_test['error']}", file=sys.stderr
        )
        return 1
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    import cv2

    from device.detect.detector import Detector
    from device.draw import annotate
    from device.errors import CollapsedScoresError

    images = _expand_images(args.images)
    det = Detector.open(
        args.model,
        args.labels,
        score_threshold=args.threshold,
        num_threads=args.threads,
        **_model_kwargs(args),
    )
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    unreadable: list[str] = []
    written: set[str] = set()  # annotated names in --out, so a/1.jpg and b/1.jpg both survive
    peak = 0.0
    for path in images:
        image = cv2.imread(str(path))
        if image is None:
            unreadable.append(str(path))
            print(
                f"doorstep-device: warning: {path}: not a readable image, skipped", file=sys.stderr
            )
            continue
        dets = det.detect(image)
        peak = max(peak, det.last_peak_score())
        results.append(
            {
                "image": str(path),
                "width": image.shape[1],
                "height": image.shape[0],
                "detections": [d.to_json() for d in dets],
            }
        )
        if out_dir:
            name = (
                f"{path.stem}.jpg"
                if path.stem not in written
                else f"{path.stem}-{len(written)}.jpg"
            )
            written.add(path.stem)
            cv2.imwrite(str(out_dir / name), annotate(image, dets))
        if not args.json:
            t = det.last_times
            print(
                f"{path}: {len(dets)} detection(s)  [{t.preprocess:.1f} + {t.invoke:.1f} + {t.decode:.1f} ms]"
            )
            for d in dets:
                x1, y1, x2, y2 = d.box
                print(
                    f"  {d.label:<16} {d.score:5.2f}  box [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]"
                )
    if not results:
        raise DoorstepError("none of the images could be read")
    if peak <= 0.0:
        raise CollapsedScoresError(
            f"{det.bundle.source}: every class score is 0 on all {len(results)} image(s): the model's scores "
            "collapsed (typically boxes and scores quantized into one int8 tensor); re-quantize it "
            "with separate score outputs"
        )
    if args.json:
        m = det.manifest
        entry = m.files.get(m.model_file)
        doc = {
            "model": {
                "name": m.name,
                "version": m.version,
                "sha256": entry.sha256 if entry is not None else None,
                "runtime": det.runtime_version,
                "score_threshold": det.score_threshold,
            },
            "images": results,
            "unreadable": unreadable,
        }
        print(json.dumps(doc, indent=2))
    elif out_dir:
        print(f"annotated images written to {out_dir}/")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DoorstepError(f"--frame-size {text!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if w < 64 or h < 64:
        raise DoorstepError(f"--frame-size {text!r}: frames must be at least 64x64")
    return w, h


def cmd_bench(args: argparse.Namespace) -> int:
    from device.bench import bench, format_table, load_frames

    size = _parse_size(args.frame_size)
    threads = parse_threads(args.threads)
    if args.iterations < 1:
        raise DoorstepError(f"--iterations {args.iterations}: time at least one frame")
    frames = load_frames(args.source, size)
    kwargs = _model_kwargs(args)
    runtime = kwargs.pop("runtime")
    print(
        f"benchmarking {args.model} on {len(frames)} frame(s) of {size[0]}x{size[1]} "
        f"({args.source or 'synthetic'}), {args.iterations} iterations per setting",
        file=sys.stderr,
    )
    rows = bench(
        args.model,
        frames,
        labels=args.labels,
        runtime=runtime,
        threads=threads,
        iterations=args.iterations,
        **kwargs,
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    return 0


def cmd_bench_daemon(args: argparse.Namespace) -> int:
    from device.daemon_bench import bench_daemon, format_figures

    if args.frames < 20 or args.seconds < 8:
        raise DoorstepError("--frames must be at least 20 and --seconds at least 8")
    figures = bench_daemon(args.model, args.runtime, args.threads, args.frames, args.seconds)
    print(format_figures(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures.to_json(), indent=2) + "\n")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from device.config import config_schema, load_config

    if args.schema:
        print(json.dumps(config_schema(), indent=2))
        return 0
    path = config_path(args.config)
    cfg = load_config(path)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    print(f"{path}: valid", file=sys.stderr)
    return 0


def _source_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    live = getattr(args, "live", False)
    if args.source:
        src = Path(args.source)
        if src.is_dir():
            overrides["source"] = {
                "type": "folder",
                "path": str(src.resolve()),
                "fps": args.fps or 5.0,
            }
        else:
            uri: int | str = int(args.source) if args.source.isdigit() else args.source
            overrides["source"] = {"type": "opencv", "uri": uri, "fps": args.fps}
            if live:
                overrides["source"]["live"] = True
    else:
        if getattr(args, "fps", None):
            overrides["source.fps"] = args.fps
        if live:
            overrides["source.live"] = True
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    import threading

    from device.config import load_config
    from device.daemon import install_signal_handlers, run

    overrides = _source_overrides(args)
    if args.broker:
        overrides["mqtt.url"] = args.broker
    if args.device_id:
        overrides["device_id"] = args.device_id
    if args.state_dir:
        overrides["state_dir"] = str(Path(args.state_dir).resolve())
    path = config_path(args.config)
    cfg = load_config(path, overrides)
    own = None if args.state_dir else user_state_dir(Path(cfg.state_dir))
    if own is not None:
        print(
            f"doorstep: {cfg.state_dir} is not writable by this user: keeping state in {own} "
            "(--state-dir or state_dir to choose)",
            file=sys.stderr,
        )
        overrides["state_dir"] = str(own)
        cfg = load_config(path, overrides)
    stop, reload = threading.Event(), threading.Event()
    install_signal_handlers(stop, reload)
    return run(cfg, stop, reload, lambda: load_config(path, overrides), args.log_format)


def cmd_capture(args: argparse.Namespace) -> int:
    import time

    import cv2

    from device.camera.factory import open_source
    from device.config import SourceConfig, load_config, source_config

    if args.count < 1:
        raise DoorstepError(f"--count {args.count}: save at least one frame")
    args.fps, args.live = None, False
    cfg_source: SourceConfig | None = (
        source_config(_source_overrides(args)["source"])  # no config file needed
        if args.source
        else load_config(config_path(args.config)).source
    )
    if cfg_source is None:
        raise DoorstepError(f"{config_path(args.config)}: no `source` configured; pass --source")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DoorstepError(f"{out}: cannot create the output folder: {exc.strerror}") from None
    saved, last = 0, -1e9
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open_source(cfg_source) as source:
        while saved < args.count:
            frame = source.read(timeout=10.0)
            if frame is None:
                if source.live:
                    raise DoorstepError("the camera delivered no frame for 10 s")
                break
            if frame.t - last < args.every:
                continue
            last = frame.t
            path = out / f"{stamp}-{saved:05d}.{args.format}"
            if not cv2.imwrite(str(path), frame.image):
                raise DoorstepError(f"{path}: could not write the image (disk full?)")
            saved += 1
            print(f"\rsaved {saved}/{args.count}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"{saved} frame(s) in {out}")
    if saved < args.count:
        print(f"the source ended after {saved} of {args.count} frames", file=sys.stderr)
    return 0


def _store_args(args: argparse.Namespace) -> tuple[Any, list[Any], str]:
    """The store, the trusted keys and the service name from --config / --state-dir."""
    from device.install import Store, trusted_keys

    keys_files: list[Path] = [Path(k) for k in getattr(args, "public_key", [])]
    service = "doorstep-device"
    state_dir = Path(args.state_dir) if args.state_dir else None
    # The service's own config, when there is one: its signing keys always apply.
    config = find_config(args.config)
    if config:
        from device.config import load_config  # pydantic: only when there is a config to read

        cfg = load_config(config)
        keys_files += cfg.signing.public_keys
        service = cfg.signing.service
        state_dir = state_dir or Path(cfg.state_dir)
    if state_dir is None:
        raise DoorstepError("say where the state directory is: --state-dir DIR or --config FILE")
    for k in keys_files:
        if not k.is_file():
            raise DoorstepError(f"{k}: public key file not found")
    return Store(state_dir), trusted_keys(keys_files), service


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_status(args: argparse.Namespace) -> int:
    from device.install import status

    store, _, _ = _store_args(args)
    st = status(store)

    def model(m: dict[str, Any] | None) -> str:
        if m is None:
            return "none"
        return f"{m['name']} {m['version']} ({m['id'][:12]})"

    d = st["daemon"]  # validated (device.record.DaemonRecord), or None and daemon_error says why
    daemon = st["daemon_error"] or "no record"
    if d is not None:
        camera = d["source"]["status"] if d["source"] else "ok"
        daemon = (
            f"{d['state']} (pid {d['pid']}), model sha256 {d['model_sha256'][:12]}, "
            f"self-test {'ok' if d['self_test']['ok'] else 'FAILED'}"
            + (f", storage {d['storage'].upper()}" if d["storage"] != "ok" else "")
            + (f", camera {camera.upper()}" if camera != "ok" else "")
        )
    free = st["free_bytes"]
    text = "\n".join(
        [
            f"state dir : {st['state_dir']}",
            f"active    : {model(st['active'])}",
            f"previous  : {model(st['previous'])}",
            f"stored    : {len(st['stored'])} bundle(s); uploads in progress: {len(st['partials'])}",
            f"free      : {'?' if free is None else f'{free / 1e9:.2f} GB'}",
            f"daemon    : {daemon}",
        ]
    )
    _print(args, st, text)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from device.install import install

    store, keys, _ = _store_args(args)
    final = install(store, Path(args.path), args.id, args.sha256, keys)
    _print(args, {"installed": str(final), "id": args.id}, f"installed {final}")
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    from device.install import activate, reload_target, send_reload

    store, keys, service = _store_args(args)
    target = reload_target(store, args.reload, service)  # an unreadable record stops us here
    result: dict[str, Any] = dict(activate(store, Path(args.path), keys))
    result["reloaded"] = send_reload(target)
    _print(
        args,
        result,
        f"active: {result['active']}, previous: {result['previous']}, reload: {result['reloaded']}",
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from device.install import reload_target, rollback, send_reload

    store, keys, service = _store_args(args)
    target = reload_target(store, args.reload, service)  # before anything is switched
    result: dict[str, Any] = dict(rollback(store, keys))
    result["reloaded"] = send_reload(target)
    _print(
        args,
        result,
        f"rolled back to {result['active']} (previous: {result['previous']}), "
        f"reload: {result['reloaded']}",
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from device.install import prune

    store, _, _ = _store_args(args)
    gone = prune(store, args.keep)
    _print(args, {"deleted": gone}, "\n".join(f"deleted {g}" for g in gone) or "nothing to delete")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from device.alerts.payloads import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from device.configpath import init_target
    from device.init import render_config, write_new

    target = init_target(args.config)
    state_dir = str(Path(args.state_dir).resolve()) if args.state_dir else None
    keys = [str(Path(k).resolve()) for k in args.public_key]
    text = render_config(args.device_id, args.broker, args.source, state_dir, keys)
    written = write_new(target, text.encode(), args.force)
    from device.config import load_config

    cfg = load_config(written.path)
    broker = cfg.mqtt.url if cfg.mqtt else "none (events only logged)"
    source: str = cfg.source.type if cfg.source else "none"
    if cfg.source is not None and cfg.source.type == "opencv":
        source = f"opencv {cfg.source.uri}"
    elif cfg.source is not None and cfg.source.type == "still":
        source = f"still {cfg.source.path}"
    kept = f"; the old one is {written.backup}" if written.backup else ""
    print(f"wrote {written.path}{kept}")
    print(f"  device_id {cfg.device_id}, broker {broker}, source {source}, state {cfg.state_dir}")
    print(f"check it: doorstep-device check-config {written.path}")
    return 0


def cmd_unit(args: argparse.Namespace) -> int:
    from device.init import render_unit, unit_warnings, write_new

    venv = args.venv or sys.prefix
    text = render_unit(venv, config=args.config, state_dir=args.state_dir)
    for problem in unit_warnings(venv):
        print(f"doorstep-device: warning: {problem}", file=sys.stderr)
    if not args.write:
        sys.stdout.write(text)
        return 0
    written = write_new(Path(args.write) / "doorstep-device.service", text.encode(), args.force)
    kept = f"; the old one is {written.backup}" if written.backup else ""
    print(f"wrote {written.path}{kept}")
    print("then: sudo systemctl daemon-reload && sudo systemctl enable --now doorstep-device")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from device.config import load_config
    from device.update.once import run_once

    return run_once(load_config(config_path(args.config)), args.wait)


def cmd_config_path(args: argparse.Namespace) -> int:
    print(config_path(None))
    return 0


COMMANDS = {
    "init": cmd_init,
    "unit": cmd_unit,
    "config-path": cmd_config_path,
    "inspect": cmd_inspect,
    "detect": cmd_detect,
    "bench": cmd_bench,
    "bench-daemon": cmd_bench_daemon,
    "check-config": cmd_check_config,
    "run": cmd_run,
    "capture": cmd_capture,
    "schemas": cmd_schemas,
    "status": cmd_status,
    "install": cmd_install,
    "activate": cmd_activate,
    "rollback": cmd_rollback,
    "prune": cmd_prune,
    "update": cmd_update,
}


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
