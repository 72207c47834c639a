"""A structural check of a TFLite flatbuffer, before any runtime touches it.

tflite-runtime 2.14 builds its interpreter from a file without verifying it: a truncated or
corrupt model crashes the process (a segmentation fault, not an exception). This walk checks
that every table, vector and string the interpreter will follow lies inside the file, and that
tensor, buffer and opcode indices are in range, so a bad file gets a clear error instead.
Field numbers follow TensorFlow's ``schema.fbs``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

POSTPROCESS_OP = "TFLite_Detection_PostProcess"
_MAX_TENSOR_TYPE = 32  # the TensorType enum's range, with room for additions


class FlatbufferError(ValueError):
    """The file is not a well-formed TFLite flatbuffer."""


@dataclass(frozen=True)
class _Table:
    pos: int
    vtable: int
    vlen: int


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos < 0 or pos + n > self.size:
            raise FlatbufferError(
                f"{what} at byte {pos} runs past the end of the file ({self.size} bytes)"
            )

    def u8(self, pos: int) -> int:
        self._need(pos, 1, "field")
        return self.data[pos]

    def u16(self, pos: int) -> int:
        self._need(pos, 2, "field")
        return int(struct.unpack_from("<H", self.data, pos)[0])

    def u32(self, pos: int) -> int:
        self._need(pos, 4, "field")
        return int(struct.unpack_from("<I", self.data, pos)[0])

    def i32(self, pos: int) -> int:
        self._need(pos, 4, "field")
        return int(struct.unpack_from("<i", self.data, pos)[0])

    def u64(self, pos: int) -> int:
        self._need(pos, 8, "field")
        return int(struct.unpack_from("<Q", self.data, pos)[0])

    def table(self, pos: int, what: str) -> _Table:
        self._need(pos, 4, what)
        vt = pos - self.i32(pos)
        self._need(vt, 4, f"{what} vtable")
        vlen, tlen = self.u16(vt), self.u16(vt + 2)
        if vlen < 4 or vlen % 2:
            raise FlatbufferError(f"{what} has a malformed vtable")
        self._need(vt, vlen, f"{what} vtable")
        self._need(pos, tlen, what)
        return _Table(pos, vt, vlen)

    def field(self, t: _Table, index: int) -> int:
        """Absolute position of field ``index`` of ``t``, or 0 when absent."""
        slot = 4 + 2 * index
        if slot + 2 > t.vlen:
            return 0
        off = self.u16(t.vtable + slot)
        return t.pos + off if off else 0

    def ref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, t: _Table, index: int, elem: int, what: str) -> tuple[int, int]:
        """``(start, length)`` of a vector field, checked to lie inside the file."""
        pos = self.field(t, index)
        if not pos:
            return 0, 0
        vec = self.ref(pos)
        length = self.u32(vec)
        self._need(vec + 4, length * elem, what)
        return vec + 4, length

    def tables(self, t: _Table, index: int, what: str) -> list[_Table]:
        start, n = self.vector(t, index, 4, what)
        return [self.table(self.ref(start + 4 * i), f"{what}[{i}]") for i in range(n)]

    def ints(self, t: _Table, index: int, what: str) -> list[int]:
        start, n = self.vector(t, index, 4, what)
        return [self.i32(start + 4 * i) for i in range(n)]

    def string(self, t: _Table, index: int, what: str) -> str:
        """A string field, which must be UTF-8 (the runtimes decode names into Python str)."""
        start, n = self.vector(t, index, 1, what)
        try:
            return self.data[start : start + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FlatbufferError(f"{what} is not UTF-8 (byte {start + exc.start})") from None

    def uint(self, t: _Table, index: int, default: int = 0) -> int:
        pos = self.field(t, index)
        return self.u32(pos) if pos else default

    def index(self, t: _Table, field: int, limit: int, what: str, of: str) -> int:
        """A uint field naming one of ``limit`` things (``of``)."""
        value = self.uint(t, field)
        if value >= limit:
            raise FlatbufferError(f"{what} names {of} {value} of {limit}")
        return value

    def span(self, t: _Table, offset_field: int, size_field: int, what: str) -> None:
        """An ``(offset, size)`` pair of ulong fields naming bytes after the flatbuffer."""
        offset_pos, size_pos = self.field(t, offset_field), self.field(t, size_field)
        if offset_pos and size_pos:
            offset, size = self.u64(offset_pos), self.u64(size_pos)
            if offset > 1 and offset + size > self.size:
                raise FlatbufferError(
                    f"{what} ({size} bytes at {offset}) runs past the end of the file"
                )


# Vector fields of the builtin options tables the runtimes parse: options type (the
# ``BuiltinOptions`` union's number) -> (field, element size) pairs. Scalars need no check.
_OPTION_VECTORS: dict[int, tuple[tuple[int, int], ...]] = {
    3: ((1, 4), (2, 4)),  # ConcatEmbeddingsOptions
    8: ((5, 1),),  # FullyConnectedOptions.quant_spec
    17: ((0, 4),),  # ReshapeOptions.new_shape
    30: ((0, 4),),  # SqueezeOptions.squeeze_dims
    115: ((0, 4),),  # BucketizeOptions.boundaries
}
_OPTION_STRINGS: dict[int, tuple[int, ...]] = {111: (0, 1)}  # VarHandleOptions
_MAX_ELEMENTS = 1 << 28  # a tensor beyond this (1 GB of float32) cannot be a doorbell's


def check_flatbuffer(data: bytes) -> None:
    """Raise ``FlatbufferError`` unless ``data`` is a structurally sound TFLite model.

    Every table, vector and string of the schema that a runtime follows is checked to lie in
    the file (strings to be UTF-8: the runtimes hand names to Python), and every index
    (tensor, buffer, opcode, subgraph) to be in range.
    """
    r = _Reader(data)
    if r.size < 8 or data[4:8] != b"TFL3":
        raise FlatbufferError("no 'TFL3' file identifier")
    model = r.table(r.ref(0), "model")
    if r.field(model, 8) or r.field(model, 9):
        raise FlatbufferError("model keeps weights in external files, which a bundle cannot hold")
    opcodes = [
        r.string(code, 1, f"operator_codes[{i}].custom_code")
        for i, code in enumerate(r.tables(model, 1, "operator_codes"))
    ]
    r.string(model, 3, "model description")
    buffers = r.tables(model, 4, "buffers")
    for i, buf in enumerate(buffers):
        r.vector(buf, 0, 1, f"buffers[{i}].data")
        r.span(buf, 1, 2, f"buffers[{i}]")  # weights stored after the flatbuffer (over 2 GB)
    nbuf = len(buffers)
    for b in r.ints(model, 5, "metadata_buffer"):
        if not 0 <= b < nbuf:
            raise FlatbufferError(f"metadata_buffer names buffer {b} of {nbuf}")
    for i, meta in enumerate(r.tables(model, 6, "metadata")):
        r.string(meta, 0, f"metadata[{i}].name")
        r.index(meta, 1, nbuf, f"metadata[{i}]", "buffer")
    subgraphs = r.tables(model, 2, "subgraphs")
    if not subgraphs:
        raise FlatbufferError("model has no subgraph")
    sizes = [_check_subgraph(r, s, graph, opcodes, nbuf) for s, graph in enumerate(subgraphs)]
    for i, sig in enumerate(r.tables(model, 7, "signature_defs")):
        what = f"signature_defs[{i}]"
        r.string(sig, 2, f"{what}.signature_key")
        sub = r.index(sig, 4, len(subgraphs), what, "subgraph")
        for part, field in (("inputs", 0), ("outputs", 1)):
            for j, tmap in enumerate(r.tables(sig, field, f"{what}.{part}")):
                r.string(tmap, 0, f"{what}.{part}[{j}].name")
                r.index(tmap, 1, sizes[sub], f"{what}.{part}[{j}]", "tensor")


def _check_subgraph(r: _Reader, s: int, graph: _Table, opcodes: list[str], nbuf: int) -> int:
    """Check one subgraph; return its tensor count. ``opcodes``: each one's custom name."""
    from device.detect.flexbuffer import check_postprocess_options, read_flexbuffer

    nops = len(opcodes)
    where = f"subgraphs[{s}]"
    r.string(graph, 4, f"{where}.name")
    tensors = r.tables(graph, 0, f"{where}.tensors")
    for i, tensor in enumerate(tensors):
        _check_tensor(r, f"{where} tensor {i}", tensor, nbuf)
    limit = len(tensors)
    for what, idx in (("inputs", 1), ("outputs", 2)):
        for ti in r.ints(graph, idx, f"{where}.{what}"):
            if not 0 <= ti < limit:
                raise FlatbufferError(f"subgraph {s} {what} names tensor {ti} of {limit}")
    for o, op in enumerate(r.tables(graph, 3, f"{where}.operators")):
        code = r.uint(op, 0)
        if code >= nops:
            raise FlatbufferError(f"operator {o} uses opcode {code} of {nops}")
        for what, idx in (("inputs", 1), ("outputs", 2), ("intermediates", 8)):
            for ti in r.ints(op, idx, f"operator {o} {what}"):
                if not -1 <= ti < limit:
                    raise FlatbufferError(f"operator {o} {what} names tensor {ti} of {limit}")
        start, n = r.vector(op, 5, 1, f"operator {o} custom options")
        custom = opcodes[code]
        what = f"operator {o} ({custom}) custom options"
        if custom == POSTPROCESS_OP:  # its Init reads these options unchecked
            check_postprocess_options(r.data[start : start + n], what)
        elif custom and n:
            read_flexbuffer(r.data[start : start + n], what)
        r.vector(op, 7, 1, f"operator {o} mutating_variable_inputs")
        r.span(op, 9, 10, f"operator {o} custom options")
        for type_field, options_field in ((3, 4), (11, 12)):
            options_pos = r.field(op, options_field)
            if not options_pos:
                continue
            options = r.table(r.ref(options_pos), f"operator {o} options")
            if type_field == 3:
                kind_pos = r.field(op, type_field)
                kind = r.u8(kind_pos) if kind_pos else 0
                for field, elem in _OPTION_VECTORS.get(kind, ()):
                    r.vector(options, field, elem, f"operator {o} options")
                for field in _OPTION_STRINGS.get(kind, ()):
                    r.string(options, field, f"operator {o} options")
    return limit


