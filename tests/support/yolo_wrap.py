"""The parcel SSD re-headed as a YOLOv8 or a YOLOv5 export: a real detector in those layouts.

Quantization's `.tflite` route must work on float YOLO exports as people have them (float16
weights behind DEQUANTIZE ops, no SignatureDef), and the int8 result must still find what the
float one finds on real photos. Nobody's YOLO may be redistributed, so the test subject is our
own float parcel model with its SSD decoding done in the graph and the result laid out as the
exporters lay it out, boxes normalized (0..1, as Ultralytics' int8 exports write them):

* ``v8``: ``[1, 4 + nc, N]``: cx, cy, w, h, then the class scores (sigmoid);
* ``v5``: ``[1, N, 5 + nc]``: cx, cy, w, h, objectness, then class probabilities (here the
  objectness is the SSD's score and the class probability parcel against its background
  column; the decoder multiplies them).

Run as ``python -m support.yolo_wrap KERAS ANCHORS OUT.tflite v8|v5`` from ``tests/``
(TensorFlow stays in that child process). The file is written by TensorFlow's float16
converter with its signatures stripped.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def build_tflite(keras_path: Path, anchors_path: Path, layout: str, work: Path) -> bytes:
    import tensorflow as tf

    base = tf.keras.models.load_model(str(keras_path), compile=False)
    spec = tf.TensorSpec([1, 300, 300, 3], tf.float32, name="images")
    base.export(str(work / "base"), input_signature=[spec], verbose=False)
    anchors = np.load(anchors_path).astype(np.float32)  # yc, xc, h, w

    class Head(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = tf.saved_model.load(str(work / "base"))
            self.anchors = tf.constant(anchors)

        @tf.function(input_signature=[spec])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            enc, logits = self.base.serve(images)
            ya, xa, ha, wa = (self.anchors[:, i] for i in range(4))
            ty, tx, th, tw = (enc[0, :, i] for i in range(4))
            cy, cx = ty / 10.0 * ha + ya, tx / 10.0 * wa + xa
            h, w = tf.exp(th / 5.0) * ha, tf.exp(tw / 5.0) * wa
            score = tf.sigmoid(logits[0, :, 1])
            if layout == "v8":
                rows = tf.stack([cx, cy, w, h, score], axis=0)  # [5, N]
            else:  # [N, 6], stacked as rows then transposed, as exporters write it
                # the class probability: parcel against the SSD head's background column
                cls = tf.sigmoid(logits[0, :, 1] - logits[0, :, 0])
                rows = tf.transpose(tf.stack([cx, cy, w, h, score, cls], axis=0))
            return rows[None]

    head = Head()
    tf.saved_model.save(head, str(work / "head"), signatures=head.__call__.get_concrete_function())
    conv = tf.lite.TFLiteConverter.from_saved_model(str(work / "head"))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return bytes(conv.convert())


def main(argv: list[str]) -> int:
    keras_path, anchors_path, out, layout = Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3]
    if layout not in ("v8", "v5"):
        raise SystemExit(f"layout {layout!r}: v8 or v5")
    from support.tflite_edit import strip_signatures

    with tempfile.TemporaryDirectory() as tmp:
        signed = Path(tmp) / "with-signature.tflite"
        signed.write_bytes(build_tflite(keras_path, anchors_path, layout, Path(tmp)))
        strip_signatures(signed, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
