"""The model bundle: the contract between host and device (see ``manifest.py``).

Import what you need from the submodules (``store``, ``manifest``, ``signing``, ``build``);
nothing is imported here, so the light commands (``doorstep-device status``) stay light.
"""
