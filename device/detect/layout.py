"""Recognise a detector's output layout from its tensors, by name and shape.

Output *order* differs between converter versions, so roles are assigned from the post-process
op's own output order, from shapes, and from names, never from output indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from device.bundle.manifest import (
    DecoderSpec,
    InputSpec,
    NanoDetParams,
    Normalization,
    SsdParams,
    TensorSpec,
)
from device.detect.model import ModelFacts, TensorFacts
from device.errors import LabelsError, ModelError

# Float-input normalisation by model family: real = (pixel - mean) / std.
FAMILY_NORMALIZATION = {
    "yolo": Normalization(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),  # 0..1
    "ssd": Normalization(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),  # -1..1
    # NanoDet's training config, in its BGR channel order
    "nanodet": Normalization(mean=(103.53, 116.28, 123.675), std=(57.375, 57.12, 58.395)),
}
FAMILY_RESIZE = {"yolo": "letterbox", "ssd": "stretch", "nanodet": "stretch"}
FAMILY_CHANNELS = {"yolo": "RGB", "ssd": "RGB", "nanodet": "BGR"}
NANODET_STRIDES = ((8, 16, 32), (8, 16, 32, 64))  # NanoDet, NanoDet-Plus


def family_of(kind: str) -> str:
    if kind == "nanodet":
        return "nanodet"
    return "yolo" if kind.startswith("yolo") else "ssd"


def _spec(t: TensorFacts) -> TensorSpec:
    return TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype)


def input_geometry(facts: ModelFacts) -> tuple[TensorFacts, str, int, int]:
    """The image input tensor, its layout (NHWC/NCHW), height and width."""
    if len(facts.inputs) != 1:
        names = ", ".join(t.name for t in facts.inputs)
        raise ModelError(
            f"{facts.path}: expected one image input, found {len(facts.inputs)} ({names})"
        )
    t = facts.inputs[0]
    shape = t.shape
    if len(shape) != 4 or shape[0] != 1:
        raise ModelError(
            f"{facts.path}: image input {t.name} has shape {list(shape)}; expected [1,H,W,3] or [1,3,H,W]"
        )
    if shape[3] == 3:
        return t, "NHWC", shape[1], shape[2]
    if shape[1] == 3:
        return t, "NCHW", shape[2], shape[3]
    raise ModelError(f"{facts.path}: image input {t.name} {list(shape)} has no 3-channel axis")


def _grid_cells(height: int, width: int, strides: Sequence[int] = (8, 16, 32)) -> int:
    """Anchor points of a detection head with these strides (YOLOv5/v8/11: 8/16/32)."""
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


def detect_layout(
    facts: ModelFacts,
    num_labels: int | None,
    decoder: str = "auto",
    anchors_count: int | None = None,
) -> DecoderSpec:
    """Work out the decoder kind and map output roles; explain the choice in ``detected_as``.

    ``num_labels`` (from the label file) disambiguates YOLO layouts and is checked against the
    class count the model implies; a mismatch raises ``LabelsError``.
    """
    _, _, height, width = input_geometry(facts)
    outs = facts.outputs
    spec: DecoderSpec | None = None

    if facts.postprocess and decoder in ("auto", "tflite_postprocess"):
        by_name = {t.name: t for t in outs}
        mapped = {}
        for role, name in facts.postprocess.output_names.items():
            if name not in by_name:
                raise ModelError(
                    f"{facts.path}: post-process output {name} ({role}) is not a model output"
                )
            mapped[role] = _spec(by_name[name])
        spec = DecoderSpec(
            kind="tflite_postprocess",
            outputs=mapped,
            detected_as="TFLite_Detection_PostProcess op; outputs mapped from the op's own order "
            "(boxes, classes, scores, count)",
        )
        _check_classes(
            facts,
            num_labels,
            facts.postprocess.num_classes,
            "the post-process op's class input",
            "tflite_postprocess",
        )
        return spec

    if decoder in ("auto", "ssd_raw") and len(outs) == 2:
        spec = _ssd_raw(facts, outs, num_labels, anchors_count, forced=decoder == "ssd_raw")
        if spec:
            return spec

    if (
        len(outs) == 1
        and len(outs[0].shape) == 3
        and decoder in ("auto", "yolo_v8", "yolo_v5", "yolo_e2e")
    ):
        spec = _yolo(facts, outs[0], height, width, num_labels, decoder)
        if spec:
            return spec

    if len(outs) == 1 and len(outs[0].shape) == 3 and decoder in ("auto", "nanodet"):
        spec = _nanodet(facts, outs[0], height, width, num_labels, forced=decoder == "nanodet")
        if spec:
            return spec

    shapes = "; ".join(f"{t.name} {list(t.shape)}" for t in outs)
    hint = "" if decoder != "auto" else " Pass --decoder to name the layout."
    raise ModelError(
        f"{facts.path}: cannot map its outputs ({shapes}) to "
        f"{'a known detector layout' if decoder == 'auto' else decoder}.{hint}"
    )


def _check_classes(
    facts: ModelFacts, num_labels: int | None, model_classes: int | None, where: str, kind: str
) -> None:
    if num_labels is None or model_classes is None or num_labels == model_classes:
        return
    raise LabelsError(
        f"labels list {num_labels} classes but {facts.path.name} read as {kind} has "
        f"{model_classes} (from {where}); use the label file that came with the model, "
        "or check --decoder"
    )


def _ssd_raw(
    facts: ModelFacts,
    outs: Sequence[TensorFacts],
    num_labels: int | None,
    anchors_count: int | None,
    forced: bool,
) -> DecoderSpec | None:
    if not all(len(t.shape) == 3 and t.shape[0] == 1 for t in outs):
        return None
    a, b = outs
    if a.shape[1] != b.shape[1]:
        return None
    box_candidates = [t for t in outs if t.shape[2] == 4]
    if len(box_candidates) == 2:
        named = [t for t in outs if "box" in t.name.lower() or "loc" in t.name.lower()]
        box_candidates = named[:1]
    if len(box_candidates) != 1:
        return None
    boxes = box_candidates[0]
    scores = b if boxes is a else a
    n, columns = boxes.shape[1], scores.shape[2]
    if anchors_count is None:
        if forced:
            raise ModelError(
                f"{facts.path}: raw SSD outputs need anchors: pass --anchors FILE.npy ({n} rows of yc, xc, h, w)"
            )
        raise ModelError(
            f"{facts.path}: outputs {boxes.name} {list(boxes.shape)} and {scores.name} "
            f"{list(scores.shape)} look like a raw SSD head; pass --anchors FILE.npy ({n} rows)"
        )
    if anchors_count != n:
        raise ModelError(f"anchors file has {anchors_count} rows but the model predicts {n} boxes")
    background = True
    if num_labels is not None:
        if columns == num_labels + 1:
            background = True
        elif columns == num_labels:
            background = False
        else:
            raise LabelsError(
                f"labels list {num_labels} classes but {facts.path.name}'s class output "
                f"{scores.name} has {columns} columns (expected {num_labels} or {num_labels}+1 with background)"
            )
    return DecoderSpec(
        kind="ssd_raw",
        outputs={"boxes": _spec(boxes), "scores": _spec(scores)},
        ssd=SsdParams(background_class=background),
        detected_as=f"raw SSD head: box encodings {list(boxes.shape)} + class scores "
        f"{list(scores.shape)} over {n} anchors{' (column 0 is background)' if background else ''}",
    )


def _yolo(
    facts: ModelFacts,
    out: TensorFacts,
    height: int,
    width: int,
    num_labels: int | None,
    decoder: str,
) -> DecoderSpec | None:
    _, rows, cols = out.shape
    cells = _grid_cells(height, width)
    kind: str | None = None
    why = ""
    if decoder in ("auto", "yolo_v8") and cols == cells and rows >= 5:
        kind, why = (
            "yolo_v8",
            f"[1, 4+nc, N] with N={cols} = anchor points of a {height}x{width} stride 8/16/32 head",
        )
    elif decoder in ("auto", "yolo_v5") and rows == 3 * cells and cols >= 6:
        kind, why = (
            "yolo_v5",
            f"[1, N, 5+nc] with N={rows} = 3 anchors x the cells of a {height}x{width} head",
        )
    elif decoder in ("auto", "yolo_e2e") and cols == 6:
        kind, why = (
            "yolo_e2e",
            f"[1, N, 6] (x1, y1, x2, y2, score, class) with NMS inside, N={rows}",
        )
    elif decoder == "yolo_v8" and rows >= 5:
        kind, why = "yolo_v8", "[1, 4+nc, N] as requested"
    elif decoder == "yolo_v5" and cols >= 6:
        kind, why = "yolo_v5", "[1, N, 5+nc] as requested"
    elif decoder == "auto" and num_labels is not None:
        if rows == 4 + num_labels and cols > rows:
            kind, why = "yolo_v8", f"[1, 4+nc, N] with nc={num_labels} from the labels"
        elif cols == 5 + num_labels and rows > cols:
            kind, why = "yolo_v5", f"[1, N, 5+nc] with nc={num_labels} from the labels"
    if kind is None:
        return None
    model_classes = {"yolo_v8": rows - 4, "yolo_v5": cols - 5}.get(kind)
    _check_classes(facts, num_labels, model_classes, f"output {out.name} {list(out.shape)}", kind)
    role = "detections" if kind == "yolo_e2e" else "predictions"
    return DecoderSpec(kind=kind, outputs={role: _spec(out)}, detected_as=f"YOLO output {why}")


def _nanodet(
    facts: ModelFacts,
    out: TensorFacts,
    height: int,
    width: int,
    num_labels: int | None,
    forced: bool,
) -> DecoderSpec | None:
    """``[1, N, nc + 4 * (reg_max + 1)]`` with N the grid points of a stride 8/16/32 (NanoDet)
    or 8/16/32/64 (NanoDet-Plus) head; reg_max 7 unless the labels say otherwise."""
    _, rows, cols = out.shape
    strides = next((st for st in NANODET_STRIDES if _grid_cells(height, width, st) == rows), None)
    if strides is None:
        if forced:
            raise ModelError(
                f"{facts.path}: output {out.name} {list(out.shape)}: {rows} rows are not the grid "
                f"points of a {height}x{width} NanoDet head (strides 8/16/32 or 8/16/32/64)"
            )
        return None
    if num_labels is not None:
        bins, extra = divmod(cols - num_labels, 4)
        if extra or bins < 2:
            raise LabelsError(
                f"labels list {num_labels} classes but {facts.path.name}'s output "
                f"{out.name} has {cols} columns, not {num_labels} + 4 x (reg_max + 1)"
            )
        reg_max = bins - 1
    else:
        reg_max = 7
        if cols - 4 * (reg_max + 1) < 1:
            return None
    nc = cols - 4 * (reg_max + 1)
    return DecoderSpec(
        kind="nanodet",
        outputs={"predictions": _spec(out)},
        nanodet=NanoDetParams(reg_max=reg_max, strides=strides),
        detected_as=f"NanoDet output [1, N, nc + 4 x (reg_max+1)] with N={rows} grid points "
        f"(strides {'/'.join(map(str, strides))}), nc={nc}, reg_max={reg_max}",
    )


def default_input_spec(
    facts: ModelFacts,
    kind: str,
    *,
    resize: str | None = None,
    channel_order: str | None = None,
    normalization: Normalization | None = None,
) -> InputSpec:
    """The input spec read from the model, with family defaults for what a model cannot say."""
    tensor, layout, height, width = input_geometry(facts)
    family = family_of(kind)
    channel_order = channel_order or FAMILY_CHANNELS[family]
    if tensor.dtype not in ("uint8", "int8", "float32"):
        raise ModelError(
            f"{facts.path}: input dtype {tensor.dtype} is not supported (uint8, int8, float32)"
        )
    # How the model was trained to see pixels. For quantized inputs the frame goes through this
    # and then the model's own scale and zero point, so a model whose input range was
    # calibrated on real images (rarely exactly 0..255) is still fed what it expects.
    normalization = normalization or FAMILY_NORMALIZATION[family]
    return InputSpec(
        name=tensor.name,
        height=height,
        width=width,
        layout=layout,
        channel_order=channel_order,
        dtype=tensor.dtype,
        scale=tensor.scale,
        zero_point=tensor.zero_point,
        resize=resize or FAMILY_RESIZE[family],
        normalization=normalization,
    )
