"""Field types and checks shared by the sections of ``device.yaml`` (``device.config``).

Pure functions on values (and the config file's directory, from the validation context): a
section model says *which* check a field gets; this module says what the check is. Each raises
``ValueError`` with the reason, which pydantic reports with the key path.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo

from device.errors import ConfigError

KEY_FILE_MAX_BYTES = 64 * 1024


class Section(BaseModel):
    """A config section: unknown keys refused, immutable, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------------ paths


def not_empty(value: Any) -> Any:
    """``Path('')`` is ``.``: an empty string would silently name the current directory."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty path names no file or directory: give a path")
    return value


NonEmptyPath = Annotated[Path, BeforeValidator(not_empty)]


def resolve_existing(value: Path | None, info: ValidationInfo) -> Path | None:
    """A path that must exist, relative to the config file's directory; ``~`` expanded."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


def beside_config(value: Path, info: ValidationInfo) -> Path:
    """A path that need not exist yet, relative to the config file's directory."""
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


def public_key_file(value: Path, info: ValidationInfo) -> Path:
    """An existing, small, regular file that parses as doorstep Ed25519 public keys."""
    from device.bundle.signing import KEY_TYPE, load_public_keys

    path = resolve_existing(value, info)
    assert path is not None
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (use a .pub from doorstep-host keygen)")
    if path.stat().st_size > KEY_FILE_MAX_BYTES:
        raise ValueError(
            f"{path}: larger than {KEY_FILE_MAX_BYTES >> 10} KiB: not a public key file "
            "(use a .pub from doorstep-host keygen)"
        )
    try:
        load_public_keys(path)
    except ConfigError as exc:
        # Name the line, never quote it: a wrong path may point at a secret (/etc/shadow).
        line = re.match(rf"{re.escape(str(path))}:(\d+): ", str(exc))
        reason = (
            f"line {line[1]} is not '{KEY_TYPE} <base64 of 32 bytes> [comment]'"
            if line
            else str(exc).removeprefix(f"{path}:").strip()
        )
        raise ValueError(
            f"{path}: not an Ed25519 public key file ({reason}); "
            "use a .pub from doorstep-host keygen"
        ) from None
    return path


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
TOPIC_PATTERN = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"
_URL_FORM = "expected mqtt://host[:port] or mqtts://host[:port]"


def check_broker_url(url: str) -> str:
    """``url`` if paho can connect to it: scheme mqtt or mqtts, a host name or IP address, a
    port in 1..65535 (default 1883 / 8883), no credentials, path, query or fragment."""
    parts = urlsplit(url.strip())
    if "://" not in url or not parts.scheme:
        raise ValueError(f"not a broker URL: {_URL_FORM}")
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"scheme {parts.scheme!r} is not mqtt or mqtts: {_URL_FORM}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "no credentials in the URL (it is logged): use mqtt.username and "
            "mqtt.password_file or mqtt.password_env"
        )
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"the host is missing: {_URL_FORM}")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}] is not an IPv6 address: {_URL_FORM}") from None
    elif not _HOSTNAME.match(host):
        raise ValueError(f"host {host!r} is not a host name or IPv4 address: {_URL_FORM}")
    after_host = parts.netloc.rpartition("]")[2] if "[" in parts.netloc else parts.netloc
    _, colon, port = after_host.partition(":")
    if colon and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number in 1..65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a broker URL has no path, query or fragment: {_URL_FORM}")
    return url


def has_area(polygon: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
    """A zone polygon that encloses something (shoelace area not zero)."""
    if polygon is None:
        return None
    doubled = sum(
        x0 * y1 - x1 * y0
        for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1], strict=True)
    )
    if abs(doubled) < 1e-9:
        raise ValueError("the polygon has no area (its corners are on one line or repeated)")
    return polygon
