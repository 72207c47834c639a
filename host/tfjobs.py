"""TensorFlow (and ai-edge-quantizer) work, run in a child process.

TensorFlow and tflite-runtime each carry their own copy of TFLite; loaded into one process they
clash (the runtime then fails to load models). So conversion, quantization and the quantization
debugger run here, in ``python -m host.tfjobs``, while evaluation runs the device's own detector
in the parent. The parent sends one JSON request on stdin; the child streams progress on stderr
and writes its JSON answer to the file the request names.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from device.errors import DoorstepError


class TFJobError(DoorstepError):
    """The TensorFlow child process failed; the message carries its last words."""


def run_job(job: str, **payload: Any) -> dict[str, Any]:
    """Run ``job`` in a child process; progress goes to our stderr; return its JSON answer."""
    # oneDNN's fused kernels are not covered by TensorFlow's op determinism: off, so a seeded
    # training run gives the same model twice.
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
        "TF_ENABLE_ONEDNN_OPTS": "0",
    }
    with tempfile.TemporaryDirectory(prefix="doorstep-tfjob-") as tmp:
        answer_path = Path(tmp) / "answer.json"
        with subprocess.Popen(
            [sys.executable, "-m", "host.tfjobs"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # TensorFlow chats on stdout; the answer comes in a file
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc:
            assert proc.stdin and proc.stderr
            proc.stdin.write(json.dumps({"job": job, "answer": str(answer_path), **payload}))
            proc.stdin.close()
            tail: list[str] = []
            for line in proc.stderr:  # pass our progress lines through, keep the end for errors
                if line.startswith("doorstep: "):
                    print(line[len("doorstep: ") :], end="", file=sys.stderr, flush=True)
                tail = [*tail[-39:], line]
            code = proc.wait()
        answer: dict[str, Any] = json.loads(answer_path.read_text()) if answer_path.exists() else {}
    if code != 0 or "error" in answer:
        reason = answer.get("error") or "".join(tail[-15:]).strip() or f"exit code {code}"
        raise TFJobError(f"TensorFlow {job} failed: {reason}")
    return answer


# ---------------------------------------------------------------- the child side


def _say(text: str) -> None:
    print(f"doorstep: {text}", file=sys.stderr, flush=True)


def _load_model(path: str) -> str:
    """A SavedModel folder to convert from: the given one, or a Keras model exported once.

    The export uses a fixed batch of 1 (static shapes: no SHAPE/PACK ops for a dynamic batch),
    freezes the weights and gives the model a serving_default signature (from_keras_model
    fails on multi-output Keras 3 models; other tools need the signature). It lives until this
    child process exits.
    """
    import tensorflow as tf

    p = Path(path)
    if p.is_dir():
        return str(p)
    try:
        model = tf.keras.models.load_model(str(p), compile=False)
    except Exception as exc:
        raise ValueError(f"{p}: cannot load as a Keras model: {exc}") from None
    export = tempfile.mkdtemp(prefix="doorstep-export-")
    atexit.register(shutil.rmtree, export, True)
    shape = [1, *model.inputs[0].shape[1:]]
    model.export(
        export, input_signature=[tf.TensorSpec(shape, tf.float32, name="image")], verbose=False
    )
    return export


def _converter(saved_model: str) -> Any:
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_saved_model(saved_model)


def _representative(
    files: list[str], spec: dict[str, Any], label: str
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Calibration frames through exactly the device's preprocessing for this model."""
    import cv2

    from device.bundle.manifest import InputSpec
    from device.detect.preprocess import InputTransform

    transform = InputTransform(InputSpec.model_validate(spec))

    def gen() -> Iterator[list[np.ndarray]]:
        step = max(1, len(files) // 4)
        for i, f in enumerate(files):
            image = cv2.imread(f)
            if image is None:
                continue
            tensor, _ = transform(image)
            if i % step == 0 or i == len(files) - 1:
                _say(f"  {label}: calibrating {i + 1}/{len(files)}")
            yield [tensor.astype(np.float32)]

    return gen


def _int8_converter(
    model: Any, files: list[str], spec: dict[str, Any], input_type: str, label: str
) -> Any:
    import tensorflow as tf

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(files, spec, label)
    # int8 kernels first; an op without one falls back to float and is reported by the parent.
    conv.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    conv.inference_input_type = {"uint8": tf.uint8, "int8": tf.int8}[input_type]
    conv.inference_output_type = tf.float32  # decoders read real values; the last op dequantizes
    conv.allow_custom_ops = True  # TFLite_Detection_PostProcess; other custom ops are refused later
    return conv


def job_float(req: dict[str, Any]) -> dict[str, Any]:
    """Keras / SavedModel -> float TFLite: float32, or with ``fp16`` float16 weights behind
    DEQUANTIZE ops (TF's float16 post-training quantization, as many exports ship)."""
    conv = _converter(_load_model(req["model"]))
    conv.allow_custom_ops = True
    if req.get("fp16"):
        import tensorflow as tf

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    Path(req["out"]).write_bytes(conv.convert())
    return {}


def job_quantize(req: dict[str, Any]) -> dict[str, Any]:
    """Full-integer quantization, once per calibration subset in ``req["runs"]``."""
    model = _load_model(req["model"])
    for run in req["runs"]:
        conv = _int8_converter(
            model, run["files"], req["input_spec"], req["input_type"], run["label"]
        )
        if req.get("denylist"):
            import tensorflow as tf

            options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=req["denylist"], fully_quantize=True
            )
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=conv, debug_dataset=conv.representative_dataset, debug_options=options
            )
            data = debugger.get_nondebug_quantized_model()
        else:
            data = conv.convert()
        Path(run["out"]).write_bytes(data)
    return {}


