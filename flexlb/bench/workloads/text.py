"""Synthetic words for prompts: deterministic per seed, one flexlb token per word."""

from __future__ import annotations

import itertools
import random

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vo", "ni", "pe", "dra", "xi", "qua", "bel", "mor", "tes", "un")
# Up to 16 + 256 + 4096 pseudo-words of one to three syllables: enough that two random sentences share no 64-word run.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys("".join(parts) for n in (1, 2, 3) for parts in itertools.product(_SYLLABLES, repeat=n))
)


def random_words(rng: random.Random, count: int) -> str:
    """``count`` words drawn from ``VOCABULARY`` with ``rng``, joined by spaces ('' for 0)."""
    return " ".join(rng.choices(VOCABULARY, k=count)) if count > 0 else ""
