"""Evaluation metrics: pure functions of numbers and strings (only the semantic relevance functions load a model).

* ``improvement`` / ``toxicity_change``: relative change of a score before and after training, as
  the detoxification recipe reports it ("mean toxicity -9.08%, std -28.75%");
* ``elo_ratings``, ``bradley_terry``, ``win_rate``: comparisons of two or more models;
* ``rouge``: ROUGE-1/2/L F-measures (Lin, 2004) with Google's ``rouge_score``;
* ``semantic_relevance``: cosine similarity of sentence embeddings (all-MiniLM-L6-v2);
  ``relevance_uncopied``: the same with the spans an answer copies from its prompt taken out;
* ``paired_bootstrap``: percentile confidence intervals of any before/after statistic, resampling
  prompts (with all their answers) with replacement;
* ``share_above``, ``perplexity``, ``copy_rate`` / ``strip_copied``: toxic share, fluency and
  copying of answers.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

import numpy as np

from rlhfkit.config import UserError

# --------------------------------------------------------------------------------------------
# Before / after
# --------------------------------------------------------------------------------------------


def improvement(before: float, after: float) -> float:
    """Relative improvement ``(before - after) / before`` of a lower-is-better score.

    0.5 -> 0.3 gives 0.4. NaN when ``before`` is 0 (undefined).
    """
    if before == 0:
        return float("nan")
    return (before - after) / before


def toxicity_change(before_scores: Sequence[float], after_scores: Sequence[float]) -> dict[str, float]:
    """Mean and std of toxicity before and after, and their relative improvements in percent.

    Standard deviations are population std (``np.std``, ddof=0) as in the detoxification recipe.
    A positive ``*_improvement_pct`` means the score went down (less toxic, less spread).
    """
    b = np.asarray(before_scores, dtype=np.float64)
    a = np.asarray(after_scores, dtype=np.float64)
    if b.size == 0 or a.size == 0:
        raise UserError("toxicity_change needs at least one score before and one after")
    mean_b, mean_a, std_b, std_a = float(b.mean()), float(a.mean()), float(b.std()), float(a.std())
    return {
        "mean_before": mean_b,
        "mean_after": mean_a,
        "std_before": std_b,
        "std_after": std_a,
        "mean_improvement_pct": 100.0 * improvement(mean_b, mean_a),
        "std_improvement_pct": 100.0 * improvement(std_b, std_a),
    }


# --------------------------------------------------------------------------------------------
# Pairwise comparisons
# --------------------------------------------------------------------------------------------


def elo_expected(r_a: float, r_b: float) -> float:
    """Probability that a beats b under Elo: ``1 / (1 + 10^((r_b - r_a) / 400))``."""
    return 1.0 / (1.0 + 10.0 ** ((r_b - r_a) / 400.0))


def elo_ratings(matches: Sequence[tuple[Hashable, Hashable, float]], k: float = 32.0,
                initial: float = 1000.0) -> dict[Hashable, float]:
    """Sequential Elo ratings from ``(a, b, outcome)`` matches in the given order.

    ``outcome`` is a's score: 1 (a wins), 0.5 (tie) or 0 (b wins). After each match
    ``r_a += k (s - E_a)`` and ``r_b += k ((1 - s) - (1 - E_a))``. The result depends on the
    order; :func:`bradley_terry` does not.
    """
    ratings: dict[Hashable, float] = {}
    for i, (a, b, s) in enumerate(matches):
        if not 0.0 <= float(s) <= 1.0:
            raise UserError(f"elo_ratings: match {i} has outcome {s}; use 1 (a wins), 0.5 (tie) or 0")
        r_a, r_b = ratings.setdefault(a, initial), ratings.setdefault(b, initial)
        e_a = elo_expected(r_a, r_b)
        ratings[a] = r_a + k * (float(s) - e_a)
        ratings[b] = r_b + k * ((1.0 - float(s)) - (1.0 - e_a))
    return ratings


def bradley_terry(wins: Mapping | Sequence[Sequence[float]] | np.ndarray, scale: str = "log",
                  prior: float = 0.0, max_iter: int = 10_000, tol: float = 1e-12) -> Any:
    """Bradley-Terry strengths by maximum likelihood, P(i beats j) = p_i / (p_i + p_j).

    ``wins``: a square matrix with ``W[i][j]`` = times i beat j, or a mapping ``{(i, j): n}`` or
    ``{i: {j: n}}`` (a tie can be entered as half a win each way). Fitted with the MM iteration of
    Zermelo (1929) / Hunter (2004): ``p_i <- W_i / sum_j n_ij / (p_i + p_j)``, with ``W_i`` the wins
    of i and ``n_ij`` the games between i and j.

    Returned strengths are normalised: ``scale="log"`` gives ``log p_i`` with mean 0 (so
    ``exp(s_i - s_j)`` is the odds that i beats j); ``scale="elo"`` gives
    ``1000 + 400 log10 p_i`` with the mean of ``log p`` at 0 (Elo-compatible: a 400-point gap means
    10:1 odds). A matrix gives a list in row order, a mapping a dict.

    The MLE exists only when every player can be reached from every other through "beat" edges
    (each has a win and a loss within any split); otherwise ``prior`` pseudo-wins added to both
    sides of every pair that met keep it finite, or ``UserError`` says so.
    """
    if scale not in ("log", "elo"):
        raise UserError(f"bradley_terry: scale must be 'log' or 'elo', got '{scale}'")
    names, w = _win_matrix(wins)
    n = len(names)
    if n < 2:
        raise UserError("bradley_terry needs at least two players")
    w = w + prior * ((w + w.T) > 0)  # pseudo-wins both ways for every pair that met
    games = w + w.T  # (n, n) games between i and j
    if not _strongly_connected(w > 0):
        raise UserError("bradley_terry: the strengths are not finite (some player won or lost every game "
                        "against a group); add games or set prior > 0")
    total_wins = w.sum(axis=1)  # (n,)
    p = np.ones(n)
    for _ in range(max_iter):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)  # (n,) sum_j n_ij / (p_i + p_j)
        new = total_wins / denom
        new /= np.exp(np.log(new).mean())  # geometric mean 1
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    log_p = np.log(p) - np.log(p).mean()
    strengths = log_p if scale == "log" else 1000.0 + 400.0 * log_p / math.log(10.0)
    values = [float(s) for s in strengths]
    return values if _is_matrix(wins) else dict(zip(names, values))


def _is_matrix(wins: Any) -> bool:
    return not isinstance(wins, Mapping)


def _win_matrix(wins: Any) -> tuple[list, np.ndarray]:
    if _is_matrix(wins):
        w = np.asarray(wins, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] != w.shape[1]:
            raise UserError(f"bradley_terry: the win matrix must be square, got shape {w.shape}")
        names = list(range(w.shape[0]))
    else:
        pairs: list[tuple[Hashable, Hashable, float]] = []
        for key, value in wins.items():
            if isinstance(value, Mapping):
                pairs.extend((key, j, float(c)) for j, c in value.items())
            elif isinstance(key, tuple) and len(key) == 2:
                pairs.append((key[0], key[1], float(value)))
            else:
                raise UserError(f"bradley_terry: expected {{(i, j): wins}} or {{i: {{j: wins}}}}, got key {key!r}")
        names = []
        for i, j, _ in pairs:
            for x in (i, j):
                if x not in names:
                    names.append(x)
        index = {x: k for k, x in enumerate(names)}
        w = np.zeros((len(names), len(names)))
        for i, j, c in pairs:
            w[index[i], index[j]] += c
    if (w < 0).any() or not np.isfinite(w).all():
        raise UserError("bradley_terry: win counts must be finite and >= 0")
    np.fill_diagonal(w, 0.0)
    return names, w


def _strongly_connected(adj: np.ndarray) -> bool:
    """Every node reaches every other along directed edges ``adj[i, j]`` (i beat j)."""
    n = adj.shape[0]
    for a in (adj, adj.T):
        seen = np.zeros(n, dtype=bool)
        seen[0] = True
        frontier = [0]
        while frontier:
            i = frontier.pop()
            for j in np.nonzero(a[i] & ~seen)[0]:
                seen[j] = True
                frontier.append(int(j))
        if not seen.all():
            return False
    return True


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> float:
    """Fraction of rows where a scores higher than b; ties count one half."""
    if len(scores_a) != len(scores_b):
        raise UserError(f"win_rate: {len(scores_a)} scores for a but {len(scores_b)} for b")
    if not len(scores_a):
        raise UserError("win_rate needs at least one pair of scores")
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(scores_a, scores_b))
    return wins / len(scores_a)


# --------------------------------------------------------------------------------------------
# Text overlap and similarity
# --------------------------------------------------------------------------------------------


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measures over pairs (``rouge_score`` with the Porter stemmer)."""
    if len(predictions) != len(references):
        raise UserError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    if not len(predictions):
        raise UserError("rouge needs at least one prediction")
    pairs = rouge_pairs(predictions, references, types)
    return {t: float(np.mean(v)) for t, v in pairs.items()}


