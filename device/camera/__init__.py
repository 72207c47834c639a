"""Frame sources, one module per kind, chosen by the config's ``type``.

File and folder sources deliver every frame in order, stamped by their frame rate, so a replay
gives the same events however fast the machine is; live sources capture in their own thread into
a latest-frame slot, so inference never works on a stale frame, and count what they drop.
"""

from device.camera.base import Frame, FrameSource, LatestSlot

__all__ = ["Frame", "FrameSource", "LatestSlot"]