def _check_tensor(r: _Reader, what: str, tensor: _Table, nbuf: int) -> None:
    shape = r.ints(tensor, 0, f"{what} shape")
    dims = shape + r.ints(tensor, 7, f"{what} shape_signature")
    if len(dims) > 32 or any(d < -1 or d > 1 << 24 for d in dims):
        shown = ", ".join(str(d) for d in dims[:8]) + (", ..." if len(dims) > 8 else "")
        raise FlatbufferError(f"{what} has an impossible shape [{shown}] ({len(dims)} dims)")
    elements = 1
    for d in shape:
        elements *= max(d, 1)
    if elements > _MAX_ELEMENTS:
        raise FlatbufferError(f"{what} has an impossible shape {shape} ({elements:,} elements)")
    type_pos = r.field(tensor, 1)
    if type_pos and r.u8(type_pos) > _MAX_TENSOR_TYPE:
        raise FlatbufferError(f"{what} has an unknown type {r.u8(type_pos)}")
    r.string(tensor, 3, f"{what} name")
    if r.field(tensor, 10):
        raise FlatbufferError(f"{what} keeps its data in an external file")
    buf_pos = r.field(tensor, 2)
    if buf_pos and r.u32(buf_pos) >= max(nbuf, 1):
        raise FlatbufferError(f"{what} refers to buffer {r.u32(buf_pos)} of {nbuf}")
    quant_pos = r.field(tensor, 4)
    if quant_pos:
        quant = r.table(r.ref(quant_pos), f"{what} quantization")
        for idx, elem in ((0, 4), (1, 4), (2, 4), (3, 8)):
            r.vector(quant, idx, elem, f"{what} quantization")
        details_pos = r.field(quant, 5)
        if details_pos:
            details = r.table(r.ref(details_pos), f"{what} quantization details")
            r.vector(details, 0, 1, f"{what} quantization details")  # CustomQuantization
    sparsity_pos = r.field(tensor, 6)
    if sparsity_pos:
        sparsity = r.table(r.ref(sparsity_pos), f"{what} sparsity")
        r.ints(sparsity, 0, f"{what} sparsity traversal_order")
        r.ints(sparsity, 1, f"{what} sparsity block_map")
        for d, dim in enumerate(r.tables(sparsity, 2, f"{what} sparsity dim_metadata")):
            for type_field, value_field in ((2, 3), (4, 5)):
                if not r.field(dim, value_field):
                    continue
                kind_pos = r.field(dim, type_field)
                width = {1: 4, 2: 2, 3: 1}.get(r.u8(kind_pos) if kind_pos else 0)
                if width is None:
                    raise FlatbufferError(f"{what} sparsity dim {d} has an unknown index type")
                values = r.table(r.ref(r.field(dim, value_field)), f"{what} sparsity dim {d}")
                r.vector(values, 0, width, f"{what} sparsity dim {d}")
    for v, variant in enumerate(r.tables(tensor, 9, f"{what} variant_tensors")):
        r.ints(variant, 0, f"{what} variant {v} shape")


def custom_op_names(data: bytes) -> list[str]:
    """Names of the custom ops a (structurally sound) model uses, e.g. ``TFLite_Detection_PostProcess``."""
    r = _Reader(data)
    model = r.table(r.ref(0), "model")
    names = []
    for code in r.tables(model, 1, "operator_codes"):
        start, length = r.vector(code, 1, 1, "custom_code")  # field 1: custom_code string
        if length:
            names.append(data[start : start + length].decode("utf-8", "replace"))
    return names
