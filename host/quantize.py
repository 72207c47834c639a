"""``doorstep-host quantize``: a float detector to a full-integer int8 bundle, proven and gated.

Steps (TensorFlow runs in a child process, the device's detector in this one):
1. gather and check calibration images;
2. convert the model to float TFLite and describe it (layout, input spec) as a bundle would;
3. refuse a layout whose boxes and scores share one tensor with very different ranges;
4. quantize with the images run through the device's own preprocessing, three times: on all
   images, and on two disjoint halves to measure how stable the activation ranges are;
5. check the int8 model: ops left in float, scores collapsed to zero on calibration frames;
6. optionally evaluate float and int8 on a labeled set and gate on the AP drop, and with
   ``--fix`` keep the most sensitive layers in float until the drop is within budget;
7. write the bundle (atomically: a failure leaves none behind).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.bundle.build import describe_model, parse_normalization
from device.bundle.manifest import Manifest, Thresholds
from device.bundle.store import Bundle, write_bundle
from device.detect.detector import Detector
from device.detect.flatbuffer import custom_op_names
from device.detect.model import read_model_facts
from device.detect.runtime import open_interpreter, runtime_version
from device.errors import DoorstepError
from device.labels import read_labels
from host.calibration import CalibrationSet, gather
from host.tfjobs import run_job

KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}
NO_INT8_OK = {"QUANTIZE", "DEQUANTIZE", "TFLite_Detection_PostProcess"}
ALLOWED_CUSTOM_OPS = {"TFLite_Detection_PostProcess"}


class QuantizeError(DoorstepError):
    """Quantization cannot produce a trustworthy model."""


class QualityGateError(DoorstepError):
    """The int8 model lost more accuracy than allowed."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Candidate:
    path: Path
    manifest: Manifest
    files: dict[str, Path | bytes]


def _model_kind(model: Path) -> str:
    if model.is_dir():
        if not (model / "saved_model.pb").exists():
            raise QuantizeError(f"{model}: a folder but not a SavedModel (no saved_model.pb)")
        return "saved_model"
    if not model.exists():
        raise QuantizeError(f"{model}: model not found")
    if model.suffix in KERAS_SUFFIXES:
        return "keras"
    if model.suffix == ".tflite":
        facts = read_model_facts(model)
        if any(t.dtype != "float32" for t in facts.inputs):
            raise QuantizeError(
                f"{model}: already quantized (input {facts.inputs[0].dtype}); give its float model"
            )
        return "tflite"
    raise QuantizeError(
        f"{model}: expected a Keras model (.keras, .h5), a SavedModel folder or a float .tflite"
    )


def _describe(
    path: Path, args: argparse.Namespace, decoder: str, facts_runtime: str = "auto"
) -> Candidate:
    manifest, files = describe_model(
        path,
        args.labels,
        decoder=decoder,
        anchors=args.anchors,
        resize=args.resize,
        channel_order=args.channel_order,
        normalization=parse_normalization(args.normalization) if args.normalization else None,
        roles=args.role,
        thresholds=Thresholds(score=args.threshold, iou=args.iou),
        name=args.name or Path(args.model).stem,
        version=args.model_version,
        runtime=facts_runtime,
    )
    return Candidate(path, manifest, files)


def _bare(c: Candidate) -> Bundle:
    paths = {
        name: (src if isinstance(src, Path) else c.path.parent / name)
        for name, src in c.files.items()
    }
    for name, src in c.files.items():
        if isinstance(src, bytes):
            paths[name].write_bytes(src)
    return Bundle(manifest=c.manifest, paths=paths, source=c.path, verified=False)


def check_shared_tensor(c: Candidate, frames: list[np.ndarray]) -> None:
    """YOLO exports put boxes and scores in one tensor; if boxes are in pixels the scores collapse."""
    if c.manifest.decoder.kind not in ("yolo_v8", "yolo_v5"):
        return
    det = Detector(_bare(c))
    out = None
    box_max, score_max = 0.0, 0.0
    for frame in frames:
        outputs, _ = det.infer(frame)
        out = outputs["predictions"]
        data = out.real()
        if c.manifest.decoder.kind == "yolo_v8":
            boxes, scores = data[:4], data[4:]
        else:
            boxes, scores = data[:, :4], data[:, 4:]
        box_max = max(box_max, float(np.abs(boxes).max()))
        score_max = max(score_max, float(scores.max()))
    if out is not None and box_max > 2.0 and box_max > 20 * max(score_max, 1e-6):
        step = box_max / 255
        raise QuantizeError(
            f"output {out.name} holds boxes in pixels (up to {box_max:.0f}) and class scores "
            f"(up to {score_max:.2f}) in one tensor: quantized together one step is {step:.2f}, so "
            "scores round to 0 and the detector goes blind. Export boxes normalized to 0..1 "
            "(Ultralytics' int8 TFLite export does this), or split boxes and scores into two outputs"
        )


