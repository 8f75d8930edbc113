"""Preference data that the tool builds itself: sample N responses per prompt, score them, keep the
best as ``chosen`` and the worst as ``rejected`` (rejection sampling for preference pairs, as in
best-of-N / RAFT-style pipelines and the DPO recipe of the design brief).

One round, for a batch of prompts (``generation.batch_size // samples_per_prompt`` of them):
1. sample: every prompt is repeated N times and sampled in one ``generate`` call per temperature
   (sample k of a prompt uses ``temperatures[k % len(temperatures)]``);
2. score: ``mode: sample`` scores every response with the composite reward
   ``bias + sum_k w_k r_k(x, y)`` (``rewards``, ``reward_bias``; every part is kept);
   ``mode: judge`` (RLAIF) lets a pairwise LLM judge compare every two samples of a prompt, both
   orders, and scores sample i by its mean win probability (``rlhfkit.feedback.group_scores``);
3. pick: best = highest score (first on ties), worst = lowest (last on ties);
4. accept when best - worst >= ``min_gap``, best >= ``min_score`` and the chosen response passes
   ``checks`` (its label equals the row's target label; the gibberish label is ``clean`` with
   confidence >= ``checks.clean_confidence``; it ends in one of ``checks.end_punctuation``);
   otherwise the prompt goes back for another round, up to ``max_attempts`` rounds, after which it
   is recorded as failed with the reasons.

Accepted rows (``prompt, chosen, rejected, chosen_score, rejected_score, chosen_<part>,
rejected_<part>, attempts`` and the row's other columns) are appended to the output as they are
accepted, failed prompts to ``<output>.failed.jsonl`` with ``reason``; a re-run skips every prompt
found in either file, so an interrupted run loses nothing it wrote. For ``parquet`` and
``datasets`` outputs the rows are appended to ``<output>.partial.jsonl`` and converted atomically
at the end (the partial file is kept: it is what a later run resumes from). At the end:
``summary.json`` (accepted and failed counts, rejection reasons, median / mean / SD of the gap
chosen_score - rejected_score) and ``gap_hist.png``.

Deliberate choices: the prompt stored in the rows is the user prompt before any chat template (the
DPO recipe wraps it again with its tokenizer's template, the same way it was wrapped for sampling);
rewards and the judge see that user prompt too. A prompt is identified by its text: a repeated
prompt in the input is processed once (counted as ``duplicates``). The SD is the sample standard
deviation (n - 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional

from rlhfkit.config import ConfigError, DataConfig, GenerationConfig, LoraConfig, ModelConfig, RewardConfig, UserError
from rlhfkit.config import save_config
from rlhfkit.feedback import JudgeConfig
from rlhfkit.utils import append_jsonl, atomic_write_bytes, atomic_write_json, logger, peak_rss_mb

SampleFn = Callable[[list[str], float], list[str]]
"""``sample_fn(user_prompts, temperature) -> completions``, one completion per (repeated) prompt."""
Scorer = Callable[[list[str], list[str], dict, int], tuple[list[float], dict[str, list[float]]]]
"""``scorer(prompts, completions, columns, n) -> (totals, parts)``; rows come in groups of n per prompt."""



@dataclass
class ChecksConfig:
    label_column: Optional[str] = None
    """Row column holding the target label (e.g. ``target``): the chosen response's label must equal
    it (case-insensitive). The label comes from ``label_model``, or VADER (positive / negative /
    neutral) when that is unset."""
    label_model: Optional[str] = None
    """Hugging Face classifier for the label check (e.g. an emotion classifier); unset: VADER."""
    clean: bool = False
    """The chosen response's gibberish label must be ``clean`` with confidence >= ``clean_confidence``
    (``rlhfkit.rewards.gibberish_label``: offline scorer, or ``gibberish_model``)."""
    clean_confidence: float = 0.8
    """Lowest confidence of the ``clean`` label."""
    gibberish_model: Optional[str] = None
    """Hugging Face gibberish classifier (labels clean / mild gibberish / word salad / noise);
    unset: the offline scorer."""
    end_punctuation: Optional[str] = None
    """Characters one of which must end the chosen response (after trailing spaces and closing
    quotes), e.g. ``".!?"``; unset: no check."""

    def validate(self) -> None:
        if not 0.0 <= self.clean_confidence <= 1.0:
            raise ConfigError(f"checks.clean_confidence must be in [0, 1], got {self.clean_confidence}")
        if self.end_punctuation is not None and not self.end_punctuation:
            raise ConfigError("checks.end_punctuation is empty; give characters such as '.!?' or null")


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"num_samples": "samples_per_prompt"}
    UNUSED: ClassVar[tuple[str, ...]] = (
        "data.eval_path", "data.eval_split", "data.eval_fraction", "data.shuffle_seed", "data.max_prompt_length",
        "data.max_completion_length", "data.overlong", "data.drop_invalid")
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy that writes the responses."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Sample from a trained adapter: ``lora.enabled=true lora.adapter_path=runs/sft``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt rows (``prompt`` column or ``prompt_template``; ``chat_template``, ``system_prompt``,
    ``where`` e.g. ``{split: train}``, ``max_rows``); the other columns go to the rewards and checks."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64, batch_size=16))
    """Sampling; ``generation.batch_size`` counts sequences, so a round takes
    ``batch_size // samples_per_prompt`` prompts."""
    samples_per_prompt: int = 4
    """N: responses sampled per prompt and round."""
    temperatures: list[float] = field(default_factory=list)
    """Sampling temperatures cycled over the N samples (sample k uses ``temperatures[k % len]``);
    empty: ``generation.temperature``."""
    mode: Literal["sample", "judge"] = "sample"
    """``sample``: score with the composite reward ``rewards``; ``judge`` (RLAIF): rank the samples of a
    prompt with the pairwise LLM judge ``judge`` (N >= 2)."""
    rewards: list[RewardConfig] = field(default_factory=list)
    """``mode: sample``: reward functions, summed with their weights (each part is kept in the rows)."""
    reward_bias: float = 0.0
    """Constant added to the composite reward."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """``mode: judge``: the pairwise judge (``judge.model`` unset: the policy judges its own samples)."""
    min_gap: float = 0.0
    """Accept a pair only when best - worst >= min_gap."""
    min_score: Optional[float] = None
    """Accept a pair only when the best score >= min_score (unset: no floor)."""
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    """Checks the chosen response must pass."""
    max_attempts: int = 30
    """Rounds of N samples per prompt before it is recorded as failed (the retry cap)."""
    trim_to_sentence: bool = False
    """Cut every response after its last ``.``, ``!`` or ``?`` when it does not end in one (responses
    cut by the token limit then end on a complete sentence); a response without one is kept whole."""
    output_dir: str = "runs/prefs"
    """Folder for config.yaml, summary.json, gap_hist.png and (when relative) the output."""
    output: str = "prefs.jsonl"
    """Output file (relative paths are inside ``output_dir``): ``.jsonl``, ``.parquet``, or a folder
    name for a ``datasets.save_to_disk`` dataset."""
    format: Literal["auto", "jsonl", "parquet", "datasets"] = "auto"
    """``auto`` (by the suffix of ``output``: .jsonl, .parquet, anything else a datasets folder),
    ``jsonl``, ``parquet`` or ``datasets``."""
    keep_columns: bool = True
    """Copy the prompt row's other columns (e.g. ``target``) into the output rows."""
    overwrite: bool = False
    """Delete earlier output and start again instead of resuming."""
    seed: int = 0
    """Seed of sampling."""
    progress: bool = True
    """Show a progress bar (prompts done, acceptance rate)."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""

    def validate(self) -> None:
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.samples_per_prompt > 1 and not self.generation.do_sample:
            raise ConfigError("samples_per_prompt > 1 needs generation.do_sample=true (greedy decoding repeats one response)")
        if any(t <= 0 for t in self.temperatures):
            raise ConfigError(f"temperatures must all be > 0, got {self.temperatures}")
        if self.mode == "judge" and self.samples_per_prompt < 2:
            raise ConfigError("mode=judge compares samples: samples_per_prompt must be >= 2")
        if self.mode == "sample" and not self.rewards:
            raise ConfigError("mode=sample needs 'rewards' (a list of reward functions)")
        if self.min_gap < 0:
            raise ConfigError(f"min_gap must be >= 0, got {self.min_gap}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.output:
            raise ConfigError("output is empty")


# ---------------------------------------------------------------------------------------------
# Decisions: pick best and worst, apply the gap, the floor and the checks
# ---------------------------------------------------------------------------------------------


@dataclass
class Decision:
    accepted: bool
    best: int
    """Index of the chosen sample in its group."""
    worst: int
    """Index of the rejected sample in its group."""
    reasons: list[str] = field(default_factory=list)
    """Codes of the failed conditions: identical, gap, min_score, label, gibberish, punctuation."""
    details: list[str] = field(default_factory=list)
    """One readable line per failed condition."""


def pick(scores: list[float]) -> tuple[int, int]:
    """(best, worst): the first index of the highest score and the last index of the lowest."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], -i))
    return best, worst


