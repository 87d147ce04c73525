"""A value of the wrong type anywhere in a runbook is one error line, ``FILE:LINE: field:
what is wrong (what was expected)``, at the line of that value; never a traceback.

Every field of every example runbook (found by walking the loaded YAML: mappings, lists,
their items, every scalar) is given, in turn, a number, text, a list, a mapping, nothing and
true; the runbook is written out (block style: each value on a line of its own) and loaded.
It either loads (the value is legitimately acceptable there) or raises RunbookError: for a
value of another kind than the field's (a list for a site name, text for seconds) exactly one
line, naming that field (or a field inside it) at a line of that value; for another value of
the field's kind (text for text, a mapping for a mapping) every line well-formed (it may be
refused for what it says, or several errors name its contents). No other exception escapes,
and what the loader accepts, ``plan`` and ``to_cluster`` use without one."""

from __future__ import annotations

import copy
import glob
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from failover.config import ConfigError
from runbooks.cluster import to_cluster
from runbooks.loader import RunbookError, load
from runbooks.model import Runbook
from runbooks.plan import plan
from tests.procs import DRCTL, REPO, run
from tests.runbooks.helpers import TWO_SITES_DB

EXAMPLES = sorted(glob.glob(os.path.join(REPO, "runbooks", "examples", "*.yaml")))
# and every optional field the examples leave out
EVERY_FIELD = os.path.join(REPO, "tests", "runbooks", "every-field.yaml")
WRONG: dict[str, Any] = {"number": 7, "text": "wrong", "list": [7], "mapping": {"wrong": 1},
                         "null": None, "bool": True}
Path = tuple[str | int, ...]
LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<field>[^ ]+): (?P<message>.+)$")


def _paths(node: Any, path: Path = ()) -> Iterator[Path]:
    """Every field below ``node``: mapping values and list items, containers and scalars."""
    items: list[tuple[str | int, Any]] = (
        list(node.items()) if isinstance(node, dict) else
        list(enumerate(node)) if isinstance(node, list) else [])
    for key, value in items:
        yield (*path, key)
        yield from _paths(value, (*path, key))


def _field(path: Path) -> str:
    """The path as the loader names it: ``services.db.steps[2].type``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def _set(doc: Any, path: Path, value: Any) -> Any:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def _dump(doc: Any) -> str:
    """Block style: each value on a line of its own (libyaml's emitter, when there: fast)."""
    return yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     default_flow_style=False)


def _lines(text: str, path: Path) -> tuple[int, int]:
    """The first and last line (1-based) of the field at ``path`` in ``text``: its key (or
    list item) through the end of its value."""
    node: Any = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    first = node.start_mark.line + 1
    for key in path:
        if isinstance(key, int):
            node = node.value[key]
            first = node.start_mark.line + 1
        else:
            key_node, node = next((k, v) for k, v in node.value if k.value == key)
            first = key_node.start_mark.line + 1
    end = node.end_mark
    return first, end.line + (1 if end.column > 0 else 0)


def _within(field: str, path: Path) -> bool:
    """``field`` is the substituted field or one inside it."""
    want = _field(path)
    return field == want or field.startswith((want + ".", want + "["))


PYTHON_TYPES = re.compile(r"NoneType|\b(int|str|dict|bool|float)\b|got (list|None|True|False)")


# fields that take a mapping as well as a list (a mapping there is not the wrong type)
UNIONS = {("etcd",): dict}


def _kind(value: Any) -> str:
    for name, kinds in (("nothing", type(None)), ("true/false", bool), ("number", int | float),
                        ("text", str), ("list", list), ("mapping", dict)):
        if isinstance(value, kinds):
            return name
    raise AssertionError(value)


def _same_kind(path: Path, original: Any, value: Any) -> bool:
    """Text for text, a list for a list...: not a wrong type but another value of the right
    one. It may be refused for what it says (an unknown site), with an error about what uses
    it (two consistency groups in one service), or several about a mapping's contents."""
    return _kind(original) == _kind(value) or isinstance(value, UNIONS.get(path, ()))


def _judge(file: str, text: str, path: Path, what: str, other_value: bool,
           exc: RunbookError) -> list[str]:
    """What is wrong with how the loader refused the value at ``path``."""
    out = []
    if not exc.errors or (len(exc.errors) != 1 and not other_value):
        out.append(f"{what}: {len(exc.errors)} errors: {exc.errors}")
    elif not other_value and str(exc) != exc.errors[0]:
        out.append(f"{what}: str() is not the one line: {str(exc)!r}")
    first, last = _lines(text, path)
    for error in exc.errors:
        m = LINE.match(error)
        if "\n" in error or m is None or m["file"] != file or int(m["line"]) < 1:
            out.append(f"{what}: not one FILE:LINE: field: message line: {error!r}")
        elif PYTHON_TYPES.search(m["message"]):
            out.append(f"{what}: a Python type name: {error}")
        elif other_value:
            continue
        elif not first <= int(m["line"]) <= last:
            out.append(f"{what}: line {m['line']}, not in {first}..{last}: {error}")
        elif not _within(m["field"], path):
            out.append(f"{what}: names another field: {error}")
    return out


