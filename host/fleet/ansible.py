"""An Ansible YAML inventory as a fleet: ``all:`` with ``hosts``/``children``/``vars``.

:func:`ansible_to_fleet` converts one to ``fleet.yaml``'s shape so it is validated by the same
model; :func:`ansible_locations` rewrites error paths to point into the inventory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from device.errors import ConfigError

_GROUP_KEYS = {"hosts", "children", "vars"}
# Ansible connection variables and the DeviceEntry field each one sets.
ANSIBLE_VARS = {
    "ansible_host": "host",
    "ansible_port": "port",
    "ansible_user": "user",
    "ansible_ssh_private_key_file": "key_file",
}


def is_ansible_inventory(data: Mapping[str, Any]) -> bool:
    """True for a YAML inventory: an ``all`` group, or top-level groups of hosts/children/vars."""
    if not data or "devices" in data:
        return False
    if "all" in data:
        return True
    return all(isinstance(v, dict) and set(v) <= _GROUP_KEYS for v in data.values()) and any(
        set(v) & {"hosts", "children"} for v in data.values()
    )


def ansible_to_fleet(data: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """Convert an Ansible YAML inventory to fleet.yaml's shape.

    Group vars apply to the hosts below them (inner groups and host vars win). Host names become
    device names and, unless ``ansible_host`` says otherwise, the address. Other ``ansible_*``
    and unrelated vars are ignored; a ``doorstep_*`` var must name a device setting. The rollout
    policy may be given as ``all: vars: doorstep_rollout: {...}``. Also returns, per device, the
    inventory path where it is defined, so errors point into the inventory.
    """
    hosts: dict[str, dict[str, Any]] = {}
    host_vars: dict[str, dict[str, Any]] = {}
    host_groups: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    rollout: Any = None

    def walk(group: str, body: Any, path: str, inherited: dict[str, Any], stack: list[str]) -> None:
        nonlocal rollout
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {path}: a group must be a mapping of hosts/children/vars")
        unknown = set(body) - _GROUP_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: {path}: unknown group keys {sorted(unknown)} (allowed: children, hosts, vars)"
            )
        if group in stack:
            raise ConfigError(f"{where}: {path}: group {group!r} contains itself")
        gvars = body.get("vars") or {}
        if not isinstance(gvars, dict):
            raise ConfigError(f"{where}: {path}.vars: must be a mapping")
        if "doorstep_rollout" in gvars:
            if path != "all":
                raise ConfigError(
                    f"{where}: {path}.vars.doorstep_rollout: allowed in all.vars only"
                )
            gvars = dict(gvars)
            rollout = gvars.pop("doorstep_rollout")
        scope = {**inherited, **gvars}
        groups = [*stack, group]
        members = body.get("hosts") or {}
        if not isinstance(members, dict):
            raise ConfigError(f"{where}: {path}.hosts: must be a mapping of host names")
        for host, hvars in members.items():
            if hvars is not None and not isinstance(hvars, dict):
                raise ConfigError(f"{where}: {path}.hosts.{host}: host vars must be a mapping")
            name = str(host)
            host_groups.setdefault(name, [])
            host_groups[name] += [g for g in groups if g != "all"]
            merged = {**scope, **host_vars.get(name, {}), **(hvars or {})}
            host_vars[name] = merged
            origins.setdefault(name, f"{path}.hosts.{name}")
            hosts.setdefault(name, {})
        children = body.get("children") or {}
        if not isinstance(children, dict):
            raise ConfigError(f"{where}: {path}.children: must be a mapping of groups")
        for child, child_body in children.items():
            walk(str(child), child_body, f"{path}.children.{child}", scope, groups)

    for group, body in data.items():
        walk(str(group), body, str(group), {}, [])

    devices: list[dict[str, Any]] = []
    for name in hosts:
        entry: dict[str, Any] = {"name": name, "host": name}
        for var, value in host_vars[name].items():
            if var in ANSIBLE_VARS:
                entry[ANSIBLE_VARS[var]] = value
            elif var.startswith("doorstep_"):
                entry[var.removeprefix("doorstep_")] = value  # unknown fields fail validation
        groups = list(dict.fromkeys(host_groups[name]))
        if groups:
            entry["groups"] = groups
        devices.append(entry)
    fleet: dict[str, Any] = {"devices": devices}
    if rollout is not None:
        fleet["rollout"] = rollout
    return fleet, [origins[name] for name in hosts]


def ansible_locations(text: str, origins: Sequence[str]) -> str:
    """Rewrite ``devices.N.field`` in error lines to the inventory path and variable name."""
    back = {field: var for var, field in ANSIBLE_VARS.items()}

    def swap(match: re.Match[str]) -> str:
        index, field = int(match.group(1)), match.group(2)
        var = back.get(field) or (field if field in ("name", "groups") else f"doorstep_{field}")
        return f"{origins[index]}.{var}"

    text = re.sub(r"devices\.(\d+)\.(\w+)", swap, text)
    return text.replace(": rollout.", ": all.vars.doorstep_rollout.")
