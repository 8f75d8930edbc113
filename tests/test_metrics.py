"""Evaluation metrics against numbers worked out by hand or the reference implementation."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rlhfkit import metrics as M
from rlhfkit.config import UserError
from rlhfkit.metrics import (
    bradley_terry, elo_ratings, embed, improvement, rouge, semantic_relevance, semantic_relevance_pairs,
    toxicity_change, win_rate,
)

pytestmark = pytest.mark.unit


def test_improvement_and_toxicity_change():
    assert improvement(0.5, 0.3) == pytest.approx(0.4)
    assert improvement(0.2, 0.3) == pytest.approx(-0.5)
    assert math.isnan(improvement(0.0, 0.1))
    # before: mean 0.5, population std 0.1; after: mean 0.3, std 0.05
    out = toxicity_change([0.4, 0.6], [0.25, 0.35])
    assert out["mean_before"] == pytest.approx(0.5) and out["mean_after"] == pytest.approx(0.3)
    assert out["std_before"] == pytest.approx(0.1) and out["std_after"] == pytest.approx(0.05)
    assert out["mean_improvement_pct"] == pytest.approx(40.0)
    assert out["std_improvement_pct"] == pytest.approx(50.0)


def test_elo_by_hand():
    # equal ratings: E_a = 0.5, a wins: 1000 + 32 * 0.5
    assert elo_ratings([("a", "b", 1)]) == {"a": 1016.0, "b": 984.0}
    assert elo_ratings([("a", "b", 0.5)]) == {"a": 1000.0, "b": 1000.0}
    # second win: E_a = 1 / (1 + 10^(-32/400)) = 0.545922, a gains 32 * 0.454078 = 14.5305
    r = elo_ratings([("a", "b", 1), ("a", "b", 1)])
    assert r["a"] == pytest.approx(1030.5305, abs=1e-4) and r["b"] == pytest.approx(969.4695, abs=1e-4)
    assert elo_ratings([("x", "y", 0)], k=16, initial=1500) == {"x": 1492.0, "y": 1508.0}
    with pytest.raises(UserError, match="outcome 2"):
        elo_ratings([("a", "b", 2)])


def test_bradley_terry_two_players_ratio():
    # a beats b 3 times of 4: MLE p_a / p_b = 3, log-strengths +-log(3)/2
    s = bradley_terry({("a", "b"): 3, ("b", "a"): 1})
    assert s["a"] - s["b"] == pytest.approx(math.log(3), abs=1e-9)
    assert s["a"] + s["b"] == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_three_players_exact_fit():
    # Win counts equal to their expectations under p = (4, 2, 1): a-b 2:1 (4/6), b-c 2:1 (2/3),
    # a-c 4:1 (4/5). The score equations W_i = sum_j n_ij p_i / (p_i + p_j) hold exactly
    # (a: 6 = 3*4/6 + 5*4/5; b: 3 = 3*2/6 + 3*2/3; c: 2 = 5*1/5 + 3*1/3), so the MLE is p itself.
    table = [[0, 2, 4], [1, 0, 2], [1, 1, 0]]
    s = bradley_terry(table)
    assert s == pytest.approx([math.log(2), 0.0, -math.log(2)], abs=1e-9)
    elo = bradley_terry(table, scale="elo")
    assert elo == pytest.approx([1000 + 400 * math.log10(2), 1000.0, 1000 - 400 * math.log10(2)], abs=1e-6)
    nested = bradley_terry({"a": {"b": 2, "c": 4}, "b": {"a": 1, "c": 2}, "c": {"a": 1, "b": 1}})
    assert nested == pytest.approx({"a": math.log(2), "b": 0.0, "c": -math.log(2)}, abs=1e-9)
    # a balanced cycle gives equal strengths
    assert bradley_terry([[0, 2, 1], [1, 0, 2], [2, 1, 0]]) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)


def test_bradley_terry_needs_connected_wins():
    with pytest.raises(UserError, match="not finite"):
        bradley_terry({("a", "b"): 3})  # b never wins: p_b -> 0
    # one pseudo-win each way: a 4 - 1 b -> ratio 4
    s = bradley_terry({("a", "b"): 3}, prior=1.0)
    assert s["a"] - s["b"] == pytest.approx(math.log(4), abs=1e-9)


def test_win_rate_ties_count_half():
    assert win_rate([1, 2, 3], [1, 1, 4]) == pytest.approx(0.5)  # tie, win, loss
    assert win_rate([2, 2], [1, 1]) == 1.0
    with pytest.raises(UserError):
        win_rate([1], [1, 2])


def test_rouge_matches_rouge_score_and_hand_values():
    from rouge_score import rouge_scorer

    preds = ["the cats sat on a mat", "the suspect was arrested by police"]
    refs = ["the cat sat on the mat", "police arrested the suspect yesterday"]
    got = rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / 2
        assert got[key] == pytest.approx(expected, abs=1e-12)
    # first pair by hand (stemmer: cats -> cat): 5 of 6 unigrams, 3 of 5 bigrams, LCS 5
    one = rouge(preds[:1], refs[:1])
    assert one == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})


def test_embed_batches_by_length_and_returns_rows_in_the_order_given():
    texts = ["one two three four five six seven eight nine ten eleven twelve", "hi", "the cat sat on the mat",
             "ok then", "a much longer sentence about a guitar player on a small stage at night"]
    together = embed(texts, batch_size=2)  # sorted by length: batches [hi, ok then], [cat, one..], [guitar]
    alone = torch.cat([embed([t]) for t in texts])  # one text per batch: no padding at all
    assert together.shape == (5, 384)
    assert torch.allclose(together, alone, atol=1e-5)


def test_semantic_relevance():
    text = "A man is playing a guitar on the stage."
    assert semantic_relevance([text], [text]) == pytest.approx(1.0, abs=1e-5)
    sims = semantic_relevance_pairs(
        [text, text], ["Someone performs a song on guitar at a concert.", "The stock market fell sharply today."]
    )
    assert sims[0] > sims[1] + 0.3
    # repeated texts are embedded once: the same cosines as embedding every text of every pair
    e = embed([text, "Someone performs a song on guitar at a concert.", "The stock market fell sharply today."])
    assert sims == pytest.approx([float(e[0] @ e[1]), float(e[0] @ e[2])], abs=1e-5)
    assert semantic_relevance([text, text], [text, "The stock market fell sharply today."]) == pytest.approx(
        (1.0 + sims[1]) / 2, abs=1e-5)


# ---- confidence intervals, shares, perplexity, copying ----

@pytest.mark.unit
def test_bootstrap_indices_and_percentiles_by_hand():
    # numpy's default_rng(0).integers(0, 3, (4, 3)): the four resamples of three prompts
    idx = M.bootstrap_indices(3, 4, seed=0)
    assert idx.tolist() == [[2, 1, 1], [0, 0, 0], [0, 0, 0], [2, 1, 2]]
    # per-prompt differences 0, 1, 3: resample means 5/3, 0, 0, 7/3 -> sorted 0, 0, 5/3, 7/3;
    # 25th / 75th percentiles (linear, positions 0.75 and 2.25): 0 and 5/3 + 0.25 (7/3 - 5/3) = 11/6
    before = np.array([1.0, 1.0, 1.0])
    after = np.array([1.0, 2.0, 4.0])
    ci = M.paired_bootstrap(lambda b, a: (a - b).mean(), before, after, n_resamples=4, seed=0, level=0.5)
    assert ci == {"estimate": pytest.approx(4 / 3), "low": pytest.approx(0.0), "high": pytest.approx(11 / 6)}


@pytest.mark.unit
def test_bootstrap_is_paired_and_keeps_a_prompts_answers_together():
    # every prompt improves by exactly 0.2 (two answers each): any resample gives 0.2, so the CI is a point
    before = np.array([[0.9, 0.7], [0.5, 0.3], [0.4, 0.2]])
    after = before - 0.2
    ci = M.paired_bootstrap(lambda b, a: b.mean() - a.mean(), before, after, n_resamples=200, seed=1)
    assert ci["low"] == pytest.approx(0.2) and ci["high"] == pytest.approx(0.2)
    # unpaired resampling would spread it: the bootstrap must resample rows of both arrays together
    with pytest.raises(UserError, match="same number of rows"):
        M.paired_bootstrap(lambda b, a: 0.0, before, after[:2])


@pytest.mark.unit
def test_bootstrap_ci_contains_the_truth_and_excludes_zero():
    rng = np.random.default_rng(7)
    diffs = rng.normal(0.0, 1.0, size=400)
    diffs = diffs - diffs.mean() + 1.0  # sample mean exactly 1, standard error ~0.05
    ci = M.paired_bootstrap(lambda d: d.mean(), diffs, n_resamples=2000, seed=0)
    assert ci["low"] < 1.0 < ci["high"] and ci["low"] > 0.8 and ci["high"] < 1.2
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * diffs.std() / 20, rel=0.15)
    null = M.paired_bootstrap(lambda d: d.mean(), diffs - diffs.mean(), n_resamples=2000, seed=0)
    assert null["low"] < 0 < null["high"]


@pytest.mark.unit
def test_share_above_and_perplexity_by_hand():
    assert M.share_above([0.1, 0.5, 0.51, 0.9], 0.5) == 0.5  # strictly above: 0.51 and 0.9
    # answers of 2 and 3 tokens with summed NLL 2 and 4 nats: exp(6 / 5)
    assert M.perplexity([2.0, 4.0], [2, 3]) == pytest.approx(math.exp(1.2))
    with pytest.raises(UserError):
        M.perplexity([], [])


@pytest.mark.unit
def test_copy_rate_and_strip_copied_by_hand():
    prompt = "Rewrite this: I hope that you die."
    # 10 words, 7 four-grams; in the prompt: 'i hope that you', 'hope that you die' (each twice) -> 4/7
    assert M.copy_rate("I hope that you die. I hope that you die!", prompt) == pytest.approx(4 / 7)
    assert M.copy_rate("I hope that you die", prompt) == 1.0
    assert M.copy_rate("I wish you a good day today", prompt) == 0.0
    assert M.copy_rate("hope that you", prompt) == 0.0  # 3 words: no 4-gram
    assert M.copy_rate("hope that you", prompt, n=2) == 1.0
    assert M.strip_copied("Well, I hope that you die today", prompt) == "well today"
    assert M.strip_copied("Have a nice day", prompt) == "have a nice day"


@pytest.mark.unit
def test_rouge_pairs_average_to_rouge():
    preds, refs = ["the cat sat", "a dog"], ["the cat sat on the mat", "a dog barks"]
    pairs = M.rouge_pairs(preds, refs)
    # ROUGE-1 F: 2 * 1 * 0.5 / 1.5 = 2/3 (3 of 3 vs 3 of 6 words); 2 * 1 * (2/3) / (5/3) = 0.8
    assert pairs["rouge1"] == pytest.approx([2 / 3, 0.8])
    assert M.rouge(preds, refs)["rouge1"] == pytest.approx((2 / 3 + 0.8) / 2)
