"""Quality measures for human preference labels: pure functions, no database, no web.

- Cohen's kappa (Cohen 1960, "A coefficient of agreement for nominal scales") for two raters:
  kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement, p_e = sum_k p1(k) p2(k) the agreement
  expected from each rater's own marginal frequencies.
- Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many raters") for n raters
  per item: P_i = (sum_j n_ij^2 - n) / (n (n - 1)), P_bar = mean_i P_i, p_j = sum_i n_ij / (N n),
  P_e = sum_j p_j^2, kappa = (P_bar - P_e) / (1 - P_e). With two raters it equals Scott's pi, not
  Cohen's kappa (one pooled marginal instead of one per rater).
- ``majority`` resolves one pair's votes; ``gold_accuracy``, ``label_agreement`` and
  ``reward_agreement`` compare annotators with known answers, a machine label, or a reward function.

Verdicts are in the pair's own (source) order: ``a`` (completion_a better), ``b``, ``tie``,
``both_bad``, ``skip``. A skip is never a vote. Kappa is ``nan`` when undefined (p_e = 1: every rating
in one category) and for no items; callers turn nan into null for JSON.
"""
from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from statistics import mean, median
from typing import Callable, Hashable, Iterable, Optional, Sequence

VERDICTS = ("a", "b", "tie", "both_bad", "skip")
VOTES = ("a", "b", "tie", "both_bad")  # verdicts that count as an opinion


def cohen_kappa(rater1: Sequence[Hashable], rater2: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items (same order)."""
    if len(rater1) != len(rater2):
        raise ValueError(f"raters labelled different numbers of items ({len(rater1)} vs {len(rater2)})")
    n = len(rater1)
    if n == 0:
        return math.nan
    p_o = sum(x == y for x, y in zip(rater1, rater2)) / n
    c1, c2 = Counter(rater1), Counter(rater2)
    p_e = sum(c1[k] * c2[k] for k in c1) / (n * n)
    if p_e == 1.0:
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from an items x categories table of counts (every row sums to the same n >= 2)."""
    rows = [list(r) for r in table]
    if not rows:
        return math.nan
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows):
        raise ValueError("every item needs the same number (>= 2) of ratings for Fleiss' kappa")
    n_items = len(rows)
    p_bar = mean((sum(c * c for c in r) - n) / (n * (n - 1)) for r in rows)
    p_j = [sum(r[j] for r in rows) / (n_items * n) for j in range(len(rows[0]))]
    p_e = sum(p * p for p in p_j)
    if p_e == 1.0:
        return math.nan
    return (p_bar - p_e) / (1.0 - p_e)


def counts_table(items: Iterable[Sequence[Hashable]], categories: Sequence[Hashable]) -> list[list[int]]:
    """Items given as their list of ratings -> the items x categories count table of Fleiss' kappa."""
    index = {c: j for j, c in enumerate(categories)}
    table = []
    for ratings in items:
        row = [0] * len(categories)
        for r in ratings:
            row[index[r]] += 1
        table.append(row)
    return table


def majority(votes: Sequence[str], rule: str = "majority") -> Optional[str]:
    """The winning verdict of one pair, or None when the rule is not met.

    ``majority``: strictly more than half of the votes; ``unanimous``: every vote.
    """
    if not votes:
        return None
    top, count = Counter(votes).most_common(1)[0]
    if rule == "unanimous":
        return top if count == len(votes) else None
    if rule == "majority":
        return top if 2 * count > len(votes) else None
    raise ValueError(f"unknown rule '{rule}' (majority or unanimous)")


