"""``doorstep-host provision``: a Pi reachable over SSH to a running doorbell. Facts and plan.

Facts in, steps out, as for ``deploy``: :data:`PROBE` is one POSIX shell script that reads what
is there (OS, Python, free space, picamera2, the doorstep user and groups, the install, the
config, the unit, the sudo rule, the service) and prints ``key=value`` lines;
:func:`parse_facts` makes them :class:`ProvisionFacts`; :func:`plan_provision` turns facts and
:class:`ProvisionOptions` into the steps still needed, each skipped when already true (pure:
no I/O). :mod:`host.fleet.provision_run` carries them out over SSH.

The install layout keeps an upgrade reversible: every wheel gets its own venv,
``<prefix>/opt/doorstep-venvs/<version>-<sha12>``, and ``<prefix>/opt/doorstep`` (what the
unit runs) is a symlink switched atomically to it; ``<prefix>/opt/doorstep.previous`` points at
the one before, which a failed health gate switches back to. A venv cannot be moved (its
scripts name their interpreter by absolute path), so none ever is. A ``/opt/doorstep`` that is a
plain directory (installed by hand, as the README shows) is moved into ``doorstep-venvs/`` once:
its scripts still name ``/opt/doorstep/bin/python``, which resolves through the link whenever
it is the active one again.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

from device.errors import DoorstepError
from host.fleet.inventory import Device

SERVICE = "doorstep-device"
RUN_USER = "doorstep"
MIN_PYTHON = (3, 11)
ROOT = PurePosixPath("/")
MIN_FREE_MB = 500  # a venv with OpenCV, numpy and the runtime takes ~300 MB
ServiceMode = Literal["systemd", "detached"]
_WHEEL = re.compile(r"^doorstep-(?P<version>[0-9][0-9A-Za-z.+]*)-py3-none-any\.whl$")


@dataclass(frozen=True)
class Wheel:
    """The device wheel being installed (built by ``scripts/run wheel``)."""

    path: Path
    version: str
    sha256: str

    @classmethod
    def read(cls, path: str | Path) -> Wheel:
        path = Path(path)
        match = _WHEEL.match(path.name)
        if match is None:
            raise DoorstepError(
                f"{path}: not a doorstep wheel (expected doorstep-VERSION-py3-none-any.whl, "
                "from `scripts/run wheel`)"
            )
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise DoorstepError(f"{path}: cannot read the wheel: {exc.strerror}") from None
        return cls(path, match.group("version"), digest)

    @property
    def tag(self) -> str:
        """``<version>-<sha12>``: the name of its venv."""
        return f"{self.version}-{self.sha256[:12]}"


@dataclass(frozen=True)
class ProvisionOptions:
    wheel: Wheel
    prefix: PurePosixPath = ROOT
    """a root the paths below live under (tests: a temp root); / on a real Pi"""
    python: str = "python3"
    """the device's interpreter the venv is made from"""
    broker: str | None = None
    source: str | None = None
    signing_key: Path | None = None
    deploy_user: str | None = None
    """the user `deploy` logs in as: doorstep group and the sudo rule (default: the SSH user)"""
    find_links: str | None = None
    no_index: bool = False
    service: ServiceMode = "systemd"
    reconfigure: bool = False
    health_deadline: float = 120.0
    health_over_mqtt: bool = False
    """also require, on ``broker`` as seen from the host, the device's retained availability
    ``online`` and a state with a passing self-test published since provisioning started"""

    def for_device(self, name: str) -> ProvisionOptions:
        """These options for device ``name``: ``{name}`` in the prefix becomes it."""
        if "{name}" not in str(self.prefix):
            return self
        return replace(self, prefix=PurePosixPath(str(self.prefix).replace("{name}", name)))

    def path(self, *parts: str) -> PurePosixPath:
        return self.prefix.joinpath(*parts)

    @property
    def link(self) -> PurePosixPath:
        return self.path("opt", "doorstep")

    @property
    def previous(self) -> PurePosixPath:
        return self.path("opt", "doorstep.previous")

    @property
    def venvs(self) -> PurePosixPath:
        return self.path("opt", "doorstep-venvs")

    @property
    def venv(self) -> PurePosixPath:
        return self.venvs / self.wheel.tag

    @property
    def config(self) -> PurePosixPath:
        return self.path("etc", "doorstep", "device.yaml")

    @property
    def keys_dir(self) -> PurePosixPath:
        return self.path("etc", "doorstep", "keys")

    @property
    def unit_dir(self) -> PurePosixPath:
        return self.path("etc", "systemd", "system")

    @property
    def unit(self) -> PurePosixPath:
        return self.unit_dir / f"{SERVICE}.service"

    @property
    def sudoers(self) -> PurePosixPath:
        return self.path("etc", "sudoers.d", "doorstep")

    @property
    def staging(self) -> PurePosixPath:
        return self.path("var", "cache", "doorstep-provision")

    @property
    def wants_picamera2(self) -> bool:
        return self.source in (None, "picamera2")


