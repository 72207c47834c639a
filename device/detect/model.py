"""Facts read from a TFLite model: tensors, quantization, ops. Never assumed, always read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.detect.flatbuffer import POSTPROCESS_OP
from device.detect.runtime import open_interpreter, runtime_version
from device.hashing import sha256_file

POSTPROCESS_ROLES = ("boxes", "classes", "scores", "count")


@dataclass(frozen=True)
class TensorFacts:
    """One input or output tensor as the model declares it."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float | None
    zero_point: int | None
    per_channel: bool = False

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def describe(self) -> str:
        quant = ""
        if self.per_channel:
            quant = " per-channel quantized"
        elif self.quantized:
            quant = f" scale={self.scale:.6g} zero_point={self.zero_point}"
        return f"{self.name}  {list(self.shape)}  {self.dtype}{quant}"


@dataclass(frozen=True)
class PostprocessFacts:
    """The TFLite_Detection_PostProcess op: its output tensor names in op order."""

    output_names: dict[str, str]
    num_classes: int | None


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    size: int
    sha256: str
    runtime: str
    inputs: tuple[TensorFacts, ...]
    outputs: tuple[TensorFacts, ...]
    ops: dict[str, int] = field(default_factory=dict)
    postprocess: PostprocessFacts | None = None
    tensor_count: int = 0


def tensor_facts(detail: dict[str, Any]) -> TensorFacts:
    """Turn one entry of ``get_input_details()``/``get_output_details()`` into facts."""
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []))
    zeros = np.asarray(params.get("zero_points", []))
    scale: float | None = None
    zero: int | None = None
    per_channel = scales.size > 1
    if scales.size == 1 and float(scales[0]) != 0.0:
        scale, zero = float(scales[0]), int(zeros[0])
    return TensorFacts(
        name=str(detail["name"]),
        index=int(detail["index"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=scale,
        zero_point=zero,
        per_channel=per_channel,
    )


def read_model_facts(path: str | Path, runtime: str = "auto") -> ModelFacts:
    """Open the model without delegates and read its tensors and ops."""
    path = Path(path)
    interpreter, name = open_interpreter(path, runtime, num_threads=1, inspect=True)
    ops_details = interpreter._get_ops_details()
    tensor_details = interpreter.get_tensor_details()
    by_index = {int(t["index"]): t for t in tensor_details}
    ops = Counter(str(op["op_name"]) for op in ops_details)
    post: PostprocessFacts | None = None
    for op in ops_details:
        if op["op_name"] == POSTPROCESS_OP:
            outs = [by_index[int(i)]["name"] for i in op["outputs"]]
            class_input = by_index.get(int(op["inputs"][1])) if len(op["inputs"]) > 1 else None
            num_classes = None
            if class_input is not None and len(class_input["shape"]) == 3:
                num_classes = int(class_input["shape"][-1]) - 1  # minus the background column
            post = PostprocessFacts(dict(zip(POSTPROCESS_ROLES, outs, strict=False)), num_classes)
            break
    return ModelFacts(
        path=path,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        runtime=runtime_version(name),
        inputs=tuple(tensor_facts(d) for d in interpreter.get_input_details()),
        outputs=tuple(tensor_facts(d) for d in interpreter.get_output_details()),
        ops=dict(ops.most_common()),
        postprocess=post,
        tensor_count=len(tensor_details),
    )
