"""A STAND-IN for picamera2 (no Raspberry Pi camera here, and picamera2 comes from Raspberry
Pi OS's apt, not PyPI). It mimics only the calls doorstep's adapter makes, with the same shapes:
``main`` as an RGB888 array (B, G, R in memory), ``lores`` as YUV420 of shape
(height * 3 / 2, stride) with each row padded to a 64-byte stride, or RGB888 on request.
Frames are made from a real photo. It records the calls, so tests can check the adapter's
lifecycle (configure before start, every request released, stop and close)."""

from __future__ import annotations

import sys
import threading
import time
import types
from typing import Any

import cv2
import numpy as np
from yuv import pad_i420


class StandInRequest:
    def __init__(self, cam: StandInPicamera2, n: int) -> None:
        self.cam, self.n = cam, n

    def make_array(self, name: str) -> np.ndarray:
        cfg = self.cam.config[name]
        w, h = cfg["size"]
        bgr = cv2.resize(self.cam.image, (w, h), interpolation=cv2.INTER_AREA)
        if cfg["format"] == "RGB888":
            return bgr
        stride = (w + 63) // 64 * 64
        return pad_i420(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420), w, h, stride)

    def get_metadata(self) -> dict[str, Any]:
        return {
            "SensorTimestamp": 1_000_000_000
            + self.n * int(1e9 / self.cam.config["controls"]["FrameRate"])
        }

    def release(self) -> None:
        self.cam.calls.append("release")


class StandInPicamera2:
    image: np.ndarray
    calls: list[str]
    fail_after: int | None = None  # capture_request raises after this many requests
    hang_after: int | None = None  # capture_request blocks after this many (a wedged camera)

    def __init__(self, camera_num: int = 0) -> None:
        self.config: dict[str, Any] = {}
        self.calls.append("init")
        self.n = 0

    def create_video_configuration(
        self, main: dict[str, Any], lores: dict[str, Any], controls: dict[str, Any]
    ) -> dict[str, Any]:
        return {"main": main, "lores": lores, "controls": controls}

    def configure(self, config: dict[str, Any]) -> None:
        self.config = config
        self.calls.append("configure")

    def start(self) -> None:
        assert self.config, "start() before configure()"
        self.calls.append("start")

    def capture_request(self) -> StandInRequest:
        self.calls.append("capture_request")
        if self.fail_after is not None and self.n >= self.fail_after:
            # what picamera2 raises when libcamera gives up on a dead sensor
            raise RuntimeError("Camera frontend has timed out!")
        if self.hang_after is not None and self.n >= self.hang_after:
            threading.Event().wait(600)  # a wedged camera: the request never completes
        self.n += 1
        time.sleep(1 / self.config["controls"]["FrameRate"])  # the sensor's frame interval
        return StandInRequest(self, self.n)

    def stop(self) -> None:
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")


def install(
    image: np.ndarray, fail_after: int | None = None, hang_after: int | None = None
) -> list[str]:
    """Put the stand-in into ``sys.modules['picamera2']``; return its call log. With
    ``fail_after`` / ``hang_after`` its camera dies / wedges after that many frames."""
    calls: list[str] = []
    attrs = {"image": image, "calls": calls, "fail_after": fail_after, "hang_after": hang_after}
    cls = type("Picamera2", (StandInPicamera2,), attrs)
    module = types.ModuleType("picamera2")
    module.Picamera2 = cls  # type: ignore[attr-defined]
    sys.modules["picamera2"] = module
    return calls
