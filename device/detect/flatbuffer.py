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

    def string(self, t: _Table, index: int, what: str) -> None:
        self.vector(t, index, 1, what)


def check_flatbuffer(data: bytes) -> None:
    """Raise ``FlatbufferError`` unless ``data`` is a structurally sound TFLite model."""
    r = _Reader(data)
    if r.size < 8 or data[4:8] != b"TFL3":
        raise FlatbufferError("no 'TFL3' file identifier")
    model = r.table(r.ref(0), "model")
    opcodes = r.tables(model, 1, "operator_codes")
    buffers = r.tables(model, 4, "buffers")
    for i, buf in enumerate(buffers):
        r.vector(buf, 0, 1, f"buffers[{i}].data")
        offset_pos, size_pos = r.field(buf, 1), r.field(buf, 2)
        if offset_pos and size_pos:  # weights stored after the flatbuffer (models over 2 GB)
            offset, size = r.u64(offset_pos), r.u64(size_pos)
            if offset > 1 and offset + size > r.size:
                raise FlatbufferError(
                    f"buffers[{i}] ({size} bytes at {offset}) runs past the end of the file"
                )
    subgraphs = r.tables(model, 2, "subgraphs")
    if not subgraphs:
        raise FlatbufferError("model has no subgraph")
    for s, graph in enumerate(subgraphs):
        tensors = r.tables(graph, 0, f"subgraphs[{s}].tensors")
        for i, tensor in enumerate(tensors):
            dims = r.ints(tensor, 0, f"tensor {i} shape") + r.ints(
                tensor, 7, f"tensor {i} shape_signature"
            )
            if any(d < -1 or d > 1 << 24 for d in dims):
                raise FlatbufferError(f"tensor {i} has an impossible shape {dims}")
            type_pos = r.field(tensor, 1)
            if type_pos and r.u8(type_pos) > _MAX_TENSOR_TYPE:
                raise FlatbufferError(f"tensor {i} has an unknown type {r.u8(type_pos)}")
            r.string(tensor, 3, f"tensor {i} name")
            quant_pos = r.field(tensor, 4)
            if quant_pos:
                quant = r.table(r.ref(quant_pos), f"tensor {i} quantization")
                for idx, elem in ((0, 4), (1, 4), (2, 4), (3, 8)):
                    r.vector(quant, idx, elem, f"tensor {i} quantization")
            buf_pos = r.field(tensor, 2)
            if buf_pos and r.u32(buf_pos) >= max(len(buffers), 1):
                raise FlatbufferError(
                    f"tensor {i} refers to buffer {r.u32(buf_pos)} of {len(buffers)}"
                )
        limit = len(tensors)
        for what, idx in (("inputs", 1), ("outputs", 2)):
            for ti in r.ints(graph, idx, f"subgraphs[{s}].{what}"):
                if not 0 <= ti < limit:
                    raise FlatbufferError(f"subgraph {s} {what} names tensor {ti} of {limit}")
        for o, op in enumerate(r.tables(graph, 3, f"subgraphs[{s}].operators")):
            code_pos = r.field(op, 0)
            code = r.u32(code_pos) if code_pos else 0
            if code >= len(opcodes):
                raise FlatbufferError(f"operator {o} uses opcode {code} of {len(opcodes)}")
            for what, idx in (("inputs", 1), ("outputs", 2)):
                for ti in r.ints(op, idx, f"operator {o} {what}"):
                    if not -1 <= ti < limit:
                        raise FlatbufferError(f"operator {o} {what} names tensor {ti} of {limit}")
            r.vector(op, 5, 1, f"operator {o} custom options")
            options_pos = r.field(op, 4)
            if options_pos:
                r.table(r.ref(options_pos), f"operator {o} options")


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
