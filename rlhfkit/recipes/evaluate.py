"""Evaluation: compare models on a held-out prompt set with one fixed, seeded decoding config.

Each entry of ``models`` either generates (``model`` set: a ModelConfig, optionally with a LoRA
``adapter_path``) or reads its completions from a column of the prompt file (``model`` unset, or
``column`` set). The first entry is the baseline ("before"), the last is "after" in the sample
table. Reported per model (all pure functions of ``rlhfkit.metrics`` where one exists):

- toxicity mean and (population) std, and their change from the baseline in percent,
  ``(before - after) / before`` as the detoxification recipe reports it (``metrics.toxicity_change``);
- ROUGE-1/2/L F-measures against a reference column (``metrics.rouge``);
- semantic relevance to a source column (``metrics.semantic_relevance_pairs``, all-MiniLM-L6-v2);
- mean reward under every configured reward function (``rewards``) and their weighted sum;
- sampled KL to a reference model: the mean over prompts of sum_t log pi(y_t | x, y_<t) -
  log pi_ref(y_t | x, y_<t) over the model's own completion y (Monte-Carlo estimate of
  KL(pi || pi_ref) when y ~ pi), both log-probs from ``rlhfkit.models.PolicyModel``;
- response length in tokens and words;
- pairwise win rates under the judge reward (ties count one half), sequential Elo over
  (prompt, pair) matches and Bradley-Terry strengths on the Elo scale (``metrics.win_rate``,
  ``elo_ratings``, ``bradley_terry``).

Writes into ``output_dir`` (atomically): ``config.yaml``, ``metrics.json``, ``samples.jsonl`` (the
``rlhfkit view`` format, sorted by gain = judge(last) - judge(first), largest first), ``report.md``
(tables, the sample table, the plots embedded), ``reward_hist.png``, ``toxicity_hist.png``,
``models.png`` and, last and only on success, ``summary.json`` (the headline numbers; as for the
training recipes, ``rlhfkit run`` skips a stage whose folder holds it with the same config).

Deliberate choices: rewards, toxicity, ROUGE and the sample table use the user prompt (before any
chat template), the one text every model shares; each model generates from the prompt wrapped in
its own tokenizer's chat template. KL is computed on the token ids each model sampled; completions
read from the file are re-encoded with EOS appended. Model and reference must share a tokenizer.
"""
from __future__ import annotations

import gc
import io
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rlhfkit import metrics as M
from rlhfkit.config import ConfigError, DataConfig, GenerationConfig, LoraConfig, ModelConfig, RewardConfig, UserError
from rlhfkit.config import save_config
from rlhfkit.data import (Example, Table, collate, encode_completion, encode_prompt, read_table, select, user_prompt,
                          wrap_prompt)
from rlhfkit.models import PolicyModel, left_pad_positions, load_policy, load_tokenizer, pick_device, unwrap
from rlhfkit.rewards import Toxicity, build_reward, validate_reward
from rlhfkit.utils import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text, logger


@dataclass
class EvalModelConfig:
    name: str = ""
    """Label of the model in tables, plots and ``samples.jsonl`` (e.g. ``before``, ``after``)."""
    model: Optional[ModelConfig] = None
    """The model to generate with (and to score for KL). Unset: completions come from the column
    ``column`` (default: ``name``) of the prompt file."""
    adapter_path: Optional[str] = None
    """A LoRA adapter folder applied to ``model`` (e.g. the output of a LoRA training run)."""
    column: Optional[str] = None
    """Read this model's completions from this column of the prompt file instead of generating
    (with ``model`` set too, the file's completions are still scored by the model for KL)."""

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("every entry of 'models' needs a 'name'")
        if self.adapter_path and self.model is None:
            raise ConfigError(f"models '{self.name}': adapter_path needs 'model' (the base the adapter was trained on)")

    @property
    def from_file(self) -> bool:
        return self.model is None or self.column is not None