def rouge_pairs(predictions: Sequence[str], references: Sequence[str],
                types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, list[float]]:
    """ROUGE F-measure of every (prediction, reference) pair, per type (for confidence intervals)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise UserError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    out: dict[str, list[float]] = {t: [] for t in types}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # score(target, prediction)
        for t in types:
            out[t].append(scores[t].fmeasure)
    return out


@functools.lru_cache(maxsize=2)
def _embedder(model_path: str, device: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    model = AutoModel.from_pretrained(model_path, trust_remote_code=False).eval().to(device)
    model.requires_grad_(False)
    return tokenizer, model


def embed(texts: Sequence[str], model_path: Optional[str] = None, batch_size: int = 128,
          max_length: int = 256, device: Optional[str] = None):
    """Sentence embeddings ``(N, H)``: mean of the last hidden states over the attention mask,
    L2-normalised (the all-MiniLM-L6-v2 recipe; Reimers & Gurevych, 2019). Texts are batched in
    order of length, so a batch pads to little more than its own texts (as sentence-transformers
    does); the rows come back in the order given."""
    import torch

    from rlhfkit.assets import minilm_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = _embedder(model_path or minilm_path(), device)
    lengths = [len(x) for x in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = torch.empty(0, 0)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state.float()  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
            if not out.numel():
                out = torch.empty(len(texts), mean.shape[-1])
            out[rows] = torch.nn.functional.normalize(mean, dim=-1).cpu()
    return out


def semantic_relevance_pairs(texts: Sequence[str], sources: Sequence[str], model_path: Optional[str] = None,
                             **kwargs) -> list[float]:
    """Cosine similarity of each text's embedding with its source's (in [-1, 1])."""
    if len(texts) != len(sources):
        raise UserError(f"semantic_relevance: {len(texts)} texts for {len(sources)} sources")
    if not len(texts):
        return []
    unique = list(dict.fromkeys([*texts, *sources]))  # each distinct text once
    at = {t: i for i, t in enumerate(unique)}
    e = embed(unique, model_path, **kwargs)  # (U, H)
    a = e[[at[t] for t in texts]]  # (N, H)
    b = e[[at[s] for s in sources]]  # (N, H)
    return (a * b).sum(-1).tolist()  # unit vectors: dot product = cosine


def semantic_relevance(texts: Sequence[str], sources: Sequence[str], model_path: Optional[str] = None,
                       **kwargs) -> float:
    """Mean cosine similarity between each text and its source (all-MiniLM-L6-v2 by default)."""
    sims = semantic_relevance_pairs(texts, sources, model_path, **kwargs)
    if not sims:
        raise UserError("semantic_relevance needs at least one text")
    return float(np.mean(sims))


# --------------------------------------------------------------------------------------------
# Confidence intervals, shares, fluency, copying
# --------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)`` indices drawn uniformly with replacement from ``range(n)``
    (``numpy.random.default_rng(seed).integers``): one row per bootstrap resample."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def paired_bootstrap(stat: Callable[..., float], *groups: Any, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Paired percentile bootstrap (Efron & Tibshirani, 1993) of ``stat(*groups)``.

    Every array in ``groups`` has one row per prompt on axis 0 (e.g. ``(P, k)`` scores of k answers
    per prompt); a resample draws P prompts with replacement and takes the same rows from every
    array, so before/after pairs (and a prompt's k answers) stay together. Returns ``estimate`` =
    ``stat`` on the data, and ``low``/``high``, the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles (numpy's linear interpolation) of ``stat`` over the resamples; resamples where
    ``stat`` is not finite (e.g. a zero denominator) are left out.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.shape[0] != arrays[0].shape[0] for a in arrays):
        raise UserError("paired_bootstrap: every group needs the same number of rows (prompts)")
    if not 0 < level < 1:
        raise UserError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    estimate = float(stat(*arrays))
    idx = bootstrap_indices(arrays[0].shape[0], n_resamples, seed)  # (B, P)
    values = np.array([stat(*(a[i] for a in arrays)) for i in idx], dtype=np.float64)  # (B,)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"estimate": estimate, "low": float("nan"), "high": float("nan")}
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return {"estimate": estimate, "low": float(low), "high": float(high)}


def share_above(values: Sequence[float], threshold: float = 0.5) -> float:
    """Fraction of values strictly above ``threshold`` (e.g. answers with p(toxic) > 0.5)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise UserError("share_above needs at least one value")
    return float((v > threshold).mean())


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Corpus perplexity ``exp(sum of token NLLs / number of tokens)`` of a set of answers, from each
    answer's summed negative log-likelihood (nats) and token count: every token weighs the same."""
    total = float(np.sum(token_counts))
    if total <= 0:
        raise UserError("perplexity needs at least one scored token")
    return math.exp(float(np.sum(nll_sums)) / total)


