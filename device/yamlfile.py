"""Reading a small YAML configuration file safely: ``device.yaml`` and the host's ``fleet.yaml``.

A config file is a few KiB of plain mappings and lists. Anything far from that is refused with a
``ConfigError`` that says what is wrong and where, before it can cost the reader its stack or its
memory:

- a file larger than :data:`MAX_BYTES` (1 MiB) is refused before it is parsed (only that much
  is ever read, so even ``/dev/zero`` is refused at once);
- nesting deeper than :data:`MAX_DEPTH` (32) mappings/lists is refused while the document is
  composed: PyYAML composes recursively, so a 20,000-deep ``[[[...`` would otherwise end in
  ``RecursionError``;
- a document that expands to more than :data:`MAX_NODES` values is refused; aliases count
  with the size of what they point to, so a "billion laughs" of nested ``*alias`` lists (tiny
  on disk, exponential once walked) is caught too, as is depth reached through an alias;
- duplicate keys are refused (PyYAML would silently keep the last one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from device.errors import ConfigError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000


class _Refused(yaml.MarkedYAMLError):  # type: ignore[misc, unused-ignore]
    """A document that parses but is too deep or too large to be a config file."""


# Without types-PyYAML (a dev extra) ``yaml.SafeLoader`` is ``Any``; with it, this ignore is unused.
class _ConfigLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """A SafeLoader that refuses duplicate keys, and documents nested deeper than ``MAX_DEPTH``
    collections or expanding (aliases included) to more than ``MAX_NODES`` values."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # collections enclosing the node being composed, itself included
        self._deepest = 0  # the deepest collection level reached inside the current node
        self._nodes = 0  # values composed so far, each alias counted as what it expands to
        self._anchored: dict[str, tuple[int, int]] = {}  # anchor -> (values, height)

    def _grow(self, nodes: int, depth: int, mark: Any) -> None:
        self._nodes += nodes
        self._deepest = max(self._deepest, depth)
        if depth > MAX_DEPTH:
            raise _Refused(
                None,
                None,
                f"nested deeper than {MAX_DEPTH} levels of mappings and lists "
                "(a config file needs a few): refused",
                mark,
            )
        if self._nodes > MAX_NODES:
            raise _Refused(
                None,
                None,
                f"the document expands to more than {MAX_NODES} values (aliases included): "
                "refused, a config file holds a few hundred",
                mark,
            )

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call, unused-ignore]
        if isinstance(event, yaml.AliasEvent):
            nodes, height = self._anchored.get(event.anchor or "", (1, 0))
            self._grow(nodes, self._depth + height, event.start_mark)
            return super().compose_node(parent, index)
        collection = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        self._depth += collection
        before, outer_deepest = self._nodes, self._deepest
        self._deepest = 0
        try:
            self._grow(1, self._depth, event.start_mark)
            node = super().compose_node(parent, index)
            inner_deepest = self._deepest
        finally:
            self._depth -= collection
            self._deepest = max(outer_deepest, self._deepest)
        if event.anchor is not None:
            self._anchored[event.anchor] = (
                self._nodes - before,
                max(0, inner_deepest - self._depth),
            )
        return node


def _construct_mapping(loader: _ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_text(path: Path, what: str) -> str:
    """At most ``MAX_BYTES`` of ``path`` as UTF-8; a longer file is refused unread."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_BYTES >> 20} MiB: refused (a {what} is a few KiB; "
            "is this the right file?)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def read_yaml_mapping(path: Path, what: str = "config file", keys: str = "keys") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: ``{}``); duplicate keys, files over
    ``MAX_BYTES``, nesting past ``MAX_DEPTH`` and documents over ``MAX_NODES`` values refused.
    Every problem is a ``ConfigError`` naming the file (and line)."""
    text = _read_text(path, what)
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except _Refused as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:  # not expected past the depth check; never a traceback regardless
        raise ConfigError(f"{path}: nested too deeply to read: refused") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of {keys}, got {type(data).__name__}"
        )
    return data
