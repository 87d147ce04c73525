"""Damage to a file, for the tests that check it is noticed."""

from __future__ import annotations


def flip_byte(path: str, offset: int) -> None:
    """Invert every bit of the byte at ``offset`` (writing a constant left a byte that already
    held it as it was: the damage the test meant never happened)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))
