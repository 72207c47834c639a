"""The TensorFlow side of ``doorstep-host train`` (runs in the child process of host/tfjobs.py).

Transfer learning for an SSD: the pretrained graph's weights (host/ssd_import.py) with a new
class head, trained with sigmoid focal loss on the class logits and a Huber loss on the encoded
boxes of matched anchors. Augmentation is made for doorbells: crops and scale, flips, brightness,
contrast and colour (many photos are at night), blur, and parcels pasted onto other scenes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.detect.decoders.ssd_raw import decode_ssd_boxes
from device.detect.nms import nms
from host.ssd_import import build_keras, ssd_anchors

SIZE = 300
SCALES = (10.0, 10.0, 5.0, 5.0)
PRIOR = 0.01  # initial class probability of the new head (focal-loss convention)


def _say(text: str) -> None:
    print(f"doorstep: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data


def load_samples(items: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(BGR image, normalized xyxy boxes, class ids) for every item."""
    out = []
    for it in items:
        image = cv2.imread(it["image"])
        if image is None:
            raise ValueError(f"{it['image']}: unreadable training image")
        b = np.array(it["boxes"], np.float32).reshape(-1, 4)
        if it["normalized"]:
            b = np.stack(
                [
                    b[:, 0] - b[:, 2] / 2,
                    b[:, 1] - b[:, 3] / 2,
                    b[:, 0] + b[:, 2] / 2,
                    b[:, 1] + b[:, 3] / 2,
                ],
                1,
            )
        else:
            h, w = image.shape[:2]
            b = b / np.array([w, h, w, h], np.float32)
        out.append((image, np.clip(b, 0, 1), np.array(it["classes"], np.int64)))
    return out


def to_input(image: np.ndarray) -> np.ndarray:
    """Stretch to 300x300, RGB, -1..1: what the device's preprocessing feeds this model."""
    rgb = cv2.cvtColor(
        cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB
    )
    return (rgb.astype(np.float32) - 127.5) / 127.5


