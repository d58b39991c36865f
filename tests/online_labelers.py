"""Labeler functions for the online tests: importable by the tests and by the Ray workers of a
`launch.py online` process started with this folder on PYTHONPATH."""

import math


def has_the(prompt, completion: str) -> bool:
    """Desirable when the completion holds the word "the"; raises on completions holding "dog" (a
    labeler that fails on some samples: those are quarantined with the error)."""
    words = completion.split()
    if "dog" in words:
        raise ValueError("a dog in the completion")
    return "the" in words


def length_score(prompt, completion: str) -> float:
    return float(len(completion))


def returns_text(prompt, completion: str):
    return "yes"


def returns_nan(prompt, completion: str):
    return math.nan if completion else 1.0


def even_length(prompt, completion: str) -> bool:
    """About half of random completions pass: every round has both labels."""
    return len(completion) % 2 == 0
