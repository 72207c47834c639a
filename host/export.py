"""``doorstep-host export --format ssd-postprocess``: a bundle's SSD as the tools people run take it.

Frigate's CPU detector, the picamera2 TensorFlow examples and most TFLite detection demos expect
one model file: a uint8 ``[1, H, W, 3]`` RGB input fed raw pixels stretched to the input size,
and four float outputs, in this order, from the ``TFLite_Detection_PostProcess`` op:

    0 boxes   [1, M, 4]  ymin, xmin, ymax, xmax, 0..1 of the input
    1 classes [1, M]     class index (0 = the first label), as a float
    2 scores  [1, M]     0..1, best first
    3 count   [1]        how many of the M rows are filled

A doorstep bundle of an SSD ends in raw box encodings and class logits, decoded by the device in
Python. This export edits the bundle's own int8 model (its weights and numerics are untouched):

* the class logits' ``DEQUANTIZE`` is dropped: the int8 logits are requantized to uint8 (exact:
  the kernel reads uint8 or float scores, not int8) and the score activation the manifest names
  (sigmoid or softmax) is added as a uint8 op, so scores never leave integers;
* the box encodings stay float (the model's own ``DEQUANTIZE``): the kernel reads the anchors
  in the encodings' type, and uint8 anchors would move every box by up to half a level;
* ``TFLite_Detection_PostProcess`` is appended with the bundle's anchors (as a float constant),
  box scale factors, IoU threshold and label count;
* with ``size``, a ``RESIZE_BILINEAR`` (half-pixel centres, as OpenCV's) in front takes a
  ``size`` x ``size`` input to the network's own; an int8 input (as ``quantize`` makes from a
  ``.tflite``) gets a ``QUANTIZE`` in front, so the file always takes uint8 pixels.

Only what these tools can feed is exported: a full-integer model whose input quantization maps
raw RGB pixels to what the network was trained on (the device applies no table), stretched.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.bundle.store import Bundle, load_bundle
from device.detect.preprocess import value_lut, xor_mask
from device.errors import DoorstepError

POSTPROCESS = "TFLite_Detection_PostProcess"
OUTPUT_NAMES = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")
FORMATS = ("ssd-postprocess",)


class ExportError(DoorstepError):
    """The bundle cannot be exported in the asked format (and why)."""


@dataclass
class ExportResult:
    model: Path
    labelmap: Path
    input_size: tuple[int, int]
    network_size: tuple[int, int]
    max_detections: int
    size_bytes: int
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        w, h = self.input_size
        lines = [
            f"wrote {self.model} ({self.size_bytes / 1e6:.2f} MB): uint8 [1, {h}, {w}, 3] RGB in; "
            f"boxes, classes, scores, count out (up to {self.max_detections} detections)",
            f"wrote {self.labelmap}",
        ]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _check_exportable(bundle: Bundle) -> None:
    m = bundle.manifest
    where = bundle.source
    if m.decoder.kind != "ssd_raw":
        raise ExportError(
            f"{where}: decoder {m.decoder.kind!r}: only an SSD with raw outputs (ssd_raw) can "
            "end in TFLite_Detection_PostProcess; a YOLO or NanoDet head has no such op"
        )
    spec = m.input
    if spec.dtype == "float32":
        raise ExportError(
            f"{where}: a float32 input: these tools feed uint8 pixels to a full-integer model; "
            "quantize it first (doorstep-host quantize)"
        )
    if spec.layout != "NHWC":
        raise ExportError(f"{where}: a {spec.layout} input: these tools feed NHWC [1, H, W, 3]")
    if spec.channel_order != "RGB":
        raise ExportError(
            f"{where}: the model reads {spec.channel_order}: these tools feed RGB pixels"
        )
    if spec.resize != "stretch":
        raise ExportError(
            f"{where}: the model was made for {spec.resize!r} frames: these tools stretch the "
            "frame to the input size, which a letterboxed model would see distorted"
        )
    table = value_lut(spec)
    # uint8: no table at all; int8: the table is a flip of the top bit (a QUANTIZE in front)
    raw = (
        table is None if spec.dtype == "uint8" else (table is not None and xor_mask(table) == 0x80)
    )
    if not raw:
        raise ExportError(
            f"{where}: its input quantization (scale {spec.scale}, zero point "
            f"{spec.zero_point}) does not map raw pixels to its normalisation (mean "
            f"{spec.normalization.mean}, std {spec.normalization.std}); the device applies a "
            "table these tools cannot: re-quantize with an input that takes raw pixels"
        )
    params = m.decoder.ssd
    if params is not None and params.score_activation not in ("sigmoid", "softmax", "none"):
        raise ExportError(f"{where}: score activation {params.score_activation!r} not supported")


class _Graph:
    """Small helpers over a flatbuffer_utils model (object API) with one subgraph."""

    def __init__(self, model: Any, schema: Any, utils: Any) -> None:
        self.model, self.s, self.u = model, schema, utils
        self.g = model.subgraphs[0]

    def code(self, op: Any) -> int:
        return int(
            self.u.get_builtin_code_from_operator_code(self.model.operatorCodes[op.opcodeIndex])
        )

    def opcode(self, builtin: int, version: int = 1, custom: str | None = None) -> int:
        for i, c in enumerate(self.model.operatorCodes):
            same_custom = (c.customCode or b"") == (custom or "").encode()
            if self.u.get_builtin_code_from_operator_code(c) == builtin and same_custom:
                c.version = max(int(c.version or 1), version)
                return i
        c = self.s.OperatorCodeT()
        c.builtinCode = builtin
        c.deprecatedBuiltinCode = min(
            builtin, self.s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
        )
        c.version = version
        if custom is not None:
            c.customCode = custom.encode()
        self.model.operatorCodes.append(c)
        return len(self.model.operatorCodes) - 1

    def buffer(self, data: bytes | None) -> int:
        b = self.s.BufferT()
        if data is not None:
            b.data = np.frombuffer(data, dtype=np.uint8)
        self.model.buffers.append(b)
        return len(self.model.buffers) - 1

    def tensor(
        self,
        name: str,
        shape: list[int],
        ttype: int,
        data: bytes | None = None,
        quant: tuple[float, int] | None = None,
    ) -> int:
        t = self.s.TensorT()
        t.name = name.encode()
        t.shape = np.asarray(shape, dtype=np.int32)
        t.type = ttype
        t.buffer = self.buffer(data) if data is not None else 0
        if quant is not None:
            q = self.s.QuantizationParametersT()
            q.scale, q.zeroPoint = [float(quant[0])], [int(quant[1])]
            t.quantization = q
        self.g.tensors.append(t)
        return len(self.g.tensors) - 1

    def op(
        self,
        opcode: int,
        inputs: list[int],
        outputs: list[int],
        options: tuple[int, Any] | None = None,
        custom: bytes | None = None,
    ) -> Any:
        op = self.s.OperatorT()
        op.opcodeIndex = opcode
        op.inputs, op.outputs = list(inputs), list(outputs)
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options
        if custom is not None:
            op.customOptions = np.frombuffer(custom, dtype=np.uint8)
            op.customOptionsFormat = self.s.CustomOptionsFormat.FLEXBUFFERS
        return op

    def quant(self, index: int) -> tuple[float, int] | None:
        q = self.g.tensors[index].quantization
        if q is None or q.scale is None or not len(q.scale):
            return None
        return float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None else 0

    def index_of(self, name: str, among: list[int]) -> int:
        for i in among:
            if self.g.tensors[i].name.decode() == name:
                return int(i)
        raise ExportError(f"the model has no output named {name!r}")

    def producer(self, index: int) -> Any | None:
        return next((op for op in self.g.operators if index in list(op.outputs)), None)


def _quantized_source(graph: _Graph, index: int, dropped: list[Any]) -> int:
    """The int8/uint8 tensor a float output was widened from by a DEQUANTIZE (that op is
    queued for removal), or the output itself."""
    s = graph.s
    op = graph.producer(index)
    if op is not None and graph.code(op) == s.BuiltinOperator.DEQUANTIZE:
        src = int(op.inputs[0])
        if graph.g.tensors[src].type in (s.TensorType.INT8, s.TensorType.UINT8):
            dropped.append(op)
            return src
    return index


def _as_uint8(graph: _Graph, index: int, ops: list[Any]) -> int:
    """``index`` if it is float or uint8; else a uint8 copy of the int8 tensor (QUANTIZE)."""
    s, t = graph.s, graph.g.tensors[index]
    if t.type != s.TensorType.INT8:
        return index
    scale, zero = graph.quant(index) or (1.0, 0)
    out = graph.tensor(
        f"{t.name.decode()}/uint8", list(t.shape), s.TensorType.UINT8, quant=(scale, zero + 128)
    )
    ops.append(graph.op(graph.opcode(s.BuiltinOperator.QUANTIZE, 2), [index], [out]))
    return out


def _postprocess_options(bundle: Bundle, max_detections: int, score_threshold: float) -> bytes:
    from flatbuffers import flexbuffers

    m = bundle.manifest
    params = m.decoder.ssd
    assert params is not None
    sy, sx, sh, sw = params.scale_factors
    return bytes(
        flexbuffers.Dumps(
            {
                "max_detections": int(max_detections),
                "max_classes_per_detection": 1,
                "detections_per_class": 100,
                "use_regular_nms": False,
                "nms_score_threshold": float(score_threshold),
                "nms_iou_threshold": float(m.thresholds.iou),
                "num_classes": len(m.labels.names),
                "y_scale": float(sy),
                "x_scale": float(sx),
                "h_scale": float(sh),
                "w_scale": float(sw),
            }
        )
    )


def export_ssd_postprocess(
    bundle_path: str | Path,
    out_dir: str | Path,
    size: int | None = None,
    max_detections: int = 20,
    score_threshold: float = 0.01,
) -> ExportResult:
    """Write ``detect.tflite`` and ``labelmap.txt`` into ``out_dir`` (see the module doc)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    if not 1 <= max_detections <= 1000:
        raise ExportError(f"--max-detections {max_detections}: must be 1..1000")
    if not 0.0 <= score_threshold < 1.0:
        raise ExportError(f"--score-threshold {score_threshold}: must be in [0, 1)")
    if size is not None and not 32 <= size <= 2048:
        raise ExportError(f"--size {size}: must be 32..2048 pixels")
    bundle = load_bundle(bundle_path)
    _check_exportable(bundle)
    m = bundle.manifest
    params = m.decoder.ssd
    assert params is not None
    try:
        model = flatbuffer_utils.read_model(str(bundle.model_path))
    except Exception as exc:  # the flatbuffer library raises anything on a damaged file
        raise ExportError(f"{bundle.model_path}: cannot read as a TFLite model: {exc}") from None
    if len(model.subgraphs or []) != 1:
        raise ExportError(f"{bundle.model_path}: {len(model.subgraphs or [])} subgraphs, not 1")
    graph = _Graph(model, schema, flatbuffer_utils)
    g, s = graph.g, schema
    notes: list[str] = []
    outputs = [int(i) for i in g.outputs]
    dropped: list[Any] = []
    # Box encodings stay float (the model's own DEQUANTIZE): with uint8 encodings the kernel
    # would read the anchors as uint8 too, a loss of up to half a level on every anchor.
    boxes = graph.index_of(m.decoder.outputs["boxes"].name, outputs)
    logits = _quantized_source(
        graph, graph.index_of(m.decoder.outputs["scores"].name, outputs), dropped
    )
    anchors = np.load(bundle.file(params.anchors_file), allow_pickle=False).astype("<f4")
    n_anchors = int(g.tensors[boxes].shape[-2])
    if anchors.shape != (n_anchors, 4):
        raise ExportError(
            f"{bundle.source}: {anchors.shape[0]} anchors but the model predicts {n_anchors} boxes"
        )
    new_ops: list[Any] = []
    # The post-process kernel reads uint8 or float scores, not int8: requantize int8 to uint8
    # (the same scale, the zero point moved by 128: exact), as the TF OD API's quantized SSDs.
    logits = _as_uint8(graph, logits, new_ops)

    # class scores: the activation the device applies in Python, as an op
    scores = logits
    activation = params.score_activation
    if activation != "none":
        quantized = graph.quant(logits) is not None
        ttype = g.tensors[logits].type
        scores = graph.tensor(
            f"{POSTPROCESS}/scores", list(g.tensors[logits].shape), ttype,
            quant=(1.0 / 256, 0) if quantized else None,
        )  # fmt: skip
        if activation == "sigmoid":
            new_ops.append(graph.op(graph.opcode(s.BuiltinOperator.LOGISTIC), [logits], [scores]))
        else:
            options = s.SoftmaxOptionsT()
            options.beta = 1.0
            code = graph.opcode(s.BuiltinOperator.SOFTMAX)
            new_ops.append(
                graph.op(code, [logits], [scores], (s.BuiltinOptions.SoftmaxOptions, options))
            )
    columns = int(g.tensors[scores].shape[-1])
    expected = len(m.labels.names) + (1 if params.background_class else 0)
    if columns != expected:
        raise ExportError(
            f"{bundle.source}: {columns} score columns, but {len(m.labels.names)} label(s)"
            f"{' and a background column' if params.background_class else ''} make {expected}"
        )

    anchor_t = graph.tensor(
        f"{POSTPROCESS}/anchors", [n_anchors, 4], s.TensorType.FLOAT32, data=anchors.tobytes()
    )
    shapes = ([1, max_detections, 4], [1, max_detections], [1, max_detections], [1])
    names = [POSTPROCESS] + [f"{POSTPROCESS}:{i}" for i in (1, 2, 3)]
    results = [
        graph.tensor(name, list(shape), s.TensorType.FLOAT32)
        for name, shape in zip(names, shapes, strict=True)
    ]
    code = graph.opcode(s.BuiltinOperator.CUSTOM, 1, POSTPROCESS)
    new_ops.append(
        graph.op(
            code,
            [boxes, scores, anchor_t],
            results,
            custom=_postprocess_options(bundle, max_detections, score_threshold),
        )
    )
    g.operators = [op for op in g.operators if all(op is not d for d in dropped)] + new_ops
    g.outputs = np.asarray(results, dtype=np.int32)

    # the input: always uint8 pixels, at ``size`` if asked
    front: list[Any] = []
    net_in = int(g.inputs[0])
    net_h, net_w = (int(v) for v in g.tensors[net_in].shape[1:3])
    in_q = graph.quant(net_in)
    assert in_q is not None  # a uint8/int8 input was checked above
    feed = net_in
    if g.tensors[net_in].type == s.TensorType.INT8:
        feed = graph.tensor(
            "image_uint8", [1, net_h, net_w, 3], s.TensorType.UINT8,
            quant=(in_q[0], in_q[1] + 128),
        )  # fmt: skip
        front.append(graph.op(graph.opcode(s.BuiltinOperator.QUANTIZE, 2), [feed], [net_in]))
        notes.append("an int8 input: a QUANTIZE in front takes uint8 pixels")
    in_w, in_h = (net_w, net_h) if size is None else (size, size)
    if (in_w, in_h) != (net_w, net_h):
        resized = feed
        feed = graph.tensor(
            "image_full_size", [1, in_h, in_w, 3], s.TensorType.UINT8,
            quant=graph.quant(resized),
        )  # fmt: skip
        size_t = graph.tensor(
            f"{POSTPROCESS}/resize_to", [2], s.TensorType.INT32,
            data=np.asarray([net_h, net_w], dtype="<i4").tobytes(),
        )  # fmt: skip
        options = s.ResizeBilinearOptionsT()
        options.alignCorners, options.halfPixelCenters = False, True
        front.insert(
            0,
            graph.op(
                graph.opcode(s.BuiltinOperator.RESIZE_BILINEAR, 3),
                [feed, size_t],
                [resized],
                (s.BuiltinOptions.ResizeBilinearOptions, options),
            ),
        )
        notes.append(
            f"input {in_w}x{in_h}: resized in the model to the network's {net_w}x{net_h} "
            "(bilinear, half-pixel centres)"
        )
    if front:
        g.operators = front + list(g.operators)
        g.inputs = np.asarray([feed], dtype=np.int32)
        g.tensors[feed].name = b"image"
    _drop_unused(graph)
    _update_signature(graph)  # after _drop_unused: the tensors are renumbered

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "detect.tflite"
    fd, tmp = tempfile.mkstemp(prefix=".detect-", suffix=".tflite", dir=out)
    os.close(fd)
    try:
        flatbuffer_utils.write_model(model, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    labelmap = out / "labelmap.txt"
    labelmap.write_text("".join(f"{i} {name}\n" for i, name in enumerate(m.labels.names)))
    check_exported(target, (in_w, in_h), max_detections)
    return ExportResult(
        target, labelmap, (in_w, in_h), (net_w, net_h), max_detections, target.stat().st_size, notes
    )


def _drop_unused(graph: _Graph) -> None:
    """Remove the tensors no op reads or writes (the dropped DEQUANTIZE ops' float outputs)."""
    from host.tflite_prep import _drop_tensors

    g = graph.g
    used = {int(i) for op in g.operators for i in (*op.inputs, *op.outputs) if int(i) >= 0}
    used |= {int(i) for i in (*g.inputs, *g.outputs)}
    drop = set(range(len(g.tensors))) - used
    _drop_tensors(g, drop)


def _update_signature(graph: _Graph) -> None:
    """One signature naming the input and the four outputs, in the tools' order."""
    s, g = graph.s, graph.g

    def entry(name: str, index: int) -> Any:
        e = s.TensorMapT()
        e.name, e.tensorIndex = name, index
        return e

    signature = s.SignatureDefT()
    signature.signatureKey = "serving_default"
    signature.subgraphIndex = 0
    signature.inputs = [entry("image", int(g.inputs[0]))]
    signature.outputs = [entry(n, int(i)) for n, i in zip(OUTPUT_NAMES, g.outputs, strict=True)]
    graph.model.signatureDefs = [signature]


def check_exported(path: Path, input_size: tuple[int, int], max_detections: int) -> None:
    """Open ``path`` in the runtime the device uses and read it as the tools do: a uint8
    input of ``input_size`` and four outputs of the post-process op's shapes, in order."""
    from device.detect.runtime import first_line, open_interpreter

    try:
        interpreter, _ = open_interpreter(path, num_threads=1)
        (inp,) = interpreter.get_input_details()
        w, h = input_size
        if list(inp["shape"]) != [1, h, w, 3] or inp["dtype"] != np.uint8:
            raise ExportError(f"{path}: input {list(inp['shape'])} {inp['dtype']}, not uint8")
        interpreter.set_tensor(inp["index"], np.full((1, h, w, 3), 114, dtype=np.uint8))
        interpreter.invoke()
        details = interpreter.get_output_details()
        shapes = [list(d["shape"]) for d in details]
        want = [[1, max_detections, 4], [1, max_detections], [1, max_detections], [1]]
        if shapes != want:
            raise ExportError(f"{path}: outputs {shapes}, expected {want}")
        count = float(interpreter.get_tensor(details[3]["index"])[0])
        if not 0 <= count <= max_detections:
            raise ExportError(f"{path}: count {count} out of 0..{max_detections}")
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"{path}: the exported model does not run: {first_line(exc)}") from None