@dataclass
class Config:
    models: list[EvalModelConfig] = field(default_factory=list)
    """Models to compare, baseline first: ``[{name: before, model: {name_or_path: ...}}, {name: after,
    model: {...}, adapter_path: runs/ppo}]``, or names of completion columns of the prompt file."""
    data: DataConfig = field(default_factory=DataConfig)
    """The held-out prompt set (all of ``data.path``, or its first ``data.max_rows`` rows): the
    ``prompt`` column or ``prompt_template``, ``chat_template``, ``system_prompt``."""
    reference_column: Optional[str] = None
    """Column with reference texts: ROUGE-1/2/L of every model against it."""
    source_column: Optional[str] = None
    """Column with the source text (e.g. the dialogue): semantic relevance of every model to it."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """The one decoding config every generating model uses."""
    seed: int = 0
    """Seed of generation (the same for every model)."""
    samples_per_prompt: int = 1
    """Completions generated per prompt and model (needs ``generation.do_sample``). Every metric is
    taken over all completions, so a policy's sampled behaviour is measured rather than one draw or
    its greedy mode, whose argmax flips under small policy changes; ``samples.jsonl`` has one row
    per (prompt, sample) and win rates compare the models' k-th samples of a prompt."""
    rewards: list[RewardConfig] = field(default_factory=list)
    """Reward functions to report (mean per model, each on its own and their weighted sum ``total``)."""
    toxicity: Optional[str] = "profanity_check"
    """Toxicity scorer (``profanity_check`` or ``hatesonar``) for toxicity mean/std and change; null: off."""
    judge: Optional[str] = None
    """The score that ranks models (win rates, Elo, Bradley-Terry, sample gains): a reward name from
    ``rewards`` (its ``name`` or kind), ``total`` (their weighted sum), or ``toxicity`` (1 - p(toxic)).
    Default: ``total`` when rewards are configured, else ``toxicity``."""
    kl_reference: Optional[str] = None
    """Name of the model in ``models`` that is the KL reference (e.g. ``before``). With sampling
    the KL is the sampled estimate (mean over prompts of sum_t log pi - log pi_ref on the sampled
    tokens); with greedy decoding it is the exact per-position KL of the next-token distributions
    summed along each greedy response (``metrics.json``: ``kl_estimator`` says which)."""
    kl_reference_model: Optional[ModelConfig] = None
    """A separate KL reference model (instead of ``kl_reference``)."""
    kl_batch_size: int = 8
    """Sequences per forward when scoring log-probs for KL."""
    relevance_model: Optional[str] = None
    """Sentence-embedding model for semantic relevance (default: the all-MiniLM-L6-v2 asset)."""
    tokenizer: Optional[str] = None
    """Tokenizer that counts the tokens of completions read from the file (default: the first
    configured model's; without any, only words are counted)."""
    elo_k: float = 32.0
    """Elo K-factor."""
    bt_prior: float = 0.5
    """Bradley-Terry pseudo-wins added both ways to every pair (keeps strengths finite when a model
    wins every comparison); 0 for the plain maximum-likelihood fit."""
    report_samples: int = 20
    """Rows of the sample table in report.md (half from the top, half from the bottom of the gain
    order when there are more prompts); samples.jsonl holds all."""
    output_dir: str = "runs/eval"
    """Folder for report.md, metrics.json, samples.jsonl and the plots."""
    progress: bool = True
    """Show a progress bar while generating."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("'models' is empty: list at least one model (name + model, or a completion column)")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"models: names must be distinct, repeated: {dupes}")
        if self.kl_reference and self.kl_reference_model is not None:
            raise ConfigError("set kl_reference (a model of the list) or kl_reference_model, not both")
        if self.kl_reference is not None:
            ref = next((m for m in self.models if m.name == self.kl_reference), None)
            if ref is None:
                raise ConfigError(f"kl_reference '{self.kl_reference}' is not a model name; names: {names}")
            if ref.model is None:
                raise ConfigError(f"kl_reference '{self.kl_reference}' has no 'model' to score log-probs with")
        if self.toxicity is not None and self.toxicity not in ("profanity_check", "hatesonar"):
            raise ConfigError(f"toxicity must be 'profanity_check', 'hatesonar' or null, got '{self.toxicity}'")
        if self.bt_prior < 0:
            raise ConfigError(f"bt_prior must be >= 0, got {self.bt_prior}")
        if self.kl_batch_size <= 0:
            raise ConfigError(f"kl_batch_size must be > 0, got {self.kl_batch_size}")
        if self.report_samples < 0:
            raise ConfigError(f"report_samples must be >= 0, got {self.report_samples}")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.samples_per_prompt > 1:
            if not self.generation.do_sample:
                raise ConfigError(f"samples_per_prompt={self.samples_per_prompt} needs generation.do_sample=true "
                                  "(greedy decoding gives the same completion every time)")
            from_file = [m.name for m in self.models if m.from_file]
            if from_file:
                raise ConfigError(f"samples_per_prompt={self.samples_per_prompt} needs generated completions; "
                                  f"models {from_file} read theirs from the file (one per row)")


# ---------------------------------------------------------------------------------------------
# Prompts and file columns
# ---------------------------------------------------------------------------------------------


def text_column(table: Table, col: str, what: str) -> list[str]:
    """Every row's text in column ``col``, or a UserError naming file, row and field."""
    out = []
    for i, row in enumerate(table.rows):
        if col not in row:
            raise UserError(f"{table.where(i)}: missing column '{col}' ({what}; columns: {', '.join(map(str, row))})")
        value = row[col]
        if not isinstance(value, str):
            raise UserError(f"{table.where(i)}: column '{col}' ({what}) must be text, got {type(value).__name__}")
        out.append(value)
    return out


