"""The embedded demo input: a *synthetic* doorstep where a parcel appears, stays, and is taken.

No photo may ship with doorstep, so the demo renders its own frames: a wall, a door, a step and
a mat in perspective, daylight that drifts from frame to frame, sensor noise, and a cardboard
box (three shaded faces, a tape strip, a shipping label with a barcode). Everything is drawn
with OpenCV from a seed, so the frames are the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

W, H = 640, 480


@dataclass(frozen=True)
class DemoFrame:
    index: int
    image: np.ndarray
    parcel: tuple[int, int, int, int] | None  # xyxy of the drawn box, None when absent


def _scene(rng: np.random.Generator, vary: bool = False) -> np.ndarray:
    """A doorstep; ``vary`` moves and recolours door, step and mat (training negatives)."""
    img = np.zeros((H, W, 3), np.float32)
    wall = np.array([150, 170, 185], np.float32) + rng.normal(0, 8 if not vary else 30, 3)
    img[:] = np.clip(wall, 40, 230)
    img[: H * 2 // 3] *= np.linspace(0.9, 1.05, H * 2 // 3)[:, None, None]  # soft light from above
    dx = int(rng.integers(-180, 180)) if vary else 0
    door = (np.array([60, 80, 150]) + (rng.normal(0, 40, 3) if vary else 0)).clip(20, 230).tolist()
    floor_y = 330 + (int(rng.integers(-30, 40)) if vary else 0)
    cv2.rectangle(img, (230 + dx, 40), (430 + dx, floor_y), (70, 60, 120), -1)  # door frame
    cv2.rectangle(img, (245 + dx, 55), (415 + dx, floor_y), door, -1)  # door
    for y in (80, 190):
        cv2.rectangle(img, (265 + dx, y), (395 + dx, y + 90), [c * 0.9 for c in door], 3)  # panels
    cv2.circle(img, (400 + dx, 200), 7, (40, 170, 200), -1)  # knob
    ground = (
        (np.array([120, 125, 130]) + (rng.normal(0, 25, 3) if vary else 0)).clip(30, 220).tolist()
    )
    floor = np.array([[0, floor_y], [W, floor_y], [W, H], [0, H]], np.int32)
    cv2.fillConvexPoly(img, floor, ground)
    step = np.array(
        [
            [150 + dx, floor_y],
            [510 + dx, floor_y],
            [560 + dx, floor_y + 42],
            [100 + dx, floor_y + 42],
        ],
        np.int32,
    )
    cv2.fillConvexPoly(img, step, [min(255, c + 30) for c in ground])
    mat = np.array(
        [
            [250 + dx, floor_y + 10],
            [410 + dx, floor_y + 10],
            [425 + dx, floor_y + 35],
            [235 + dx, floor_y + 35],
        ],
        np.int32,
    )
    cv2.fillConvexPoly(img, mat, (50, 70, 90))
    for x in range(0, W, 48):  # paving joints
        cv2.line(img, (x, floor_y + 42), (x + (x - W // 2) // 3, H), [c * 0.85 for c in ground], 2)
    return img


def render_negatives(count: int, seed: int = 1000) -> list[np.ndarray]:
    """Parcel-free doorsteps in varied layouts and light (never the demo's seed or layout)."""
    out = []
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        img = _scene(rng, vary=True) * rng.uniform(0.4, 1.2) + rng.normal(0, 5, (H, W, 3))
        out.append(cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0.6))
    return out


def _parcel(
    img: np.ndarray, rng: np.random.Generator, x: int, y: int, w: int, h: int, depth: int
) -> tuple[int, int, int, int]:
    base = np.array([95, 145, 195], np.float32) + rng.normal(0, 6, 3)  # cardboard (BGR)
    front = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.int32)
    top = np.array(
        [[x, y], [x + w, y], [x + w + depth, y - depth], [x + depth, y - depth]], np.int32
    )
    side = np.array(
        [[x + w, y], [x + w + depth, y - depth], [x + w + depth, y + h - depth], [x + w, y + h]],
        np.int32,
    )
    cv2.fillConvexPoly(img, front, base.tolist())
    cv2.fillConvexPoly(img, top, (base * 1.18).clip(0, 255).tolist())
    cv2.fillConvexPoly(img, side, (base * 0.72).tolist())
    tape = np.array(
        [
            [x + w // 2 - 9, y],
            [x + w // 2 + 9, y],
            [x + w // 2 + 9 + depth, y - depth],
            [x + w // 2 - 9 + depth, y - depth],
        ],
        np.int32,
    )
    cv2.fillConvexPoly(img, tape, (base * 1.3).clip(0, 255).tolist())
    cv2.rectangle(
        img,
        (x + w // 2 - 9, y),
        (x + w // 2 + 9, y + h // 3),
        (base * 1.25).clip(0, 255).tolist(),
        -1,
    )
    lx, ly = x + w // 8, y + h // 2
    cv2.rectangle(img, (lx, ly), (lx + w // 3, ly + h // 3), (235, 238, 240), -1)  # label
    for i in range(12):  # barcode
        bx = lx + 4 + i * max(1, (w // 3 - 8) // 12)
        cv2.line(
            img, (bx, ly + h // 6), (bx, ly + h // 3 - 4), (30, 30, 30), 1 + int(rng.integers(0, 2))
        )
    for i in range(2):
        cv2.line(img, (lx + 4, ly + 6 + 6 * i), (lx + w // 3 - 6, ly + 6 + 6 * i), (80, 80, 80), 1)
    cv2.line(img, (x, y + h), (x + w, y + h), (60, 80, 100), 2)  # contact shadow
    return x, y - depth, x + w + depth, y + h


def render_demo(
    frames: int = 30, arrive: int = 8, leave: int = 22, seed: int = 7
) -> list[DemoFrame]:
    """``frames`` frames; the parcel is there from ``arrive`` until just before ``leave``."""
    rng = np.random.default_rng(seed)
    scene = _scene(rng)
    out = []
    for i in range(frames):
        img = scene.copy()
        box = None
        if arrive <= i < leave:
            box = _parcel(img, np.random.default_rng(seed + 1), 170, 300, 150, 80, 28)
        light = 1.0 + 0.06 * np.sin(i / 5.0)
        img = img * light + rng.normal(0, 4, img.shape)
        img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0.6)
        out.append(DemoFrame(i, img, box))
    return out


def write_frames(frames: list[DemoFrame], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in frames:
        path = folder / f"frame_{f.index:03d}.png"
        cv2.imwrite(str(path), f.image)
        paths.append(path)
    return paths
