"""Agreement measures of the labelling app, against numbers worked out by hand."""
from __future__ import annotations

import math

import pytest

from rlhfkit.apps import agreement as agr

pytestmark = pytest.mark.unit


def test_cohen_kappa_two_categories_textbook():
    # 50 items: both yes 20, r1 yes/r2 no 5, r1 no/r2 yes 10, both no 15.
    # p_o = 35/50 = 0.7; r1 yes 25/50, r2 yes 30/50 -> p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    r1 = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    r2 = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert agr.cohen_kappa(r1, r2) == pytest.approx(0.4)


def test_cohen_kappa_three_categories_by_hand():
    # p_o = 5/6; r1: a3 b2 tie1, r2: a2 b3 tie1 -> p_e = (6 + 6 + 1)/36 = 13/36
    # kappa = (30/36 - 13/36) / (23/36) = 17/23
    r1 = ["a", "a", "b", "b", "tie", "a"]
    r2 = ["a", "b", "b", "b", "tie", "a"]
    assert agr.cohen_kappa(r1, r2) == pytest.approx(17 / 23)


def test_cohen_kappa_edge_cases():
    assert agr.cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert agr.cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)  # p_o 0, p_e 0.5
    assert math.isnan(agr.cohen_kappa(["a", "a"], ["a", "a"]))  # p_e = 1: undefined
    assert math.isnan(agr.cohen_kappa([], []))
    with pytest.raises(ValueError):
        agr.cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_small_table_by_hand():
    # 3 items, 3 raters: P_i = 1, 1, (4+1-3)/6 = 1/3 -> P_bar = 7/9; p = (5/9, 4/9) -> P_e = 41/81
    # kappa = (63/81 - 41/81) / (40/81) = 22/40 = 0.55
    assert agr.fleiss_kappa([[3, 0], [0, 3], [2, 1]]) == pytest.approx(0.55)


def test_fleiss_kappa_fleiss_1971_style_example():
    # The 10 items x 14 raters x 5 categories example (Wikipedia "Fleiss' kappa"):
    # P_bar = 0.378, P_e = 0.213, kappa = 0.210
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert agr.fleiss_kappa(table) == pytest.approx(0.20993, abs=5e-5)


def test_fleiss_with_two_raters_is_scotts_pi_not_cohen():
    # r1 = a b a a, r2 = a b b a.  Fleiss: P_i = 1,1,0,1 -> 3/4; p = (5/8, 3/8) -> P_e = 34/64
    # kappa = (48/64 - 34/64) / (30/64) = 7/15.  Cohen: p_o 3/4, p_e (3*2 + 1*2)/16 = 1/2 -> 1/2
    r1, r2 = ["a", "b", "a", "a"], ["a", "b", "b", "a"]
    table = agr.counts_table(zip(r1, r2), ["a", "b"])
    assert table == [[2, 0], [0, 2], [1, 1], [2, 0]]
    assert agr.fleiss_kappa(table) == pytest.approx(7 / 15)
    assert agr.cohen_kappa(r1, r2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        agr.fleiss_kappa([[2, 0], [1, 0]])  # unequal numbers of ratings


def test_majority_and_unanimous():
    assert agr.majority(["a", "a", "b"]) == "a"
    assert agr.majority(["a", "b"]) is None  # 1 of 2 is not more than half
    assert agr.majority(["tie", "tie", "a"]) == "tie"
    assert agr.majority(["a", "a", "b"], "unanimous") is None
    assert agr.majority(["b", "b"], "unanimous") == "b"
    assert agr.majority([]) is None


def test_annotator_agreement_three_annotators():
    by_pair = {
        1: {"ann": "a", "bob": "a", "cy": "a"},
        2: {"ann": "b", "bob": "b", "cy": "a"},
        3: {"ann": "a", "bob": "b"},  # not judged by cy: only in the ann/bob Cohen
    }
    out = agr.annotator_agreement(by_pair)
    assert out["annotators"] == ["ann", "bob", "cy"]
    ann_bob = next(p for p in out["pairwise"] if p["annotators"] == ["ann", "bob"])
    # ann = a b a, bob = a b b: p_o 2/3; ann a2 b1, bob a1 b2 -> p_e = (2 + 2)/9 = 4/9 -> kappa = (6/9-4/9)/(5/9) = 0.4
    assert ann_bob["items"] == 3
    assert ann_bob["cohen_kappa"] == pytest.approx(0.4)
    assert ann_bob["percent_agreement"] == pytest.approx(2 / 3)
    # Fleiss over items 1 and 2 only: counts (a, b) = [3, 0], [1, 2]: P_i = 1, (1+4-3)/6 = 1/3 -> 2/3
    # p = (4/6, 2/6) -> P_e = 5/9; kappa = (6/9 - 5/9) / (4/9) = 0.25
    assert out["fleiss_items"] == 2
    assert out["fleiss_kappa"] == pytest.approx(0.25)
    assert "cohen_kappa" not in out  # a single Cohen headline only for exactly two annotators


def test_gold_label_and_reward_agreement():
    acc = agr.gold_accuracy([("ann", "a", "a"), ("ann", "b", "a"), ("ann", "skip", "a"), ("bob", "tie", "tie")])
    assert acc == {"ann": {"correct": 1, "items": 2, "accuracy": 0.5}, "bob": {"correct": 1, "items": 1, "accuracy": 1.0}}
    m = agr.label_agreement([("a", "a"), ("b", "a"), ("tie", "a"), (None, "a"), ("a", "a")])
    assert m == {"items": 3, "agree": 2, "agreement": pytest.approx(2 / 3)}

    def longer_is_better(prompts, completions):
        return [float(len(c)) for c in completions]

    # humans: pair 0 prefers a ("xxx" > "x": reward agrees, margin 2), pair 1 prefers b ("yy" vs
    # "yyyy": reward disagrees, margin 2 - 4 = -2), pair 2 is a tie (ignored)
    out = agr.reward_agreement(["p0", "p1", "p2"], ["xxx", "yyyy", "z"], ["x", "yy", "zz"], ["a", "b", "tie"],
                               longer_is_better)
    assert out == {"items": 2, "agree": 1, "agreement": 0.5, "mean_margin": 0.0}


def test_speed():
    out = agr.speed([1000, 3000, 2000, None], [0.0, 1800.0, 3600.0, 3600.0])
    assert out["median_seconds"] == pytest.approx(2.0)
    assert out["mean_seconds"] == pytest.approx(2.0)
    assert out["per_hour"] == pytest.approx(3.0)  # 3 intervals in one hour