_CLOSERS = "\"'”’)]»"


def ends_with(text: str, chars: str) -> bool:
    """Does ``text`` end in one of ``chars`` (after trailing whitespace and closing quotes)?"""
    t = text.rstrip().rstrip(_CLOSERS).rstrip()
    return bool(t) and t[-1] in chars


def trim_to_sentence(text: str, chars: str = ".!?") -> str:
    """``text`` cut after its last sentence end (closing quotes kept) unless it already ends in one."""
    if ends_with(text, chars):
        return text
    cut = max(text.rfind(c) for c in chars)
    if cut < 0:
        return text
    end = cut + 1
    while end < len(text) and text[end] in _CLOSERS:
        end += 1
    return text[:end]


class Checker:
    """The ``checks`` on chosen responses: ``check(texts, rows) -> [[(code, detail), ...], ...]``."""

    def __init__(self, cfg: ChecksConfig, device: Optional[str] = None):
        self.cfg = cfg
        self.labeller = None
        if cfg.label_column:
            from rlhfkit.rewards import LabelMatch

            self.labeller = LabelMatch(cfg.label_column, cfg.label_model, device=device)

    def __call__(self, texts: list[str], rows: list[dict]) -> list[list[tuple[str, str]]]:
        from rlhfkit.rewards import gibberish_labels

        cfg = self.cfg
        out: list[list[tuple[str, str]]] = [[] for _ in texts]
        if not texts:
            return out
        if self.labeller is not None:
            labels = self.labeller.labels(texts)
            for i, (label, row) in enumerate(zip(labels, rows)):
                if cfg.label_column not in row:
                    raise UserError(f"checks.label_column: the row of prompt {row.get('prompt', '')!r:.60} has no "
                                    f"column '{cfg.label_column}' (columns: {', '.join(map(str, row))})")
                target = str(row[cfg.label_column]).strip().lower()
                if str(label).strip().lower() != target:
                    out[i].append(("label", f"label '{label}' != target '{target}'"))
        if cfg.clean:
            for i, (label, conf) in enumerate(gibberish_labels(texts, cfg.gibberish_model)):
                if label != "clean" or conf < cfg.clean_confidence:
                    out[i].append(("gibberish", f"gibberish label '{label}' ({conf:.2f}); needs 'clean' >= "
                                                f"{cfg.clean_confidence:g}"))
        if cfg.end_punctuation:
            for i, t in enumerate(texts):
                if not ends_with(t, cfg.end_punctuation):
                    out[i].append(("punctuation", f"does not end in one of '{cfg.end_punctuation}'"))
        return out