def sudo_rule(user: str) -> str:
    """The one command a deploy user may run as root (what ``activate`` needs)."""
    return (
        "# written by doorstep-host provision: the deploy user may reload the daemon, nothing "
        "else\n"
        f"{user} ALL=(root) NOPASSWD: /usr/bin/systemctl reload {SERVICE}\n"
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------ facts


def probe_script(options: ProvisionOptions, device: Device) -> str:
    """The POSIX shell script that prints the facts as ``key=value`` lines (read-only)."""
    q = shlex.quote
    o = options
    state = q(str(device.state_dir))
    return f"""
P={q(str(o.prefix))}
PY={q(o.python)}
echo "now=$(date +%s)"
echo "login_uid=$(id -u)"
echo "login_user=$(id -un)"
echo "arch=$(uname -m)"
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os=$PRETTY_NAME"; echo "os_codename=$VERSION_CODENAME"; fi
if command -v "$PY" >/dev/null 2>&1; then
  echo "python=$(command -v "$PY")"
  echo "python_version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
  "$PY" -c 'import ensurepip, venv' 2>/dev/null && echo venv=yes
  "$PY" -c 'import picamera2' 2>/dev/null && echo picamera2=yes
fi
ls /dev/media* >/dev/null 2>&1 && echo camera_nodes=yes
d="$P"; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
echo "free_kb=$(df -Pk "$d" | awk 'NR==2 {{print $4}}')"
[ "$(id -u)" = 0 ] && echo root_ok=yes || {{ sudo -n true 2>/dev/null && echo root_ok=yes; }}
command -v systemctl >/dev/null 2>&1 && echo systemctl=yes
command -v systemd-analyze >/dev/null 2>&1 && echo systemd_analyze=yes
command -v visudo >/dev/null 2>&1 && echo visudo=yes
command -v apt-get >/dev/null 2>&1 && echo apt=yes
L={q(str(o.link))}
[ -L "$L" ] && echo "link=$(readlink "$L")"
[ -d "$L" ] && [ ! -L "$L" ] && echo link_is_dir=yes
[ -L {q(str(o.previous))} ] && echo "previous=$(readlink {q(str(o.previous))})"
[ -f "$L/.doorstep-wheel" ] && echo "installed=$(head -c 200 "$L/.doorstep-wheel")"
[ -x "$L/bin/doorstep-device" ] && echo "installed_version=$("$L/bin/doorstep-device" --version 2>/dev/null)"
[ -f {q(str(o.venv))}/.doorstep-wheel ] && echo new_venv_complete=yes
grep -q '^{RUN_USER}:' "$P/etc/passwd" 2>/dev/null && echo user=yes
for g in video i2c {RUN_USER}; do
  line=$(grep "^$g:" "$P/etc/group" 2>/dev/null) && echo "group_$g=${{line##*:}}"
done
[ -f {q(str(o.config))} ] && echo config=yes
for f in unit:{q(str(o.unit))} sudoers:{q(str(o.sudoers))}; do
  name=${{f%%:*}}; path=${{f#*:}}
  [ -f "$path" ] && echo "${{name}}_sha=$(sha256sum "$path" | cut -c1-64)"
done
if command -v systemctl >/dev/null 2>&1; then
  echo "service_active=$(systemctl is-active {SERVICE} 2>/dev/null)"
  echo "service_enabled=$(systemctl is-enabled {SERVICE} 2>/dev/null)"
fi
[ -f {state}/daemon.json ] && "$PY" - {state}/daemon.json <<'PYEOF' 2>/dev/null
import json, os, sys
record = json.load(open(sys.argv[1]))
pid = record.get("pid")
alive = record.get("state") == "running" and isinstance(pid, int) and os.path.exists(f"/proc/{{pid}}")
print("daemon_alive=yes" if alive else "daemon_alive=no")
PYEOF
exit 0
"""


@dataclass(frozen=True)
class ProvisionFacts:
    """What the probe found on one device (only what the planner needs)."""

    reachable: bool = True
    error: str | None = None
    now: float = 0.0
    login_uid: int = -1
    login_user: str = ""
    arch: str = ""
    os: str = ""
    os_codename: str = ""
    python: str | None = None
    python_version: tuple[int, int] | None = None
    venv: bool = False
    picamera2: bool = False
    camera_nodes: bool = False
    free_mb: float = 0.0
    root_ok: bool = False
    systemctl: bool = False
    systemd_analyze: bool = False
    visudo: bool = False
    apt: bool = False
    link: str | None = None
    link_is_dir: bool = False
    previous: str | None = None
    installed_sha256: str | None = None
    installed_version: str | None = None
    new_venv_complete: bool = False
    user: bool = False
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """group name -> members, for the groups that exist (video, i2c, doorstep)"""
    config: bool = False
    unit_sha: str | None = None
    sudoers_sha: str | None = None
    service_active: str | None = None
    service_enabled: str | None = None
    daemon_alive: bool = False

    def member(self, user: str, group: str) -> bool:
        return user in self.groups.get(group, ())


def parse_facts(text: str) -> ProvisionFacts:
    """The probe's ``key=value`` lines (unknown keys ignored, malformed values refused)."""
    kv: dict[str, str] = {}
    for line in text.splitlines()[:200]:
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[a-z0-9_]{1,32}", key):
            kv[key] = value.strip()[:500]
    flag = {k for k, v in kv.items() if v == "yes"}
    version = None
    if m := re.fullmatch(r"(\d+)\.(\d+)", kv.get("python_version", "")):
        version = (int(m.group(1)), int(m.group(2)))
    installed = kv.get("installed", "").split()
    groups = {
        name: tuple(m for m in kv[f"group_{name}"].split(",") if m)
        for name in ("video", "i2c", RUN_USER)
        if f"group_{name}" in kv
    }
    try:
        free_mb = int(kv.get("free_kb", "0") or 0) / 1024
        now = float(kv.get("now", "0") or 0)
        uid = int(kv.get("login_uid", "-1") or -1)
    except ValueError as exc:
        return ProvisionFacts(error=f"the device's facts do not parse: {exc}")
    sha = installed[0] if installed and re.fullmatch(r"[0-9a-f]{64}", installed[0]) else None
    return ProvisionFacts(
        now=now,
        login_uid=uid,
        login_user=kv.get("login_user", ""),
        arch=kv.get("arch", ""),
        os=kv.get("os", ""),
        os_codename=kv.get("os_codename", ""),
        python=kv.get("python") or None,
        python_version=version,
        venv="venv" in flag,
        picamera2="picamera2" in flag,
        camera_nodes="camera_nodes" in flag,
        free_mb=free_mb,
        root_ok="root_ok" in flag,
        systemctl="systemctl" in flag,
        systemd_analyze="systemd_analyze" in flag,
        visudo="visudo" in flag,
        apt="apt" in flag,
        link=kv.get("link") or None,
        link_is_dir="link_is_dir" in flag,
        previous=kv.get("previous") or None,
        installed_sha256=sha,
        installed_version=kv.get("installed_version", "").removeprefix("doorstep ") or None,
        new_venv_complete="new_venv_complete" in flag,
        user="user" in flag,
        groups=groups,
        config="config" in flag,
        unit_sha=kv.get("unit_sha") or None,
        sudoers_sha=kv.get("sudoers_sha") or None,
        service_active=kv.get("service_active") or None,
        service_enabled=kv.get("service_enabled") or None,
        daemon_alive="daemon_alive" in flag,
    )


# ------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PStep:
    """One provisioning step: ``kind`` names it, ``detail`` says what it will do, ``names``
    are what it acts on (the apt packages, the groups)."""

    kind: Literal[
        "apt", "groups", "user", "deploy-user", "venv", "switch", "config", "sudo-rule", "unit",
        "service", "health",
    ]  # fmt: skip
    detail: str
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.kind:<12} {self.detail}"


