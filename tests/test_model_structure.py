"""The structural check of a model, part by part: each damage that crashed a runtime, or leaked
a traceback from it, is refused before any runtime sees the file, with a line that says where.

Each case damages a real model (the COCO SSD from ../shared, or doorstep's default model) at
one place found by walking the file, as a flipped byte on an SD card or a hostile bundle would.
The campaign over hundreds of random damages is ``test_bad_model``'s mutation test.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from device.detect.detector import Detector
from device.detect.flatbuffer import FlatbufferError, _Reader, _Table, check_flatbuffer
from device.detect.flexbuffer import check_postprocess_options, read_flexbuffer
from device.detect.runtime import check_tflite_file
from device.errors import ModelError
from device.models import default_bundle

POSTPROCESS_OP = 63  # the COCO SSD's TFLite_Detection_PostProcess, its last operator


def _model(r: _Reader) -> _Table:
    return r.table(r.ref(0), "model")


def _operator(r: _Reader, index: int) -> _Table:
    return r.tables(r.tables(_model(r), 2, "subgraphs")[0], 3, "operators")[index]


def _options_span(data: bytes) -> tuple[int, int]:
    r = _Reader(data)
    return r.vector(_operator(r, POSTPROCESS_OP), 5, 1, "custom options")


def _refused(tmp_path: Path, data: bytes | bytearray, match: str) -> None:
    path = tmp_path / "damaged.tflite"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=match) as caught:
        check_tflite_file(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{path}: corrupt or truncated TFLite model: ")


def test_the_real_models_pass(ssd_model: Path) -> None:
    check_flatbuffer(ssd_model.read_bytes())
    check_flatbuffer((default_bundle() / "model.tflite").read_bytes())


def test_the_ssd_postprocess_options_are_read(ssd_model: Path) -> None:
    data = ssd_model.read_bytes()
    start, n = _options_span(data)
    options = check_postprocess_options(data[start : start + n], "options")
    assert options["max_detections"] == 10
    assert options["num_classes"] == 90
    assert options["y_scale"] == pytest.approx(10.0)
    assert options["nms_iou_threshold"] == pytest.approx(0.6)


def test_postprocess_without_its_options(tmp_path: Path, ssd_model: Path) -> None:
    """Both runtimes segfaulted: the op's Init reads a FlexBuffer that is not there."""
    data = bytearray(ssd_model.read_bytes())
    op = _operator(_Reader(bytes(data)), POSTPROCESS_OP)
    struct.pack_into("<H", data, op.vtable + 4 + 2 * 5, 0)  # custom_options: absent
    _refused(
        tmp_path, data, r"operator 63 \(TFLite_Detection_PostProcess\) custom options: 0 bytes"
    )


def test_postprocess_options_damaged(tmp_path: Path, ssd_model: Path) -> None:
    data = bytearray(ssd_model.read_bytes())
    start, n = _options_span(bytes(data))
    root_width = bytearray(data)
    root_width[start + n - 1] = 200
    _refused(tmp_path, root_width, "its root is 200 bytes wide")
    no_nul = bytearray(data)
    key = start + bytes(data[start : start + n]).index(b"max_detections\0")
    no_nul[key + len("max_detections")] = ord("x")  # the key runs on into the next one
    _refused(tmp_path, no_nul, r"operator 63 \(TFLite_Detection_PostProcess\) custom options: ")
    beyond = bytearray(data)
    beyond[start + n - 3] = 0xFF  # the root map's offset: far before the buffer's start
    _refused(tmp_path, beyond, "outside its 217 bytes")


def test_flexbuffer_loops_are_bounded() -> None:
    # [size 1][element: offset 0, i.e. this vector again][its type: vector][root: offset 2
    # back to the vector][root type: vector][root width 1]: a vector inside itself, for ever
    looping = bytes([1, 0, 10 << 2, 2, 10 << 2, 1])
    with pytest.raises(FlatbufferError, match="nested too deep"):
        read_flexbuffer(looping, "options")


def test_tensor_name_not_utf8(tmp_path: Path, ssd_model: Path) -> None:
    """LiteRT raised UnicodeDecodeError from the op details: a traceback, not an error."""
    data = bytearray(ssd_model.read_bytes())
    r = _Reader(bytes(data))
    tensor = r.tables(r.tables(_model(r), 2, "subgraphs")[0], 0, "tensors")[5]
    start, _ = r.vector(tensor, 3, 1, "name")
    data[start + 1] = 0xFF
    _refused(tmp_path, data, r"subgraphs\[0\] tensor 5 name is not UTF-8")


def test_signature_and_metadata_indices(tmp_path: Path) -> None:
    """The default model has a signature and metadata: tflite-runtime followed their indices
    unchecked."""
    data = (default_bundle() / "model.tflite").read_bytes()
    r = _Reader(data)
    sig = r.tables(_model(r), 7, "signature_defs")[0]
    assert not r.field(sig, 4)  # subgraph_index absent: 0, the only subgraph
    tmap = r.tables(sig, 1, "outputs")[0]
    assert r.field(tmap, 1)  # a tensor index other than 0 is stored
    bad_tensor = bytearray(data)
    struct.pack_into("<I", bad_tensor, r.field(tmap, 1), 100_000)
    _refused(tmp_path, bad_tensor, r"signature_defs\[0\].outputs\[0\] names tensor 100000 of")
    meta = r.tables(_model(r), 6, "metadata")[0]
    bad_meta = bytearray(data)
    struct.pack_into("<I", bad_meta, r.field(meta, 1), 1 << 30)
    _refused(tmp_path, bad_meta, r"metadata\[0\] names buffer 1073741824 of")
    key_start, _ = r.vector(sig, 2, 1, "signature_key")
    bad_key = bytearray(data)
    bad_key[key_start] = 0xC3  # the start of a two-byte sequence, then 'e': not UTF-8
    _refused(tmp_path, bad_key, r"signature_defs\[0\].signature_key is not UTF-8")


def test_a_model_that_fails_to_run_is_one_error(
    tmp_path: Path, ssd_model: Path, ssd_labels: Path
) -> None:
    """Options the structure allows but the kernel refuses at invoke (more classes than the
    scores tensor holds) raised RuntimeError from detect(): now a ModelError naming the file."""
    data = bytearray(ssd_model.read_bytes())
    start, n = _options_span(bytes(data))
    for i in range(start, start + n):  # find num_classes (90) among the option bytes
        if data[i] != 90:
            continue
        trial = bytearray(data)
        trial[i] = 95
        try:
            if check_postprocess_options(bytes(trial[start : start + n]), "o")["num_classes"] == 95:
                data = trial
                break
        except FlatbufferError:
            continue
    else:
        pytest.fail("num_classes not found among the SSD's postprocess options")
    path = tmp_path / "classes.tflite"
    path.write_bytes(bytes(data))
    check_tflite_file(path)  # structurally sound
    det = Detector.open(path, ssd_labels, num_threads=1)

    with pytest.raises(ModelError, match=r"classes.tflite: the model failed to run: .*num_classes"):
        det.detect(np.zeros((300, 300, 3), np.uint8))
