"""doorstep's device side: everything that runs on the doorbell.

Nothing in this package imports TensorFlow, Keras or ``host``: a Raspberry Pi installs
``doorstep[device]`` only (``tests/test_import_boundary.py`` enforces it).
"""

__version__ = "0.1.0"