def _messages(exc: RunbookError) -> list[str]:
    """The errors without their FILE:LINE (lines move when a field is left out)."""
    return [m["field"] + ": " + m["message"] if (m := LINE.match(e)) else e
            for e in exc.errors]


def _absent(file: str, doc: Any, path: Path) -> list[str] | None:
    """The errors with the field at ``path`` left out (None: it loads then)."""
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with open(file, "w") as fh:
        fh.write(_dump(out))
    try:
        load(file)
    except RunbookError as exc:
        return _messages(exc)
    return None


def _used(rb: Runbook, what: str) -> list[str]:
    """A runbook the loader accepted must not crash what uses it."""
    try:
        for name in rb.services:
            plan(rb, name)
            plan(rb, name, switchover=True)
        to_cluster(rb)
    except ConfigError:
        pass  # a key or password file the example names does not exist here
    except Exception as exc:
        return [f"{what}: accepted, then {type(exc).__name__}: {exc}"]
    return []


def _problems(example: str, tmp_path: str, path: Path, kind: str, original: Any,
              doc: Any) -> tuple[bool, list[str]]:
    """Load ``doc`` with the field at ``path`` replaced by the ``kind`` of wrong value:
    (refused, what is wrong with how it was refused or used)."""
    text = _dump(_set(doc, path, WRONG[kind]))
    file = os.path.join(tmp_path, os.path.basename(example))
    with open(file, "w") as fh:
        fh.write(text)
    what = f"{_field(path)} = {kind}"
    try:
        rb = load(file)
    except RunbookError as exc:
        if WRONG[kind] is None and isinstance(path[-1], str) and \
                _messages(exc) == _absent(file, doc, path):
            return True, []  # a field given no value is as if left out (a mapping's default)
        return True, _judge(file, text, path, what, _same_kind(path, original, WRONG[kind]),
                            exc)
    except Exception as exc:  # the defect: anything else escaping is a traceback
        return True, [f"{what}: {type(exc).__name__}: {exc}"]
    return False, _used(rb, what)