def activation_scale_drift(a: Path, b: Path) -> dict[str, Any]:
    """How much the activation scales of two calibrations of one model differ."""
    scales = []
    for path in (a, b):
        interp, _ = open_interpreter(path, inspect=True)
        details = {int(t["index"]): t for t in interp.get_tensor_details()}
        produced = {int(i) for op in interp._get_ops_details() for i in op["outputs"]}
        s = {}
        for index in produced:
            t = details[index]
            q = t.get("quantization_parameters", {}).get("scales", [])
            if len(q) == 1 and float(q[0]) > 0:
                s[str(t["name"])] = float(q[0])
        scales.append(s)
    common = sorted(set(scales[0]) & set(scales[1]))
    if not common:
        return {"tensors": 0}
    rel = np.array(
        [abs(scales[0][n] - scales[1][n]) / max(scales[0][n], scales[1][n]) for n in common]
    )
    worst = common[int(rel.argmax())]
    return {
        "tensors": len(common),
        "median_percent": round(float(np.median(rel)) * 100, 2),
        "max_percent": round(float(rel.max()) * 100, 2),
        "worst_tensor": worst,
    }


def float_ops(path: Path) -> dict[str, int]:
    """Ops of an int8 model that still compute in float (no int8 kernel), with counts."""
    interp, _ = open_interpreter(path, inspect=True)
    details = {int(t["index"]): t for t in interp.get_tensor_details()}
    found: dict[str, int] = {}
    for op in interp._get_ops_details():
        name = str(op["op_name"])
        if name in NO_INT8_OK:
            continue
        ins = [details[int(i)] for i in op["inputs"] if int(i) >= 0]
        if ins and np.dtype(ins[0]["dtype"]) == np.float32:
            found[name] = found.get(name, 0) + 1
    return found


def quick_latency(path: Path) -> float:
    from host.bench import time_invoke

    return time_invoke(path, threads=[1], iterations=15, warmup=3).latency[1][0]