def annotator_agreement(by_pair: dict[int, dict[str, str]]) -> dict:
    """Kappa between annotators. ``by_pair``: pair id -> {annotator: verdict} (skips already removed).

    Returns pairwise Cohen's kappa (items both judged), and Fleiss' kappa over the items judged by
    every annotator (when there are at least two annotators), with the item counts behind each.
    """
    names = sorted({a for votes in by_pair.values() for a in votes})
    pairwise = []
    for x, y in combinations(names, 2):
        shared = [p for p, votes in by_pair.items() if x in votes and y in votes]
        r1 = [by_pair[p][x] for p in shared]
        r2 = [by_pair[p][y] for p in shared]
        agree = sum(u == v for u, v in zip(r1, r2))
        pairwise.append({
            "annotators": [x, y], "items": len(shared), "cohen_kappa": cohen_kappa(r1, r2),
            "percent_agreement": agree / len(shared) if shared else math.nan,
        })
    out: dict = {"annotators": names, "pairwise": pairwise}
    if len(names) >= 2:
        complete = [[votes[a] for a in names] for votes in by_pair.values() if all(a in votes for a in names)]
        out["fleiss_kappa"] = fleiss_kappa(counts_table(complete, VOTES)) if complete else math.nan
        out["fleiss_items"] = len(complete)
    if len(names) == 2:
        out["cohen_kappa"] = pairwise[0]["cohen_kappa"]
    return out


def gold_accuracy(judgements: Iterable[tuple[str, str, str]]) -> dict[str, dict]:
    """(annotator, verdict, gold verdict) triples -> per annotator {correct, items, accuracy}."""
    stats: dict[str, list[int]] = {}
    for annotator, verdict, gold in judgements:
        if verdict == "skip":
            continue
        s = stats.setdefault(annotator, [0, 0])
        s[0] += verdict == gold
        s[1] += 1
    return {a: {"correct": c, "items": n, "accuracy": c / n} for a, (c, n) in sorted(stats.items())}


def label_agreement(pairs: Iterable[tuple[str, str]]) -> dict:
    """(human verdict, other label) pairs -> fraction equal. Used for a machine label (``prefs``)."""
    items = [(h, m) for h, m in pairs if h in ("a", "b") and m in ("a", "b")]
    agree = sum(h == m for h, m in items)
    return {"items": len(items), "agree": agree, "agreement": agree / len(items) if items else math.nan}


def reward_agreement(
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    human: Sequence[str],
    fn: Callable[[list[str], list[str]], list[float]],
) -> dict:
    """Agreement of a reward function with human verdicts on pairs the humans decided (a or b).

    ``fn(prompts, completions) -> list[float]`` scores both sides in one call each; the reward
    "prefers" the higher score (equal scores count as a disagreement). Returns items, agreement,
    and the mean score margin of the human-chosen over the human-rejected completion.
    """
    keep = [i for i, h in enumerate(human) if h in ("a", "b")]
    if not keep:
        return {"items": 0, "agreement": math.nan, "mean_margin": math.nan}
    p = [prompts[i] for i in keep]
    s_a = [float(x) for x in fn(p, [completions_a[i] for i in keep])]
    s_b = [float(x) for x in fn(p, [completions_b[i] for i in keep])]
    if len(s_a) != len(keep) or len(s_b) != len(keep):
        raise ValueError(f"reward function returned {len(s_a)}/{len(s_b)} scores for {len(keep)} completions")
    margins = [(sa - sb) if human[i] == "a" else (sb - sa) for i, sa, sb in zip(keep, s_a, s_b)]
    agree = sum(m > 0 for m in margins)
    return {"items": len(keep), "agree": agree, "agreement": agree / len(keep), "mean_margin": mean(margins)}


def speed(elapsed_ms: Sequence[Optional[int]], created_at: Sequence[float]) -> dict:
    """Per-annotator speed: median/mean seconds per judgement (from the page's timer) and the rate
    over the span of their judgements (per hour; breaks included, so a lower bound)."""
    secs = [e / 1000.0 for e in elapsed_ms if e is not None]
    out = {
        "median_seconds": median(secs) if secs else math.nan,
        "mean_seconds": mean(secs) if secs else math.nan,
        "per_hour": math.nan,
    }
    if len(created_at) >= 2:
        span = max(created_at) - min(created_at)
        if span > 0:
            out["per_hour"] = (len(created_at) - 1) / span * 3600.0
    return out
