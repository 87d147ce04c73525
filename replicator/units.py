"""Parsing of human-written sizes and rates ("20MB/s", "512KiB", "1.5G")."""

from __future__ import annotations

import re

from replicator.errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text``: decimal units (kB, MB, GB) are powers of 1000, binary (KiB...) of 1024."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(
            f"invalid {what} {text!r}: expected a number with an optional unit, e.g. 20MB"
        )
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise UsageError(
            f"invalid {what} {text!r}: unknown unit {unit!r} (use B, kB, MB, GB, KiB, MiB, GiB)"
        )
    value = int(float(number) * factor)
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    return value


def parse_rate(text: str) -> int:
    """Bytes per second in ``text`` ("20MB/s", "100MiB/s", "5M"); the "/s" suffix is optional."""
    body = text.strip()
    if body.startswith("-"):
        raise UsageError(f"invalid rate {text!r}: must be greater than zero")
    if body.lower().endswith("/s"):
        body = body[:-2]
    elif body.lower().endswith("ps"):
        body = body[:-2]
    return parse_size(body, what="rate")


# A rate cap below this is almost certainly a unit mistake ("20" or "20kB/s" for 20MB/s): the
# CLI's --rate-limit refuses it as a runbook's rate_limit does (runbooks/replication_fields.py)
MIN_RATE_LIMIT = 64 * 1024


def parse_rate_limit(text: str) -> int:
    """A bandwidth cap: a rate (``parse_rate``) of at least ``MIN_RATE_LIMIT``."""
    rate = parse_rate(text)
    if rate < MIN_RATE_LIMIT:
        raise UsageError(_too_low(text, rate, "a cap", ""))
    return rate


_ZERO_RATE = re.compile(r"^(0+(\.0*)?[a-z]*(/s|ps)?|off)$")  # "0", "0.0", "0MB/s", "off"


def parse_verify_rate(text: str) -> int:
    """The background verify's rate (``push --verify-rate``, a runbook's
    ``replication.verify_rate``): 0 or "off" turns it off, otherwise a rate of at least
    ``MIN_RATE_LIMIT`` (lower is almost certainly a unit mistake, as for a cap)."""
    if _ZERO_RATE.match("".join(text.split()).lower()):
        return 0
    rate = parse_rate(text)
    if rate < MIN_RATE_LIMIT:
        raise UsageError(_too_low(text, rate, "a verify rate",
                                  " 0 turns the background verify off"))
    return rate


def _too_low(text: str, rate: int, what: str, more: str) -> str:
    number = re.match(r"\s*(\d+(?:\.\d+)?)", text)
    return (f"{text!r} is {rate} bytes/s, below the 64KiB/s minimum: {what} that low is "
            "almost certainly a unit mistake (did you mean "
            f"{number.group(1) if number else 20}MB/s?{more})")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
