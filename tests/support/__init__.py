"""Test harnesses that are not part of doorstep: nothing here is installed on a Pi or a host.

- ``loopback``: real sshd daemons on 127.0.0.1, one per simulated doorbell.
- ``doorbell``: the real ``doorstep-device run`` daemon behind each of them.
- ``bench_deploy``: how a deploy's time grows with the fleet, on those doorbells
  (``scripts/run bench`` runs it; ``python -m support.bench_deploy --help`` from ``tests/``).
- ``redbox``: a hand-built Keras detector, the quantization tests' subject.

Imported as ``support.<module>``: pytest puts ``tests/`` on ``sys.path`` (tests/conftest.py);
outside pytest, run with ``PYTHONPATH=tests``.
"""
