"""``rlhfkit judge``: a local language model labels existing data (RLAIF on pairs you already have).

``mode: pairwise``: rows with two answers, ``completion_a`` / ``completion_b`` (or ``chosen`` /
``rejected``: re-judging a preference set reports how often the judge agrees with its labels).
Every pair is judged in both orders and the two verdicts averaged
(``rlhfkit.feedback.PairwiseJudge``); the output holds preference rows in the ``prefs`` format
(``prompt, chosen, rejected, chosen_score, rejected_score, judge_p_a``) for the pairs whose
confidence ``max(p, 1 - p)`` reaches ``min_confidence``.
``mode: pointwise``: rows with one ``completion``; the output adds ``score``, the expected label
value (``rlhfkit.feedback.PointwiseJudge``: "1".."10", or "No"/"Yes" with ``judge.values: [0, 1]``).
``judge.backend: openai`` asks an OpenAI-compatible endpoint instead (a verdict with an explanation,
ties allowed; ``feedback.EndpointScorer``): the rows then carry ``judge_explanation`` (pointwise)
or ``judge_explanation_ab`` / ``judge_explanation_ba`` (pairwise, both orders).

Writes ``output`` (jsonl, atomically), ``config.yaml`` and ``summary.json`` (counts, mean
probability, position bias = mean probability of the answer shown first, agreement).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from rlhfkit.config import ConfigError, DataConfig, UserError, save_config
from rlhfkit.feedback import EndpointScorer, JudgeConfig, PairwiseJudge, PointwiseJudge, _fill, label_pairs
from rlhfkit.utils import atomic_write_json, atomic_write_jsonl, logger


@dataclass
class Config:
    UNUSED: ClassVar[tuple[str, ...]] = (
        "data.eval_path", "data.eval_split", "data.eval_fraction", "data.shuffle_seed", "data.chat_template",
        "data.system_prompt", "data.max_prompt_length", "data.max_completion_length", "data.overlong",
        "data.drop_invalid")
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The judge: ``judge.model`` (required), templates, choices / labels."""
    data: DataConfig = field(default_factory=DataConfig)
    """Rows to judge: ``prompt`` (or ``prompt_template``) and ``completion_a``/``completion_b``, or
    ``chosen``/``rejected`` (pairwise), or ``completion`` (pointwise); ``data.columns`` maps names."""
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    """``pairwise`` (preference rows) or ``pointwise`` (a score per completion)."""
    min_confidence: float = 0.5
    """Pairwise: write a row only when max(p, 1 - p) >= this (0.5 keeps every non-identical pair)."""
    output_dir: str = "runs/judge"
    """Folder for config.yaml, summary.json and (when relative) the output."""
    output: str = "judged.jsonl"
    """Output jsonl file (relative paths are inside ``output_dir``)."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""

    def validate(self) -> None:
        if not 0.5 <= self.min_confidence <= 1.0:
            raise ConfigError(f"min_confidence must be in [0.5, 1], got {self.min_confidence}")
        if self.judge.model is None and self.judge.backend != "openai":
            raise ConfigError("judge.model is required (e.g. judge.model.name_or_path=asset:smollm2)")


def _pair_columns(table, cfg: DataConfig) -> tuple[str, str]:
    first = table.rows[0] if table.rows else {}
    for a, b in (("completion_a", "completion_b"), ("chosen", "rejected")):
        ca, cb = cfg.columns.get(a, a), cfg.columns.get(b, b)
        if ca in first and cb in first:
            return a, b
    raise UserError(f"{table.source}: pairwise judging needs columns completion_a/completion_b or chosen/rejected "
                    f"(columns: {', '.join(map(str, first))})")


def run(cfg: Config, resume: bool = False, judge=None) -> dict:
    """Judge the rows of ``cfg.data``. Python callers may pass a ready ``PairwiseJudge`` /
    ``PointwiseJudge`` as ``judge``. It keeps no checkpoint: ``resume`` is refused."""
    if resume:
        raise UserError("judge keeps no checkpoint: --resume is not supported (run it again without it)")
    from rlhfkit.data import read_table, require_text, select, user_prompt

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    out = Path(cfg.output) if Path(cfg.output).is_absolute() else out_dir / cfg.output
    table = select(read_table(cfg.data.path, cfg.data.split, cfg.data.subset), cfg.data.where)
    if cfg.data.max_rows is not None:
        table.rows = table.rows[: cfg.data.max_rows]
    prompts = [user_prompt(table, i, cfg.data) for i in range(len(table.rows))]
    summary: dict = {"command": "judge", "mode": cfg.mode, "rows": len(prompts), "output": str(out)}
    if cfg.mode == "pointwise":
        completions = [require_text(table, i, "completion", cfg.data, allow_empty=True) for i in range(len(prompts))]
        judge = judge or PointwiseJudge.from_config(cfg.judge, cpu=cfg.cpu)
        scores = judge(prompts, completions)
        rows = [{**r, "prompt": p, "completion": c, "score": s}
                for r, p, c, s in zip(table.rows, prompts, completions, scores)]
        summary.update(score_mean=statistics.fmean(scores) if scores else None,
                       score_sd=statistics.stdev(scores) if len(scores) > 1 else None)
        scorer = getattr(judge, "scorer", None)
        if isinstance(scorer, EndpointScorer):  # the endpoint's explanation of each score
            for r in rows:
                r["judge_explanation"] = scorer.explanations.get(
                    _fill(judge.template, prompt=r["prompt"], completion=r["completion"]))
            summary["judge_unparsed"] = scorer.unparsed
    else:
        a_col, b_col = _pair_columns(table, cfg.data)
        a = [require_text(table, i, a_col, cfg.data, allow_empty=True) for i in range(len(prompts))]
        b = [require_text(table, i, b_col, cfg.data, allow_empty=True) for i in range(len(prompts))]
        judge = judge or PairwiseJudge.from_config(cfg.judge, cpu=cfg.cpu)
        rows, v = label_pairs(judge, prompts, a, b, cfg.min_confidence)
        summary.update(pairs=len(prompts), written=len(rows), skipped=len(prompts) - len(rows),
                       p_a_mean=statistics.fmean(v.p) if v.p else None, position_bias=v.position_bias)
        scorer = getattr(judge, "scorer", None)
        if isinstance(scorer, EndpointScorer):  # both orders' explanations; ties (p = 1/2) give no row
            for r in rows:
                x, y = (r["chosen"], r["rejected"]) if r["judge_p_a"] >= 0.5 else (r["rejected"], r["chosen"])
                r["judge_explanation_ab"] = scorer.explanations.get(judge.text(r["prompt"], x, y))
                r["judge_explanation_ba"] = scorer.explanations.get(judge.text(r["prompt"], y, x))
            summary.update(ties=sum(p == 0.5 for p in v.p), judge_unparsed=scorer.unparsed)
        if a_col == "chosen":
            # the judge agrees with the set's label when it prefers the 'chosen' answer (p > 0.5)
            agree = [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in v.p]
            summary["agreement"] = statistics.fmean(agree) if agree else None
    atomic_write_jsonl(out, rows)
    atomic_write_json(out_dir / "summary.json", summary)
    logger.info(f"judge: {summary}")
    return summary


__all__ = ["Config", "run"]