def job_sensitivity(req: dict[str, Any]) -> dict[str, Any]:
    """Per-layer quantization error (TensorFlow's QuantizationDebugger), worst first."""
    import csv
    import io

    import tensorflow as tf

    model = _load_model(req["model"])
    files = req["files"]
    conv = _int8_converter(model, files, req["input_spec"], req["input_type"], "debugger")
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv,
        debug_dataset=_representative(
            files[: req.get("debug_images", 20)], req["input_spec"], "debug run"
        ),
    )
    debugger.run()
    buf = io.StringIO()
    debugger.layer_statistics_dump(buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    layers = []
    for row in rows:
        scale = float(row.get("scale") or 0) or 1.0
        rmse = float(row.get("mean_squared_error") or 0) ** 0.5
        layers.append(
            {"tensor": row["tensor_name"], "op": row["op_name"], "rmse_over_scale": rmse / scale}
        )
    layers.sort(key=lambda r: -r["rmse_over_scale"])
    return {"layers": layers}


def job_build_ssd(req: dict[str, Any]) -> dict[str, Any]:
    """An extracted SSD graph (host/ssd_import.py) -> a float Keras model file."""
    from host.ssd_import import build_keras

    model = build_keras(req["graph"], req.get("num_classes"))
    model.save(req["out"])
    return {"parameters": int(model.count_params())}


def job_aq_quantize(req: dict[str, Any]) -> dict[str, Any]:
    """A float .tflite -> full-integer int8 with Google's ai-edge-quantizer (no TensorFlow).

    Its ``static_wi8_ai8`` recipe quantizes weights and activations to int8, the input and
    outputs included (symmetric int8 input).
    """
    from importlib import metadata

    from ai_edge_litert.interpreter import Interpreter

    from host.tflite_prep import prepare_float_tflite

    # A working copy with float16 weights widened and a signature added where the export had
    # none (as most TF 2.x exports of float .tflite files have): the user's file is untouched.
    work = tempfile.mkdtemp(prefix="doorstep-aq-")
    atexit.register(shutil.rmtree, work, True)
    model = str(Path(work) / "float32.tflite")
    for note in prepare_float_tflite(req["model"], model):
        _say(f"{Path(req['model']).name}: {note}")
    interp = Interpreter(model_path=model)
    signatures = interp.get_signature_list()
    key = next(iter(signatures))
    input_name = signatures[key]["inputs"][0]
    for run in req["runs"]:
        quantizer = _aq_quantizer(model, req.get("float_ops", []))
        # The quantizer merges calibration batches with a moving average (0.95), which all but
        # ignores the rare frame with a high value: a detector's class logits are then clipped
        # and every detection's score capped. Calibrate frame by frame and keep the true range.
        ranges: dict[str, dict[str, Any]] = {}
        for frame in _representative(run["files"], req["input_spec"], run["label"])():
            for name, qsv in quantizer.calibrate({key: [{input_name: frame[0]}]}).items():
                if name in ranges:
                    ranges[name]["min"] = np.minimum(ranges[name]["min"], qsv["min"])
                    ranges[name]["max"] = np.maximum(ranges[name]["max"], qsv["max"])
                else:
                    ranges[name] = dict(qsv)
        result = quantizer.quantize(ranges, enable_progress_report=False)
        Path(run["out"]).write_bytes(result.quantized_model)
        if run.get("validate"):  # the per-op error of this quantization, for --fix
            ops = _aq_op_errors(quantizer, model, key, input_name, run["validate"], req)
            Path(run["validate_out"]).write_text(json.dumps(ops))
    return {
        "converter": f"ai-edge-quantizer {metadata.version('ai-edge-quantizer')} (static_wi8_ai8)"
    }


def _aq_quantizer(model: str, float_ops: list[str]) -> Any:
    """ai-edge-quantizer's full-integer recipe, with the ops writing ``float_ops`` (their
    output tensors' names) left in float (``--fix``)."""
    import re

    import ai_edge_quantizer as aq
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    quantizer = aq.Quantizer(model)
    quantizer.load_quantization_recipe(aq.recipe.static_wi8_ai8())
    for name in float_ops:
        quantizer.update_quantization_recipe(
            regex=f"^{re.escape(name)};",  # a scope: its output names, each ending in ";"
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            algorithm_key=AlgorithmName.NO_QUANTIZE,
        )
    return quantizer


def _aq_op_errors(
    quantizer: Any, model: str, key: str, input_name: str, files: list[str], req: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every op of ``model`` with the error its quantization adds, worst first.

    ai-edge-quantizer runs the float and the quantized model side by side and gives each
    tensor's signal-to-noise ratio against the float one; an op's own error is how many dB it
    loses from its noisiest input to its output (errors of the layers before it are not its).
    A tensor that is 0 in the float model (no signal) is left out."""
    import math

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import validation_utils

    frames = [{input_name: f[0]} for f in _representative(files, req["input_spec"], "error run")()]
    result = quantizer.validate(
        test_data={key: frames},
        error_metrics=[validation_utils.ValidationErrorMetric.SNR],
        use_xnnpack=False,
        num_threads=1,
    )
    snr = {
        name: next(iter(metrics.values()))
        for name, metrics in result.get_all_tensor_results().items()
    }

    def db(name: str) -> float | None:
        value = snr.get(name)
        if value is None or float(value) <= 0.0:  # not compared, or no signal to compare
            return None
        return 10 * math.log10(float(value))

    fm = flatbuffer_utils.read_model(model)
    graph = fm.subgraphs[0]
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c) for c in fm.operatorCodes]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def constant(index: int) -> bool:
        data = fm.buffers[graph.tensors[index].buffer].data
        return data is not None and len(data) > 0

    def first_output(op: Any) -> str:
        return str(graph.tensors[int(op.outputs[0])].name.decode())

    readers: dict[int, list[str]] = {}
    for op in graph.operators:
        for i in op.inputs:
            readers.setdefault(int(i), []).append(first_output(op))
    ops = []
    for op in graph.operators:
        out = first_output(op)
        out_db = db(out)
        if out_db is None:
            continue
        ins = [
            db(graph.tensors[int(i)].name.decode())
            for i in op.inputs
            if int(i) >= 0 and not constant(int(i))
        ]
        ins_db = [v for v in ins if v is not None]
        worst_in = min(ins_db) if ins_db else 120.0
        ops.append(
            {
                "tensor": out,
                "op": names.get(codes[op.opcodeIndex], str(codes[op.opcodeIndex])),
                "snr_db": round(out_db, 2),
                "loss_db": round(worst_in - out_db, 2),
                # kept in float, an op's output would still be quantized again for these
                "consumers": sorted({r for i in op.outputs for r in readers.get(int(i), [])}),
            }
        )
    ops.sort(key=lambda r: -r["loss_db"])
    return ops


def job_train(req: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune an SSD (host/train_tf.py)."""
    from host.train_tf import run

    return run(req)


JOBS = {
    "float": job_float,
    "quantize": job_quantize,
    "sensitivity": job_sensitivity,
    "build_ssd": job_build_ssd,
    "aq_quantize": job_aq_quantize,
    "train": job_train,
}


def main() -> int:
    req = json.loads(sys.stdin.read())
    start = time.perf_counter()
    answer_path = Path(req["answer"])
    try:
        answer = JOBS[req["job"]](req)
        if "tensorflow" in sys.modules:
            import tensorflow as tf

            answer.setdefault("converter", f"tensorflow {tf.__version__} TFLiteConverter")
    except Exception as exc:  # report the reason to the parent as data, not a traceback
        first = str(exc).strip().splitlines()
        answer_path.write_text(
            json.dumps({"error": f"{type(exc).__name__}: {' '.join(first[:6])[:1500]}"})
        )
        return 1
    answer["seconds"] = round(time.perf_counter() - start, 1)
    answer_path.write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
