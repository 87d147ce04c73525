from __future__ import annotations

import argparse
import re

import pytest

from drctl.argtypes import AddressError, hostport, parse_hostport
from replicator.errors import ALL_ERRORS, UsageError
from replicator.units import parse_rate, parse_size, parse_verify_rate


@pytest.mark.parametrize(("text", "value"), [
    ("20MB/s", 20_000_000), ("100MiB/s", 100 << 20), ("5M", 5_000_000), ("1.5G", 1_500_000_000),
    ("512KiB", 512 << 10), ("4096", 4096), ("8 kB", 8000),
])
def test_rates_and_sizes(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "", "-3MB", "0", "12XB", "MB"])
def test_bad_rates_say_what_is_wrong(text: str) -> None:
    with pytest.raises(UsageError, match="invalid rate"):
        parse_rate(text)


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("0/s", 0), ("0.0", 0), ("off", 0),
                                             ("Off", 0), ("64KiB/s", 64 << 10),
                                             ("2MiB/s", 2 << 20)])
def test_verify_rates(text: str, value: int) -> None:
    assert parse_verify_rate(text) == value


def test_a_verify_rate_below_64kib_is_a_unit_mistake_as_for_a_cap() -> None:
    with pytest.raises(UsageError, match=r"'20' is 20 bytes/s, below the 64KiB/s minimum: .*"
                       r"\(did you mean 20MB/s\? 0 turns the background verify off\)"):
        parse_verify_rate("20")
    with pytest.raises(UsageError, match="did you mean 20MB/s"):
        parse_verify_rate("20kB/s")
    with pytest.raises(UsageError, match="invalid rate 'fast'"):
        parse_verify_rate("fast")


def test_size_units() -> None:
    assert parse_size("1GiB") == 1 << 30


def test_hostport() -> None:
    """One parser for every address flag (drctl/argtypes.py), the same words in each."""
    assert parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    assert parse_hostport("db.example:65535") == ("db.example", 65535)
    for bad, words in (("host", "expected HOST:PORT"), (":80", "expected HOST:PORT"),
                       ("[]:80", "expected HOST:PORT"), ("h:x", "expected HOST:PORT"),
                       ("h:99999", "port 99999 out of range (1..65535)"),
                       ("h:0", "port 0 out of range")):
        with pytest.raises(AddressError, match=re.escape(f"invalid address {bad!r}: {words}")):
            parse_hostport(bad)
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(words)):
            hostport(bad)
    assert hostport("[::1]:9") == "[::1]:9"


def test_error_codes_are_unique_and_have_exit_codes() -> None:
    codes = [cls.code for cls in ALL_ERRORS]
    assert len(codes) == len(set(codes))
    assert all(isinstance(cls.exit_code, int) and cls.exit_code > 0 for cls in ALL_ERRORS)
