"""Reward functions: ``fn(prompts, completions, **columns) -> list[float]``.

Every reward in rlhfkit, and every Python callable a user hands to ``rlhfkit.train(reward_fn=...)``,
has the same signature: ``prompts`` and ``completions`` are lists of strings of equal length, and
``columns`` holds the other dataset columns of the same rows as per-row lists (e.g.
``target_label=[...]``, ``summary=[...]``). The result is one float per completion.

Two ways to get one:

* from config (``reward:`` sections of a recipe): ``build_reward(cfgs, bias)`` returns a
  :class:`Composite` (weighted sum plus bias; ``.score()`` also returns every part's raw values for
  logging as ``reward/<name>``);
* from Python: the classes below, e.g. ``Toxicity(backend="hatesonar")``, ``Length(min_words=5)``,
  ``Composite([("label", 0.4, LabelMatch("emotion")), ("len", 0.25, Length())], bias=0.001)``.

Models (HF classifiers, reward models, the hatesonar ONNX graph, VADER) load on the first call and
are cached for the life of the process. Nothing here trains.

Every reward built by ``build_reward`` or placed in a ``Composite`` runs behind
:func:`validate_reward`, which turns a wrong count, a non-number, NaN or inf into a ``UserError``
naming the function, e.g. ``reward 'python:mymod:f' returned 3 values for 4 completions``.

Modules (every name is re-exported here, so ``from rlhfkit.rewards import X`` is the import path):
``base`` (the contract, :func:`validate_reward`), ``classifiers`` (HF classifiers, sentiment, label
match), ``reward_model`` (:class:`RewardModel`), ``toxicity``, ``text`` (length, copy, relevance,
token frequency, gibberish), ``custom`` (:class:`PythonReward`), ``judges`` (the named scorers of
``rlhfkit eval``), ``composite`` (:class:`Composite`, :class:`ReferenceNormalized`, :func:`build_reward`).
"""
from __future__ import annotations

from rlhfkit.rewards.base import RewardFn, ValidatedReward, check_rewards, join_prompt_completion, validate_reward
from rlhfkit.rewards.classifiers import Classifier, LabelMatch, Sentiment, classifier_logits, vader_compound, vader_label
from rlhfkit.rewards.composite import Composite, ReferenceNormalized, build_reward, reward_from_config
from rlhfkit.rewards.custom import PythonReward, load_function
from rlhfkit.rewards.judges import JUDGE_KINDS, EvalJudgeConfig, WordList, build_judge, judge_names, profanity_wordlist
from rlhfkit.rewards.reward_model import (REWARD_SPEC, RewardModel, last_token_rewards, pad_right, reward_input_ids,
                                          reward_spec)
from rlhfkit.rewards.text import (GIBBERISH_LABELS, RESOURCES, Copy, Gibberish, Length, Relevance, TokenFrequency,
                                  english_words, gibberish_label, gibberish_labels, gibberish_parts, gibberish_score,
                                  preference_length_reward)
from rlhfkit.rewards.toxicity import Toxicity, toxicity_prob

__all__ = [
    "RewardFn", "ValidatedReward", "validate_reward", "check_rewards", "join_prompt_completion",
    "classifier_logits", "Classifier", "RewardModel", "reward_input_ids", "pad_right",
    "last_token_rewards", "reward_spec", "toxicity_prob", "Toxicity", "vader_compound",
    "vader_label", "Sentiment", "LabelMatch", "preference_length_reward", "Length", "Copy", "Relevance",
    "TokenFrequency",
    "english_words", "gibberish_parts", "gibberish_score", "gibberish_label", "gibberish_labels",
    "Gibberish", "ReferenceNormalized", "Composite", "PythonReward", "load_function",
    "reward_from_config", "build_reward", "GIBBERISH_LABELS", "REWARD_SPEC", "RESOURCES",
    "EvalJudgeConfig", "WordList", "build_judge", "judge_names", "profanity_wordlist", "JUDGE_KINDS",
]