def decide(scores: list[float], texts: list[str], min_gap: float, min_score: Optional[float],
           check_failures: list[tuple[str, str]] = ()) -> Decision:
    """Accept or not. ``check_failures`` are the checks the best sample failed (see :class:`Checker`)."""
    best, worst = pick(scores)
    d = Decision(True, best, worst)
    gap = scores[best] - scores[worst]
    fails = []
    if texts[best] == texts[worst]:
        fails.append(("identical", "best and worst responses are the same text"))
    if gap < min_gap:
        fails.append(("gap", f"gap {gap:.4g} < min_gap {min_gap:g}"))
    if min_score is not None and scores[best] < min_score:
        fails.append(("min_score", f"best score {scores[best]:.4g} < min_score {min_score:g}"))
    fails.extend(check_failures)
    d.reasons = [c for c, _ in fails]
    d.details = [t for _, t in fails]
    d.accepted = not fails
    return d


# ---------------------------------------------------------------------------------------------
# Scorers and samplers
# ---------------------------------------------------------------------------------------------


def reward_scorer(reward) -> Scorer:
    """Scorer from a reward: a ``Composite`` (its parts are kept) or any ``fn(prompts, completions, **columns)``."""
    from rlhfkit.rewards import validate_reward

    def score(prompts, completions, columns, n):
        if hasattr(reward, "score"):
            return reward.score(prompts, completions, **columns)
        return validate_reward(reward)(prompts, completions, **columns), {}

    return score


def judge_scorer(judge) -> Scorer:
    """Scorer from a ``PairwiseJudge``: the mean win probability of each sample within its prompt."""
    from rlhfkit.feedback import group_scores

    def score(prompts, completions, columns, n):
        return group_scores(judge, prompts, completions, n), {}

    return score