class ExportedDetector:
    """The exported file run as Frigate and the picamera2 examples run it: raw RGB pixels
    stretched to the input, the four outputs read by their fixed indices."""

    def __init__(self, path: str | Path, runtime: str = "auto", num_threads: int | None = None):
        from device.detect.runtime import open_interpreter

        self.interpreter, self.runtime = open_interpreter(path, runtime, num_threads)
        (self._input,) = self.interpreter.get_input_details()
        self.height, self.width = (int(v) for v in self._input["shape"][1:3])
        self._outputs = [d["index"] for d in self.interpreter.get_output_details()]

    def detect(self, bgr: np.ndarray) -> list[tuple[int, float, tuple[float, float, float, float]]]:
        """``[(class index, score, (x1, y1, x2, y2) in bgr's pixels)]``, best first."""
        import cv2

        h, w = bgr.shape[:2]
        rgb = cv2.cvtColor(
            cv2.resize(bgr, (self.width, self.height), interpolation=cv2.INTER_LINEAR),
            cv2.COLOR_BGR2RGB,
        )
        self.interpreter.set_tensor(self._input["index"], rgb[None])
        self.interpreter.invoke()
        boxes, classes, scores, count = (self.interpreter.get_tensor(i) for i in self._outputs)
        out = []
        for i in range(int(count[0])):
            y1, x1, y2, x2 = (float(v) for v in boxes[0][i])
            out.append((int(classes[0][i]), float(scores[0][i]), (x1 * w, y1 * h, x2 * w, y2 * h)))
        return out
