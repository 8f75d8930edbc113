"""The reward contract and its checks: ``fn(prompts, completions, **columns) -> list[float]``.

:func:`validate_reward` wraps any reward so that a wrong count, a non-number, NaN or inf becomes a
``UserError`` naming the function; :func:`join_prompt_completion` is the text reward models score.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

from rlhfkit.config import UserError

RewardFn = Callable[..., list[float]]



class ValidatedReward:
    """Wraps a reward function and checks what it returns (count, numbers, finite)."""

    def __init__(self, fn: RewardFn, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise UserError(
                f"reward '{self.name}' got {len(prompts)} prompts for {len(completions)} completions"
            )
        return check_rewards(self.fn(list(prompts), list(completions), **columns), len(completions), self.name)

    def __getattr__(self, attr: str) -> Any:  # expose the wrapped reward's extras (e.g. .labels)
        if attr == "fn":
            raise AttributeError(attr)
        return getattr(self.fn, attr)

    def __repr__(self) -> str:
        return f"ValidatedReward({self.name!r})"


def validate_reward(fn: RewardFn, name: Optional[str] = None) -> ValidatedReward:
    """Wrap ``fn`` so that a bad result raises ``UserError`` naming it (idempotent)."""
    if isinstance(fn, ValidatedReward):
        return fn
    if not callable(fn):
        raise UserError(f"reward '{name or fn!r}' is not callable")
    return ValidatedReward(fn, name or _callable_name(fn))


def check_rewards(values: Any, n: int, name: str) -> list[float]:
    """``values`` as ``list[float]`` of length ``n``, or ``UserError`` naming reward ``name``."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # torch / numpy
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise UserError(f"reward '{name}' returned {type(values).__name__}, expected a list of {n} numbers")
    values = list(values)
    if len(values) != n:
        raise UserError(f"reward '{name}' returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 and not isinstance(v, numbers.Real):
            v = v.item()  # 0-d tensor
        if not isinstance(v, numbers.Real):
            raise UserError(
                f"reward '{name}' returned a non-number for completion {i}: {v!r} ({type(v).__name__})"
            )
        v = float(v)
        if not math.isfinite(v):
            raise UserError(f"reward '{name}' returned {v} for completion {i}")
        out.append(v)
    return out


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "name", None)
    if isinstance(name, str):
        return name
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}:{qual}" if module and module != "__main__" else qual


def _column(columns: dict, key: str, n: int, reward: str) -> list:
    if key not in columns:
        raise UserError(
            f"reward '{reward}' needs the column '{key}'; the rows have: {', '.join(sorted(columns)) or 'none'}"
        )
    values = list(columns[key])
    if len(values) != n:
        raise UserError(f"reward '{reward}': column '{key}' has {len(values)} values for {n} completions")
    return values


def join_prompt_completion(prompt: str, completion: str) -> str:
    """The text a reward model scores: ``prompt + " " + completion``.

    No space is added when the prompt is empty, already ends with whitespace, or the completion
    starts with whitespace. No chat template is applied even when the tokenizer has one (a
    deliberate simplification): ``rlhfkit reward`` trains on the same join, so train and use match.
    """
    if not prompt:
        return completion
    if prompt[-1].isspace() or (completion and completion[0].isspace()):
        return prompt + completion
    return prompt + " " + completion
