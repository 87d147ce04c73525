"""argparse ``type=`` checks shared by every drctl command: a bad value is refused by the
parser, with the flag named ("argument --interval: expected seconds > 0, got '-1'"), before
the command does anything."""

from __future__ import annotations

import argparse
import ipaddress
import math


def _number(text: str, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise argparse.ArgumentTypeError(
            f"expected seconds {'> 0' if strict else '>= 0'}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, greater than zero."""
    return _number(text, strict=True)


def seconds_or_zero(text: str) -> float:
    """A duration in seconds, zero or more (0 has a meaning of its own: see the flag's help)."""
    return _number(text, strict=False)


def _whole(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}")
    return value


def count(text: str) -> int:
    """A whole number greater than zero."""
    return _whole(text, 1)


def natural(text: str) -> int:
    """A whole number, zero or more."""
    return _whole(text, 0)


def zstd_level(text: str) -> int:
    """A zstd compression level (0: no compression)."""
    return _whole(text, 0, 22)


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1..65535")
    return int(text)


class AddressError(ValueError):
    """A HOST:PORT that is not one (the message names the address and what is wrong)."""


def parse_hostport(text: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT) and check the port: the one parser of every
    drctl address flag (``--listen``, ``--metrics-listen``, ``--to``, ...), so each says the
    same about the same mistake. AddressError if malformed."""
    if text.rpartition(":")[0].endswith(":"):
        try:  # an IPv6 address alone ("::1", "fe80::1"): its last group is not a port
            ipaddress.IPv6Address(text)
        except ValueError:
            pass
        else:
            raise AddressError(f"invalid address {text!r}: an IPv6 address needs brackets "
                               f"and a port, [{text}]:PORT")
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or not port_text.isdigit() or "[" in host or "]" in host:
        raise AddressError(f"invalid address {text!r}: expected HOST:PORT")
    if ":" in host and not bracketed:  # gRPC would read part of it as the port
        raise AddressError(f"invalid address {text!r}: an IPv6 address needs brackets, "
                           f"[{host}]:{port_text}")
    number = int(port_text)
    if not 0 < number < 65536:
        raise AddressError(f"invalid address {text!r}: port {number} out of range "
                           "(1..65535)")
    return host, number


def hostport(text: str) -> str:
    """A HOST:PORT address (returned as given; ``parse_hostport`` splits it)."""
    try:
        parse_hostport(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