@pytest.mark.parametrize("example", [*EXAMPLES, EVERY_FIELD], ids=os.path.basename)
def test_every_wrong_type_in_every_field_is_one_error_line(example: str, tmp_path: str) -> None:
    load(example)  # valid as it is: each error below is the substituted value's
    with open(example) as fh:
        doc = yaml.safe_load(fh)
    paths = list(_paths(doc))
    assert len(paths) >= 60, paths  # the walk found the fields (not vacuous)
    problems: list[str] = []
    rejected = {kind: 0 for kind in WRONG}
    for path in paths:
        node = doc
        for key in path:
            node = node[key]
        original = node
        refused = 0
        for kind in WRONG:
            no, found = _problems(example, str(tmp_path), path, kind, original, doc)
            problems += found
            rejected[kind] += no
            refused += no
        if refused < 3:
            problems.append(f"{_field(path)}: only {refused} of {len(WRONG)} wrong values "
                            "refused")
    assert not problems, "\n".join(problems)
    # each kind of wrong value is refused in most places (the loader did check them)
    assert all(n >= len(paths) // 2 for n in rejected.values()), rejected


def test_the_sweep_sees_every_field() -> None:
    assert len(EXAMPLES) >= 3
    with open(EVERY_FIELD) as fh:
        doc = yaml.safe_load(fh)
    fields = {re.sub(r"\[\d+\]", "[]", _field(p)) for p in _paths(doc)}
    for key in ("verify_timeout", "algorithm", "env", "update"):
        assert f"dns.zones.dr.test.{key}" in fields or f"dns.zones.dr.test.tsig.{key}" in fields
    for key in ("rate_limit", "compression", "cp_interval", "journal_limit", "apply_interval",
                "export", "verify_rate", "export_tls", "export_allow[]"):
        assert f"services.db.replication.{key}" in fields, key
    for key in ("automatic", "grace", "damping", "allow_data_loss", "drain_timeout"):
        assert f"services.db.failover.{key}" in fields, key
    for key in ("name", "check", "at", "run", "timeout", "http", "retries", "interval",
                "command"):
        assert f"services.db.steps[].{key}" in fields, key
    assert "services.app.steps[].tcp" in fields and "services.app.depends_on[]" in fields


def test_the_walk_and_the_line_check_see_the_fields() -> None:
    doc = {"a": {"b": [1, {"c": 2}]}}
    assert [_field(p) for p in _paths(doc)] == ["a", "a.b", "a.b[0]", "a.b[1]", "a.b[1].c"]
    text = _dump(doc)
    assert text == "a:\n  b:\n  - 1\n  - c: 2\n"
    assert _lines(text, ("a", "b", 1, "c")) == (4, 4)
    assert _lines(text, ("a", "b")) == (2, 4)
    assert _lines(text, ("a",)) == (1, 4)
    assert _within("a.b[1].c", ("a", "b")) and not _within("a.bc", ("a", "b"))


ODD = {  # what YAML can say besides the six: keys that are not text, dates, binary, sets
    "a list as a key": ("{[a]: 1}", "not valid YAML: a key must be text"),
    "a key given twice": ("{a: {address: x}, a: {address: y}}", "duplicate key 'a'"),
    "on as a key": ("{on: {address: x}, b: {address: y}}",
                    "sites.true: key true is not text (YAML reads yes/no/on/off as true/false"),
    "a date": ("{a: {address: 2024-01-01}, b: {address: y}}",
               "sites.a.address: got a date (2024-01-01) (expected a host name"),
    "binary": ("{a: {address: !!binary aGk=}, b: {address: y}}",
               "sites.a.address: got binary data (expected a host name"),
    "a set": ("{a: {address: x}, b: !!set {y}}", "sites.b: got a value of another kind"),
    "a tab": ("\n\ta: {address: x}", "not valid YAML: found character"),
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_yaml_is_one_error_line(tmp_path: str, case: str) -> None:
    sites, message = ODD[case]
    path = os.path.join(str(tmp_path), "runbook.yaml")
    with open(path, "w") as fh:
        fh.write('kind: drctl-runbook\nversion: 1\ncluster: c\netcd: ["127.0.0.1:2379"]\n'
                 f"sites: {sites}\nservices: {{}}\n")
    with pytest.raises(RunbookError) as info:
        load(path)
    assert info.value.errors == [str(info.value)], info.value.errors
    line = 6 if case == "a tab" else 5
    assert str(info.value).startswith(f"{path}:{line}: {message}"), str(info.value)
    if case == "a tab":  # (LibYAML's message leaves the character out: named here)
        assert str(info.value).endswith(": a tab (YAML indents with spaces, never tabs)")


# The trial's crashes, through the command line (validate, plan, status --config)
RUNBOOK = TWO_SITES_DB + """\
    steps:
      - {type: wait_replication, timeout: 30}
      - {type: promote}
"""
SERVICES = RUNBOOK[RUNBOOK.index("services:"):]
CLI_CASES = {
    "services-a-number": ((SERVICES, "services: 7\n"), 6,
                          "services: got the number 7 (expected a mapping"),
    "sites-a-number": (("sites: {a: {address: 10.0.0.1}, b: {address: 10.0.0.2}}", "sites: 5"),
                       5, "sites: got the number 5 (expected a mapping"),
    "primary-a-list": (("primary: a", "primary: [a]"), 8,
                       "services.db.primary: got a list (expected a site name"),
    "timeout-text": (("timeout: 30}", "timeout: 30 sec}"), 11,
                     "services.db.steps[0].timeout: got text '30 sec' (expected seconds > 0"),
    "services-a-list": ((SERVICES, "services: [1]\n"), 6,
                        "services: got a list (expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_cli_says_a_wrong_type_in_one_line(tmp_path: str, case: str) -> None:
    (old, new), line, message = CLI_CASES[case]
    assert old in RUNBOOK
    path = os.path.join(str(tmp_path), "runbook.yaml")
    with open(path, "w") as fh:
        fh.write(RUNBOOK.replace(old, new))
    for cmd in (["runbook", "validate", path], ["runbook", "plan", path, "db"],
                ["status", "--config", path]):
        p = run([*DRCTL, *cmd], timeout=60)
        assert p.returncode == RunbookError.exit_code == 2, (cmd, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, (cmd, p.stderr)
        assert f"{path}:{line}: {message}" in lines[0], (cmd, lines[0])


@pytest.mark.parametrize("section", ["failover", "replication"])
def test_a_settings_section_given_no_value_takes_the_defaults(section: str,
                                                              tmp_path: str) -> None:
    """``failover:`` or ``replication:`` with every line under it commented out means the
    defaults, as before the typed loader (not "got nothing")."""
    example = next(e for e in EXAMPLES if e.endswith("two-site-web.yaml"))
    with open(example) as fh:
        doc = yaml.safe_load(fh)
    service = next(iter(doc["services"].values()))
    keep = {k: v for k, v in service.get("replication", {}).items() if k == "export"}
    service[section] = None
    file = os.path.join(tmp_path, "rb.yaml")
    with open(file, "w") as fh:
        fh.write(_dump(doc).replace(f"  {section}: null", f"  {section}:"))
    if section == "failover":
        rb = load(file)
        assert rb.services[next(iter(doc["services"]))].automatic is True
    else:  # the defaults leave the data path without its export: said once per site
        with pytest.raises(RunbookError) as exc:
            load(file)
        assert all("lacks" in e and "replication.export" in e for e in exc.value.errors)
        assert keep  # (the example does set one)
