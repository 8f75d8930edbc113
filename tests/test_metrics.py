"""Evaluation metrics against numbers worked out by hand or the reference implementation."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

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
