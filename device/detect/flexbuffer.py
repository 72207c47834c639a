"""A bounds-checked reader of FlexBuffers, the format of a TFLite custom op's options.

The runtimes hand a custom op's option bytes to the op's ``Init``, which reads them as a
FlexBuffer with no checks at all: a flipped byte there (an offset, a width, a key without its
terminating NUL) made both tflite-runtime 2.14 and LiteRT segfault. This reader follows the
format (the root at the end; maps, vectors, keys and strings reached by offsets backwards, each
item's width and type packed in a byte) and refuses anything that leaves the buffer, so
:func:`read_flexbuffer` either returns the decoded value or raises ``FlatbufferError``.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from device.detect.flatbuffer import FlatbufferError

# FlexBuffers types (the upper six bits of a packed type byte)
_NULL, _INT, _UINT, _FLOAT, _KEY, _STRING = 0, 1, 2, 3, 4, 5
_INDIRECT = {6: _INT, 7: _UINT, 8: _FLOAT}
_MAP, _VECTOR = 9, 10
_TYPED = {11: _INT, 12: _UINT, 13: _FLOAT, 14: _KEY, 15: _STRING, 36: 26}  # element types
_FIXED = {16 + 3 * (n - 2) + k: (base, n) for n in (2, 3, 4) for k, base in enumerate((1, 2, 3))}
_BLOB, _BOOL = 25, 26
_MAX_DEPTH = 16
_MAX_ITEMS = 10_000


class _Flex:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.what, self.items = data, what, 0

    def fail(self, why: str) -> FlatbufferError:
        return FlatbufferError(f"{self.what}: {why}")

    def need(self, pos: int, n: int) -> None:
        if pos < 0 or n < 0 or pos + n > len(self.data):
            raise self.fail(f"reads {n} bytes at {pos}, outside its {len(self.data)} bytes")

    def uint(self, pos: int, width: int) -> int:
        self.need(pos, width)
        return int.from_bytes(self.data[pos : pos + width], "little")

    def sint(self, pos: int, width: int) -> int:
        self.need(pos, width)
        return int.from_bytes(self.data[pos : pos + width], "little", signed=True)

    def real(self, pos: int, width: int) -> float:
        if width not in (4, 8):
            raise self.fail(f"a float of {width} bytes")
        self.need(pos, width)
        return float(struct.unpack_from("<f" if width == 4 else "<d", self.data, pos)[0])

    def target(self, pos: int, width: int) -> int:
        """Where the offset stored at ``pos`` points (offsets point backwards)."""
        return pos - self.uint(pos, width)

    def cstring(self, pos: int) -> str:
        self.need(pos, 1)
        end = self.data.find(b"\0", pos)
        if end < 0:
            raise self.fail(f"a key at {pos} has no terminating NUL")
        try:
            return self.data[pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"a key at {pos} is not UTF-8") from None

    def scalar(self, kind: int, pos: int, width: int) -> Any:
        if kind == _INT:
            return self.sint(pos, width)
        if kind in (_UINT, _BOOL):
            value = self.uint(pos, width)
            return bool(value) if kind == _BOOL else value
        if kind == _FLOAT:
            return self.real(pos, width)
        raise self.fail(f"an element of unknown type {kind}")

    def value(self, pos: int, parent_width: int, packed: int, depth: int) -> Any:
        """The item stored at ``pos`` in ``parent_width`` bytes, of packed type ``packed``."""
        self.items += 1
        if depth > _MAX_DEPTH or self.items > _MAX_ITEMS:
            raise self.fail("nested too deep or too many items (a loop of offsets?)")
        kind, width = packed >> 2, 1 << (packed & 3)
        if kind == _NULL:
            return None
        if kind in (_INT, _UINT, _FLOAT, _BOOL):
            return self.scalar(kind, pos, parent_width)
        at = self.target(pos, parent_width)
        if kind in _INDIRECT:
            return self.scalar(_INDIRECT[kind], at, width)
        if kind == _KEY:
            return self.cstring(at)
        if kind in (_STRING, _BLOB):
            size = self.uint(at - width, width)
            self.need(at, size + (kind == _STRING))  # a string ends with a NUL
            raw = self.data[at : at + size]
            if kind == _BLOB:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"a string at {at} is not UTF-8") from None
        if kind in (_MAP, _VECTOR):
            size = self.uint(at - width, width)
            self.need(at, size * width + size)  # the elements, then a type byte each
            types = self.data[at + size * width : at + size * width + size]
            values = [self.value(at + i * width, width, types[i], depth + 1) for i in range(size)]
            if kind == _VECTOR:
                return values
            keys_width = self.uint(at - 2 * width, width)
            if keys_width not in (1, 2, 4, 8):
                raise self.fail(f"a map's keys are {keys_width} bytes wide")
            keys_at = self.target(at - 3 * width, width)
            if self.uint(keys_at - keys_width, keys_width) != size:
                raise self.fail(f"a map at {at} has {size} values but a different number of keys")
            self.need(keys_at, size * keys_width)
            keys = [
                self.cstring(self.target(keys_at + i * keys_width, keys_width)) for i in range(size)
            ]
            return dict(zip(keys, values, strict=True))
        if kind in _TYPED or kind in _FIXED:
            elem, size = _FIXED.get(kind, (_TYPED.get(kind, 0), -1))
            if size < 0:
                size = self.uint(at - width, width)
            self.need(at, size * width)
            if elem in (_KEY, _STRING):
                return [self.cstring(self.target(at + i * width, width)) for i in range(size)]
            return [self.scalar(elem, at + i * width, width) for i in range(size)]
        raise self.fail(f"an item of unknown type {kind}")


def read_flexbuffer(data: bytes, what: str) -> Any:
    """Decode ``data`` (a whole FlexBuffer); raise ``FlatbufferError`` if it is malformed."""
    flex = _Flex(data, what)
    if len(data) < 3:
        raise flex.fail(f"{len(data)} bytes: too short for a FlexBuffer")
    width, packed = data[-1], data[-2]
    if width not in (1, 2, 4, 8) or width + 2 > len(data):
        raise flex.fail(f"its root is {width} bytes wide")
    return flex.value(len(data) - 2 - width, width, packed, 0)


# The options TFLite_Detection_PostProcess reads, with the ranges a working model has.
_POSTPROCESS_INTS = {
    "max_detections": (1, 10_000),
    "max_classes_per_detection": (1, 10_000),
    "detections_per_class": (1, 10_000),
    "num_classes": (1, 100_000),
}
_POSTPROCESS_FLOATS = (
    "nms_score_threshold",
    "nms_iou_threshold",
    "y_scale",
    "x_scale",
    "h_scale",
    "w_scale",
)


def check_postprocess_options(data: bytes, what: str) -> dict[str, Any]:
    """The options of a ``TFLite_Detection_PostProcess`` op, read and checked."""
    options = read_flexbuffer(data, what)
    if not isinstance(options, dict):
        raise FlatbufferError(f"{what}: not a map of options")
    for key, (low, high) in _POSTPROCESS_INTS.items():
        value = options.get(key)
        if key == "detections_per_class" and value is None:
            continue  # optional: the op defaults it
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise FlatbufferError(f"{what}: {key} is {value!r}, not in {low}..{high}")
    for key in _POSTPROCESS_FLOATS:
        value = options.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise FlatbufferError(f"{what}: {key} is {value!r}, not a finite number >= 0")
    if not 0 < options["nms_iou_threshold"] <= 1:
        raise FlatbufferError(
            f"{what}: nms_iou_threshold is {options['nms_iou_threshold']!r}, not in (0, 1]"
        )
    return options
