"""Rebuild a TFLite SSD (the TF Object Detection API's MobileNet SSDs) as a float Keras model.

The zoo's quantized SSD keeps every weight, bias and its anchors as readable tensors. This
module walks the model's ops in order (convolutions, reshapes, concatenations), dequantizes each
weight and bias with its own scale and zero point, and records strides (from tensor shapes) and
activations; ``host/tfjobs.py`` then builds the same graph in Keras. The rebuilt model ends in
the raw SSD outputs, box encodings ``[1, N, 4]`` and class *logits* ``[1, N, C+1]`` (the sigmoid
moves to the device's decoder), and its anchors are written beside it. It is the starting point
for fine-tuning doorstep's parcel detector and a real detector to test quantization on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from device.detect.flatbuffer import POSTPROCESS_OP
from device.detect.runtime import open_interpreter
from device.errors import ModelError


def _real(t: dict[str, Any], data: np.ndarray) -> np.ndarray:
    params = t.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), np.float64)
    zeros = np.asarray(params.get("zero_points", []), np.float64)
    if scales.size == 0:
        return data.astype(np.float32)
    axis = int(params.get("quantized_dimension", 0))
    shape = [1] * data.ndim
    if scales.size > 1:
        shape[axis] = scales.size
    real: np.ndarray = (data.astype(np.float64) - zeros.reshape(shape)) * scales.reshape(shape)
    return real.astype(np.float32)


def extract_ssd(model: str | Path, out_dir: str | Path) -> Path:
    """Write ``graph.json`` + ``weights.npz`` + ``anchors.npy`` describing ``model``'s SSD graph."""
    interp, _ = open_interpreter(model, inspect=True)
    tensors = {int(t["index"]): t for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    consumers: dict[int, list[str]] = {}
    for op in ops:
        for i in op["inputs"]:
            consumers.setdefault(int(i), []).append(str(op["op_name"]))
    weights: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    heads: list[int] = []
    anchors = None
    for op in ops:
        name = str(op["op_name"])
        ins, outs = [int(i) for i in op["inputs"]], [int(i) for i in op["outputs"]]
        out_t = tensors[outs[0]]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            src, w, b = (tensors[i] for i in ins[:3])
            key = f"l{len(layers)}"
            weights[f"{key}_w"] = _real(w, interp.get_tensor(w["index"]))
            weights[f"{key}_b"] = _real(b, interp.get_tensor(b["index"]))
            size_in, size_out = int(src["shape"][1]), int(out_t["shape"][1])
            # SAME padding: out = ceil(in / stride); find that stride (75 -> 38 is stride 2)
            stride = next((s for s in (1, 2, 3, 4) if -(-size_in // s) == size_out), 0)
            if not stride:
                raise ModelError(
                    f"{model}: cannot infer the stride of {out_t['name']} ({size_in} -> {size_out})"
                )
            linear = "RESHAPE" in consumers.get(outs[0], []) or str(out_t["name"]).endswith(
                "BiasAdd"
            )
            layers.append(
                {
                    "op": name,
                    "in": ins[0],
                    "out": outs[0],
                    "key": key,
                    "stride": stride,
                    "activation": None if linear else "relu6",
                    "name": str(out_t["name"]),
                }
            )
        elif name == "RESHAPE":
            layers.append(
                {
                    "op": name,
                    "in": ins[0],
                    "out": outs[0],
                    "shape": [int(d) for d in out_t["shape"][1:]],
                }
            )
        elif name == "CONCATENATION":
            rank = len(out_t["shape"])
            axis = next(
                a
                for a in range(1, rank)
                if sum(int(tensors[i]["shape"][a]) for i in ins) == int(out_t["shape"][a])
            )
            layers.append({"op": name, "ins": ins, "out": outs[0], "axis": axis})
        elif name == "LOGISTIC":
            layers.append(
                {"op": "IDENTITY", "in": ins[0], "out": outs[0]}
            )  # logits out; the decoder applies it
        elif name == POSTPROCESS_OP:
            heads = ins[:2]
            anchor_t = tensors[ins[2]]
            anchors = _real(anchor_t, interp.get_tensor(anchor_t["index"]))
        else:
            raise ModelError(f"{model}: op {name} is not supported by the SSD importer")
    if not heads or anchors is None:
        raise ModelError(f"{model}: no {POSTPROCESS_OP} op: not a TF Object Detection API SSD")
    logits = next(
        layer["in"]
        for layer in layers
        if layer.get("out") == heads[1] and layer["op"] == "IDENTITY"
    )
    inp = interp.get_input_details()[0]
    graph = {
        "input": int(inp["index"]),
        "input_shape": [int(d) for d in inp["shape"][1:]],
        "outputs": {"box_encodings": heads[0], "class_logits": logits},
        "layers": layers,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph.json").write_text(json.dumps(graph, indent=1))
    np.savez(out / "weights.npz", **weights)
    np.save(out / "anchors.npy", anchors.astype(np.float32))
    return out


def build_keras(graph_dir: str | Path, num_classes: int | None = None) -> Any:
    """The Keras model of an extracted graph (runs where TensorFlow is loaded).

    ``num_classes`` replaces the class head (new random class predictors, background included)
    for fine-tuning; ``None`` keeps the original classes.
    """
    import tensorflow as tf

    k = tf.keras
    src = Path(graph_dir)
    graph = json.loads((src / "graph.json").read_text())
    w = np.load(src / "weights.npz")
    inp = k.Input(tuple(graph["input_shape"]), name="image")
    t: dict[int, Any] = {graph["input"]: inp}
    pending: list[tuple[Any, list[np.ndarray]]] = []
    for layer in graph["layers"]:
        op = layer["op"]
        if op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            kernel, bias = w[f"{layer['key']}_w"], w[f"{layer['key']}_b"]
            act = layer["activation"]
            relu6 = k.layers.ReLU(6.0) if act == "relu6" else None
            if op == "CONV_2D":
                is_class_head = "ClassPredictor" in layer["name"]
                filters = kernel.shape[0]
                if num_classes is not None and is_class_head:
                    anchors_per_cell = filters // _orig_classes(graph, w)
                    filters = anchors_per_cell * (num_classes + 1)
                conv = k.layers.Conv2D(
                    filters,
                    kernel.shape[1:3],
                    strides=layer["stride"],
                    padding="same",
                    name=_clean(layer["name"]),
                )
                x = conv(t[layer["in"]])
                if filters == kernel.shape[0]:
                    pending.append((conv, [kernel.transpose(1, 2, 3, 0), bias]))
            else:
                conv = k.layers.DepthwiseConv2D(
                    kernel.shape[1:3],
                    strides=layer["stride"],
                    padding="same",
                    name=_clean(layer["name"]),
                )
                x = conv(t[layer["in"]])
                pending.append((conv, [kernel.transpose(1, 2, 3, 0), bias]))
            t[layer["out"]] = relu6(x) if relu6 else x
        elif op == "RESHAPE":
            shape = list(layer["shape"])
            if num_classes is not None and shape[-1] == _orig_classes(graph, w):
                shape[-1] = num_classes + 1
            t[layer["out"]] = k.layers.Reshape(shape)(t[layer["in"]])
        elif op == "CONCATENATION":
            t[layer["out"]] = k.layers.Concatenate(axis=layer["axis"])([t[i] for i in layer["ins"]])
        elif op == "IDENTITY":
            t[layer["out"]] = t[layer["in"]]
    boxes = k.layers.Reshape((-1, 4), name="box_encodings")(t[graph["outputs"]["box_encodings"]])
    logits = k.layers.Activation("linear", name="class_logits")(t[graph["outputs"]["class_logits"]])
    model = k.Model(inp, [boxes, logits], name="ssd")
    for layer_obj, values in pending:
        layer_obj.set_weights(values)
    return model


def _orig_classes(graph: dict[str, Any], w: Any) -> int:
    for layer in graph["layers"]:
        if layer["op"] == "RESHAPE" and len(layer["shape"]) == 2 and layer["shape"][-1] != 4:
            return int(layer["shape"][-1])
    raise ModelError("graph has no class predictions")


def _clean(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in name.split(";")[0])[-60:]
    return cleaned.lstrip("_-") or "layer"


def ssd_anchors(
    grids: tuple[int, ...] = (19, 10, 5, 3, 2, 1),
    min_scale: float = 0.2,
    max_scale: float = 0.95,
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
) -> np.ndarray:
    """Float anchors ``[N, 4]`` (yc, xc, h, w) of the TF Object Detection API's SSD generator.

    The zoo model stores its anchors as uint8 (a step of about 0.0065); these are the exact
    values they quantize, for training and export. The lowest layer has three anchors per cell
    (scale 0.1 at 1:1, and the first scale at 2:1 and 1:2); the others one per aspect ratio plus
    one at the geometric mean of this scale and the next.
    """
    n = len(grids)
    scales = [min_scale + (max_scale - min_scale) * i / (n - 1) for i in range(n)] + [1.0]
    rows = []
    for layer, cells in enumerate(grids):
        if layer == 0:
            kinds = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            kinds = [(scales[layer], r) for r in aspect_ratios]
            kinds.append((float(np.sqrt(scales[layer] * scales[layer + 1])), 1.0))
        for i in range(cells):
            for j in range(cells):
                for scale, ratio in kinds:
                    root = float(np.sqrt(ratio))
                    rows.append([(i + 0.5) / cells, (j + 0.5) / cells, scale / root, scale * root])
    return np.array(rows, np.float32)
