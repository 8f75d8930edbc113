"""Combinators and the config entry points: :class:`Composite` (weighted sum plus bias),
:class:`ReferenceNormalized`, and :func:`reward_from_config` / :func:`build_reward`, which build
every reward kind from ``RewardConfig`` sections.
"""
from __future__ import annotations

from typing import Optional, Sequence

from rlhfkit.config import ConfigError, RewardConfig, from_dict
from rlhfkit.rewards.base import RewardFn, _column, validate_reward
from rlhfkit.rewards.classifiers import Classifier, LabelMatch, Sentiment
from rlhfkit.rewards.custom import PythonReward
from rlhfkit.rewards.reward_model import RewardModel
from rlhfkit.rewards.text import Copy, Gibberish, Length, Relevance, TokenFrequency
from rlhfkit.rewards.toxicity import Toxicity



class ReferenceNormalized:
    """``r(x, y) - r(x, y_ref)`` with ``y_ref`` from ``columns[reference_column]``.

    The reward of the human reference summary is subtracted (Stiennon et al., 2020, "Learning to
    summarize from human feedback": the reward model is normalised so that reference summaries
    score 0).
    """

    def __init__(self, base: RewardFn, reference_column: str):
        self.base = validate_reward(base)
        self.reference_column = reference_column
        self.name = f"reference_normalized:{self.base.name}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        refs = _column(columns, self.reference_column, len(completions), self.name)
        r = self.base(prompts, completions, **columns)
        r_ref = self.base(prompts, [str(y) for y in refs], **columns)
        return [a - b for a, b in zip(r, r_ref)]


class Composite:
    """Weighted sum of rewards plus a bias: ``bias + sum_k w_k r_k(x, y)``.

    ``parts`` is a list of ``(name, weight, fn)``; names must be distinct (they become the log keys
    ``reward/<name>``). ``score()`` returns the total and every part's raw (unweighted) values.
    """

    def __init__(self, parts: Sequence[tuple[str, float, RewardFn]], bias: float = 0.0):
        if not parts:
            raise ConfigError("composite reward needs at least one part")
        names = [p[0] for p in parts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"composite reward: part names must be distinct, repeated: {dupes}")
        self.parts = [(str(name), float(w), validate_reward(fn, getattr(fn, "name", None) or str(name)))
                      for name, w, fn in parts]
        self.bias = float(bias)
        self.name = "composite"

    def score(self, prompts, completions, **columns) -> tuple[list[float], dict[str, list[float]]]:
        total = [self.bias] * len(completions)
        raw: dict[str, list[float]] = {}
        for name, weight, fn in self.parts:
            values = fn(prompts, completions, **columns)
            raw[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        return total, raw

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.score(prompts, completions, **columns)[0]


# --------------------------------------------------------------------------------------------
# From config
# --------------------------------------------------------------------------------------------


def reward_from_config(cfg: RewardConfig | dict, device: Optional[str] = None) -> RewardFn:
    """One reward function (unweighted, not validated) from a ``RewardConfig`` section."""
    if isinstance(cfg, dict):
        cfg = from_dict(RewardConfig, cfg, source="reward config", prefix="reward.")
    cfg.validate()
    kind = cfg.kind
    if kind == "classifier":
        return Classifier(cfg.model, cfg.label, cfg.output, cfg.text, cfg.batch_size, cfg.max_length, device)
    if kind == "reward_model":
        return RewardModel(cfg.model, cfg.normalize, cfg.batch_size, cfg.max_length, device)
    if kind == "toxicity":
        return Toxicity(cfg.backend, cfg.invert)
    if kind == "sentiment":
        return Sentiment()
    if kind == "label_match":
        return LabelMatch(cfg.target_column, cfg.model, None, cfg.batch_size, cfg.max_length, device)
    if kind == "length":
        return Length(cfg.min_words, cfg.max_words)
    if kind == "gibberish":
        return Gibberish(cfg.model, cfg.batch_size, cfg.max_length, device)
    if kind == "copy":
        return Copy(cfg.ngram)
    if kind == "relevance":
        return Relevance(cfg.source_column, cfg.ngram, cfg.model)
    if kind == "token_frequency":
        return TokenFrequency(cfg.token)
    if kind == "python":
        return PythonReward(cfg.function)
    if kind == "reference_normalized":
        base = from_dict(RewardConfig, cfg.base, source="reward config", prefix="reward.base.")
        if base.kind == "reference_normalized":
            raise ConfigError("reward.base of reference_normalized cannot itself be reference_normalized")
        return ReferenceNormalized(validate_reward(reward_from_config(base, device)), cfg.reference_column)
    raise ConfigError(f"unknown reward kind '{kind}'")  # validate() already rejects it


def build_reward(cfgs: Sequence[RewardConfig | dict] | RewardConfig | dict, bias: float = 0.0,
                 device: Optional[str] = None) -> Composite:
    """The recipe's reward: ``bias + sum_k weight_k r_k`` over the configured rewards.

    Always a :class:`Composite` (one part for a single config), so recipes can log every part via
    ``.score()``. Part names are ``cfg.name`` or the kind, numbered when a kind repeats
    (``classifier``, ``classifier_2``).
    """
    if isinstance(cfgs, (RewardConfig, dict)):
        cfgs = [cfgs]
    parts = []
    seen: dict[str, int] = {}
    for cfg in cfgs:
        if isinstance(cfg, dict):
            cfg = from_dict(RewardConfig, cfg, source="reward config", prefix="reward.")
        fn = reward_from_config(cfg, device)
        name = cfg.name or cfg.kind
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            if cfg.name:
                raise ConfigError(f"two rewards are named '{name}'; names must be distinct")
            name = f"{name}_{seen[name]}"
        label = f"{cfg.name} ({fn.name})" if cfg.name and cfg.name != fn.name else fn.name
        parts.append((name, cfg.weight, validate_reward(fn, label)))
    return Composite(parts, bias)