def row_columns(table: Table) -> dict[str, list]:
    """Every column as a per-row list (None where a row lacks it): the ``**columns`` of rewards."""
    keys: list[str] = []
    for row in table.rows:
        keys.extend(k for k in row if k not in keys)
    return {k: [row.get(k) for row in table.rows] for k in keys}


# ---------------------------------------------------------------------------------------------
# Models: load, generate, sampled KL
# ---------------------------------------------------------------------------------------------


def load_entry(model_cfg: ModelConfig, adapter_path: Optional[str], device: torch.device):
    """(model in eval mode, tokenizer); a LoRA adapter is loaded on its base and merged into it (the
    same function up to float rounding; generation and forwards skip the adapter's extra ops)."""
    lora = LoraConfig(enabled=True, adapter_path=adapter_path) if adapter_path else None
    model, tok = load_policy(model_cfg, lora, device)
    if lora is not None and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model, tok


def generate_samples(model, tok, prompts: list[str], gen: GenerationConfig, seed: int, progress: bool,
                     desc: str) -> tuple[list[str], list[list[int]]]:
    """(texts, sampled token ids) per prompt, so KL is computed on the tokens actually sampled."""
    from rlhfkit.rollout import generate

    return generate(model, tok, prompts, gen, progress=progress, seed=seed, desc=desc, return_ids=True)