def model_sampler(model, tokenizer, cfg: Config) -> SampleFn:
    """Sampling from a Hugging Face model: the user prompt wrapped like ``rlhfkit.data`` wraps it
    for training (chat template, system prompt), then ``rlhfkit.generation.generate``."""
    from rlhfkit.data import wrap_prompt
    from rlhfkit.generation import generate

    def sample(prompts: list[str], temperature: float) -> list[str]:
        gen = dataclasses.replace(cfg.generation, temperature=temperature)
        wrapped = [wrap_prompt(p, cfg.data, tokenizer) for p in prompts]
        return generate(model, tokenizer, wrapped, gen)

    return sample


def sample_by_temperature(sample_fn: SampleFn, prompts: list[str], temperatures: list[float]) -> list[str]:
    """One ``sample_fn`` call per distinct temperature (all prompts of a round in one batch);
    completions come back in the order of ``prompts``."""
    out: list[str] = [""] * len(prompts)
    for temp in dict.fromkeys(temperatures):
        idx = [i for i, t in enumerate(temperatures) if t == temp]
        got = sample_fn([prompts[i] for i in idx], temp)
        if len(got) != len(idx):
            raise UserError(f"sampler returned {len(got)} completions for {len(idx)} prompts")
        for i, c in zip(idx, got):
            out[i] = c
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass
class Paths:
    output: Path
    working: Path
    failed: Path
    format: str


def output_paths(cfg: Config) -> Paths:
    out = Path(cfg.output)
    if not out.is_absolute():
        out = Path(cfg.output_dir) / out
    fmt = cfg.format
    if fmt == "auto":
        suffix = out.suffix.lower()
        fmt = "jsonl" if suffix == ".jsonl" else "parquet" if suffix == ".parquet" else "datasets"
        if suffix in (".json", ".csv"):
            raise ConfigError(f"output '{cfg.output}': use .jsonl, .parquet or a folder name (datasets)")
    working = out if fmt == "jsonl" else Path(f"{out}.partial.jsonl")
    return Paths(out, working, Path(f"{out}.failed.jsonl"), fmt)


