"""The real pretrained COCO SSD MobileNet v1 on real photos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from yuv import pad_i420

from device.bundle.manifest import DecoderSpec, SsdParams, TensorSpec
from device.detect.decoders import Output
from device.detect.decoders.ssd_raw import SsdRawDecoder
from device.detect.detector import Detector
from device.detect.model import read_model_facts
from device.detect.nms import box_iou, nms
from device.detect.preprocess import Yuv420Frame
from device.detect.runtime import RUNTIMES, open_interpreter, resolve_runtime
from device.errors import ModelError


@pytest.fixture(scope="module")
def ssd(ssd_model: Path, ssd_labels: Path) -> Detector:
    return Detector.open(ssd_model, ssd_labels)


def test_pets_gives_two_dogs_scoring_at_least_0_7(ssd: Detector, coco_samples: Path) -> None:
    image = cv2.imread(str(coco_samples / "pets.jpg"))
    dets = ssd.detect(image)
    dogs = [d for d in dets if d.label == "dog"]
    assert len(dogs) == 2, dets
    assert all(d.score >= 0.7 for d in dogs)
    h, w = image.shape[:2]
    left, right = sorted(dogs, key=lambda d: d.box[0])
    assert left.box[2] < right.box[2]  # two separate animals, left and right
    for d in dogs:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_kite_and_cold_gives_a_person_and_a_kite(ssd: Detector, coco_samples: Path) -> None:
    labels = {d.label for d in ssd.detect(cv2.imread(str(coco_samples / "kite_and_cold.jpg")))}
    assert {"person", "kite"} <= labels


def test_layout_is_mapped_from_the_postprocess_op(ssd: Detector) -> None:
    m = ssd.manifest
    assert m.decoder.kind == "tflite_postprocess"
    assert m.decoder.outputs["scores"].name == "TFLite_Detection_PostProcess:2"
    assert m.decoder.outputs["count"].shape == [1]
    assert (m.input.height, m.input.width, m.input.dtype) == (300, 300, "uint8")
    assert (m.input.scale, m.input.zero_point) == (1 / 128, 128)
    assert m.input.resize == "stretch"


def test_model_facts_read_ops_without_delegate_nodes(ssd_model: Path) -> None:
    facts = read_model_facts(ssd_model)
    assert facts.ops["CONV_2D"] == 34 and facts.ops["DEPTHWISE_CONV_2D"] == 13
    assert facts.ops["TFLite_Detection_PostProcess"] == 1
    assert not any("Delegate" in name or "XNNPACK" in name for name in facts.ops)
    assert facts.postprocess is not None and facts.postprocess.num_classes == 90


def test_yuv420_lores_frame_gives_the_same_dogs(ssd: Detector, coco_samples: Path) -> None:
    image = cv2.imread(str(coco_samples / "pets.jpg"))  # 512x430: chroma rows straddle array rows
    h, w = image.shape[:2]
    stride = (w + 63) // 64 * 64  # picamera2 pads rows to 64 bytes
    i420 = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
    buf = pad_i420(i420, w, h, stride)
    bgr_dogs = [d for d in ssd.detect(image) if d.label == "dog"]
    yuv_dogs = [d for d in ssd.detect(Yuv420Frame(buf, w, h)) if d.label == "dog"]
    assert len(yuv_dogs) == len(bgr_dogs) == 2
    for a, b in zip(
        sorted(bgr_dogs, key=lambda d: d.box[0]),
        sorted(yuv_dogs, key=lambda d: d.box[0]),
        strict=True,
    ):
        assert box_iou(np.array(a.box), np.array([b.box]))[0] > 0.9
        assert abs(a.score - b.score) < 0.1


def test_raw_ssd_decoder_agrees_with_the_models_own_postprocess(
    ssd: Detector, ssd_model: Path, coco_samples: Path, tmp_path: Path
) -> None:
    """Decode the SSD's raw box encodings and scores (read from inside the real model) with our
    raw-SSD decoder and compare with what TFLite_Detection_PostProcess itself returns."""
    interp, _ = open_interpreter(ssd_model, preserve_all_tensors=True)
    tensors = {t["name"]: t for t in interp.get_tensor_details()}
    image = cv2.imread(str(coco_samples / "pets.jpg"))
    tensor, geo = ssd.transform(image)
    interp.set_tensor(interp.get_input_details()[0]["index"], tensor)
    interp.invoke()

    def read(name: str) -> Output:
        t = tensors[name]
        scale, zp = t["quantization"]
        return Output(name, interp.get_tensor(t["index"]), float(scale) or None, int(zp))

    np.save(tmp_path / "anchors.npy", read("anchors").real())  # the model's own 1917 anchors
    spec = DecoderSpec(
        kind="ssd_raw",
        outputs={
            "boxes": TensorSpec(name="Squeeze", shape=[1, 1917, 4], dtype="uint8"),
            "scores": TensorSpec(name="convert_scores", shape=[1, 1917, 91], dtype="uint8"),
        },
        ssd=SsdParams(score_activation="none", background_class=True),  # LOGISTIC ran in-graph
    )
    decoder = SsdRawDecoder(spec, (300, 300), 90, lambda name: tmp_path / name)
    raw = {"boxes": read("Squeeze"), "scores": read("convert_scores")}
    cand = decoder.decode(
        {k: Output(v.name, v.data[0], v.scale, v.zero_point) for k, v in raw.items()}, 0.5
    )
    keep = nms(cand.boxes, cand.scores, cand.class_ids, 0.6, 10)
    ours = sorted(
        zip(
            cand.scores[keep].tolist(),
            cand.class_ids[keep].tolist(),
            [geo.box_to_source(b) for b in cand.boxes[keep].tolist()],
            strict=True,
        ),
        reverse=True,
    )
    theirs = [d for d in ssd.detect(image) if d.score >= 0.5]
    assert len(ours) == len(theirs) == 2
    for (score, cls, box), det in zip(ours, theirs, strict=True):
        assert cls == det.class_id
        assert score == pytest.approx(det.score, abs=0.01)
        assert box_iou(np.array(box), np.array([det.box]))[0] > 0.95


INSTALLED = [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]


@pytest.mark.parametrize("runtime", INSTALLED)
def test_each_installed_runtime_finds_the_dogs(
    runtime: str, ssd_model: Path, ssd_labels: Path, coco_samples: Path
) -> None:
    det = Detector.open(ssd_model, ssd_labels, runtime=runtime, num_threads=1)
    assert det.runtime == runtime
    assert [d.label for d in det.detect(cv2.imread(str(coco_samples / "pets.jpg")))][:2] == [
        "dog",
        "dog",
    ]


def test_auto_prefers_litert_unless_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    assert INSTALLED, "no TFLite runtime installed"
    monkeypatch.delenv("DOORSTEP_RUNTIME", raising=False)
    assert resolve_runtime("auto") == INSTALLED[0]
    monkeypatch.setenv("DOORSTEP_RUNTIME", INSTALLED[-1])
    assert resolve_runtime("auto") == INSTALLED[-1]
    monkeypatch.setenv("DOORSTEP_RUNTIME", "tensorflow")
    with pytest.raises(ModelError, match="DOORSTEP_RUNTIME='tensorflow': choose one of"):
        resolve_runtime("auto")
