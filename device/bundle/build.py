"""Describe a ``.tflite`` detector as a bundle manifest: the code behind ``doorstep-host bundle``.

It lives on the device side so that a bare model given to ``doorstep-device detect --labels``
is described exactly as a written bundle would be.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from device import __version__
from device.bundle.manifest import FileEntry, Labels, Manifest, Normalization, Thresholds
from device.bundle.store import Bundle
from device.detect.layout import default_input_spec, detect_layout
from device.detect.model import ModelFacts, read_model_facts
from device.errors import BundleError, LabelsError, ModelError
from device.hashing import sha256_file
from device.labels import read_labels

ROLE_NAMES = {
    "package": ("package", "packages", "parcel", "parcels"),
    "person": ("person", "people", "pedestrian"),
}


def default_roles(names: Sequence[str]) -> dict[str, list[int]]:
    """Class ids per role, by name (``package``/``parcel`` and ``person``)."""
    roles: dict[str, list[int]] = {}
    for role, words in ROLE_NAMES.items():
        ids = [i for i, n in enumerate(names) if n.strip().lower() in words]
        if ids:
            roles[role] = ids
    return roles


def parse_role_overrides(specs: Sequence[str], names: Sequence[str]) -> dict[str, list[int]]:
    """``package=suitcase,book`` -> {"package": [ids]}; names or numeric ids allowed."""
    roles: dict[str, list[int]] = {}
    lookup = {n.lower(): i for i, n in enumerate(names)}
    for spec in specs:
        role, sep, value = spec.partition("=")
        if not sep or not role.strip() or not value.strip():
            raise LabelsError(
                f"--role {spec!r}: expected ROLE=NAME[,NAME...], e.g. package=suitcase"
            )
        ids = []
        for item in value.split(","):
            item = item.strip()
            if item.isdigit() and int(item) < len(names):
                ids.append(int(item))
            elif item.lower() in lookup:
                ids.append(lookup[item.lower()])
            else:
                raise LabelsError(f"--role {spec!r}: no class named {item!r} in the labels")
        roles[role.strip()] = ids
    return roles


def parse_normalization(text: str) -> Normalization:
    """``yolo`` (0..1), ``ssd`` (-1..1), ``MEAN,STD`` or ``M1,M2,M3,S1,S2,S3`` (pixel units)."""
    from device.detect.layout import FAMILY_NORMALIZATION

    if text in FAMILY_NORMALIZATION:
        return FAMILY_NORMALIZATION[text]
    try:
        values = [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        values = []
    if len(values) == 2:
        return Normalization(mean=(values[0],) * 3, std=(values[1],) * 3)
    if len(values) == 6:
        return Normalization(mean=tuple(values[:3]), std=tuple(values[3:]))
    raise ModelError(
        f"--normalization {text!r}: expected yolo, ssd, MEAN,STD or three means and three stds"
    )


def describe_model(
    model: str | Path,
    labels: Sequence[str] | str | Path | None,
    *,
    decoder: str = "auto",
    runtime: str = "auto",
    anchors: str | Path | None = None,
    resize: str | None = None,
    channel_order: str | None = None,
    normalization: Normalization | None = None,
    roles: Sequence[str] = (),
    thresholds: Thresholds | None = None,
    name: str | None = None,
    version: str = "0.0.0",
    facts: ModelFacts | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[Manifest, dict[str, Path | bytes]]:
    """Build the manifest for ``model`` and the files a bundle of it must hold."""
    model = Path(model)
    facts = facts or read_model_facts(model, runtime)
    names: list[str] | None
    if labels is None:
        names = None
    elif isinstance(labels, str | Path):
        names = read_labels(labels)
    else:
        names = list(labels)

    files: dict[str, Path | bytes] = {"model.tflite": model}
    anchors_count = None
    if anchors is not None:
        arr = _load_anchors(Path(anchors))
        anchors_count = arr.shape[0]
        files["anchors.npy"] = _npy_bytes(arr)
    spec = detect_layout(facts, len(names) if names is not None else None, decoder, anchors_count)
    if names is None:
        raise LabelsError(f"{model}: no labels given: pass --labels FILE (one class name per line)")
    if spec.kind == "ssd_raw" and anchors is None:
        raise BundleError("raw SSD decoding needs --anchors")
    input_spec = default_input_spec(
        facts, spec.kind, resize=resize, channel_order=channel_order, normalization=normalization
    )
    role_map = default_roles(names)
    role_map.update(parse_role_overrides(roles, names))
    manifest = Manifest(
        name=name or model.stem,
        version=version,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        input=input_spec,
        decoder=spec,
        labels=Labels(names=names, roles=role_map),
        thresholds=thresholds or Thresholds(),
        tools={"runtime": facts.runtime, "doorstep": __version__},
        ops=facts.ops,
        **(extra or {}),
    )
    return manifest, files


def bare_model_bundle(model: str | Path, labels: str | Path | None, **options: object) -> Bundle:
    """An in-memory, unverified bundle for a bare ``.tflite`` (``detect --model x.tflite``)."""
    model = Path(model)
    manifest, _ = describe_model(model, labels, **options)  # type: ignore[arg-type]
    paths = {"model.tflite": model}
    anchors = options.get("anchors")
    if anchors is not None:
        paths["anchors.npy"] = Path(str(anchors))
    entries = {
        name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size) for name, p in paths.items()
    }
    manifest = manifest.model_copy(update={"files": entries})
    return Bundle(manifest=manifest, paths=paths, source=model, verified=False)


def _load_anchors(path: Path) -> np.ndarray:
    try:
        arr: np.ndarray = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(
            f"{path}: cannot read anchors (.npy of N x 4 yc, xc, h, w): {exc}"
        ) from None
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BundleError(f"{path}: anchors must have shape [N, 4], got {list(arr.shape)}")
    return arr.astype(np.float32)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