_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits, ``_`` and ``'``); punctuation is dropped."""
    return _WORD.findall(text.lower())


def _ngram_set(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def copy_rate(answer: str, prompt: str, n: int = 4) -> float:
    """Share of the answer's word n-grams (with repeats) that occur verbatim in the prompt
    (case and punctuation ignored, see :func:`words`). An answer shorter than n words has no
    n-gram and gets 0."""
    if n < 1:
        raise UserError(f"copy_rate: n must be >= 1, got {n}")
    a = words(answer)
    grams = [tuple(a[i:i + n]) for i in range(len(a) - n + 1)]
    if not grams:
        return 0.0
    seen = _ngram_set(words(prompt), n)
    return sum(g in seen for g in grams) / len(grams)


def strip_copied(answer: str, prompt: str, n: int = 4) -> str:
    """The answer's words that are not inside any word n-gram copied verbatim from the prompt,
    joined by spaces: what is left to judge once the quoting is taken out."""
    a = words(answer)
    seen = _ngram_set(words(prompt), n)
    copied = [False] * len(a)
    for i in range(len(a) - n + 1):
        if tuple(a[i:i + n]) in seen:
            copied[i:i + n] = [True] * n
    return " ".join(w for w, c in zip(a, copied) if not c)


def relevance_uncopied(completions: Sequence[str], prompts: Sequence[str], sources: Sequence[str], n: int = 4,
                       model_path: Optional[str] = None) -> list[float]:
    """Cosine relevance to the source of what each answer says beyond quoting: the answer with every
    word n-gram copied verbatim from its prompt taken out (:func:`strip_copied`), embedded as in
    :func:`semantic_relevance_pairs`; an answer with nothing left scores 0."""
    left = [c if copy_rate(c, p, n) == 0 else strip_copied(c, p, n) for c, p in zip(completions, prompts)]
    keep = [i for i, t in enumerate(left) if t]
    out = [0.0] * len(left)
    if keep:
        sims = semantic_relevance_pairs([left[i] for i in keep], [sources[i] for i in keep], model_path)
        for i, v in zip(keep, sims):
            out[i] = v
    return out


__all__ = [
    "improvement", "toxicity_change", "elo_expected", "elo_ratings", "bradley_terry", "win_rate",
    "rouge", "rouge_pairs", "embed", "semantic_relevance", "semantic_relevance_pairs", "bootstrap_indices",
    "paired_bootstrap", "share_above", "perplexity", "words", "copy_rate", "strip_copied",
    "relevance_uncopied",
]
