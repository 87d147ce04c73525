"""Words in messages: counts ("1 block", "2 blocks") and the word a misspelt one stands for."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (nouns whose plural takes an "s")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt ``word`` most likely stands for (None: none is close)."""
    near = difflib.get_close_matches(word, sorted(choices), n=1)
    return near[0] if near else None
