"""Frame to input tensor, exactly as the manifest says, and boxes back to source pixels.

Frames arrive as BGR ``uint8`` arrays (OpenCV) or as picamera2 YUV420 buffers. Everything that
can be computed once (lookup tables, target sizes, buffers) is computed when the transform is
built, not per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from device.bundle.manifest import InputSpec
from device.errors import DetectorError

_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}


@dataclass(frozen=True)
class Yuv420Frame:
    """A planar YUV 4:2:0 (I420) buffer as picamera2 returns it for a ``YUV420`` stream.

    ``data`` has shape ``(height * 3 // 2, stride)``: ``height`` rows of Y, then the U and V
    planes, each ``height / 2`` rows of ``stride / 2`` bytes, laid contiguously (so an array
    row holds two chroma rows).
    ``stride`` may exceed ``width`` (rows are padded for alignment).
    """

    data: np.ndarray
    width: int
    height: int

    def to_bgr(self) -> np.ndarray:
        return yuv420_to_bgr(self.data, self.width, self.height)


def yuv420_to_bgr(data: np.ndarray, width: int, height: int) -> np.ndarray:
    """Convert a padded I420 buffer to a BGR image, dropping the row padding of every plane."""
    if width % 2 or height % 2:
        raise DetectorError(f"YUV420 frame {width}x{height}: width and height must be even")
    rows, stride = data.shape[:2] if data.ndim == 2 else (0, 0)
    if data.ndim != 2 or rows != height * 3 // 2 or stride < width or stride % 2:
        raise DetectorError(
            f"YUV420 buffer of shape {list(data.shape)} does not fit a {width}x{height} frame: "
            f"expected ({height * 3 // 2}, stride >= {width})"
        )
    if stride == width:
        return cv2.cvtColor(data, cv2.COLOR_YUV2BGR_I420)
    # Chroma planes are contiguous after Y: each is height/2 rows of stride/2 bytes.
    chroma = data[height:].reshape(-1)
    plane = (height // 2) * (stride // 2)
    u = chroma[:plane].reshape(height // 2, stride // 2)[:, : width // 2]
    v = chroma[plane : 2 * plane].reshape(height // 2, stride // 2)[:, : width // 2]
    packed = np.empty(height * width * 3 // 2, dtype=np.uint8)
    packed[: height * width] = data[:height, :width].reshape(-1)
    packed[height * width : height * width + plane * width // stride] = u.reshape(-1)
    packed[height * width + plane * width // stride :] = v.reshape(-1)
    packed = packed.reshape(height * 3 // 2, width)
    return cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_I420)


@dataclass(frozen=True)
class Geometry:
    """How a source frame was placed on the model's input canvas."""

    src_w: int
    src_h: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def box_to_source(self, box: list[float]) -> tuple[float, float, float, float]:
        """Map one xyxy box on the input canvas to source pixels, clipped to the frame.

        Plain floats: it runs for the few boxes left after NMS, where numpy's per-call cost
        would exceed the arithmetic."""
        x1, y1, x2, y2 = box
        w, h = float(self.src_w), float(self.src_h)
        sx, sy, px, py = self.scale_x, self.scale_y, self.pad_x, self.pad_y
        return (
            min(max((x1 - px) / sx, 0.0), w),
            min(max((y1 - py) / sy, 0.0), h),
            min(max((x2 - px) / sx, 0.0), w),
            min(max((y2 - py) / sy, 0.0), h),
        )


def value_lut(spec: InputSpec) -> np.ndarray | None:
    """A per-channel 256-entry table mapping pixel values to quantized input values.

    ``None`` when the mapping is the identity (the common uint8 case), so no work is done.
    """
    if spec.dtype == "float32":
        return None
    if spec.scale is None or spec.zero_point is None:
        raise DetectorError(
            f"input {spec.name} is {spec.dtype} but the manifest has no scale/zero_point"
        )
    lo, hi = _QRANGE[spec.dtype]
    pixels = np.arange(256, dtype=np.float64)[:, None]
    mean = np.asarray(spec.normalization.mean, dtype=np.float64)[None, :]
    std = np.asarray(spec.normalization.std, dtype=np.float64)[None, :]
    exact = (pixels - mean) / std / spec.scale + spec.zero_point
    q = np.round(exact)
    # A tie (the exact value halfway between two levels, as with mean 127.5 and zero point 127)
    # is as well served by either level; the float32 noise in the stored scale would otherwise
    # decide it, a level at a time. Resolve ties toward the pixel value itself, so that such a
    # model needs no table at all (cv2.LUT costs ~0.14 ms a 300x300 frame on one core).
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    q = np.where(tie & (np.abs(exact - pixels) < 0.5 + 1e-4), pixels, q)
    q = np.clip(q, lo, hi).astype(np.int64)
    if spec.dtype == "uint8" and np.array_equal(q, np.repeat(np.arange(256)[:, None], 3, axis=1)):
        return None
    table: np.ndarray = q.astype(np.int8 if spec.dtype == "int8" else np.uint8).view(np.uint8)
    if (table == table[:, :1]).all():
        return np.ascontiguousarray(table[:, 0])  # one table for all channels: twice as fast
    return table.reshape(256, 1, 3)


def xor_mask(table: np.ndarray) -> int | None:
    """``m`` when a single-channel ``table`` is ``x ^ m``: uint8 pixels to an int8 input with
    zero point -128 is ``x ^ 0x80``. One xor costs ~0.01 ms a 300x300 frame on one core,
    cv2.LUT ~0.14 ms."""
    if table.shape != (256,):
        return None
    mask = int(table[0])
    return mask if np.array_equal(table, np.arange(256) ^ mask) else None


def apply_lut(src: np.ndarray, table: np.ndarray, mask: int | None, dst: np.ndarray) -> None:
    """``dst = table[src]``, as one xor when the table is one (see :func:`xor_mask`)."""
    if mask is None:
        cv2.LUT(src, table, dst=dst)
    else:
        np.bitwise_xor(src, np.uint8(mask), out=dst)


class InputTransform:
    """Preprocessing for one model: built once from the manifest, applied per frame."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.size = (spec.width, spec.height)
        self._lut = value_lut(spec)
        self._xor = None if self._lut is None else xor_mask(self._lut)
        self._swap = spec.channel_order == "RGB"
        self._mean = np.asarray(spec.normalization.mean, dtype=np.float32)
        self._inv_std = 1.0 / np.asarray(spec.normalization.std, dtype=np.float32)
        self._canvas = np.full((spec.height, spec.width, 3), spec.pad_value, dtype=np.uint8)
        self._canvas_geo: Geometry | None = None
        self.canvas: np.ndarray = self._canvas
        # work buffers reused frame after frame (no allocation per frame)
        self._resized = np.empty((spec.height, spec.width, 3), dtype=np.uint8)
        self._rgb = np.empty((spec.height, spec.width, 3), dtype=np.uint8)
        self._geo_cache: dict[tuple[int, int], Geometry] = {}

    def geometry(self, src_w: int, src_h: int) -> Geometry:
        w, h = self.size
        if self.spec.resize == "stretch":
            return Geometry(src_w, src_h, w / src_w, h / src_h, 0.0, 0.0)
        scale = min(w / src_w, h / src_h)
        nw, nh = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        # Exact per-axis ratios of the resized image, so back-mapping undoes the rounding too.
        return Geometry(src_w, src_h, nw / src_w, nh / src_h, (w - nw) // 2, (h - nh) // 2)

    def __call__(
        self, frame: np.ndarray | Yuv420Frame, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, Geometry]:
        """Return the model input tensor (with batch axis) and the geometry to map boxes back.

        ``out``, an NHWC ``[1, h, w, 3]`` integer array (the interpreter's own input buffer),
        receives the result directly when the model's input allows it; the returned tensor is
        then ``out`` itself. Otherwise a new array is returned."""
        image = frame.to_bgr() if isinstance(frame, Yuv420Frame) else frame
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DetectorError(
                f"frame must be an HxWx3 uint8 BGR image, got shape {list(image.shape)} dtype {image.dtype}"
            )
        src_h, src_w = image.shape[:2]
        geo = self._geo_cache.get((src_w, src_h))
        if geo is None:
            geo = self._geo_cache[(src_w, src_h)] = self.geometry(src_w, src_h)
        w, h = self.size
        if self.spec.resize == "stretch":
            canvas = (
                image
                if (src_w, src_h) == (w, h)
                else cv2.resize(image, (w, h), dst=self._resized, interpolation=cv2.INTER_LINEAR)
            )
        else:
            nw, nh = round(src_w * geo.scale_x), round(src_h * geo.scale_y)
            px, py = int(geo.pad_x), int(geo.pad_y)
            canvas = self._canvas
            if geo != self._canvas_geo:  # a new frame size: clear what the old one left behind
                canvas.fill(self.spec.pad_value)
                self._canvas_geo = geo
            canvas[py : py + nh, px : px + nw] = (
                image
                if (nw, nh) == (src_w, src_h)
                else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
            )
        self.canvas = canvas  # the frame at the model's size, BGR uint8 (motion gating)
        direct = out is not None and self.spec.layout == "NHWC" and self.spec.dtype != "float32"
        if direct and self._swap and self._lut is None:  # the common uint8 RGB model: one pass
            assert out is not None
            cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB, dst=out[0])
            return out, geo
        if self._swap:
            canvas = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB, dst=self._rgb)
        if direct:
            assert out is not None
            target = out[0].view(np.uint8)  # int8 bytes are written as their uint8 pattern
            if self._lut is not None:
                apply_lut(canvas, self._lut, self._xor, target)
            else:
                np.copyto(target, canvas)
            return out, geo
        if self.spec.dtype == "float32":
            tensor = (canvas.astype(np.float32) - self._mean) * self._inv_std
        elif self._lut is not None:
            tensor = np.empty(canvas.shape, np.uint8)
            apply_lut(canvas, self._lut, self._xor, tensor)
            if self.spec.dtype == "int8":
                tensor = tensor.view(np.int8)
        else:
            tensor = canvas.copy()  # the work buffers are reused by the next frame
        if self.spec.layout == "NCHW":
            tensor = tensor.transpose(2, 0, 1)
        return np.ascontiguousarray(tensor)[None], geo
