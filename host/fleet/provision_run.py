"""``doorstep-host provision``, carried out: the plan of :mod:`host.fleet.provision` over SSH.

Every step runs as root on the device (``sudo -n`` when the SSH user is not root). A step that
fails stops that device with the device's own words; nothing is left half-switched: the venv
is built beside the active one and the ``/opt/doorstep`` link changes only once it is complete,
so an interrupted run resumes, and a new install whose daemon fails the health gate is switched
back to the previous one (and that one restarted and checked again).
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from host.fleet.inventory import Device
from host.fleet.parallel import run_all
from host.fleet.plan import DaemonFacts
from host.fleet.progress import Progress, table
from host.fleet.provision import (
    RUN_USER,
    SERVICE,
    ProvisionFacts,
    ProvisionOptions,
    ProvisionPlan,
    deploy_user,
    parse_facts,
    plan_provision,
    probe_script,
    sha256_text,
    sudo_rule,
)
from host.fleet.remote import RemoteDoorstep
from host.fleet.ssh import CommandError, Connection, DeviceError, connect
from host.safe_text import printable

q = shlex.quote
CLEAN_ENV = ["env", "-u", "PYTHONPATH", "-u", "PYTHONHOME", "-u", "VIRTUAL_ENV"]
RUN_PATTERN = "doorstep-device run\\|device.cli run"  # the daemon's command line (grep BRE)


@dataclass
class ProvisionResult:
    name: str
    outcome: str = "not started"
    """provisioned | unchanged | rolled back | failed | refused | unreachable | planned"""
    detail: str = ""
    done: list[str] = field(default_factory=list)
    seconds: float = 0.0
    version: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("provisioned", "unchanged", "planned")

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.name,
            "outcome": self.outcome,
            "detail": self.detail,
            "steps": self.done,
            "seconds": round(self.seconds, 1),
            "version": self.version,
        }


class StepError(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason


class DeviceProvision:
    """One device: probe, plan, apply, health gate, and the rollback of a failed upgrade."""

    def __init__(
        self, device: Device, conn: Connection, options: ProvisionOptions, progress: Progress
    ) -> None:
        self.device, self.conn, self.o, self.progress = device, conn, options, progress
        self.remote = RemoteDoorstep(conn, device)
        self.facts = ProvisionFacts()
        self.sudo: list[str] = []

    async def probe(self) -> ProvisionFacts:
        out = await self.conn.run(
            [*CLEAN_ENV, "sh", "-c", probe_script(self.o, self.device)], timeout=120
        )
        self.facts = parse_facts(out.stdout)
        self.sudo = [] if self.facts.login_uid == 0 else ["sudo", "-n"]
        return self.facts

    async def root(
        self, script: str, what: str, timeout: float = 300.0, stdin: str | None = None
    ) -> str:
        """Run ``script`` (sh) as root; a failure is a :class:`StepError` for ``what``."""
        # No PYTHONPATH or venv of the login's environment may steer the Python run as root.
        argv = [*self.sudo, *CLEAN_ENV]
        try:
            result = await self.conn.run([*argv, "sh", "-c", script], timeout=timeout, input=stdin)
        except CommandError as exc:
            raise StepError(what, exc.reason) from None
        return result.stdout

    def _user_flags(self) -> str:
        return "" if self.o.prefix == PurePosixPath("/") else f"--prefix {q(str(self.o.prefix))} "

    async def apply(self, plan: ProvisionPlan, result: ProvisionResult) -> None:
        before = await self.remote.daemon()
        kinds = {s.kind for s in plan.steps}
        switched = False
        for step in plan.steps:
            self.progress.phase(self.device.name, step.kind, step.detail[:60])
            if step.kind == "apt":
                await self.root(
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                    + " ".join(q(n) for n in step.names),
                    "apt",
                    timeout=1800,
                )
            elif step.kind == "groups":
                await self.root(
                    " && ".join(
                        f"groupadd {self._user_flags()}--system {q(g)}" for g in step.names
                    ),
                    "groups",
                )
            elif step.kind == "user":
                flags = self._user_flags()
                if self.facts.user:
                    script = f"usermod {flags}-aG video,i2c {RUN_USER}"
                else:
                    script = (
                        f"useradd {flags}--system --user-group --no-create-home "
                        f"--shell /usr/sbin/nologin --groups video,i2c {RUN_USER}"
                    )
                await self.root(script, "user")
            elif step.kind == "deploy-user":
                who = deploy_user(self.o, self.facts)
                assert who is not None
                await self.root(
                    f"usermod {self._user_flags()}-aG {RUN_USER} {q(who)}", "deploy-user"
                )
            elif step.kind == "venv":
                await self._venv()
            elif step.kind == "switch":
                await self._switch()
                switched = True
            elif step.kind == "config":
                await self._config()
            elif step.kind == "sudo-rule":
                await self._sudo_rule()
            elif step.kind == "unit":
                if await self._unit():
                    result.done.append("unit")
                continue
            elif step.kind == "service":
                await self._service(before)
            elif step.kind == "health":
                await self._health(before, plan, result, switched, restarted="service" in kinds)
                continue
            result.done.append(step.kind)

    # ------------------------------------------------------------------------------ steps

    async def _venv(self) -> None:
        o = self.o
        venv = str(o.venv)
        if self.facts.new_venv_complete:
            return  # built by an earlier run that stopped before the switch
        staged = str(o.staging / o.wheel.path.name)
        await self.root(f"install -d -m 0755 {q(str(o.staging))} {q(str(o.venvs))}", "venv")
        upload = f"{await self._home()}/.doorstep-provision-{o.wheel.path.name}"
        self.progress.phase(self.device.name, "uploading", o.wheel.path.name)
        try:
            sent = await self.conn.upload(
                o.wheel.path,
                upload,
                progress=lambda done, total: self.progress.transfer(self.device.name, done, total),
            )
        except DeviceError as exc:
            raise StepError("venv", exc.reason) from None
        # Checked once root's copy exists: nothing the login user can still change.
        await self.root(
            f"install -m 0644 {q(sent.part)} {q(staged)} && rm -f {q(sent.part)} && "
            f"echo {q(o.wheel.sha256 + '  ' + staged)} | sha256sum -c --quiet -",
            "venv (the uploaded wheel's sha256)",
        )
        pip = ["--quiet", "--disable-pip-version-check"]
        if o.no_index:
            pip.append("--no-index")
        if o.find_links:
            pip += ["--find-links", o.find_links]
        self.progress.phase(self.device.name, "venv", f"pip install {o.wheel.path.name}")
        await self.root(
            f"rm -rf {q(venv)} && {q(self.facts.python or o.python)} -m venv "
            f"--system-site-packages {q(venv)} && "
            f"{q(venv)}/bin/pip install {' '.join(q(a) for a in pip)} {q(staged + '[device]')} && "
            f"{q(venv)}/bin/doorstep-device --version && "
            f"echo {q(f'{o.wheel.sha256} {o.wheel.version}')} > {q(venv)}/.doorstep-wheel",
            "venv",
            timeout=1800,
        )

    async def _home(self) -> str:
        out = await self.conn.run('printf %s "$HOME"', timeout=30)
        home = out.stdout.strip()
        if not home.startswith("/"):
            raise StepError("venv", "the SSH user has no home directory to upload into")
        return home

    async def _switch(self) -> None:
        o = self.o
        link, previous, venv = q(str(o.link)), q(str(o.previous)), q(str(o.venv))
        script = [f"cd {q(str(o.link.parent))}"]
        if self.facts.link_is_dir:  # installed by hand: moved once, never again
            keep = q(str(o.venvs / f"by-hand-{int(self.facts.now)}"))
            script += [f"mv -T {link} {keep}", f"ln -sfn {keep} {previous}.tmp"]
            script.append(f"mv -T {previous}.tmp {previous}")
        elif self.facts.link and self.facts.link != str(o.venv):
            script += [
                f"ln -sfn {q(self.facts.link)} {previous}.tmp",
                f"mv -T {previous}.tmp {previous}",
            ]
        script += [f"ln -sfn {venv} {link}.tmp", f"mv -T {link}.tmp {link}"]
        await self.root(" && ".join(script), "switch")

    async def _config(self) -> None:
        o, d = self.o, self.device
        args = [
            f"{o.link}/bin/doorstep-device", "init", "--config", str(o.config),
            "--device-id", d.device_id, "--state-dir", str(d.state_dir),
        ]  # fmt: skip
        if o.broker:
            args += ["--broker", o.broker]
        if o.source:
            args += ["--source", o.source]
        if o.reconfigure:
            args.append("--force")
        script = []
        if o.signing_key is not None:
            key = o.keys_dir / o.signing_key.name
            home = await self._home()
            upload = f"{home}/.doorstep-provision-{o.signing_key.name}"
            try:
                sent = await self.conn.upload(o.signing_key, upload, resume=False)
            except DeviceError as exc:
                raise StepError("config", exc.reason) from None
            digest = hashlib.sha256(o.signing_key.read_bytes()).hexdigest()
            script.append(
                f"install -D -m 0644 {q(sent.part)} {q(str(key))} && rm -f {q(sent.part)} && "
                f"echo {q(digest + '  ' + str(key))} | sha256sum -c --quiet -"
            )
            args += ["--public-key", str(key)]
        script.append(shlex.join(args))
        await self.root(" && ".join(script), "config")

    async def _sudo_rule(self) -> None:
        who = deploy_user(self.o, self.facts)
        assert who is not None
        final = self.o.sudoers
        # A name with a dot is ignored by sudo: the rule is not live until checked and renamed.
        script = (
            f"install -d -m 0750 {q(str(final.parent))} && "
            f't=$(mktemp {q(str(final.parent))}/.doorstep.XXXXXX) && cat > "$t" && '
            f'if visudo -cqf "$t"; then chmod 0440 "$t" && mv -f "$t" {q(str(final))}; '
            f"else rm -f \"$t\"; echo 'visudo -c refused the rule' >&2; exit 1; fi"
        )
        await self.root(script, "sudo-rule", stdin=sudo_rule(who))

    async def _unit(self) -> bool:
        """Write the unit if it differs from what the installed doorstep renders; verify it."""
        o, d = self.o, self.device
        render = [
            f"{o.link}/bin/doorstep-device", "unit", "--venv", str(o.link),
            "--config", str(o.config), "--state-dir", str(d.state_dir),
        ]  # fmt: skip
        text = await self.root(shlex.join(render) + " 2>/dev/null", "unit")
        changed = sha256_text(text) != self.facts.unit_sha
        if changed:
            await self.root(
                shlex.join([*render, "--write", str(o.unit_dir), "--force"]) + " >/dev/null", "unit"
            )
        if self.facts.systemd_analyze:
            await self.root(
                f"systemd-analyze verify {q(str(o.unit))}", "unit (systemd-analyze verify)"
            )
        if self.o.service == "systemd":
            await self.root(f"systemctl daemon-reload && systemctl enable {SERVICE}", "unit")
        return changed

    async def _service(self, before: DaemonFacts | None) -> None:
        o, d = self.o, self.device
        if o.service == "systemd":
            await self.root(f"systemctl restart {SERVICE}", "service", timeout=180)
            return
        # Detached (no systemd): stop the daemon the record names, if it is ours, then start.
        state = str(d.state_dir)
        script = []
        if before is not None and before.pid is not None and before.state == "running":
            pid = int(before.pid)
            ours = f"tr '\\0' ' ' < /proc/{pid}/cmdline 2>/dev/null | grep -q '{RUN_PATTERN}'"
            wait = (
                f"i=0; while [ -e /proc/{pid} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"
            )
            script.append(f"if {ours}; then kill -TERM {pid}; {wait}; fi")
        run = shlex.join(
            [
                f"{o.link}/bin/doorstep-device",
                "run",
                "--config",
                str(o.config),
                "--state-dir",
                state,
            ]
        )
        script.append(
            f"mkdir -p {q(state)} && cd / && (setsid nohup {run} >> {q(state + '/detached.log')} 2>&1 < /dev/null &)"
        )
        await self.root("; ".join(script), "service", timeout=120)

    async def _health(
        self,
        before: DaemonFacts | None,
        plan: ProvisionPlan,
        result: ProvisionResult,
        switched: bool,
        restarted: bool,
    ) -> None:
        self.progress.phase(self.device.name, "health check")
        why = await self._wait_healthy(before, restarted, self.o.health_deadline)
        if why is None and self.o.health_over_mqtt:
            why = await self._wait_mqtt(self.facts.now - 1.0, self.o.health_deadline)
        if why is None:
            return
        if not switched or not (plan.facts.link or plan.facts.link_is_dir):
            raise StepError("health", why)
        self.progress.phase(self.device.name, "rolling back", why[:60])
        o = self.o
        script = (
            f"cd {q(str(o.link.parent))} && t=$(readlink {q(str(o.previous))}) && "
            f'ln -sfn "$t" {q(str(o.link))}.tmp && mv -T {q(str(o.link))}.tmp {q(str(o.link))}'
        )
        await self.root(script, "rollback")
        failed = await self.remote.daemon()
        await self._service(failed)
        again = await self._wait_healthy(failed, True, self.o.health_deadline)
        result.outcome = "rolled back"
        result.detail = f"the new install failed its health gate ({why}); " + (
            "the previous one serves again"
            if again is None
            else f"and the previous one too: {again}"
        )

    async def _wait_healthy(
        self, before: DaemonFacts | None, restarted: bool, deadline: float
    ) -> str | None:
        """None once the daemon runs (a new process if it was restarted) with a passing
        self-test; else why not, when ``deadline`` seconds have passed."""
        end = time.monotonic() + deadline
        while True:
            now = await self.remote.daemon()
            why = _unhealthy(before, now, restarted)
            if why is None or time.monotonic() >= end:
                return why
            self.progress.phase(self.device.name, "health check", why[:60])
            await asyncio.sleep(1.0)

    async def _wait_mqtt(self, since: float, deadline: float) -> str | None:
        """None once the broker holds the device's availability ``online`` and a state with a
        passing self-test written at or after ``since`` (device clock); else why not."""
        from device.alerts.mqtt import BrokerSettings
        from device.errors import DoorstepError
        from host.fleet.status import status_over_mqtt

        assert self.o.broker is not None
        broker = BrokerSettings(self.o.broker, discovery_prefix=None)
        end = time.monotonic() + deadline
        while True:
            self.progress.phase(self.device.name, "health check", f"over MQTT ({broker.url})")
            try:
                (row,) = await asyncio.to_thread(status_over_mqtt, [self.device], broker)
                why = None
                if not row.reachable:
                    why = f"not online on {broker.url} ({row.detail})"
                elif "self-test ok" not in row.daemon:
                    why = f"on {broker.url}: {row.daemon}"
                elif row.last_seen is None or row.last_seen < since:
                    why = f"on {broker.url}: no state published since provisioning started"
            except DoorstepError as exc:
                why = f"{broker.url}: {exc}"
            if why is None or time.monotonic() >= end:
                return why
            await asyncio.sleep(1.0)


def _unhealthy(before: DaemonFacts | None, now: DaemonFacts | None, restarted: bool) -> str | None:
    if now is None:
        return "the daemon has written no record yet"
    if now.error:
        return now.error
    if now.state != "running":
        return f"the daemon is {now.state}"
    if restarted and before is not None and before.pid == now.pid and before.state == "running":
        return "the old daemon is still running"
    if now.self_test_ok is not True:
        return f"self-test not passed ({now.self_test_error or 'pending'})"
    return None


# ------------------------------------------------------------------------------------ fleet


@dataclass
class ProvisionReport:
    plans: dict[str, ProvisionPlan]
    results: dict[str, ProvisionResult]
    dry_run: bool

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())

    def plan_text(self) -> str:
        return "\n".join(p.text() for p in self.plans.values())

    def summary(self) -> str:
        rows = [
            [printable(r.name), r.outcome, r.version or "-", f"{r.seconds:.0f} s",
             ", ".join(r.done) or "-", printable(r.detail)]
            for r in self.results.values()
        ]  # fmt: skip
        return table(["device", "outcome", "version", "time", "changed", "detail"], rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "devices": [r.to_json() for r in self.results.values()],
            "plans": {
                name: {
                    "refusal": p.refusal,
                    "steps": [{"kind": s.kind, "detail": s.detail} for s in p.steps],
                    "notes": list(p.notes),
                }
                for name, p in self.plans.items()
            },
        }


async def provision(
    devices: Sequence[Device],
    options: ProvisionOptions,
    progress: Progress,
    *,
    dry_run: bool = False,
    parallel: int = 10,
) -> ProvisionReport:
    """Probe, plan and (unless ``dry_run``) provision every device, ``parallel`` at once."""
    plans: dict[str, ProvisionPlan] = {}
    results: dict[str, ProvisionResult] = {}
    progress.start([d.name for d in devices])

    async def one(device: Device) -> None:
        result = results[device.name] = ProvisionResult(device.name)
        mine = options.for_device(device.name)
        started = time.monotonic()
        progress.phase(device.name, "connecting")
        try:
            async with connect(device, connect_timeout=device.connect_timeout) as conn:
                run = DeviceProvision(device, conn, mine, progress)
                progress.phase(device.name, "gathering facts")
                facts = await run.probe()
                plan = plans[device.name] = plan_provision(device, facts, mine)
                if plan.refusal:
                    result.outcome, result.detail = "refused", plan.refusal
                elif dry_run:
                    result.outcome = "planned"
                    result.detail = f"{len(plan.changes)} change(s)"
                else:
                    await run.apply(plan, result)
                    if result.outcome == "not started":
                        result.outcome = "provisioned" if result.done else "unchanged"
                    result.version = (await run.probe()).installed_version
        except StepError as exc:
            result.outcome, result.detail = "failed", f"{exc.step}: {exc.reason}"
        except DeviceError as exc:
            if device.name not in plans:
                result.outcome, result.detail = "unreachable", exc.reason
                plans[device.name] = ProvisionPlan(
                    device, ProvisionFacts(reachable=False, error=exc.reason), refusal=exc.reason
                )
            else:
                result.outcome, result.detail = "failed", exc.reason
        result.seconds = time.monotonic() - started
        progress.phase(device.name, result.outcome, result.detail[:60])

    await run_all(devices, one, limit=parallel)
    progress.close()
    order = [d.name for d in devices]
    return ProvisionReport(
        {n: plans[n] for n in order if n in plans}, {n: results[n] for n in order}, dry_run
    )
