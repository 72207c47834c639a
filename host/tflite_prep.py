"""A float ``.tflite`` as exporters wrote it, made into what ai-edge-quantizer takes.

Most float ``.tflite`` files people have were written by TF 2.x exporters of 2021-2023: no
SignatureDef, and often float16 weights, each behind a ``DEQUANTIZE`` op that widens it to
float32 at run time. ai-edge-quantizer needs exactly one signature and float32 weights to
calibrate. :func:`prepare_float_tflite` writes a working copy that has both (the user's file is
never changed):

* every ``DEQUANTIZE`` of a constant float16 tensor is folded: its float32 output tensor gets
  the widened values as its own constant buffer, and the op is dropped (the values are exactly
  those the op would compute);
* a model with no signature gets ``serving_default`` over its one subgraph's inputs and
  outputs, named after their tensors.

A model with more than one subgraph is refused: which one is the detector cannot be guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device.errors import ModelError

SIGNATURE_KEY = "serving_default"


def _name(raw: bytes | str | None, index: int) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return raw or f"tensor_{index}"


def _drop_tensors(graph: Any, drop: set[int]) -> None:
    """Remove the tensors ``drop`` (read by nothing) from ``graph`` (a ``SubGraphT``) and
    renumber every reference to the others (op inputs, outputs and intermediates, the graph's
    inputs and outputs)."""
    new_index: dict[int, int] = {}
    kept: list[Any] = []
    for i, tensor in enumerate(graph.tensors):
        if i not in drop:
            new_index[i] = len(kept)
            kept.append(tensor)
    graph.tensors = kept

    def remap(indices: Any) -> list[int]:
        return [new_index[int(i)] if int(i) >= 0 else -1 for i in indices]

    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = remap(op.intermediates)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)


def prepare_float_tflite(src: str | Path, dst: str | Path) -> list[str]:
    """Write ``dst``: ``src`` with float16 constants folded and a signature; return notes on
    what was changed (empty: ``dst`` is ``src``'s content as it was)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    src = Path(src)
    try:
        model = flatbuffer_utils.read_model(str(src))
    except Exception as exc:  # the flatbuffer library raises anything on a damaged file
        raise ModelError(f"{src}: cannot read as a TFLite model: {exc}") from None
    if len(model.subgraphs or []) != 1:
        raise ModelError(
            f"{src}: {len(model.subgraphs or [])} subgraphs; doorstep quantizes single-subgraph "
            "detectors (re-export the detector alone)"
        )
    graph = model.subgraphs[0]
    notes: list[str] = []
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    kept, folded, orphans = [], 0, set()
    for op in graph.operators or []:
        if codes[op.opcodeIndex] == schema.BuiltinOperator.DEQUANTIZE and len(op.inputs) == 1:
            source = graph.tensors[op.inputs[0]]
            target = graph.tensors[op.outputs[0]]
            data = model.buffers[source.buffer].data if source.buffer else None
            if (
                source.type == schema.TensorType.FLOAT16
                and target.type == schema.TensorType.FLOAT32
                and data is not None
                and len(data)
            ):
                values = np.frombuffer(bytes(bytearray(data)), dtype="<f2").astype("<f4")
                buffer = schema.BufferT()
                buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
                model.buffers.append(buffer)
                target.buffer = len(model.buffers) - 1
                folded += 1
                orphans.add(op.inputs[0])
                continue
        kept.append(op)
    if folded:
        graph.operators = kept
        # The float16 originals are now read by no op: their bytes would ride along into the
        # quantized model (which would then be larger than the float16 one).
        used = {i for op in kept for i in (*op.inputs, *op.outputs) if i >= 0}
        used |= {*graph.inputs, *graph.outputs}
        drop = orphans - used
        for i in drop:
            buffer = graph.tensors[i].buffer
            if buffer and not any(
                t.buffer == buffer for j, t in enumerate(graph.tensors) if j not in drop
            ):
                model.buffers[buffer].data = None
        _drop_tensors(graph, drop)
        notes.append(f"{folded} float16 weight tensor(s) widened to float32 (DEQUANTIZE folded)")
    if not model.signatureDefs:
        signature = schema.SignatureDefT()
        signature.signatureKey = SIGNATURE_KEY
        signature.subgraphIndex = 0
        signature.inputs, signature.outputs = [], []
        for indices, target_list in (
            (graph.inputs, signature.inputs),
            (graph.outputs, signature.outputs),
        ):
            for i in indices:
                entry = schema.TensorMapT()
                entry.name = _name(graph.tensors[i].name, i)
                entry.tensorIndex = int(i)
                target_list.append(entry)
        model.signatureDefs = [signature]
        notes.append(f"no signature: added {SIGNATURE_KEY!r} over the model's inputs and outputs")
    elif len(model.signatureDefs) > 1:
        raise ModelError(
            f"{src}: {len(model.signatureDefs)} signatures; doorstep quantizes one-signature "
            "detectors"
        )
    flatbuffer_utils.write_model(model, str(dst))
    return notes