@torch.no_grad()
def sequence_logps(policy: PolicyModel, tok, prompts: list[str], responses: list[list[int]],
                   batch_size: int) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) of every (prompt, response ids) pair: (N,)."""
    device = next(policy.parameters()).device
    seq2seq = policy.is_seq2seq
    examples = [Example(encode_prompt(tok, p, seq2seq), list(r)) for p, r in zip(prompts, responses)]
    out = []
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s: s + batch_size], tok.pad_token_id, seq2seq)
        res = policy(**{k: v.to(device) for k, v in batch.items()})
        out.append((res["logps"] * res["mask"]).sum(-1).double().cpu())  # (b,)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def sampled_kl(model, ref_model, tok, prompts: list[str], responses: list[list[int]], batch_size: int) -> list[float]:
    """Per prompt, sum over the response tokens of log pi - log pi_ref; their mean estimates
    KL(pi || pi_ref) when the responses were sampled from pi."""
    lp = sequence_logps(PolicyModel(model).eval(), tok, prompts, responses, batch_size)
    lr = sequence_logps(PolicyModel(ref_model).eval(), tok, prompts, responses, batch_size)
    return (lp - lr).tolist()


@torch.no_grad()
def response_logits(model, batch: dict) -> torch.Tensor:
    """Logits (N, V) of the next-token distributions that predict each response token of a
    collated batch (rows in order, tokens in order within a row)."""
    mask = batch["labels"] != -100  # (B, T)
    hf = unwrap(model)
    if hf.config.is_encoder_decoder:
        dec_in = hf.prepare_decoder_input_ids_from_labels(labels=batch["labels"].masked_fill(~mask, 0))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec_in,
                    decoder_attention_mask=batch.get("decoder_attention_mask"), use_cache=False)
        return out.logits[mask]  # (N, V)
    position_ids = left_pad_positions(batch["attention_mask"])  # (B, T)
    T, P = mask.shape[1], max(1, int(mask.any(0).long().argmax()))  # collate's layout: responses start at column P
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
                use_cache=False, logits_to_keep=T - P + 1)  # the LM head on positions P - 1 .. T - 1 only
    return out.logits[:, :-1][mask[:, P:]]  # (N, V): position t - 1 predicts token t


@torch.no_grad()
def token_kl(model, ref_model, tok, prompts: list[str], responses: list[list[int]], batch_size: int) -> list[float]:
    """Per prompt, sum over the response's positions of the exact KL between the next-token
    distributions, sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)).

    Used when the evaluated responses are greedy: the sampled estimator ``log pi - log pi_ref``
    is only unbiased for responses sampled from pi (on greedy ones it can be negative), while
    this is >= 0 at every position and needs no extra sampling. For sampled responses its
    expectation equals the sequence KL too.
    """
    device = next(model.parameters()).device
    seq2seq = bool(unwrap(model).config.is_encoder_decoder)
    examples = [Example(encode_prompt(tok, p, seq2seq), list(r)) for p, r in zip(prompts, responses)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].completion_ids))
    out = [0.0] * len(examples)
    for s in range(0, len(order), batch_size):  # rows of similar length together: little padding
        chunk = order[s: s + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], tok.pad_token_id, seq2seq).items()}
        lp = torch.log_softmax(response_logits(model, batch).float(), -1)  # (N, V)
        lq = torch.log_softmax(response_logits(ref_model, batch).float(), -1)  # (N, V)
        kl_pos = (lp.exp() * (lp - lq)).sum(-1).double().cpu()  # (N,)
        counts = (batch["labels"] != -100).sum(-1).tolist()  # tokens per row
        for i, c in zip(chunk, kl_pos.split(counts)):
            out[i] = float(c.sum())
    return out


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def token_count(tok, texts: list[str]) -> list[int]:
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


# ---------------------------------------------------------------------------------------------
# Comparisons under the judge
# ---------------------------------------------------------------------------------------------


def outcome(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def compare(names: list[str], judge: dict[str, list[float]], elo_k: float, bt_prior: float) -> dict:
    """Win-rate matrix, Elo over (prompt, pair) matches in order, Bradley-Terry on the Elo scale."""
    n_prompts = len(judge[names[0]])
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    win = {a: {b: M.win_rate(judge[a], judge[b]) for b in names if b != a} for a in names}
    matches = [(a, b, outcome(judge[a][i], judge[b][i])) for i in range(n_prompts) for a, b in pairs]
    elo = M.elo_ratings(matches, k=elo_k)
    W = np.zeros((len(names), len(names)))  # W[i, j]: prompts where i beat j (ties: half each)
    for (ia, a) in enumerate(names):
        for (ib, b) in enumerate(names):
            if ia != ib:
                W[ia, ib] = sum(outcome(x, y) for x, y in zip(judge[a], judge[b]))
    try:
        bt = dict(zip(names, M.bradley_terry(W, scale="elo", prior=bt_prior)))
        bt_note = None
    except UserError as e:
        bt, bt_note = None, str(e)
    return {"win_rate": win, "elo": elo, "bradley_terry": bt, "bradley_terry_note": bt_note, "wins": W.tolist()}


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Figure with the Agg canvas: no pyplot state, no display)
# ---------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def histogram_png(values: dict[str, list[float]], title: str, xlabel: str) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    finite = np.concatenate([np.asarray(v, dtype=float) for v in values.values()])
    edges = np.histogram_bin_edges(finite, bins=20) if finite.size and np.ptp(finite) > 0 else 10
    for name, v in values.items():
        ax.hist(v, bins=edges, alpha=0.5, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.legend()
    return _png(fig)


def bars_png(panels: dict[str, dict[str, float]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(panels), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, vals) in zip(axes, panels.items()):
        names = list(vals)
        ax.bar(range(len(names)), [vals[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(text: str, limit: int = 300) -> str:
    """Text for one markdown table cell: shortened, control characters dropped, ``|`` escaped."""
    text = text if len(text) <= limit else text[:limit] + "…"
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_report(cfg: Config, m: dict, samples: list[dict], images: list[str]) -> str:
    names, base, last = m["models"], m["baseline"], m["models"][-1]
    g = cfg.generation
    decoding = (f"do_sample={g.do_sample}, temperature={g.temperature}, top_k={g.top_k}, top_p={g.top_p}, "
                f"max_new_tokens={g.max_new_tokens}, seed={cfg.seed}")
    if "generated" not in m["completions_from"].values():
        decoding = "none (every model's completions come from the file)"
    per = f" x {m['samples_per_prompt']} samples" if m["samples_per_prompt"] > 1 else ""
    out = [f"# Evaluation: {' vs '.join(names)}\n",
           f"{m['prompts']} prompts{per} from `{cfg.data.path}`. Decoding: {decoding}. Judge: `{m['judge']}`; "
           f"baseline: `{base}`.\n", "## Models\n"]
    header = ["model", "completions"]
    cols: list = []
    if "toxicity" in m:
        header += ["toxicity mean", "toxicity std", f"mean improvement vs {base} %", f"std improvement vs {base} %"]
        cols.append(lambda n: [m["toxicity"][n]["mean"], m["toxicity"][n]["std"],
                               m["toxicity_change"].get(n, {}).get("mean_improvement_pct"),
                               m["toxicity_change"].get(n, {}).get("std_improvement_pct")])
    for r in m.get("reward_names", []):
        header.append(f"reward {r}")
        cols.append(lambda n, r=r: [m["reward"][n][r]])
    if "rouge" in m:
        header += ["ROUGE-1", "ROUGE-2", "ROUGE-L"]
        cols.append(lambda n: [m["rouge"][n]["rouge1"], m["rouge"][n]["rouge2"], m["rouge"][n]["rougeL"]])
    if "semantic_relevance" in m:
        header.append("relevance")
        cols.append(lambda n: [m["semantic_relevance"][n]])
    if "kl" in m:
        header.append(f"KL to {m['kl_reference']} ({m.get('kl_estimator', 'sampled')})")
        cols.append(lambda n: [m["kl"].get(n)])
    header += ["tokens", "words"]
    cols.append(lambda n: [m["length"][n].get("tokens"), m["length"][n]["words"]])
    if len(names) > 1:
        header += [f"win rate vs {base}", "Elo", "Bradley-Terry"]
        cols.append(lambda n: [m["win_rate_vs_baseline"].get(n), m["elo"][n],
                               (m["bradley_terry"] or {}).get(n)])
    rows = [[n, m["completions_from"][n]] + [v for c in cols for v in c(n)] for n in names]
    out.append(_table(header, rows))
    if "toxicity_change" in m:
        out.append("\nImprovement = (baseline - model) / baseline of the toxicity mean and std (positive: less toxic).\n")
    if len(names) > 1:
        out.append(f"\n## Win rates under `{m['judge']}` (row beats column; ties count one half)\n")
        out.append(_table(["model"] + names, [[a] + [m["win_rate"][a].get(b) for b in names] for a in names]))
        if m.get("bradley_terry_note"):
            out.append(f"\nBradley-Terry: {m['bradley_terry_note']}\n")
    if images:
        out.append("\n## Plots\n")
        out += [f"![{p}]({p})\n" for p in images]
    if len(names) > 1 and samples:
        k = cfg.report_samples
        shown = samples if len(samples) <= k else samples[: (k + 1) // 2] + [None] + samples[len(samples) - k // 2:]
        out.append(f"\n## Samples sorted by gain ({m['judge']}: {last} - {base}), largest first\n")
        header = ["#", "prompt", base, last, f"reward {base}", f"reward {last}", "gain"]
        trows = []
        for s in shown:
            if s is None:
                trows.append(["…"] * len(header))
                continue
            number = f"{s['index'] + 1}" + (f".{s['sample'] + 1}" if "sample" in s else "")  # prompt.sample
            trows.append([number, _cell(s["prompt"]), _cell(s["completions"][base]),
                          _cell(s["completions"][last]), s["rewards"][base], s["rewards"][last], s["gain"]])
        out.append(_table(header, trows))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def summarize(m: dict, seconds: float) -> dict:
    """The headline numbers of ``metrics.json`` for ``summary.json`` (the run viewer's run table)."""
    s = {"command": "eval", "prompts": m["prompts"], "samples_per_prompt": m["samples_per_prompt"],
         "models": m["models"], "judge": m["judge"],
         "judge_mean": m["judge_mean"]}
    if "win_rate_vs_baseline" in m:
        s["win_rate_vs_baseline"] = m["win_rate_vs_baseline"]
    if "toxicity" in m:
        s["toxicity_mean"] = {n: v["mean"] for n, v in m["toxicity"].items()}
    if "kl" in m:
        s["kl"] = m["kl"]
    s["eval_seconds"] = round(seconds, 3)
    return s


def run(cfg: Config, resume: bool = False) -> dict:
    if resume:  # it keeps no checkpoint
        raise UserError("eval keeps no checkpoint: --resume is not supported (run it again without it)")
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    stale = out_dir / "summary.json"
    if stale.is_file():
        stale.unlink()  # written again at the end: until then this folder holds no finished evaluation
    table = select(read_table(cfg.data.path, cfg.data.split, cfg.data.subset), cfg.data.where)
    if cfg.data.max_rows is not None:
        table = Table(table.rows[: cfg.data.max_rows], table.source, table.row_numbers[: cfg.data.max_rows])
    if not table.rows:
        raise UserError(f"{table.source}: no rows to evaluate")
    per_prompt = cfg.samples_per_prompt
    n_prompts = len(table.rows)
    if per_prompt > 1:  # each row repeated in place: one seeded generation pass samples all its completions
        table = Table([r for r in table.rows for _ in range(per_prompt)], table.source,
                      [n for n in (table.row_numbers or range(1, n_prompts + 1)) for _ in range(per_prompt)])
    prompts = [user_prompt(table, i, cfg.data) for i in range(len(table.rows))]
    references = text_column(table, cfg.reference_column, "reference_column") if cfg.reference_column else None
    sources = text_column(table, cfg.source_column, "source_column") if cfg.source_column else None
    file_completions = {e.name: text_column(table, e.column or e.name, f"completions of model '{e.name}'")
                        for e in cfg.models if e.from_file}  # check the file before loading any model
    columns = row_columns(table)
    composite = build_reward(cfg.rewards) if cfg.rewards else None
    part_names = [p[0] for p in composite.parts] if composite else []
    judge_name = cfg.judge or ("total" if composite else "toxicity")
    valid = (["total"] + part_names if composite else []) + (["toxicity"] if cfg.toxicity else [])
    if not valid:
        raise ConfigError("nothing to score: configure 'rewards' or keep 'toxicity' on")
    if judge_name not in valid:
        raise ConfigError(f"judge '{judge_name}' is not a configured score; choose one of {valid}")
    names = [e.name for e in cfg.models]
    logger.info(f"eval: {n_prompts} prompts x {per_prompt} sample(s) from {table.source}; models {names}; "
                f"judge {judge_name}")

    # ---- completions (generated or read) and sampled KL, one model in memory at a time ----
    device = pick_device(cfg.cpu)
    completions: dict[str, list[str]] = {}
    tokens: dict[str, Optional[list[int]]] = {}
    kl: dict[str, float] = {}
    length_tok = load_tokenizer(ModelConfig(name_or_path=cfg.tokenizer)) if cfg.tokenizer else None
    ref_model = ref_tok = None
    if cfg.kl_reference_model is not None:
        ref_model, ref_tok = load_entry(cfg.kl_reference_model, None, device)
    elif cfg.kl_reference is not None:
        e = next(e for e in cfg.models if e.name == cfg.kl_reference)
        ref_model, ref_tok = load_entry(e.model, e.adapter_path, device)
    for e in cfg.models:
        model = tok = None
        if e.model is not None:
            if e.name == cfg.kl_reference:
                model, tok = ref_model, ref_tok
            else:
                model, tok = load_entry(e.model, e.adapter_path, device)
            if length_tok is None:
                length_tok = tok
        wrapped = [wrap_prompt(p, cfg.data, tok) for p in prompts] if tok is not None else None
        if e.from_file:
            completions[e.name] = file_completions[e.name]
            seq2seq = bool(model.config.is_encoder_decoder) if model is not None else False
            responses = [encode_completion(tok, c, seq2seq) for c in completions[e.name]] if tok is not None else None
        else:
            completions[e.name], responses = generate_samples(model, tok, wrapped, cfg.generation, cfg.seed,
                                                              cfg.progress, f"generate {e.name}")
        tokens[e.name] = token_count(tok, completions[e.name]) if tok is not None else None
        if model is not None and model is ref_model:
            kl[e.name] = 0.0  # the reference itself: no forwards needed
        elif ref_model is not None and model is not None:
            if not same_tokenizer(tok, ref_tok):
                raise UserError(f"models '{e.name}': KL needs the reference's tokenizer; this model's differs")
            kl_fn = sampled_kl if cfg.generation.do_sample else token_kl
            kl[e.name] = float(np.mean(kl_fn(model, ref_model, tok, wrapped, responses, cfg.kl_batch_size)))
        if model is not None and model is not ref_model:
            del model
            gc.collect()
    for e in cfg.models:
        if tokens[e.name] is None and length_tok is not None:
            tokens[e.name] = token_count(length_tok, completions[e.name])
    del ref_model
    gc.collect()

    # ---- scores ----
    m: dict = {"command": "eval", "prompts": n_prompts, "samples_per_prompt": per_prompt, "models": names,
               "baseline": names[0], "judge": judge_name,
               "completions_from": {e.name: ("file" if e.from_file else "generated") for e in cfg.models}}
    judge: dict[str, list[float]] = {}
    tox: dict[str, list[float]] = {}
    parts_per_model: dict[str, dict[str, list[float]]] = {}
    if cfg.toxicity:
        scorer = validate_reward(Toxicity(cfg.toxicity, invert=False))
        tox = {n: scorer(prompts, completions[n]) for n in names}
        m["toxicity"] = {n: {"mean": float(np.mean(tox[n])), "std": float(np.std(tox[n]))} for n in names}
        m["toxicity_change"] = {n: M.toxicity_change(tox[names[0]], tox[n]) for n in names[1:]}
        if judge_name == "toxicity":
            judge = {n: [1.0 - p for p in tox[n]] for n in names}
    if composite is not None:
        m["reward_names"] = ["total"] + part_names if len(part_names) > 1 else part_names
        m["reward"] = {}
        for n in names:
            total, raw = composite.score(prompts, completions[n], **columns)
            parts_per_model[n] = {"total": total, **raw}
            m["reward"][n] = {k: float(np.mean(v)) for k, v in parts_per_model[n].items()}
            if judge_name != "toxicity":
                judge[n] = parts_per_model[n][judge_name]
    if references is not None:
        m["rouge"] = {n: M.rouge(completions[n], references) for n in names}
    relevance: dict[str, list[float]] = {}
    if sources is not None:
        relevance = {n: M.semantic_relevance_pairs(completions[n], sources, cfg.relevance_model) for n in names}
        m["semantic_relevance"] = {n: float(np.mean(relevance[n])) for n in names}
    if kl:
        m["kl"] = kl
        m["kl_reference"] = cfg.kl_reference or cfg.kl_reference_model.name_or_path
        m["kl_estimator"] = "sampled" if cfg.generation.do_sample else "token"
    m["length"] = {n: {"words": float(np.mean([len(c.split()) for c in completions[n]])),
                       **({"tokens": float(np.mean(tokens[n]))} if tokens[n] is not None else {})} for n in names}
    m["judge_mean"] = {n: float(np.mean(judge[n])) for n in names}
    if len(names) > 1:
        comp = compare(names, judge, cfg.elo_k, cfg.bt_prior)
        m.update(comp)
        m["win_rate_vs_baseline"] = {n: comp["win_rate"][n][names[0]] for n in names[1:]}

    # ---- samples, sorted by gain ----
    samples = []
    for i in range(len(prompts)):
        row = {"prompt": prompts[i], "completions": {n: completions[n][i] for n in names},
               "rewards": {n: judge[n][i] for n in names}}
        if len(names) > 1:
            row["gain"] = judge[names[-1]][i] - judge[names[0]][i]
        if references is not None:
            row["reference"] = references[i]
        if sources is not None:
            row["source"] = sources[i]
            row["relevance"] = {n: relevance[n][i] for n in names}
        if tox:
            row["toxicity"] = {n: tox[n][i] for n in names}
        if parts_per_model:
            row["scores"] = {k: {n: parts_per_model[n][k][i] for n in names} for k in parts_per_model[names[0]]}
        row["index"] = i // per_prompt  # the prompt's position in the file (0-based)
        if per_prompt > 1:
            row["sample"] = i % per_prompt
        samples.append(row)
    if len(names) > 1:
        samples.sort(key=lambda r: -r["gain"])  # stable: equal gains keep prompt order

    # ---- files ----
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {"reward_hist.png": histogram_png(judge, f"{judge_name} per prompt", judge_name)}
    if tox:
        images["toxicity_hist.png"] = histogram_png(tox, f"toxicity ({cfg.toxicity})", "p(toxic)")
    panels = {f"{judge_name} (mean)": m["judge_mean"]}
    if tox:
        panels["toxicity (mean)"] = {n: m["toxicity"][n]["mean"] for n in names}
    if kl:
        panels[f"KL to {m['kl_reference']}"] = kl
    panels["words (mean)"] = {n: m["length"][n]["words"] for n in names}
    if len(names) > 1:
        panels[f"win rate vs {names[0]}"] = {n: (m["win_rate_vs_baseline"].get(n, 0.5)) for n in names}
    images["models.png"] = bars_png(panels)
    for fname, data in images.items():
        atomic_write_bytes(out_dir / fname, data)
    save_config(cfg, out_dir / "config.yaml")
    atomic_write_jsonl(out_dir / "samples.jsonl", samples)
    atomic_write_json(out_dir / "metrics.json", m)
    atomic_write_text(out_dir / "report.md", render_report(cfg, m, samples, list(images)))
    atomic_write_json(out_dir / "summary.json", summarize(m, time.perf_counter() - t0))  # last: marks success
    logger.info(f"eval: wrote {out_dir}/report.md, metrics.json, samples.jsonl and {len(images)} plots")
    return m


__all__ = ["Config", "EvalModelConfig", "run", "summarize", "generate_samples", "sampled_kl", "token_kl",
           "sequence_logps", "compare"]
