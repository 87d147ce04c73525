"""Counts in messages: "1 block", "2 blocks"."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (nouns whose plural takes an "s")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
