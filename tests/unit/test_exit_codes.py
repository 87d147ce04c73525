"""One exit-code table (docs/cli.md, generated from drctl/exitcodes.py and the error classes):
current, complete, and one code per kind of error across commands."""

from __future__ import annotations

import argparse
import os
import socket

import pytest

from drctl import argtypes
from drctl.exitcodes import TABLE, error_classes, render
from drctl.listening import bind_problem
from drctl.pki import KeyPermissionError, PkiError
from failover.api.users import UsersFileError
from failover.config import ConfigError
from failover.coordination.credentials import CredentialsError
from failover.errors import StoreRefusedError, StoreUnavailableError
from replicator.errors import (
    EpochNotGrantedError,
    PermissionDeniedError,
    StaleEpochError,
    TargetUnavailableError,
    UsageError,
    VolumeError,
    VolumeNotFoundError,
)
from replicator.units import parse_rate_limit
from runbooks.loader import RunbookError
from tests.procs import REPO

DOC = os.path.join(REPO, "docs", "cli.md")

# Errors of one kind, whichever command or package reports them, exit with one code.
KINDS: dict[str, tuple[type[Exception], ...]] = {
    "a bad flag, argument or configuration": (
        UsageError, ConfigError, RunbookError, CredentialsError, UsersFileError, PkiError,
        KeyPermissionError),
    "unreachable": (TargetUnavailableError, StoreUnavailableError),
    "refused": (StaleEpochError, PermissionDeniedError, EpochNotGrantedError, StoreRefusedError),
}


def test_docs_cli_md_is_generated_from_the_code() -> None:
    with open(DOC, encoding="utf-8") as fh:
        assert fh.read() == render(), "run: python -m drctl.exitcodes > docs/cli.md"


def test_every_error_class_exit_code_is_in_the_table_and_the_doc() -> None:
    with open(DOC, encoding="utf-8") as fh:
        doc = fh.read()
    table = {entry.code for entry in TABLE}
    classes = error_classes()
    assert len(classes) >= 25
    for cls in classes:
        code, exit_code = getattr(cls, "code", None), getattr(cls, "exit_code", None)
        assert isinstance(code, str) and code, cls
        assert isinstance(exit_code, int) and exit_code in table, (cls, exit_code)
        assert f"| `{code}` | {exit_code} |" in doc, (cls, code)
    codes = [getattr(cls, "code", "") for cls in classes]
    assert len(codes) == len(set(codes)), "two error classes share a code"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_kind_of_error_has_one_exit_code(kind: str) -> None:
    codes = {cls: getattr(cls, "exit_code", None) for cls in KINDS[kind]}
    assert len(set(codes.values())) == 1, codes


def test_no_such_replica_has_its_own_exit_code() -> None:
    others = {getattr(c, "exit_code", None) for c in error_classes()
              if c is not VolumeNotFoundError}
    assert VolumeNotFoundError.exit_code not in others
    assert VolumeNotFoundError.exit_code != VolumeError.exit_code


@pytest.mark.parametrize(("text", "value"), [("20MB/s", 20_000_000), ("65536", 65536),
                                             ("64KiB/s", 65536)])
def test_rate_limit_takes_a_rate(text: str, value: int) -> None:
    assert parse_rate_limit(text) == value


@pytest.mark.parametrize("text", ["20", "20kB/s", "1000"])
def test_a_rate_limit_too_low_to_be_meant_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="unit mistake"):
        parse_rate_limit(text)


@pytest.mark.parametrize(("check", "bad"), [
    (argtypes.seconds, ["-1", "0", "nan", "inf", "x", ""]),
    (argtypes.seconds_or_zero, ["-1", "-0.5", "nan", "x"]),
    (argtypes.count, ["0", "-3", "1.5", "x"]),
    (argtypes.natural, ["-1", "x"]),
    (argtypes.zstd_level, ["-1", "23"]),
    (argtypes.port, ["0", "65536", "-1", "x"]),
    (argtypes.hostport, ["h", "h:", ":1", "h:x", "h:0", "a:b:c", "[::1", "[::1]", "::1:7400",
                         "[[::1]]:5", "[::1]x:5"]),
])
def test_argument_types_refuse_what_makes_no_sense(check: object, bad: list[str]) -> None:
    assert callable(check)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            check(text)


def test_argument_types_take_what_does() -> None:
    assert argtypes.seconds("0.5") == 0.5 and argtypes.seconds_or_zero("0") == 0
    assert argtypes.count("3") == 3 and argtypes.natural("0") == 0
    assert argtypes.zstd_level("22") == 22 and argtypes.port("7400") == 7400
    assert [argtypes.parse_hostport(t) for t in ("h:1", "[::1]:7400", "10.0.0.1:53")] == [
        ("h", 1), ("::1", 7400), ("10.0.0.1", 53)]
    with pytest.raises(argtypes.AddressError, match=r"needs brackets, \[::1\]:7400"):
        argtypes.parse_hostport("::1:7400")


def test_bind_problem_names_a_port_in_use_and_a_foreign_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "already in use" in (bind_problem("127.0.0.1", port) or "")
    assert bind_problem("127.0.0.1", port) is None
    assert "no such address" in (bind_problem("192.0.2.1", port) or "")
