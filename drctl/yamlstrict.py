"""YAML loading that remembers line numbers and rejects duplicate keys (for error messages
that name file, line and field). Shared by the cluster configuration and the runbooks."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    pass


class NotTextError(yaml.YAMLError):
    """The file is not UTF-8 text (a binary file given by mistake)."""

    def __init__(self, exc: UnicodeDecodeError) -> None:
        self.problem = (f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start}): a binary file?")
        self.line = bytes(exc.object[: exc.start]).count(b"\n") + 1  # of that byte
        super().__init__(self.problem)


class LineDict(dict[str, Any]):
    """A mapping from YAML that knows its own line and each key's line (1-based)."""

    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[str, int] = {}

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)


class StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> LineDict:
    mapping = LineDict()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in mapping:
            raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_text(path: str) -> str:
    """The text of the file ``path``; raises OSError, or NotTextError for a file that is not
    UTF-8 text."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotTextError(exc) from None


def load_yaml(path: str) -> Any:
    """Parse ``path``; raises OSError, yaml.YAMLError (NotTextError for a file that is not
    UTF-8 text) or DuplicateKeyError."""
    return yaml.load(read_text(path), Loader=StrictLoader)


def yaml_problem(exc: yaml.YAMLError, path: str | None = None) -> str:
    """What is wrong, in one line: PyYAML's problem with its characters made visible, and a
    tab where the error points named as one (``path``: the file, to look; the runbook
    loader's message, LibYAML's, leaves the character out)."""
    text = str(getattr(exc, "problem", None) or exc)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    mark = getattr(exc, "problem_mark", None)
    if path is not None and mark is not None:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().split("\n")  # (YAML's line breaks, as its marks count)
            tab = lines[mark.line][mark.column] == "\t"
        except (OSError, IndexError):
            tab = False
        if tab:
            return f"{text}: a tab (YAML indents with spaces, never tabs)"
    return text


def yaml_error_line(exc: yaml.YAMLError) -> int | None:
    if isinstance(exc, NotTextError):
        return exc.line
    mark = getattr(exc, "problem_mark", None)
    return mark.line + 1 if mark is not None else None
