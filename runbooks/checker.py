"""The typed accessors a runbook is read through, and the errors they collect.

Every value is read through ``Checker``'s typed accessors (``text``, ``number``, ``whole``,
``flag``, ``block``, ``items``): a value of the wrong type is one error at the line of that
value, ``FILE:LINE: field: got a list (expected a site name)``, and the reader goes on with
the field's default, never a Python exception. ``got`` says what a value is in the
runbook's terms (never a Python type name)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Any

from drctl.words import closest
from drctl.yamlstrict import LineDict
from runbooks.yamlnodes import Sequence, value_line

MISSING: Any = object()  # a key or an index that is not there (or a value refused)
_YES_NO = "YAML reads yes/no/on/off as true/false: quote it"


def got(value: Any) -> str:
    """What a value is, in the runbook's terms (never a Python type name)."""
    if value is None:
        return "got nothing"
    if isinstance(value, bool):
        return f"got {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"got the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"got text {shown!r}" if value else "got empty text"
    if isinstance(value, list):
        return "got a list" if value else "got an empty list"
    if isinstance(value, dict):
        return "got a mapping" if value else "got an empty mapping"
    if isinstance(value, datetime.date):
        return f"got a date ({value})"
    return "got binary data" if isinstance(value, bytes) else "got a value of another kind"


def _at(node: Any, key: Any) -> Any:
    """``node[key]`` for a mapping's key or a list's index; MISSING if there is none."""
    if isinstance(node, dict):
        return node.get(key, MISSING)
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return MISSING


