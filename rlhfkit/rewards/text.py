"""Rewards on the text itself: :class:`Length` (and the preference recipe's piecewise
:func:`preference_length_reward`), :class:`Copy`, :class:`Relevance` (a sentence-embedding model),
:class:`TokenFrequency`, and the offline gibberish score (:class:`Gibberish`, which can use a hub
classifier instead).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional, Sequence

from rlhfkit.config import ConfigError
from rlhfkit.rewards.classifiers import Classifier, _default_device, _label_names, classifier_logits

GIBBERISH_LABELS = ("clean", "mild gibberish", "word salad", "noise")
RESOURCES = Path(__file__).resolve().parent.parent / "resources"  # rlhfkit/resources



def preference_length_reward(n: int) -> float:
    """The piecewise length score of the preference-generation recipe, implemented literally.

    With ``d_min = (n - 5) / 5`` and ``d_max = (n - 20) / 20``: ``d_min * 1e-4`` if ``|d_min| < 1``
    (0 <= n < 10: almost flat), ``|d_min + d_max| * 10`` if ``|d_min| > 1 > |d_max|`` (10 < n < 40:
    grows as ``|5n - 40| / 2``, e.g. 10 at n = 12, 55 at n = 30), else ``d_max * 0.9`` (n = 10 and
    n >= 40, e.g. 0.9 at n = 40). Note the jump at n = 40 (77.5 just before, 0.9 at 40).
    """
    d_min = (n - 5) / 5
    d_max = (n - 20) / 20
    if abs(d_min) < 1:
        return d_min * 1e-4
    if abs(d_min) > 1 > abs(d_max):
        return abs(d_min + d_max) * 10
    return d_max * 0.9


class Length:
    """Length of the completion in words (whitespace-separated).

    With ``min_words`` and/or ``max_words``: 1.0 inside ``[min_words, max_words]``, falling linearly
    outside it: ``n / min_words`` below (0 at n = 0) and ``max(0, 1 - (n - max_words) / max_words)``
    above (0 at twice ``max_words``). An unset end is open. With neither set:
    :func:`preference_length_reward`.
    """

    def __init__(self, min_words: Optional[int] = None, max_words: Optional[int] = None):
        if min_words is not None and min_words < 0:
            raise ConfigError(f"length: min_words must be >= 0, got {min_words}")
        if max_words is not None and max_words <= 0:
            raise ConfigError(f"length: max_words must be > 0, got {max_words}")
        if min_words is not None and max_words is not None and min_words > max_words:
            raise ConfigError(f"length: min_words ({min_words}) > max_words ({max_words})")
        self.min_words, self.max_words = min_words, max_words
        self.name = "length"

    def score(self, n: int) -> float:
        if self.min_words is None and self.max_words is None:
            return preference_length_reward(n)
        if self.min_words and n < self.min_words:
            return n / self.min_words
        if self.max_words is not None and n > self.max_words:
            return max(0.0, 1.0 - (n - self.max_words) / self.max_words)
        return 1.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [float(self.score(len(c.split()))) for c in completions]


class Copy:
    """Minus the share of the completion's word n-grams that occur verbatim in its prompt
    (:func:`rlhfkit.metrics.copy_rate`, the copy rate ``rlhfkit eval`` reports): 0 for an answer
    that quotes nothing, -1 for one made only of quotes. Added to a judge's reward it stops a policy
    from parroting the prompt, which a judge of the answer alone may score as harmless."""

    def __init__(self, ngram: int = 4):
        if ngram < 1:
            raise ConfigError(f"copy: ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.name = "copy"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from rlhfkit.metrics import copy_rate

        return [-copy_rate(c, p, self.ngram) for p, c in zip(prompts, completions)]


class Relevance:
    """Cosine relevance of what the completion says beyond quoting to its row's ``column`` (e.g. the
    text it answers): :func:`rlhfkit.metrics.relevance_uncopied`, the relevance ``rlhfkit eval``
    reports with the copied spans removed (sentence embeddings, all-MiniLM-L6-v2 unless ``model``).
    Word n-grams copied verbatim from the prompt are taken out first, so quoting earns nothing; an
    answer with nothing left scores 0. Added to a judge's reward it keeps a policy on topic, where a
    judge of the answer alone pays as much for a generic dodge."""

    def __init__(self, column: str, ngram: int = 4, model: Optional[str] = None):
        if ngram < 1:
            raise ConfigError(f"relevance: ngram must be >= 1, got {ngram}")
        self.column, self.ngram, self.model = column, ngram, model
        self.name = "relevance"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from rlhfkit.metrics import relevance_uncopied
        from rlhfkit.rewards.base import _column

        sources = [str(s) for s in _column(columns, self.column, len(completions), self.name)]
        return relevance_uncopied(completions, prompts, sources, self.ngram, self.model)


class TokenFrequency:
    """Fraction of the completion's whitespace-separated words equal to ``token`` (0 when empty).

    A test reward: a policy trained on it must learn to emit ``token`` more often.
    """

    def __init__(self, token: str):
        self.token = token
        self.name = f"token_frequency:{token}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        out = []
        for c in completions:
            words = c.split()
            out.append(sum(w == self.token for w in words) / len(words) if words else 0.0)
        return out


# --------------------------------------------------------------------------------------------
# Gibberish
# --------------------------------------------------------------------------------------------

_STRIP = ".,;:!?\"'()[]{}<>«»“”‘’`*_-—–…/\\"
_NUMBER = re.compile(r"[$€£]?\d+(?:[.,:]\d+)*(?:%|st|nd|rd|th|s|am|pm|k)?")
_CLITIC = re.compile(r"'(?:s|t|re|ve|ll|d|m)$")


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """The bundled English word list (SCOWL via Debian wamerican + wbritish; resources/README.md)."""
    return frozenset((RESOURCES / "words.txt").read_text(encoding="ascii").split())


def _is_word(token: str, words: frozenset[str]) -> Optional[bool]:
    """True for a dictionary word, False for a non-word, None for punctuation and numbers (ignored)."""
    t = token.replace("’", "'").strip(_STRIP).lower()
    if not t or _NUMBER.fullmatch(t):
        return None
    t = _CLITIC.sub("", t)  # don't -> don, cat's -> cat
    if len(t) == 1:
        return t in ("a", "i")
    parts = [p for p in re.split(r"[-']", t) if p]
    return bool(parts) and all(p in words for p in parts)


def _repeat_fraction(tokens: list[str], n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the text (repetition loops)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def gibberish_parts(text: str) -> tuple[float, float]:
    """(dictionary-word ratio, repeated-trigram fraction) of ``text``; the ratio is 0 with no words."""
    words = english_words()
    tokens = text.split()
    status = [s for s in (_is_word(t, words) for t in tokens) if s is not None]
    ratio = sum(status) / len(status) if status else 0.0
    normalised = [t.replace("’", "'").strip(_STRIP).lower() for t in tokens]
    return ratio, _repeat_fraction([t for t in normalised if t])


def gibberish_score(text: str) -> float:
    """Offline cleanliness score in [0, 1]: dictionary-word ratio * (1 - repeated-trigram fraction).

    Fluent English scores ~1, random letters ~0, loops ("the the the the") are pulled down. A
    heuristic: it cannot see word salad made of real words; use a hub classifier (``model``) for that.
    """
    ratio, loops = gibberish_parts(text)
    return ratio * (1.0 - loops)


def gibberish_label(text: str, model: Optional[str] = None, device: Optional[str] = None) -> tuple[str, float]:
    """(label, confidence) with labels clean / mild gibberish / word salad / noise.

    With ``model`` (a HF classifier with those labels): the argmax label and its probability.
    Offline, from :func:`gibberish_parts` (ratio r, loops l, score s = r (1 - l)):
    ``("clean", s)`` if s >= 0.5; else ``("noise", 1 - r)`` if r < 0.5; else
    ``("word salad", l)`` if l >= 0.5; else ``("mild gibberish", 1 - s)``.
    """
    if model is not None:
        return gibberish_labels([text], model, device)[0]
    ratio, loops = gibberish_parts(text)
    s = ratio * (1.0 - loops)
    if s >= 0.5:
        return "clean", s
    if ratio < 0.5:
        return "noise", 1.0 - ratio
    if loops >= 0.5:
        return "word salad", loops
    return "mild gibberish", 1.0 - s


def gibberish_labels(texts: Sequence[str], model: Optional[str] = None, device: Optional[str] = None,
                     batch_size: int = 32, max_length: int = 512) -> list[tuple[str, float]]:
    """:func:`gibberish_label` of many texts (one batched classifier pass when ``model`` is set)."""
    if model is None:
        return [gibberish_label(t) for t in texts]
    device = device or _default_device()
    probs = classifier_logits(model, texts, batch_size, max_length, "right", device).softmax(-1)  # (N, C)
    names = _label_names(model, device)
    conf, idx = probs.max(-1)
    return [(names[i], float(c)) for i, c in zip(idx.tolist(), conf)]


class Gibberish:
    """p(clean) of the completion: a HF gibberish classifier (``model``, labels clean / mild
    gibberish / word salad / noise, e.g. ``madhurjindal/autonlp-Gibberish-Detector-492513457``) or,
    by default, the offline :func:`gibberish_score`."""

    def __init__(self, model: Optional[str] = None, batch_size: int = 32, max_length: int = 512,
                 device: Optional[str] = None):
        self.model, self.batch_size, self.max_length, self.device = model, batch_size, max_length, device
        self.name = f"gibberish:{model}" if model else "gibberish"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if self.model is None:
            return [gibberish_score(c) for c in completions]
        return Classifier(self.model, "clean", "probability", "completion", self.batch_size,
                          self.max_length, self.device)(prompts, completions)

    def labels(self, completions: Sequence[str]) -> list[tuple[str, float]]:
        return gibberish_labels(completions, self.model, self.device, self.batch_size, self.max_length)
