"""doorstep's host side: quantize, evaluate, bundle and deploy detectors.

``host`` may import ``device`` (evaluation must run the device's own preprocessing and
decoding); ``device`` never imports ``host``.
"""

from device import __version__

__all__ = ["__version__"]