class Checker:
    """Collects the errors, and reads each value through a typed accessor: the value if it
    has the type (and passes ``check``), else the default after one error at its line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[str] = []
        self.fields: set[str] = set()  # the fields already reported (no follow-on errors)
        # the names declared (a site given as `east: 7` is declared: a service may name it
        # without a second error); None: the whole block is unusable, names are not checked
        self.sites: set[str] | None = set()
        self.zones: set[str] | None = set()
        self.services: set[str] = set()
        # each service's depends_on: the list (for its items' lines) and its names
        self.depends: dict[str, tuple[Any, list[tuple[int, str]]]] = {}
        self.lines: dict[str, int] = {}  # the line of each value read, by field

    # -- reporting

    @staticmethod
    def field(node: Any, key: Any, where: str) -> str:
        if key is None:
            return where or "(top level)"
        if isinstance(node, list):
            return f"{where}[{key}]"
        name = str(key).lower() if isinstance(key, bool) else str(key)
        return f"{where}.{name}" if where else name

    def report(self, line: int, field: str, message: str) -> None:
        self.fields.add(field)
        self.errors.append(f"{self.path}:{line or 1}: {field}: {message}")

    def err(self, node: Any, key: Any, where: str, message: str) -> None:
        """An error about a key (unknown, missing: key None) at the key's line."""
        line = getattr(node, "line", 0)
        if key is not None and isinstance(node, LineDict | Sequence):
            line = node.line_of(key)
        self.report(line, self.field(node, key, where), message)

    def bad(self, node: Any, key: Any, where: str, message: str) -> None:
        """An error about ``node[key]``'s value, at the value's line."""
        self.report(value_line(node, key) or getattr(node, "line", 0),
                    self.field(node, key, where), message)

    def wrong(self, node: Any, key: Any, where: str, hint: str) -> None:
        """``node[key]`` is not what the field takes: say what it is and what was expected."""
        value = _at(node, key)
        if isinstance(value, bool) and any(w in hint for w in ("name", "text", "HOST", "path")):
            hint += f"; {_YES_NO}"
        self.bad(node, key, where, f"{got(value)} (expected {hint})")

    def reported(self, field: str) -> bool:
        """An error was reported for ``field`` or a field inside it."""
        return any(f == field or f.startswith((field + ".", field + "["))
                   for f in self.fields)

    # -- typed accessors (absent: the default, nothing reported)

    def value(self, node: Any, key: Any, where: str, kinds: tuple[type, ...], hint: str,
              check: Callable[[Any], bool] | None = None) -> Any:
        """``node[key]`` if it is one of ``kinds`` (true/false only if ``bool`` is one) and
        passes ``check``; else MISSING (after one error, if it was given)."""
        value = _at(node, key)
        if value is MISSING:
            return MISSING
        self.lines[self.field(node, key, where)] = value_line(node, key)
        if (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
                or (check is not None and not check(value))):
            self.wrong(node, key, where, hint)
            return MISSING
        return value

    def text(self, node: Any, key: Any, where: str, hint: str,
             check: Callable[[str], bool] | None = None) -> str | None:
        value = self.value(node, key, where, (str,), hint, check)
        return None if value is MISSING else str(value)

    def number(self, node: Any, key: Any, where: str, hint: str, default: float,
               check: Callable[[float], bool] | None = None) -> float:
        value = self.value(node, key, where, (int, float), hint, check)
        return default if value is MISSING else float(value)

    def whole(self, node: Any, key: Any, where: str, hint: str, default: int,
              check: Callable[[int], bool] | None = None) -> int:
        value = self.value(node, key, where, (int,), hint, check)
        return default if value is MISSING else int(value)

    def flag(self, node: Any, key: Any, where: str, default: bool) -> bool:
        value = self.value(node, key, where, (bool,), "true or false")
        return default if value is MISSING else bool(value)

    def block(self, node: Any, key: Any, where: str, hint: str, allowed: set[str] | None,
              required: set[str] | None = None, optional: bool = False) -> LineDict | None:
        """A mapping: its keys checked (``allowed`` None: any name). ``optional``: a section
        of settings with defaults, where no value (``replication:`` with every line under it
        commented out) is an empty mapping, as it always was."""
        if optional and isinstance(key, str) and isinstance(node, LineDict) and key in node \
                and node[key] is None:
            empty = LineDict()
            empty.line = value_line(node, key)
            self.lines[self.field(node, key, where)] = empty.line
            self.keys(empty, self.field(node, key, where), allowed, required or set())
            return empty
        value = self.value(node, key, where, (LineDict,), hint)
        if value is MISSING:
            return None
        mapping: LineDict = value
        self.keys(mapping, self.field(node, key, where), allowed, required or set())
        return mapping

    def items(self, node: Any, key: Any, where: str, hint: str,
              nonempty: bool = False) -> Sequence | None:
        value = self.value(node, key, where, (Sequence,), hint, bool if nonempty else None)
        return None if value is MISSING else value

    def each(self, node: Any, key: str, where: str, hint: str, item: str,
             allowed: set[str], required: set[str]) -> Iterator[tuple[str, LineDict]]:
        """The items of the list ``node[key]`` that are mappings (their keys checked), each
        with its field (``where.key[i]``); an item of another type is one error, and left
        out."""
        lw = self.field(node, key, where)
        for i, _ in enumerate(self.items(node, key, where, hint) or []):
            block = self.block(node[key], i, lw, item, allowed, required)
            if block is not None:
                yield f"{lw}[{i}]", block

    def texts(self, node: Any, key: Any, where: str, hint: str, item: str,
              nonempty: bool = False) -> list[tuple[int, str]] | None:
        """A list of text: its items with their index (an item of another type: an error)."""
        values = self.items(node, key, where, hint, nonempty)
        if values is None:
            return None
        lw = self.field(node, key, where)
        return [(i, v) for i, v in enumerate(values)
                if self.text(values, i, lw, item) is not None]

    def keys(self, node: LineDict, where: str, allowed: set[str] | None,
             required: set[str]) -> None:
        """Unknown keys (a close one to an allowed key named: "did you mean"), then the
        required keys missing, except one a misspelt key already stands for."""
        missing = required - set(node)
        for key in node:
            if not isinstance(key, str):
                shown = str(key).lower() if isinstance(key, bool) else repr(key)
                self.err(node, key, where, f"key {shown} is not text ({_YES_NO})")
            elif allowed is not None and key not in allowed:
                near = closest(key, allowed - set(node))
                mean = f"; did you mean {near!r}?" if near else ""
                self.err(node, key, where, f"unknown key{mean} (allowed: "
                                           f"{', '.join(sorted(allowed))})")
                missing.discard(near)
        for key in sorted(missing):
            self.err(node, None, where, f"missing required key {key!r}")


def names(node: LineDict) -> list[str]:
    """A mapping's names (a key that is not text is reported by ``keys``)."""
    return [k for k in node if isinstance(k, str)]
