"""Preprocessing from the manifest: resize modes, exact back-mapping, colour, layout, dtypes, YUV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from yuv import pad_i420

from device.bundle.manifest import InputSpec, Normalization
from device.detect.preprocess import InputTransform, Yuv420Frame, value_lut, yuv420_to_bgr
from device.errors import DetectorError


def _spec(**kw: object) -> InputSpec:
    base: dict[str, object] = dict(
        name="in",
        height=64,
        width=64,
        layout="NHWC",
        channel_order="RGB",
        dtype="uint8",
        scale=1 / 255,
        zero_point=0,
        resize="letterbox",
        normalization=Normalization(mean=(0, 0, 0), std=(255, 255, 255)),
    )
    base.update(kw)
    return InputSpec.model_validate(base)


def _frame(w: int = 128, h: int = 96) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_letterbox_places_frame_centred_and_maps_boxes_back_exactly() -> None:
    t = InputTransform(_spec())
    tensor, geo = t(_frame(128, 96))
    assert tensor.shape == (1, 64, 64, 3)
    assert (geo.pad_x, geo.pad_y) == (0, 8)
    assert (tensor[0, :8] == 114).all() and (tensor[0, 56:] == 114).all()
    src = np.array([[10, 20, 100, 90], [0, 0, 128, 96]], np.float32)
    canvas = src.copy()
    canvas[:, [0, 2]] = src[:, [0, 2]] * geo.scale_x + geo.pad_x
    canvas[:, [1, 3]] = src[:, [1, 3]] * geo.scale_y + geo.pad_y
    np.testing.assert_allclose([geo.box_to_source(b) for b in canvas.tolist()], src, atol=1e-4)


def test_boxes_are_clipped_to_the_frame() -> None:
    geo = InputTransform(_spec(resize="stretch")).geometry(100, 100)
    boxes = np.array([[-10, -10, 150, 150]], np.float32) * geo.scale_x
    assert geo.box_to_source(boxes[0].tolist()) == (0, 0, 100, 100)


def test_letterbox_with_odd_sizes_undoes_rounding() -> None:
    t = InputTransform(_spec(height=300, width=300))
    geo = t.geometry(641, 479)
    nh = round(479 * 300 / 641)
    assert geo.scale_y == pytest.approx(nh / 479)
    box = np.array([641 * geo.scale_x, geo.pad_y, 0, geo.pad_y + nh], np.float32)
    back = geo.box_to_source(box.tolist())
    assert back[0] == pytest.approx(641, abs=1e-3)
    assert back[3] == pytest.approx(479, abs=1e-3)


def test_padding_is_cleared_when_frame_size_changes() -> None:
    t = InputTransform(_spec())
    t(np.full((32, 128, 3), 7, np.uint8))  # wide: large top/bottom pad
    tensor, geo = t(np.full((128, 32, 3), 7, np.uint8))  # tall: left/right pad
    assert geo.pad_y == 0 and geo.pad_x == 24
    assert (tensor[0, :, :24] == 114).all() and (tensor[0, :, 40:] == 114).all()


def test_stretch_and_channel_order() -> None:
    frame = np.zeros((10, 20, 3), np.uint8)
    frame[..., 0] = 200  # blue in BGR
    rgb, geo = InputTransform(_spec(resize="stretch", height=5, width=5))(frame)
    bgr, _ = InputTransform(_spec(resize="stretch", height=5, width=5, channel_order="BGR"))(frame)
    assert (rgb[0, ..., 2] == 200).all() and (rgb[0, ..., 0] == 0).all()
    assert (bgr[0, ..., 0] == 200).all()
    assert (geo.scale_x, geo.scale_y) == (0.25, 0.5)


def test_uint8_input_matching_the_normalisation_is_fed_unchanged() -> None:
    assert value_lut(_spec()) is None  # 0..1 model, scale 1/255: q = pixel
    ssd = _spec(
        scale=1 / 128, zero_point=128, normalization=Normalization(mean=(128,) * 3, std=(128,) * 3)
    )
    assert value_lut(ssd) is None


def test_uint8_input_calibrated_on_a_narrower_range_is_rescaled() -> None:
    """A 0..1 model whose input range was calibrated as 0..0.9: pixel 200 is q = 200/255/(0.9/255)."""
    lut = value_lut(_spec(scale=0.9 / 255))
    assert lut is not None
    assert lut.shape == (256,)  # the same for every channel: one table (cv2.LUT's fast path)
    assert lut[200] == 222
    assert lut[255] == 255  # saturates rather than wrapping


def test_per_channel_normalisation_gets_a_table_per_channel() -> None:
    spec = _spec(
        scale=1 / 64,
        zero_point=128,
        normalization=Normalization(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4)),
    )
    lut = value_lut(spec)
    assert lut is not None and lut.shape == (256, 1, 3)
    image = np.full((8, 8, 3), 120, np.uint8)
    tensor, _ = InputTransform(spec)(image)
    # RGB order: channel 0 is the model's R, normalised with mean 123.7
    expected = [
        round((120 - m) / s * 64 + 128) for m, s in ((123.7, 58.4), (116.3, 57.1), (103.5, 57.4))
    ]
    assert tensor[0, 0, 0].tolist() == expected


def test_ssd_minus_one_to_one_on_the_zoo_models_quantization() -> None:
    """(2/255)p - 1 quantized with 1/128, 128 (the zoo SSD): q = round(1.0039 p), capped at 255."""
    lut = value_lut(
        _spec(
            scale=1 / 128,
            zero_point=128,
            normalization=Normalization(mean=(127.5,) * 3, std=(127.5,) * 3),
        )
    )
    assert lut is not None
    assert [int(lut[p]) for p in (0, 100, 127, 200, 254, 255)] == [0, 100, 127, 201, 255, 255]


def test_int8_input_uses_the_models_zero_point() -> None:
    spec = _spec(dtype="int8", scale=1 / 255, zero_point=-128)
    tensor, _ = InputTransform(spec)(
        np.array([[[0, 128, 255]]], np.uint8).repeat(64, 0).repeat(64, 1)
    )
    assert tensor.dtype == np.int8
    assert tensor[0, 0, 0].tolist() == [127, 0, -128]  # RGB order: 255, 128, 0


def test_float_input_normalisation_and_nchw() -> None:
    spec = _spec(
        dtype="float32",
        scale=None,
        zero_point=None,
        layout="NCHW",
        resize="stretch",
        normalization=Normalization(mean=(127.5,) * 3, std=(127.5,) * 3),
    )
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[..., 2] = 255  # red in BGR
    tensor, _ = InputTransform(spec)(frame)
    assert tensor.shape == (1, 3, 64, 64) and tensor.dtype == np.float32
    assert np.allclose(tensor[0, 0], 1.0) and np.allclose(tensor[0, 1], -1.0)


def test_yuv420_with_row_padding_matches_unpadded_conversion() -> None:
    w, h, stride = 64, 50, 128  # h/2 odd: chroma rows straddle array rows
    bgr = cv2.GaussianBlur(_frame(w, h), (5, 5), 2)
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)  # (h*3/2, w), chroma packed two rows per row
    padded = pad_i420(i420, w, h, stride)
    expected = cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)
    np.testing.assert_array_equal(yuv420_to_bgr(padded, w, h), expected)
    np.testing.assert_array_equal(Yuv420Frame(i420, w, h).to_bgr(), expected)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((10, 10), np.uint8), "HxWx3 uint8"),
        (np.zeros((10, 10, 3), np.float32), "dtype float32"),
    ],
)
def test_bad_frames_are_refused(frame: np.ndarray, message: str) -> None:
    with pytest.raises(DetectorError, match=message):
        InputTransform(_spec())(frame)


def test_yuv_buffer_of_wrong_shape_is_refused() -> None:
    with pytest.raises(DetectorError, match="does not fit a 64x48 frame"):
        yuv420_to_bgr(np.zeros((48, 64), np.uint8), 64, 48)


def test_a_tie_between_two_levels_feeds_the_pixel_unchanged() -> None:
    """Mean and std 127.5 with the stored scale float32(1/127.5) and zero point 127 (the default
    parcel model): every pixel falls halfway between two levels, and the float32 noise in the
    scale used to pick the lower one from pixel 128 on, which cost a table lookup per frame.
    Either level is as near; the pixel itself is chosen, and no table is needed."""
    spec = _spec(
        scale=float(np.float32(1 / 127.5)),
        zero_point=127,
        normalization=Normalization(mean=(127.5,) * 3, std=(127.5,) * 3),
    )
    assert value_lut(spec) is None
    image = np.arange(64 * 64 * 3, dtype=np.int64).reshape(64, 64, 3).astype(np.uint8)
    tensor, _ = InputTransform(spec)(image)
    assert np.array_equal(tensor[0], image[:, :, ::-1])  # RGB, values unchanged


def test_int8_input_with_zero_point_minus_128_is_one_xor() -> None:
    """0..1 as int8 (scale 1/255, zero point -128): q = pixel - 128, written through the
    interpreter's buffer without a table lookup, bit for bit what the table gives."""
    spec = _spec(dtype="int8", zero_point=-128)
    lut = value_lut(spec)
    assert lut is not None and lut.shape == (256,)
    transform = InputTransform(spec)
    assert transform._xor == 0x80
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = np.zeros((1, 64, 64, 3), np.int8)
    transform(image, out=out)
    expected = image[:, :, ::-1].astype(np.int16) - 128
    assert np.array_equal(out[0].astype(np.int16), expected)