def augment(
    rng: np.random.Generator,
    image: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    donors: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    img = image
    # copy-paste: a parcel from another photo onto this scene
    if donors and rng.uniform() < 0.3:
        d_img, d_boxes, d_cls = donors[int(rng.integers(len(donors)))]
        if len(d_boxes):
            k = int(rng.integers(len(d_boxes)))
            dh, dw = d_img.shape[:2]
            x1, y1, x2, y2 = (d_boxes[k] * [dw, dh, dw, dh]).astype(int)
            patch = d_img[y1:y2, x1:x2]
            if patch.size and patch.shape[0] > 8 and patch.shape[1] > 8:
                scale = rng.uniform(0.15, 0.4) * min(w, h) / max(patch.shape[:2])
                patch = cv2.resize(
                    patch,
                    (max(8, int(patch.shape[1] * scale)), max(8, int(patch.shape[0] * scale))),
                )
                ph, pw = patch.shape[:2]
                if ph < h and pw < w:
                    px, py = (
                        int(rng.integers(0, w - pw)),
                        int(rng.integers(h // 3, h - ph)) if h - ph > h // 3 else 0,
                    )
                    img = img.copy()
                    img[py : py + ph, px : px + pw] = patch
                    new = np.array([[px / w, py / h, (px + pw) / w, (py + ph) / h]], np.float32)
                    covered = _area(_intersect(boxes, new[0])) / np.maximum(_area(boxes), 1e-9)
                    keep = covered < 0.5
                    boxes = np.concatenate([boxes[keep], new])
                    classes = np.concatenate([classes[keep], d_cls[k : k + 1]])
    # random crop (zoom in), keeping boxes that stay mostly visible
    if rng.uniform() < 0.6:
        for _ in range(5):
            s = rng.uniform(0.55, 1.0)
            cw, ch = int(w * s * rng.uniform(0.85, 1.15)), int(h * s * rng.uniform(0.85, 1.15))
            cw, ch = min(cw, w), min(ch, h)
            cx, cy = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            win = np.array([cx / w, cy / h, (cx + cw) / w, (cy + ch) / h], np.float32)
            inter = _intersect(boxes, win)
            vis = _area(inter) / np.maximum(_area(boxes), 1e-9)
            keep = vis >= 0.6
            if len(boxes) and not keep.any():
                continue
            img = img[cy : cy + ch, cx : cx + cw]
            span = np.array([win[2] - win[0], win[3] - win[1]] * 2, np.float32)
            b = (inter[keep] - np.array([win[0], win[1], win[0], win[1]], np.float32)) / span
            boxes, classes = np.clip(b.astype(np.float32), 0, 1), classes[keep]
            break
    if rng.uniform() < 0.5:
        img = img[:, ::-1]
        boxes = boxes[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [1, 0, 1, 0]
    img = img.astype(np.float32)
    img = (img - img.mean()) * rng.uniform(0.7, 1.3) + img.mean() * rng.uniform(
        0.65, 1.3
    )  # contrast, brightness
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.6, 1.4)  # saturation
    if rng.uniform() < 0.25:  # night: dark, noisy
        img = img * rng.uniform(0.25, 0.6) + rng.normal(0, 6, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.uniform() < 0.15:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.8, 2.0))
    return np.ascontiguousarray(img), boxes.astype(np.float32), classes


def _intersect(boxes: np.ndarray, win: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.stack(
        [
            np.maximum(boxes[:, 0], win[0]),
            np.maximum(boxes[:, 1], win[1]),
            np.minimum(boxes[:, 2], win[2]),
            np.minimum(boxes[:, 3], win[3]),
        ],
        1,
    ).reshape(-1, 4)
    return out


def _area(b: np.ndarray) -> np.ndarray:
    area: np.ndarray = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return area


# ------------------------------------------------------------------ targets


def anchor_corners(anchors: np.ndarray) -> np.ndarray:
    yc, xc, h, w = anchors.T
    return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], 1)


def assign(
    anchors: np.ndarray,
    corners: np.ndarray,
    boxes: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per anchor: class targets [N, C+1], encoded box targets [N, 4], weights (1 pos, 0 ignore, -1 neg)."""
    n = len(anchors)
    cls = np.zeros((n, num_classes + 1), np.float32)
    enc = np.zeros((n, 4), np.float32)
    state = -np.ones(n, np.float32)
    if not len(boxes):
        return cls, enc, state
    ix1 = np.maximum(corners[:, None, 0], boxes[None, :, 0])
    iy1 = np.maximum(corners[:, None, 1], boxes[None, :, 1])
    ix2 = np.minimum(corners[:, None, 2], boxes[None, :, 2])
    iy2 = np.minimum(corners[:, None, 3], boxes[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    union = _area(corners)[:, None] + _area(boxes)[None, :] - inter
    iou = inter / np.maximum(union, 1e-9)
    best_gt = iou.argmax(1)
    best_iou = iou.max(1)
    pos = best_iou >= 0.5
    forced = iou.argmax(0)  # every box gets at least its best anchor
    best_gt[forced] = np.arange(len(boxes))
    pos[forced] = True
    state[(best_iou >= 0.4) & ~pos] = 0
    state[pos] = 1
    g = boxes[best_gt[pos]]
    a = anchors[pos]
    gyc, gxc = (g[:, 1] + g[:, 3]) / 2, (g[:, 0] + g[:, 2]) / 2
    gh, gw = np.maximum(g[:, 3] - g[:, 1], 1e-4), np.maximum(g[:, 2] - g[:, 0], 1e-4)
    enc[pos] = np.stack(
        [
            (gyc - a[:, 0]) / a[:, 2] * SCALES[0],
            (gxc - a[:, 1]) / a[:, 3] * SCALES[1],
            np.log(gh / a[:, 2]) * SCALES[2],
            np.log(gw / a[:, 3]) * SCALES[3],
        ],
        1,
    )
    cls[np.flatnonzero(pos), classes[best_gt[pos]] + 1] = 1.0
    return cls, enc, state


# ------------------------------------------------------------------ evaluation


def predict(
    model: Any, images: list[np.ndarray], anchors: np.ndarray, threshold: float = 0.01
) -> list[list[tuple]]:
    """Per image: (score, class, normalized xyxy) after sigmoid, decoding and class-aware NMS."""
    results = []
    for i in range(0, len(images), 8):
        batch = np.stack([to_input(im) for im in images[i : i + 8]])
        enc, logits = model(batch, training=False)
        for e, lg in zip(np.asarray(enc), np.asarray(logits), strict=True):
            probs = 1 / (1 + np.exp(-lg[:, 1:]))
            best, score = probs.argmax(1), probs.max(1)
            keep = np.flatnonzero(score >= threshold)
            boxes = decode_ssd_boxes(e[keep], anchors[keep], SCALES)
            kept = nms(boxes, score[keep], best[keep], 0.45, 100)  # the bundle's default IoU
            results.append([(float(score[keep][k]), int(best[keep][k]), boxes[k]) for k in kept])
    return results


def validation_ap(
    model: Any,
    val: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    names: list[str],
    anchors: np.ndarray,
) -> Any:
    from host.datasets import Dataset, Sample
    from host.evaluate import _coco_objects, score

    sizes = [(im.shape[1], im.shape[0]) for im, _, _ in val]
    samples = [
        Sample(Path(f"{i}"), b * [w, h, w, h], tuple(int(c) for c in cl))
        for i, ((_, b, cl), (w, h)) in enumerate(zip(val, sizes, strict=True))
    ]
    gt = _coco_objects(Dataset(Path("val"), "val", names, samples), sizes)
    dets = []
    for i, found in enumerate(predict(model, [im for im, _, _ in val], anchors)):
        w, h = sizes[i]
        for s, c, (x1, y1, x2, y2) in found:
            dets.append(
                {
                    "image_id": i,
                    "category_id": c,
                    "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h],
                    "score": s,
                }
            )
    return score(dets, gt, names, 0.5, "val")


# ------------------------------------------------------------------ training


def run(req: dict[str, Any]) -> dict[str, Any]:
    import tensorflow as tf

    seed = int(req["seed"])
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    out = Path(req["out"])
    names = list(req["names"])
    nc = len(names)
    anchors = ssd_anchors()
    corners = anchor_corners(anchors)
    np.save(out / "anchors.npy", anchors)
    train = load_samples(req["train"])
    val = load_samples(req["val"])
    _say(f"  loaded {len(train)} training and {len(val)} validation photos")

    model = build_keras(req["graph"], num_classes=nc)
    for layer in model.layers:
        if "ClassPredictor" in layer.name and layer.get_weights():
            k, b = layer.get_weights()
            layer.set_weights(
                [
                    np.random.default_rng(seed).normal(0, 0.01, k.shape).astype(np.float32),
                    np.full(b.shape, -math.log((1 - PRIOR) / PRIOR), np.float32),
                ]
            )
    heads = [
        v for layer in model.layers if "Predictor" in layer.name for v in layer.trainable_weights
    ]

    state_file, ckpt = out / "checkpoint.json", out / "checkpoint.weights.h5"
    start, best = 0, {"ap50": -1.0, "epoch": -1}
    if req.get("resume") and state_file.exists() and ckpt.exists():
        saved = json.loads(state_file.read_text())
        model.load_weights(ckpt)
        start, best = saved["epoch"] + 1, saved["best"]
        _say(f"  resumed from epoch {saved['epoch'] + 1} (best AP@0.5 so far {best['ap50']:.3f})")

    epochs, head_epochs, batch = int(req["epochs"]), int(req["head_epochs"]), int(req["batch"])
    steps = max(1, math.ceil(len(train) / batch))
    lr = float(req["lr"])

    def losses(images: Any, cls_t: Any, box_t: Any, st: Any) -> tuple[Any, Any]:
        enc, logits = model(images, training=True)
        pos = tf.cast(st > 0, tf.float32)
        valid = tf.cast(st != 0, tf.float32)
        n_pos = tf.maximum(tf.reduce_sum(pos), 1.0)
        p = tf.sigmoid(logits[..., 1:])
        t = cls_t[..., 1:]
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=t, logits=logits[..., 1:])
        pt = p * t + (1 - p) * (1 - t)
        alpha = 0.25 * t + 0.75 * (1 - t)
        focal = tf.reduce_sum(alpha * (1 - pt) ** 2 * ce, -1) * valid
        box = (
            tf.reduce_sum(tf.keras.losses.huber(box_t[..., None], enc[..., None], delta=1.0), -1)
            * pos
        )
        return tf.reduce_sum(focal) / n_pos, tf.reduce_sum(box) / n_pos

    def make_step(variables: list[Any], optimizer: Any) -> Any:
        """One compiled training step over ``variables`` (one per phase: heads, then all)."""
        optimizer.build(variables)

        @tf.function  # type: ignore[untyped-decorator]
        def step(images: Any, cls_t: Any, box_t: Any, st: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                lc, lb = losses(images, cls_t, box_t, st)
                total = lc + lb
            grads = tape.gradient(total, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return lc, lb

        return step

    phases = {
        False: (tf.keras.optimizers.Adam(lr), heads),
        True: (tf.keras.optimizers.Adam(lr * 0.2), model.trainable_weights),
    }
    steps_fn: dict[bool, Any] = {}

    def clean_loss() -> float:
        """Loss on the training photos as they are (no augmentation): did training learn them?"""
        total = 0.0
        for i in range(0, len(train), batch):
            chunk = train[i : i + batch]
            targets = [assign(anchors, corners, b, c, nc) for _, b, c in chunk]
            images = np.stack([to_input(im) for im, _, _ in chunk])
            lc, lb = losses(images, *(np.stack([t[k] for t in targets]) for k in range(3)))
            total += (float(lc) + float(lb)) * len(chunk)
        return total / len(train)

    loss_before = clean_loss()
    history = []
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        full = epoch >= head_epochs
        optimizer, variables = phases[full]
        if full not in steps_fn:
            steps_fn[full] = make_step(variables, optimizer)
        step = steps_fn[full]
        progress = (epoch - head_epochs) / max(1, epochs - head_epochs) if full else 0.0
        optimizer.learning_rate.assign(
            lr * (0.2 if full else 1.0) * 0.5 * (1 + math.cos(math.pi * progress))
        )
        rng = np.random.default_rng(seed * 1000 + epoch)
        order = rng.permutation(len(train))
        sums = np.zeros(2)
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            ims, cts, bts, sts = [], [], [], []
            for i in idx:
                image, boxes, classes = train[i]
                im, b, c = augment(rng, image, boxes, classes, train)
                ct, bt, st = assign(anchors, corners, b, c, nc)
                ims.append(to_input(im))
                cts.append(ct)
                bts.append(bt)
                sts.append(st)
            lc, lb = step(np.stack(ims), np.stack(cts), np.stack(bts), np.stack(sts))
            sums += [float(lc), float(lb)]
        scores = validation_ap(model, val, names, anchors)
        ap50, ap = scores.overall.ap50, scores.overall.ap
        cls_loss, box_loss = sums / steps
        history.append(
            {
                "epoch": epoch + 1,
                "cls_loss": round(cls_loss, 4),
                "box_loss": round(box_loss, 4),
                "val_ap50": round(ap50, 4),
                "val_ap": round(ap, 4),
                "phase": "all" if full else "heads",
            }
        )
        mark = ""
        if ap50 > best["ap50"]:
            best = {"ap50": ap50, "ap": ap, "epoch": epoch + 1}
            model.save(out / "model.keras")
            mark = "  (best: saved)"
        model.save_weights(ckpt)
        state_file.write_text(json.dumps({"epoch": epoch, "best": best}))
        _say(
            f"epoch {epoch + 1}/{epochs} [{'all layers' if full else 'heads only'}] loss {cls_loss + box_loss:.3f} "
            f"(class {cls_loss:.3f}, box {box_loss:.3f})  val AP@0.5 {ap50:.3f}  AP@.5:.95 {ap:.3f}  "
            f"{time.perf_counter() - t0:.0f} s{mark}"
        )
    log = out / "training.json"
    previous = json.loads(log.read_text())["history"] if log.exists() and start else []
    loss_after = clean_loss()
    _say(
        f"  loss on the unaugmented training photos: {loss_before:.3f} before, {loss_after:.3f} after"
    )
    clean = {"before": round(loss_before, 4), "after": round(loss_after, 4)}
    log.write_text(
        json.dumps(
            {"best": best, "history": previous + history, "seed": seed, "clean_loss": clean},
            indent=1,
        )
    )
    return {
        "best_ap50": best["ap50"],
        "best_epoch": best["epoch"],
        "parameters": int(model.count_params()),
    }