@dataclass(frozen=True)
class ProvisionPlan:
    device: Device
    facts: ProvisionFacts
    steps: tuple[PStep, ...] = ()
    refusal: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def changes(self) -> tuple[PStep, ...]:
        """The steps that change the device (the health gate only reads)."""
        return tuple(s for s in self.steps if s.kind != "health")

    def text(self) -> str:
        head = f"{self.device.name} ({self.device.address})"
        if self.refusal:
            return f"{head}: refused: {self.refusal}"
        lines = [f"{head}: {self.facts.os or 'unknown OS'}, {self.facts.arch}, Python "
                 f"{'.'.join(map(str, self.facts.python_version or ())) or '?'}"]  # fmt: skip
        if not self.changes:
            lines.append("  nothing to change (already provisioned as asked)")
        lines += [f"  {s.describe()}" for s in self.steps]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")  # what useradd accepts (Debian's default)


def deploy_user(options: ProvisionOptions, facts: ProvisionFacts) -> str | None:
    """The user to put in the doorstep group and the sudo rule; None for root."""
    user = options.deploy_user or facts.login_user
    return None if not user or user == "root" else user


def plan_provision(
    device: Device, facts: ProvisionFacts, options: ProvisionOptions
) -> ProvisionPlan:
    """What is still needed on ``device`` (pure: facts and options only)."""
    if not facts.reachable or facts.error:
        return ProvisionPlan(device, facts, refusal=facts.error or "unreachable")
    refusal = _refusal(facts, options)
    if refusal:
        return ProvisionPlan(device, facts, refusal=refusal)
    o, steps, notes = options, [], []
    who = deploy_user(o, facts)
    if who is not None and not USER_NAME.match(who):  # it goes into a sudoers file
        return ProvisionPlan(device, facts, refusal=f"deploy user {who!r} is not a valid user name")
    prefixed = o.prefix != ROOT
    packages = [p for p, ok in (("python3-venv", facts.venv),) if not ok]
    if o.wants_picamera2 and not facts.picamera2:
        packages.append("python3-picamera2")
    if packages:
        steps.append(PStep("apt", f"apt-get install -y {' '.join(packages)}", tuple(packages)))
    missing_groups = [g for g in ("video", "i2c") if g not in facts.groups]
    if missing_groups:
        steps.append(
            PStep("groups", f"groupadd --system {' '.join(missing_groups)}", tuple(missing_groups))
        )
    if not facts.user:
        steps.append(PStep("user", f"useradd --system --user-group {RUN_USER} (groups video, i2c)"))
    elif not (facts.member(RUN_USER, "video") and facts.member(RUN_USER, "i2c")):
        steps.append(PStep("user", f"usermod -aG video,i2c {RUN_USER}"))
    if who is not None and not (facts.user and facts.member(who, RUN_USER)):
        steps.append(PStep("deploy-user", f"usermod -aG {RUN_USER} {who} (installs models)"))
    fresh = facts.installed_sha256 != o.wheel.sha256
    if fresh:
        was = facts.installed_version or ("a hand-made venv" if facts.link_is_dir else "none")
        steps.append(
            PStep(
                "venv",
                f"{o.venv}: python -m venv --system-site-packages, pip install "
                f"{o.wheel.path.name}[device] (installed now: {was})",
            )
        )
        steps.append(PStep("switch", f"{o.link} -> {o.venv} (previous kept as {o.previous})"))
    if not facts.config or o.reconfigure:
        what = "replace (old kept as .bak)" if facts.config else "write"
        steps.append(
            PStep(
                "config", f"{what} {o.config}: doorstep-device init --device-id {device.device_id}"
            )
        )
    elif o.broker or o.source or o.signing_key:
        notes.append(
            f"{o.config} exists and is kept: --reconfigure applies --broker/--source/--signing-key"
        )
    if who is not None and facts.visudo and facts.sudoers_sha != sha256_text(sudo_rule(who)):
        steps.append(
            PStep(
                "sudo-rule",
                f"{o.sudoers}: {who} may `systemctl reload {SERVICE}` (visudo -c first)",
            )
        )
    elif who is not None and not facts.visudo:
        notes.append(f"no visudo on the device (sudo not installed): no sudo rule for {who}")
    steps.append(PStep("unit", f"{o.unit}, if it differs from `doorstep-device unit`"))
    changed = bool(steps[:-1]) or fresh
    if o.service == "systemd":
        running = facts.service_active == "active" and facts.service_enabled == "enabled"
        if changed or not running:
            steps.append(PStep("service", f"systemctl enable {SERVICE}; (re)start it"))
    elif changed or not facts.daemon_alive:
        steps.append(PStep("service", "(re)start `doorstep-device run` detached (no systemd)"))
    steps.append(PStep("health", "the daemon runs the installed version with a passing self-test"))
    if prefixed and packages:
        return ProvisionPlan(
            device, facts,
            refusal=f"needs apt packages ({', '.join(packages)}), which --prefix cannot install",
        )  # fmt: skip
    if packages and not facts.apt:
        return ProvisionPlan(
            device, facts, refusal=f"needs {', '.join(packages)}, and has no apt-get"
        )
    return ProvisionPlan(device, facts, tuple(steps), notes=tuple(notes))


def _refusal(facts: ProvisionFacts, options: ProvisionOptions) -> str | None:
    if not facts.root_ok:
        return (
            f"{facts.login_user or 'the SSH user'} is not root and has no passwordless sudo "
            "(provision needs root: log in as a sudo-capable user)"
        )
    if facts.python is None:
        return f"no {options.python} on the device"
    if facts.python_version is None or facts.python_version < MIN_PYTHON:
        found = ".".join(map(str, facts.python_version or ())) or "unknown"
        return f"Python {found}; doorstep needs 3.11 or newer (Raspberry Pi OS Bookworm or later)"
    if options.service == "systemd" and not facts.systemctl:
        return "no systemctl on the device: use --service detached for a device without systemd"
    if facts.free_mb < MIN_FREE_MB and facts.installed_sha256 != options.wheel.sha256:
        return f"{facts.free_mb:.0f} MB free; an install needs {MIN_FREE_MB} MB"
    return None