def quantize(args: argparse.Namespace) -> Bundle | None:
    """Run the whole quantize command; return the written bundle."""
    model = Path(args.model)
    kind = _model_kind(model)
    if args.labels is None:
        raise QuantizeError(
            f"{model}: pass --labels FILE (one class name per line): a {kind} model carries no label map"
        )
    out = Path(args.out)
    if out.exists() and not args.force:
        raise QuantizeError(f"{out} already exists: choose another --out or pass --force")
    try:
        Thresholds(score=args.threshold, iou=args.iou)
    except ValueError as exc:
        raise QuantizeError(f"--threshold/--iou: {exc}") from None
    names = read_labels(args.labels)  # refuse bad labels and evaluation sets before the slow work
    if args.eval:
        from host.datasets import load_dataset
        from host.evaluate import class_mapping, parse_label_map

        class_mapping(names, load_dataset(args.eval), parse_label_map(args.label_map))

    say(f"[1/6] calibration images from {', '.join(args.calib)}")
    calib = gather(args.calib, args.max_images)
    if len(calib.files) < 2:
        raise QuantizeError(
            f"only {len(calib.files)} readable calibration image: need at least 2 (100-500 recommended)"
        )
    for w in calib.warnings:
        say(f"  warning: {w}")
    say(
        f"  using {len(calib.files)} images"
        + (
            f"; ignored {calib.non_images} non-image file(s) (labels, notes)"
            if calib.non_images
            else ""
        )
    )

    work = Path(tempfile.mkdtemp(prefix="doorstep-quantize-"))
    try:
        return _quantize_in(work, model, kind, calib, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantize_in(
    work: Path, model: Path, kind: str, calib: CalibrationSet, args: argparse.Namespace
) -> Bundle | None:
    import cv2

    float_path = work / "float.tflite"
    if kind == "tflite":
        say(f"[2/6] {model.name} is a float TFLite model: quantizing it with ai-edge-quantizer")
        shutil.copyfile(model, float_path)
    else:
        say(f"[2/6] converting {model.name} to float TFLite")
        run_job("float", model=str(model), out=str(float_path))
    unknown = [n for n in custom_op_names(float_path.read_bytes()) if n not in ALLOWED_CUSTOM_OPS]
    if unknown:
        raise QuantizeError(
            f"{model}: uses TensorFlow ops that TFLite cannot run: {', '.join(sorted(set(unknown)))}; "
            "replace them with TFLite builtin ops (or move them out of the model) before quantizing"
        )
    fl = _describe(float_path, args, args.decoder)
    say(f"  layout: {fl.manifest.decoder.kind} ({fl.manifest.decoder.detected_as})")
    frames = [img for img in (cv2.imread(str(p)) for p in calib.files[:16]) if img is not None]
    check_shared_tensor(fl, frames)

    input_type = "int8" if kind == "tflite" else args.input_type  # ai-edge-quantizer: int8 in
    say(
        f"[3/6] full-integer quantization ({input_type} input, int8 weights per channel and "
        "activations), then twice more on disjoint halves for the stability check"
    )
    half_a, half_b = calib.halves()
    int8_path = work / "int8.tflite"
    runs = [
        {"files": [str(p) for p in calib.files], "out": str(int8_path), "label": "all images"},
        {"files": [str(p) for p in half_a], "out": str(work / "a.tflite"), "label": "half A"},
        {"files": [str(p) for p in half_b], "out": str(work / "b.tflite"), "label": "half B"},
    ]
    spec = fl.manifest.input.model_dump(mode="json")
    if kind == "tflite":
        answer = run_job("aq_quantize", model=str(float_path), input_spec=spec, runs=runs)
    else:
        answer = run_job(
            "quantize", model=str(model), input_spec=spec, input_type=args.input_type, runs=runs
        )
    converter = answer["converter"]
    drift = activation_scale_drift(work / "a.tflite", work / "b.tflite")
    say(
        f"  stability: activation scales of the two halves differ by median {drift.get('median_percent')}%, "
        f"max {drift.get('max_percent')}% ({drift.get('worst_tensor')})"
    )
    if drift.get("max_percent", 0) > 25:
        calib.warnings.append(
            f"calibration is unstable: one half's activation scales differ up to "
            f"{drift['max_percent']}% from the other's: use more, more varied images"
        )
        say(f"  warning: {calib.warnings[-1]}")

    say("[4/6] checking the int8 model")
    q = _checked_int8(int8_path, fl, args, frames)

    evaluation: dict[str, Any] | None = None
    if args.eval:
        say(f"[5/6] evaluating float and int8 on {args.eval}")
        q, evaluation = _gate(work, model, fl, q, spec, calib, frames, args)
    else:
        say("[5/6] no --eval set: accuracy not measured (pass --eval DIR to gate on it)")

    say(f"[6/6] writing {args.out}")
    facts = read_model_facts(q.path)
    extra = {
        "calibration": {
            **calib.facts(),
            "stability": drift,
            "input_type": q.manifest.input.dtype,  # as built (the --fix debugger yields int8)
            "preprocessing": "device InputTransform (the manifest's input spec)",
        },
        "evaluation": evaluation,
        "tools": {
            "converter": f"{converter} (full-integer post-training quantization)",
            "runtime": runtime_version(open_interpreter(q.path, inspect=True)[1]),
            "doorstep": q.manifest.tools.get("doorstep", ""),
        },
    }
    manifest = q.manifest.model_copy(update={**extra, "ops": facts.ops})
    files = {**q.files, "model.tflite": q.path}
    bundle = write_bundle(args.out, manifest, files, overwrite=args.force)
    fsize, qsize = float_path.stat().st_size, q.path.stat().st_size
    say(f"  float {fsize / 1e6:.2f} MB -> int8 {qsize / 1e6:.2f} MB ({qsize / fsize * 100:.0f}%)")
    print(f"wrote {bundle.source}/")
    return bundle


def _checked_int8(
    path: Path,
    fl: Candidate,
    args: argparse.Namespace,
    frames: list[np.ndarray],
    kept_float: int = 0,
) -> Candidate:
    try:
        q = _describe(path, args, fl.manifest.decoder.kind)
    except DoorstepError as exc:
        raise QuantizeError(f"the int8 model does not load: {exc}") from None
    # the int8 input has its own scale and zero point; the pixel->real mapping stays the float's
    q.manifest = q.manifest.model_copy(
        update={
            "input": q.manifest.input.model_copy(
                update={
                    "normalization": fl.manifest.input.normalization,
                    "resize": fl.manifest.input.resize,
                    "channel_order": fl.manifest.input.channel_order,
                }
            )
        }
    )
    left_float = float_ops(path)
    if kept_float:
        say(
            f"  {sum(left_float.values())} op(s) compute in float ({kept_float} layer(s) kept in float by --fix)"
        )
    elif left_float:
        ops = ", ".join(f"{n} x{c}" for n, c in left_float.items())
        say(
            f"  warning: {sum(left_float.values())} op(s) have no int8 kernel and run in float: {ops} "
            "(each adds a quantize/dequantize pair; replace them in the model for full speed)"
        )
    peak = Detector(_bare(q)).self_test(frames[:8]) if frames else 1.0
    say(
        f"  int8 scores alive on calibration frames (peak {peak:.2f}); ops: "
        f"{sum(read_model_facts(path).ops.values())}"
    )
    return q


def _gate(
    work: Path,
    model: Path,
    fl: Candidate,
    q: Candidate,
    spec: dict[str, Any],
    calib: CalibrationSet,
    frames: list[np.ndarray],
    args: argparse.Namespace,
) -> tuple[Candidate, dict[str, Any]]:
    from host.datasets import load_dataset
    from host.evaluate import evaluate_detector, format_table, parse_label_map

    dataset = load_dataset(args.eval)
    label_map = parse_label_map(args.label_map)

    def score(c: Candidate, name: str) -> Any:
        return evaluate_detector(Detector(_bare(c)), dataset, label_map, name=name)

    fs, qs = score(fl, "float"), score(q, "int8")
    drop = (fs.overall.ap50 - qs.overall.ap50) * 100
    print(format_table([fs, qs]))
    flat, qlat = quick_latency(fl.path), quick_latency(q.path)
    report: dict[str, Any] = {
        "dataset": str(args.eval),
        "images": fs.images,
        "float": {"ap50": round(fs.overall.ap50, 4), "ap": round(fs.overall.ap, 4)},
        "int8": {"ap50": round(qs.overall.ap50, 4), "ap": round(qs.overall.ap, 4)},
        "ap50_drop_points": round(drop, 2),
        "max_drop_points": args.max_drop,
        "size_bytes": {"float": fl.path.stat().st_size, "int8": q.path.stat().st_size},
        "latency_ms_1_thread": {"float": round(flat, 2), "int8": round(qlat, 2)},
    }
    if drop <= args.max_drop:
        say(f"  quality gate passed: AP@0.5 drop {drop:.2f} points <= {args.max_drop}")
        return q, report
    if not args.fix:
        raise QualityGateError(
            f"quality gate failed: int8 AP@0.5 is {drop:.2f} points below float (allowed {args.max_drop}); "
            "rerun with --fix to keep the most sensitive layers in float, or calibrate on more varied images"
        )
    say(f"  AP@0.5 drop {drop:.2f} points > {args.max_drop}: ranking layers by quantization error")
    files = [str(p) for p in calib.files]
    tflite = model.suffix == ".tflite"
    units: dict[str, list[str]] = {}

    def ops_of(keep: list[str]) -> list[str]:
        return list(dict.fromkeys(op for k in keep for op in units.get(k, [k])))

    if tflite:
        # ai-edge-quantizer: the float and int8 models run side by side; each op is ranked by
        # the signal-to-noise ratio it loses, input to output, and kept in float by name.
        report_path = work / "op-errors.json"
        run_job(
            "aq_quantize",
            model=str(fl.path),
            input_spec=spec,
            runs=[
                {
                    "files": files,
                    "out": str(work / "ranked.tflite"),
                    "label": "error ranking",
                    "validate": files[:20],
                    "validate_out": str(report_path),
                }
            ],
        )
        layers = [row for row in json.loads(report_path.read_text()) if row["loss_db"] > 0]
        # Kept in float, an op's output is quantized again where an int8 op reads it: the
        # unit kept in float is the op with its readers, so the tensor stays float.
        units = {row["tensor"]: [row["tensor"], *row["consumers"]] for row in layers}
        error, header = "loss_db", "dB lost"
    else:
        layers = run_job(
            "sensitivity",
            model=str(model),
            files=files,
            input_spec=spec,
            input_type=args.input_type,
        )["layers"]
        error, header = "rmse_over_scale", "rmse/scale"
    say(f"    {header:>10}  {'op':<18} output tensor")
    for row in layers[:5]:
        say(f"    {row[error]:10.3f}  {row['op']:<18} {row['tensor']}")
    ranked = [row["tensor"] for row in layers]
    if not ranked:
        raise QualityGateError(
            f"quality gate failed: int8 AP@0.5 is {drop:.2f} points below float and no op loses "
            "accuracy of its own: check the input range and calibration images"
        )
    tries = 0

    def attempt(keep: list[str]) -> tuple[Candidate, Any, float]:
        nonlocal tries
        tries += 1
        path = work / f"fix{tries}.tflite"
        run = {"files": files, "out": str(path), "label": f"{len(keep)} in float"}
        if tflite:
            run_job(
                "aq_quantize",
                model=str(fl.path),
                input_spec=spec,
                float_ops=ops_of(keep),
                runs=[run],
            )
        else:
            run_job(
                "quantize",
                model=str(model),
                input_spec=spec,
                input_type=args.input_type,
                denylist=keep,
                runs=[run],
            )
        cand = _checked_int8(path, fl, args, frames, kept_float=len(ops_of(keep)))
        cs = score(cand, f"int8, {len(ops_of(keep))} float layer(s)")
        return cand, cs, (fs.overall.ap50 - cs.overall.ap50) * 100

    # Grow the most sensitive prefix until the budget holds, then drop every layer that is not
    # needed (least sensitive first), so what stays in float is as little as we can show.
    best: tuple[list[str], Candidate, Any, float] | None = None
    k = 1
    while best is None and k <= 2 * len(ranked):
        keep = ranked[: min(k, len(ranked))]
        cand, cs, d = attempt(keep)
        say(f"  {len(keep)} most sensitive layer(s) in float: AP@0.5 drop {d:.2f} points")
        if d <= args.max_drop:
            best = (keep, cand, cs, d)
        elif k >= len(ranked):
            break
        k *= 2
    if best is None:
        raise QualityGateError(
            f"quality gate failed: even with all {len(ranked)} quantized layers in float the AP@0.5 drop "
            f"stays above {args.max_drop} points: the loss is not in the quantized layers (check the input "
            "range and calibration images)"
        )
    for layer in reversed(list(best[0])):
        if len(best[0]) == 1:
            break
        trial = [t for t in best[0] if t != layer]
        cand, cs, d = attempt(trial)
        if d <= args.max_drop:
            best = (trial, cand, cs, d)
            say(f"  not needed in float: {layer} (drop {d:.2f} without it)")
    keep, cand, cs, fixed_drop = best
    keep = ops_of(keep)
    lat = quick_latency(cand.path)
    print(format_table([fs, qs, cs]))
    say(f"  fixed: kept {len(keep)} layer(s) in float: {'; '.join(keep)}")
    say(
        f"  AP@0.5 drop {drop:.2f} -> {fixed_drop:.2f} points; latency {qlat:.2f} -> {lat:.2f} ms at 1 thread "
        f"({tries} trial conversions)"
    )
    report.update(
        {
            "int8": {"ap50": round(cs.overall.ap50, 4), "ap": round(cs.overall.ap, 4)},
            "ap50_drop_points": round(fixed_drop, 2),
            "fix": {
                "float_layers": keep,
                "drop_before_points": round(drop, 2),
                "drop_after_points": round(fixed_drop, 2),
                "latency_ms_before": round(qlat, 2),
                "latency_ms_after": round(lat, 2),
            },
            "size_bytes": {"float": fl.path.stat().st_size, "int8": cand.path.stat().st_size},
            "latency_ms_1_thread": {"float": round(flat, 2), "int8": round(lat, 2)},
        }
    )
    return cand, report
