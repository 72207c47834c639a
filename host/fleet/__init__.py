"""Fleet deploy: push a signed bundle to many doorbells over SSH, check it, roll it back.

Facts in, steps out, run by a connector (as pyinfra does):

- ``inventory``: ``fleet.yaml`` (or an Ansible inventory) -> devices and the rollout policy.
- ``facts``: ``doorstep-device status --json`` -> facts; the health verdict. Pure.
- ``plan``: facts + bundle -> steps; rollout waves; the dry-run text. Pure.
- ``ssh``: the SSH connector (asyncssh, host keys always checked, uploads that resume).
- ``remote``: the ``doorstep-device`` commands of one device, over a connection.
- ``executor``: runs one device's steps, with the health gate and rollback.
- ``deploy``: the whole rollout (and ``rollback``); ``status``: what each device runs.
- ``progress``: the live per-device view and the tables; ``commands``: the CLI commands.
The loopback fleet the tests and the deploy benchmark run on (real sshd + daemon doorbells on
this machine) is test support, not shipped: ``tests/support/``.

Nothing is re-exported here, so the pure parts import without asyncssh.
"""
