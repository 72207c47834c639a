"""Test subjects made from real exports: a ``.tflite`` as older TF 2.x exporters wrote it."""

from __future__ import annotations

from pathlib import Path


def strip_signatures(src: Path, dst: Path) -> None:
    """``src`` with its SignatureDefs removed (TF 2.x exporters of 2021-2023 wrote none)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(src))
    model.signatureDefs = []
    flatbuffer_utils.write_model(model, str(dst))


def int8_input_variant(src: Path, dst: Path) -> tuple[float, int]:
    """``src`` (a uint8-input model whose first op is the ``QUANTIZE`` to int8, as TF's
    converter writes it) taking that int8 tensor as its input instead, as ai-edge-quantizer
    makes a model from a ``.tflite``. Returns the new input's (scale, zero point)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(src))
    graph = model.subgraphs[0]
    first = graph.operators[0]
    code = flatbuffer_utils.get_builtin_code_from_operator_code(
        model.operatorCodes[first.opcodeIndex]
    )
    if code != schema.BuiltinOperator.QUANTIZE or int(first.inputs[0]) != int(graph.inputs[0]):
        raise ValueError(f"{src}: the first op is not the input's QUANTIZE")
    graph.inputs = [int(first.outputs[0])]
    graph.operators = graph.operators[1:]
    tensor = graph.tensors[int(first.outputs[0])]
    signature = model.signatureDefs[0]
    signature.inputs[0].tensorIndex = int(first.outputs[0])
    flatbuffer_utils.write_model(model, str(dst))
    return float(tensor.quantization.scale[0]), int(tensor.quantization.zeroPoint[0])
