"""The model bundle: the contract between host and device (see ``manifest.py``)."""

from device.bundle.manifest import Manifest
from device.bundle.store import Bundle, load_bundle, pack_bundle, write_bundle

__all__ = ["Bundle", "Manifest", "load_bundle", "pack_bundle", "write_bundle"]
