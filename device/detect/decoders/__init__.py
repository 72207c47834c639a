"""Output decoders, one module per layout family, chosen by the manifest's ``decoder.kind``."""

from __future__ import annotations

from device.detect.decoders.base import Candidates, Decoder, Output
from device.detect.decoders.nanodet import NanoDetDecoder
from device.detect.decoders.postprocess import PostprocessDecoder
from device.detect.decoders.ssd_raw import SsdRawDecoder
from device.detect.decoders.yolo import YoloE2EDecoder, YoloV5Decoder, YoloV8Decoder

DECODERS: dict[str, type[Decoder]] = {
    cls.kind: cls
    for cls in (
        PostprocessDecoder,
        YoloV8Decoder,
        YoloV5Decoder,
        YoloE2EDecoder,
        SsdRawDecoder,
        NanoDetDecoder,
    )
}

__all__ = ["DECODERS", "Candidates", "Decoder", "Output"]
