"""A runbook's YAML with the line of every value, for ``FILE:LINE: field: message`` errors.

drctl.yamlstrict gives each mapping its own line and each key's line; a runbook's errors
also name list items and scalars (``steps[2].timeout: got text '30 sec'``), which know no
line of their own. Here a mapping also records the line each of its values starts on, and a
list the line of each item, so an error is reported at the line of the offending value."""

from __future__ import annotations

from typing import Any

import yaml

from drctl.yamlstrict import LineDict, read_text

try:  # libyaml when PyYAML has it: the same nodes and marks, parsed faster
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (YAML would silently keep the last)."""


class Mapping(LineDict):
    """A mapping that also knows the line each value starts on (a value left empty, as in
    ``dns:`` alone, is on its key's line)."""

    def __init__(self) -> None:
        super().__init__()
        self.value_lines: dict[Any, int] = {}

    def value_line(self, key: Any) -> int:
        return self.value_lines.get(key) or self.line_of(key)


class Sequence(list[Any]):
    """A list that knows its own line and each item's line (1-based)."""

    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.lines[index] if 0 <= index < len(self.lines) else self.line


def value_line(node: Any, key: Any) -> int:
    """The line of ``node[key]`` (a key of a mapping, an index of a list); 0 if unknown."""
    if isinstance(node, Mapping):
        return node.value_line(key)
    if isinstance(node, LineDict):
        return node.line_of(key)
    if isinstance(node, Sequence) and isinstance(key, int):
        return node.line_of(key)
    return 0


class RunbookLoader(_SafeLoader):
    """The safe loader (no Python objects), with the mappings and lists below."""


def _mapping(loader: Any, node: yaml.MappingNode) -> Mapping:
    mapping = Mapping()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # a list or a mapping as a key (`[a]: 1`, `? {a: 1}`)
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be text, a number or true/false, not a list or a "
                            "mapping", key_node.start_mark) from None
        if key in mapping:
            raise DuplicateKey(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
        mapping.value_lines[key] = value_node.start_mark.line + 1
    return mapping


def _sequence(loader: Any, node: yaml.SequenceNode) -> Sequence:
    out = Sequence()
    out.line = node.start_mark.line + 1
    for item in node.value:
        out.append(loader.construct_object(item, deep=True))
        out.lines.append(item.start_mark.line + 1)
    return out


RunbookLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
RunbookLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load_yaml(path: str) -> Any:
    """Parse ``path``; raises OSError or yaml.YAMLError (NotTextError for a file that is not
    UTF-8 text, DuplicateKey for a key given twice)."""
    return yaml.load(read_text(path), Loader=RunbookLoader)
