"""Reward functions imported by name in tests/test_rewards.py (``reward_fns_example:NAME``)."""
from __future__ import annotations


def n_chars(prompts, completions, **columns):
    """Number of characters of each completion."""
    return [len(c) for c in completions]


def uses_column(prompts, completions, bonus, **columns):
    """Length of the completion plus the row's ``bonus`` column."""
    return [len(c) + b for c, b in zip(completions, bonus)]


def wrong_count(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def returns_nan(prompts, completions, **columns):
    return [float("nan")] + [0.0] * (len(completions) - 1)


def returns_inf(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1) + [float("inf")]


def returns_text(prompts, completions, **columns):
    return ["0.5"] * len(completions)


not_callable = 3