def read_rows(path: Path) -> list[dict]:
    """Rows of a jsonl file written by appends; an unfinished last line (a write cut by a kill) is
    removed from the file with a warning, so the next append starts on a fresh line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning(f"{path}: removed an unfinished last line (an interrupted write)")
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: row {n}: malformed JSON ({e.msg}); fix or delete the file") from None
    return rows


def write_final(rows: list[dict], paths: Paths) -> None:
    """Convert the working jsonl into a parquet file or a datasets folder, atomically."""
    if paths.format == "jsonl":
        return
    if paths.format == "parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"prompt": [], "chosen": [], "rejected": []}), buf)
        atomic_write_bytes(paths.output, buf.getvalue())
        return
    import tempfile

    import datasets

    out = paths.output
    out.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        ds.save_to_disk(str(tmp))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def gap_statistics(rows: list[dict]) -> dict:
    """n, median, mean, SD (sample, n - 1), min and max of chosen_score - rejected_score."""
    gaps = [float(r["chosen_score"]) - float(r["rejected_score"]) for r in rows]
    if not gaps:
        return {"n": 0, "median": None, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": len(gaps), "median": statistics.median(gaps), "mean": statistics.fmean(gaps),
            "sd": statistics.stdev(gaps) if len(gaps) > 1 else None, "min": min(gaps), "max": max(gaps)}


def histogram_png(gaps: list[float], title: str) -> bytes:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.hist(gaps, bins=min(30, max(5, len(gaps) // 3)) if gaps else 10, color="C0")
    ax.set_title(title)
    ax.set_xlabel("chosen_score - rejected_score")
    ax.set_ylabel("pairs")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def load_prompts(data: DataConfig) -> tuple[list[str], list[dict], str]:
    """(user prompts, their rows, source name): all rows of ``data.path`` that match
    ``data.where``, then the first ``data.max_rows`` (no held-out split)."""
    from rlhfkit.data import Table, read_table, select, user_prompt

    table = select(read_table(data.path, data.split, data.subset), data.where)
    if data.max_rows is not None:
        table = Table(table.rows[: data.max_rows], table.source, table.row_numbers[: data.max_rows])
    prompts = [user_prompt(table, i, data) for i in range(len(table.rows))]
    return prompts, table.rows, table.source


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    index: int
    attempts: int = 0
    reasons: Counter = field(default_factory=Counter)


def run(cfg: Config, resume: bool = False, sample_fn: Optional[SampleFn] = None, reward_fn: Optional[Callable] = None,
        judge=None) -> dict:
    """Build the preference set. Python callers may pass ``sample_fn(prompts, temperature)``
    (instead of loading ``cfg.model``), ``reward_fn`` (a ``Composite`` or any reward function,
    instead of ``cfg.rewards``) or ``judge`` (a ``PairwiseJudge`` for ``mode: judge``). A re-run
    resumes whether or not ``resume`` is set (the output is the state); ``overwrite`` starts again."""
    from rlhfkit.engine import Interrupted

    t0 = time.time()
    out_dir = Path(cfg.output_dir)
    paths = output_paths(cfg)
    if cfg.overwrite:
        for p in (paths.working, paths.failed, paths.output, out_dir / "summary.json"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    old_cfg = out_dir / "config.yaml"
    if old_cfg.is_file() and paths.working.is_file():
        import yaml

        if yaml.safe_load(old_cfg.read_text()) != dataclasses.asdict(cfg):
            logger.warning(f"prefs: {out_dir}/config.yaml differs from this config; rows written under the earlier "
                           "config are kept (set overwrite=true to start again)")
    save_config(cfg, old_cfg)

    prompts, rows, source = load_prompts(cfg.data)
    accepted_rows = read_rows(paths.working)
    failed_rows = read_rows(paths.failed)
    done = {r["prompt"] for r in accepted_rows} | {r["prompt"] for r in failed_rows}
    pending, seen, duplicates = [], set(), 0
    for i, p in enumerate(prompts):
        if p in seen:
            duplicates += 1
            continue
        seen.add(p)
        if p not in done:
            pending.append(i)
    if duplicates:
        logger.warning(f"{source}: {duplicates} repeated prompts are processed once")
    n_total = len(seen)
    logger.info(f"prefs: {n_total} prompts, {n_total - len(pending)} already done in {paths.working.name}/"
                f"{paths.failed.name}, {len(pending)} to go")

    # ---- sampler and scorer -------------------------------------------------------------------
    import torch

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = tok = None
    if pending and (sample_fn is None or (cfg.mode == "judge" and judge is None and cfg.judge.model is None)):
        from rlhfkit.feedback import load_lm

        model, tok = load_lm(cfg.model, cfg.lora.adapter_path if cfg.lora.enabled else None, cfg.cpu)
    if sample_fn is None:
        sample_fn = model_sampler(model, tok, cfg) if model is not None else None
    if cfg.mode == "judge":
        if judge is None and pending:
            from rlhfkit.feedback import PairwiseJudge

            judge = PairwiseJudge.from_config(cfg.judge, model if cfg.judge.model is None else None,
                                              tok if cfg.judge.model is None else None, cfg.cpu)
        scorer = judge_scorer(judge)
    else:
        if reward_fn is None:
            if not cfg.rewards:
                raise UserError("mode=sample needs 'rewards' (or reward_fn= from Python)")
            from rlhfkit.rewards import build_reward

            reward_fn = build_reward(cfg.rewards, cfg.reward_bias)
        scorer = reward_scorer(reward_fn)
    checker = Checker(cfg.checks)
    temps = cfg.temperatures or [cfg.generation.temperature]
    n = cfg.samples_per_prompt
    per_round = max(1, cfg.generation.batch_size // n)
    col_names = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("prompts", "completions")]
    prompt_col = cfg.data.columns.get("prompt", "prompt") if cfg.data.prompt_template is None else None

    # ---- rounds -------------------------------------------------------------------------------
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total, initial=n_total - len(pending), desc="prefs", unit="prompt", dynamic_ncols=True)
    new_acc, new_fail, samples, rounds = 0, 0, 0, 0
    rejections: Counter = Counter()
    attempts_done: list[int] = []
    queue = deque(_Job(i) for i in pending)
    active: list[_Job] = []

    def extra_columns(row: dict, out: dict) -> dict:
        if cfg.keep_columns:
            for k, v in row.items():
                if k not in out and k != prompt_col:
                    out[k] = v
        return out

    try:
        while queue or active:
            while queue and len(active) < per_round:
                active.append(queue.popleft())
            rounds += 1
            user_prompts = [prompts[j.index] for j in active for _ in range(n)]
            sample_temps = [temps[k % len(temps)] for _ in active for k in range(n)]
            completions = sample_by_temperature(sample_fn, user_prompts, sample_temps)
            texts = [trim_to_sentence(c) if cfg.trim_to_sentence else c for c in completions]
            samples += len(texts)
            columns = {k: [rows[j.index].get(k) for j in active for _ in range(n)] for k in col_names}
            totals, parts = scorer(user_prompts, texts, columns, n)
            picks = [pick(totals[g * n:(g + 1) * n]) for g in range(len(active))]
            failures = checker([texts[g * n + b] for g, (b, _) in enumerate(picks)], [rows[j.index] for j in active])
            still = []
            for g, job in enumerate(active):
                lo = g * n
                job.attempts += 1
                d = decide(totals[lo: lo + n], texts[lo: lo + n], cfg.min_gap, cfg.min_score, failures[g])
                job.reasons.update(d.reasons)
                rejections.update(d.reasons)
                b, w = lo + d.best, lo + d.worst
                if d.accepted:
                    row = {"prompt": prompts[job.index], "chosen": texts[b], "rejected": texts[w],
                           "chosen_score": totals[b], "rejected_score": totals[w]}
                    for name, vals in parts.items():
                        row[f"chosen_{name}"] = vals[b]
                        row[f"rejected_{name}"] = vals[w]
                    row["attempts"] = job.attempts
                    append_jsonl(paths.working, extra_columns(rows[job.index], row))
                    accepted_rows.append(row)
                    new_acc += 1
                elif job.attempts >= cfg.max_attempts:
                    row = {"prompt": prompts[job.index], "reason": "; ".join(d.details), "reasons": dict(job.reasons),
                           "attempts": job.attempts, "best_score": totals[b], "worst_score": totals[w]}
                    append_jsonl(paths.failed, extra_columns(rows[job.index], row))
                    failed_rows.append(row)
                    new_fail += 1
                else:
                    still.append(job)
                    continue
                attempts_done.append(job.attempts)
                if bar is not None:
                    bar.update(1)
            active = still
            if bar is not None:
                acc, fail = len(accepted_rows), len(failed_rows)
                bar.set_postfix({"accepted": acc, "failed": fail,
                                 "rate": f"{acc / max(acc + fail, 1):.2f}", "active": len(active)}, refresh=False)
    except KeyboardInterrupt:
        logger.warning(f"prefs: interrupted; {len(accepted_rows)} accepted and {len(failed_rows)} failed prompts are "
                       f"on disk; run again to continue")
        raise Interrupted(130) from None
    finally:
        if bar is not None:
            bar.close()

    # ---- finish -------------------------------------------------------------------------------
    write_final(accepted_rows, paths)
    stats = gap_statistics(accepted_rows)
    hist = out_dir / "gap_hist.png"
    atomic_write_bytes(hist, histogram_png([float(r["chosen_score"]) - float(r["rejected_score"]) for r in accepted_rows],
                                           f"{len(accepted_rows)} pairs: chosen - rejected score"))
    acc, fail = len(accepted_rows), len(failed_rows)
    seconds = time.time() - t0
    summary = {
        "command": "prefs", "mode": cfg.mode, "output": str(paths.output), "format": paths.format,
        "failed_file": str(paths.failed), "prompts": n_total, "accepted": acc, "failed": fail,
        "acceptance_rate": acc / (acc + fail) if acc + fail else None, "duplicates": duplicates,
        "gap": stats,
        "chosen_score_mean": statistics.fmean(r["chosen_score"] for r in accepted_rows) if accepted_rows else None,
        "rejected_score_mean": statistics.fmean(r["rejected_score"] for r in accepted_rows) if accepted_rows else None,
        "this_run": {"accepted": new_acc, "failed": new_fail, "skipped": n_total - len(pending), "rounds": rounds,
                     "attempts_mean": statistics.fmean(attempts_done) if attempts_done else None,
                     "rejections": dict(rejections)},
        "samples": samples, "seconds": seconds, "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(), "histogram": str(hist),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    sd = stats["sd"]
    logger.info(f"prefs: {acc} accepted, {fail} failed; gap median {_f(stats['median'])} mean {_f(stats['mean'])} "
                f"sd {_f(sd)}; {paths.output}")
    return summary


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}"


__all__ = ["Config", "ChecksConfig", "Checker", "Decision", "decide", "pick", "run", "gap_statistics",
           "trim_to_sentence", "ends_with", "output_paths", "read_rows", "reward_scorer", "judge_scorer",
           "model_sampler", "sample_by_temperature", "load_prompts"]
