"""Evaluation: compare models on a held-out prompt set with one fixed, seeded decoding config.

Each entry of ``models`` either generates (``model`` set: a ModelConfig, optionally with a LoRA
``adapter_path``) or reads its completions from a column of the prompt file (``model`` unset, or
``column`` set). The first entry is the baseline ("before"), the last is "after" in the sample
table. Reported per model (all pure functions of ``rlhfkit.metrics`` where one exists):

- for every judge (``judges``: alt-profanity-check, HateSonar, better-profanity's word list, any HF
  classifier, a reward model; each marked trained-against or held out): mean, (population) std,
  share above its threshold, and their change from the baseline, ``(before - after) / before`` in
  percent for toxicity as the detoxification recipe reports it (``metrics.toxicity_change``);
- fluency and copying: perplexity of every model's answers under one scorer model (default: the
  baseline), ``exp(sum NLL / tokens)`` (``metrics.perplexity``); the copy rate, the share of an
  answer's word n-grams found verbatim in its prompt (``metrics.copy_rate``); relevance to the
  source with those copied spans taken out (``metrics.strip_copied``), so quoting earns nothing;
  the share of generated answers cut at ``max_new_tokens``;
- a paired bootstrap CI over prompts (a prompt's answers resampled together;
  ``metrics.paired_bootstrap``) for every change vs the baseline: judges, rewards, ROUGE,
  relevance and perplexity ratios, copy rate, cut share, win rates (also under ``win_rates``);
- with ``checkpoints: true`` on a model, every checkpoint its training run kept, and the
  over-optimisation table and plot: every judge against KL to the reference (Gao et al., 2022);
- ROUGE-1/2/L F-measures against a reference column (``metrics.rouge``);
- semantic relevance to a source column (``metrics.semantic_relevance_pairs``, all-MiniLM-L6-v2);
- mean reward under every configured reward function (``rewards``) and their weighted sum;
- sampled KL to a reference model: the mean over prompts of sum_t log pi(y_t | x, y_<t) -
  log pi_ref(y_t | x, y_<t) over the model's own completion y (Monte-Carlo estimate of
  KL(pi || pi_ref) when y ~ pi), both log-probs from ``rlhfkit.policy.PolicyModel``;
- response length in tokens and words;
- pairwise win rates under the judge reward (ties count one half), sequential Elo over
  (prompt, pair) matches and Bradley-Terry strengths on the Elo scale (``metrics.win_rate``,
  ``elo_ratings``, ``bradley_terry``).

Writes into ``output_dir`` (atomically): ``config.yaml``, ``metrics.json``, ``samples.jsonl`` (the
``rlhfkit view`` format, sorted by gain = judge(last) - judge(first), largest first), ``report.md``
(tables, the sample table, the plots embedded; drawn and written by ``recipes/_eval_report.py``),
``reward_hist.png`` (answers per judge score),
``toxicity_cdf.png`` (share of answers at or below each score, log scale for probabilities),
``models.png`` (every change vs the baseline with its CI as error bars),
``overoptimisation_<name>.png`` (with checkpoints) and, last and only on success, ``summary.json``
(the headline numbers; as for the training recipes, ``rlhfkit run`` skips a stage whose folder holds
it with the same config).

Deliberate choices: rewards, toxicity, ROUGE and the sample table use the user prompt (before any
chat template), the one text every model shares; each model generates from the prompt wrapped in
its own tokenizer's chat template. KL is computed on the token ids each model sampled; completions
read from the file are re-encoded with EOS appended. Model and reference must share a tokenizer.
Perplexity scores the ids a model sampled when it shares the scorer's tokenizer (an answer cut at
the cap has no EOS to score), else the text re-encoded with EOS. Copying is measured against the
user prompt, which quotes the source in the detoxification prompts. Relevance without copied
spans (rather than against a topic) keeps the one reference every prompt set has, its source, and
gives 0 to an answer that only quotes. CIs are percentile intervals; a resample whose statistic is
undefined (a zero baseline mean) is left out.
"""
from __future__ import annotations

import gc
import json
import math
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
from rlhfkit.models import is_quantized, left_pad_positions, load_policy, load_tokenizer, pick_device, unwrap
from rlhfkit.policy import PolicyModel
from rlhfkit.recipes._eval_report import (bars_png, cdf_png, change_panels, histogram_png, overoptimisation_png,
                                         render_report)
from rlhfkit.rewards import EvalJudgeConfig, build_judge, build_reward, judge_names
from rlhfkit.rollout import reward_columns
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
    checkpoints: bool = False
    """Also evaluate every checkpoint the training run in ``adapter_path`` kept
    (``checkpoints/step-N``, see ``train.checkpoint_every`` / ``keep_checkpoints``) as models
    ``<name>@<N>`` before this one; the report plots every judge against KL to the reference over
    them (the over-optimisation curve) and names the best one by the trained-against judge."""

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("every entry of 'models' needs a 'name'")
        if "@" in self.name:
            raise ConfigError(f"models '{self.name}': '@' is kept for checkpoint names (<name>@<step>)")
        if self.checkpoints and not self.adapter_path:
            raise ConfigError(f"models '{self.name}': checkpoints needs adapter_path (the training run's folder)")
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
    judges: list[EvalJudgeConfig] = field(default_factory=lambda: [EvalJudgeConfig()])
    """Named toxicity judges, each scored on every answer: ``[{kind: profanity_check, trained_against:
    true}, {kind: hatesonar}, {kind: wordlist}, {kind: classifier, model: ..., label: toxic},
    {kind: reward_model, model: runs/rm}]``. Per judge and model: mean, std, share above its
    ``threshold``, and the change vs the baseline with a bootstrap CI. ``[]``: none."""
    toxicity: Optional[str] = None
    """Deprecated: one judge of this kind (``profanity_check`` or ``hatesonar``); use ``judges``."""
    judge: Optional[str] = None
    """The score that ranks models (win rates, Elo, Bradley-Terry, sample gains): a reward name from
    ``rewards`` (its ``name`` or kind), ``total`` (their weighted sum), a judge's name (its
    non-toxicity 1 - p for a toxicity judge, the score itself for a reward model), or ``toxicity``
    (the first judge). Default: ``total`` when rewards are configured, else the first judge."""
    win_rates: list[str] = field(default_factory=list)
    """More scores to report win rates vs the baseline under (each with its CI), beside ``judge``:
    a reward part or judge name, ``total``, or ``total-<part>``: the weighted sum without that part
    (e.g. ``total-length``, to see whether a win survives without the length term)."""
    perplexity_scorer: Optional[str] = None
    """Name of the model in ``models`` under which every model's answers get a perplexity (one fixed
    scorer, so the figures compare; the ratio to the baseline's says how far fluency moved).
    Default: the baseline when it has a ``model``, else the first model that has one."""
    copy_ngram: int = 4
    """n of the word n-grams of the copy rate (share of an answer's n-grams found verbatim in its
    prompt) and of the copied spans left out of ``relevance_uncopied``."""
    bootstrap_resamples: int = 1000
    """Resamples of the paired bootstrap over prompts behind every confidence interval."""
    ci_level: float = 0.95
    """Confidence level of the intervals."""
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
        for j in self.judges:
            j.validate()
        judge_names(self.judges)
        if self.perplexity_scorer is not None:
            entry = next((m for m in self.models if m.name == self.perplexity_scorer), None)
            if entry is None:
                raise ConfigError(f"perplexity_scorer '{self.perplexity_scorer}' is not a model name; names: {names}")
            if entry.model is None:
                raise ConfigError(f"perplexity_scorer '{self.perplexity_scorer}' has no 'model' to score with")
        if self.copy_ngram < 1:
            raise ConfigError(f"copy_ngram must be >= 1, got {self.copy_ngram}")
        if self.bootstrap_resamples < 1:
            raise ConfigError(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        if not 0 < self.ci_level < 1:
            raise ConfigError(f"ci_level must be in (0, 1), got {self.ci_level}")
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


# ---------------------------------------------------------------------------------------------
# Models: load, generate, sampled KL
# ---------------------------------------------------------------------------------------------


def load_entry(model_cfg: ModelConfig, adapter_path: Optional[str], device: torch.device,
               checkpoint: Optional[Path] = None):
    """(model in eval mode, tokenizer); a LoRA adapter is loaded on its base and merged into it (the
    same function up to float rounding; generation and forwards skip the adapter's extra ops).
    ``checkpoint``: a training checkpoint folder whose trainable weights replace the adapter's."""
    lora = LoraConfig(enabled=True, adapter_path=adapter_path) if adapter_path else None
    model, tok = load_policy(model_cfg, lora, device)
    if checkpoint is not None:
        load_trainable(model, checkpoint)
    # (not into a 4-/8-bit base: peft would quantise the merged weights again and lose the adapter's change)
    if lora is not None and hasattr(model, "merge_and_unload") and not is_quantized(model):
        model = model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model, tok


def load_trainable(model, checkpoint: Path) -> None:
    """Copy the trainable weights of an Engine checkpoint (``trainable.safetensors``) into ``model``.

    Checkpoint names carry the training wrapper's prefix (``lm.`` of the policy with its value
    head); each is matched to the model parameter it ends with. Weights without a match (the value
    head) are skipped; a LoRA parameter of the model that the checkpoint lacks is an error.
    """
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    found = set()
    for key, value in weights.items():
        parts = key.split(".")
        name = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in params), None)
        if name is not None:
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))
            found.add(name)
    missing = [n for n in params if "lora_" in n and n not in found]
    if not found or missing:
        raise UserError(f"{checkpoint}: the checkpoint does not match the model "
                        f"({len(found)} weights matched; missing e.g. {missing[:1]})")


def checkpoint_dirs(run_dir: str) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint a training run kept in ``<run_dir>/checkpoints/step-N``."""
    out = []
    for d in sorted(Path(run_dir).glob("checkpoints/step-*[0-9]")):
        if (d / "trainable.safetensors").is_file():
            out.append((int(d.name.split("-")[1]), d))
    return out


def expand_checkpoints(models: list[EvalModelConfig]) -> tuple[list[EvalModelConfig], dict[str, Path]]:
    """The evaluated entries: every ``checkpoints: true`` model is preceded by one entry per kept
    checkpoint of its run, named ``<name>@<step>``; and the checkpoint folder of each such name."""
    import dataclasses

    entries, checkpoint_of = [], {}
    for e in models:
        if e.checkpoints:
            summary = Path(e.adapter_path) / "summary.json"
            final = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
            found = [(step, d) for step, d in checkpoint_dirs(e.adapter_path) if step != final]  # final: the model
            if not found:
                raise UserError(f"models '{e.name}': {e.adapter_path}/checkpoints holds no checkpoint "
                                "(set train.checkpoint_every and train.keep_checkpoints in the training run)")
            for step, folder in found:
                name = f"{e.name}@{step}"
                entries.append(dataclasses.replace(e, name=name, checkpoints=False))
                checkpoint_of[name] = folder
        entries.append(e)
    return entries, checkpoint_of


def answer_nll(model, tok, prompts: list[str], responses: list[list[int]],
               batch_size: int) -> tuple[list[float], list[int]]:
    """(summed negative log-likelihood in nats, token count) of every response given its prompt:
    ``metrics.perplexity`` turns them into exp(mean token NLL)."""
    logps, counts = sequence_logps(PolicyModel(model).eval(), tok, prompts, responses, batch_size, with_counts=True)
    return (-logps).tolist(), counts


def generate_samples(model, tok, prompts: list[str], gen: GenerationConfig, seed: int, progress: bool,
                     desc: str) -> tuple[list[str], list[list[int]]]:
    """(texts, sampled token ids) per prompt, so KL is computed on the tokens actually sampled."""
    from rlhfkit.generation import generate

    return generate(model, tok, prompts, gen, progress=progress, seed=seed, desc=desc, return_ids=True)


@torch.no_grad()
def sequence_logps(policy: PolicyModel, tok, prompts: list[str], responses: list[list[int]],
                   batch_size: int, with_counts: bool = False):
    """sum_t log pi(y_t | x, y_<t) of every (prompt, response ids) pair: (N,); with ``with_counts``
    also the number of response tokens scored in each."""
    device = next(policy.parameters()).device
    seq2seq = policy.is_seq2seq
    examples = [Example(encode_prompt(tok, p, seq2seq), list(r)) for p, r in zip(prompts, responses)]
    out, counts = [], []
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s: s + batch_size], tok.pad_token_id, seq2seq)
        res = policy(**{k: v.to(device) for k, v in batch.items()})
        out.append((res["logps"] * res["mask"]).sum(-1).double().cpu())  # (b,)
        counts += [int(c) for c in res["mask"].sum(-1).tolist()]
    logps = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    return (logps, counts) if with_counts else logps


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
# Confidence intervals (paired bootstrap over prompts, metrics.paired_bootstrap), judges, checkpoints
# ---------------------------------------------------------------------------------------------


class Bootstrap:
    """``boot(stat, *per_answer_lists)``: estimate and CI of ``stat`` on ``(prompts, samples)`` grids,
    resampling prompts with all their answers (the same draws for every figure of a run)."""

    def __init__(self, n_prompts: int, per_prompt: int, n_resamples: int, seed: int, level: float):
        self.shape, self.n_resamples, self.seed, self.level = (n_prompts, per_prompt), n_resamples, seed, level

    def __call__(self, stat, *lists) -> dict[str, float]:
        grids = [np.asarray(v, dtype=np.float64).reshape(self.shape) for v in lists]  # (P, k) each
        with np.errstate(divide="ignore", invalid="ignore"):
            return M.paired_bootstrap(stat, *grids, n_resamples=self.n_resamples, seed=self.seed, level=self.level)


def _diff(b: np.ndarray, a: np.ndarray) -> float:
    return float(a.mean() - b.mean())


def _ratio(b: np.ndarray, a: np.ndarray) -> float:
    return float(a.mean() / b.mean())


def _win_rate(b: np.ndarray, a: np.ndarray) -> float:
    return float(((a > b) + 0.5 * (a == b)).mean())  # ties count one half


def _perplexity_ratio(nll_b: np.ndarray, n_b: np.ndarray, nll_a: np.ndarray, n_a: np.ndarray) -> float:
    return math.exp(nll_a.sum() / n_a.sum() - nll_b.sum() / n_b.sum())


def _improvement_pct(lower_is_better: bool, of=np.mean):
    """Change of ``of`` (mean or std) from b to a in percent of b, positive when it got better."""
    def stat(b: np.ndarray, a: np.ndarray) -> float:
        before, after = np.float64(of(b)), np.float64(of(a))  # numpy division: 0 gives inf/nan, left out
        return float(100.0 * ((before - after) if lower_is_better else (after - before)) / abs(before))
    return stat


def judge_summary(jc: EvalJudgeConfig, scores: dict[str, list[float]], names: list[str], boot: Bootstrap) -> dict:
    """One judge's figures: per model mean (with CI), std and share above the threshold; per model
    after the baseline the change of each, with its paired CI (percent of the baseline's mean and
    std, positive = better; share in percentage points)."""
    thr = jc.threshold
    base = scores[names[0]]
    out = {"kind": jc.kind, "trained_against": jc.trained_against, "threshold": thr,
           "higher_is": "toxic" if jc.lower_is_better else "better",
           "mean": {n: float(np.mean(scores[n])) for n in names},
           "mean_ci": {n: boot(lambda a: float(a.mean()), scores[n]) for n in names},
           "std": {n: float(np.std(scores[n])) for n in names},
           "share_above": {n: M.share_above(scores[n], thr) for n in names}, "change": {}}
    for n in names[1:]:
        out["change"][n] = {
            "mean_improvement_pct": boot(_improvement_pct(jc.lower_is_better), base, scores[n]),
            "std_improvement_pct": boot(_improvement_pct(jc.lower_is_better, np.std), base, scores[n]),
            "share_above_change_pts": boot(lambda b, a: 100.0 * (float((a > thr).mean()) - float((b > thr).mean())),
                                           base, scores[n]),
        }
    return out


def checkpoint_curves(models: list[EvalModelConfig], entries: list[EvalModelConfig], checkpoint_of: dict,
                      m: dict, judge_cfgs: list[EvalJudgeConfig], jnames: list[str]) -> dict:
    """For every ``checkpoints: true`` model: its checkpoints and final model in step order, each with
    KL to the reference and every judge's mean (with CI), preceded by the KL reference itself (KL 0)
    when it is in the list; and the best by the trained-against judge (the proxy reward): the
    over-optimisation curve of Gao et al. (2022)."""
    curves = {}
    for e in models:
        if not e.checkpoints:
            continue
        members = [x.name for x in entries if x.name.startswith(e.name + "@") and x.name in checkpoint_of] + [e.name]
        summary = Path(e.adapter_path) / "summary.json"
        final_step = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
        points = []
        ref = m.get("kl_reference")
        if ref in m["models"] and ref not in members:
            points.append({"model": ref, "step": 0})
        for name in members:
            points.append({"model": name, "step": int(name.rsplit("@", 1)[1]) if name in checkpoint_of else final_step})
        for pt in points:
            n = pt["model"]
            pt["kl"] = m.get("kl", {}).get(n)
            pt["judges"] = {j: {"mean": m["judges"][j]["mean"][n], "low": m["judges"][j]["mean_ci"][n]["low"],
                                "high": m["judges"][j]["mean_ci"][n]["high"]} for j in jnames}
        proxy = next(((j, c) for j, c in zip(jnames, judge_cfgs) if c.trained_against), None)
        best = None
        if proxy is not None:
            sign = -1.0 if proxy[1].lower_is_better else 1.0
            best = max(members, key=lambda n: sign * m["judges"][proxy[0]]["mean"][n])
        curves[e.name] = {"points": points, "proxy": proxy[0] if proxy else None, "best": best}
    return curves


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
    if "judges" in m:
        s["judges_mean"] = {j: v["mean"] for j, v in m["judges"].items()}
    if "perplexity_ratio" in m:
        s["perplexity_ratio"] = {n: v["estimate"] for n, v in m["perplexity_ratio"].items()}
    s["copy_rate"] = m["copy_rate"]
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
    columns = reward_columns(table.rows)
    composite = build_reward(cfg.rewards) if cfg.rewards else None
    part_names = [p[0] for p in composite.parts] if composite else []
    judge_cfgs = list(cfg.judges)
    if cfg.toxicity is not None:
        logger.warning(f"[rlhfkit] warning: eval key 'toxicity' is deprecated; use judges: [{{kind: {cfg.toxicity}}}]")
        judge_cfgs = [EvalJudgeConfig(kind=cfg.toxicity)]
    jnames = judge_names(judge_cfgs)
    judge_name = cfg.judge or ("total" if composite else (jnames[0] if jnames else "toxicity"))
    if judge_name == "toxicity" and jnames and "toxicity" not in jnames:
        judge_name = jnames[0]  # 'toxicity' names the first judge
    valid = (["total"] + part_names if composite else []) + jnames
    if not valid:
        raise ConfigError("nothing to score: configure 'rewards' or at least one of 'judges'")
    if judge_name not in valid:
        raise ConfigError(f"judge '{judge_name}' is not a configured score; choose one of {valid}")
    without = [f"total-{p}" for p in part_names] if len(part_names) > 1 else []
    for w in cfg.win_rates:
        if w not in valid + without:
            raise ConfigError(f"win_rates: '{w}' is not a configured score; choose from {valid + without}")
    entries, checkpoint_of = expand_checkpoints(cfg.models)
    names = [e.name for e in entries]
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
    scorer_name = cfg.perplexity_scorer or next(
        (e.name for e in sorted(entries, key=lambda e: e.name != names[0]) if e.model is not None), None)
    toks: dict = {}  # each model's tokenizer
    nll: dict[str, tuple[list[float], list[int]]] = {}  # perplexity: (summed NLL, tokens) of each answer
    scored_ids: dict[str, Optional[list[list[int]]]] = {}  # the token ids each model's answers were generated as
    cut: dict[str, list[float]] = {}  # 1.0 where a generated answer stopped at max_new_tokens without EOS
    for e in entries:
        model = tok = None
        if e.model is not None:
            if e.name == cfg.kl_reference:
                model, tok = ref_model, ref_tok
            else:
                model, tok = load_entry(e.model, e.adapter_path, device, checkpoint_of.get(e.name))
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
            cut[e.name] = [float(len(r) >= cfg.generation.max_new_tokens and r[-1] != tok.eos_token_id)
                           for r in responses]
        scored_ids[e.name] = responses if not e.from_file else None
        toks[e.name] = tok
        tokens[e.name] = token_count(tok, completions[e.name]) if tok is not None else None
        if model is not None and model is ref_model:
            kl[e.name] = 0.0  # the reference itself: no forwards needed
        elif ref_model is not None and model is not None:
            if not same_tokenizer(tok, ref_tok):
                raise UserError(f"models '{e.name}': KL needs the reference's tokenizer; this model's differs")
            if cfg.generation.do_sample:  # sampled KL: log pi - log pi_ref on the sampled tokens
                lp = sequence_logps(PolicyModel(model).eval(), tok, wrapped, responses, cfg.kl_batch_size)
                ref_nll = answer_nll(ref_model, tok, wrapped, responses, cfg.kl_batch_size)
                kl[e.name] = float(np.mean((lp.numpy() + np.asarray(ref_nll[0])).tolist()))
                if scorer_name == cfg.kl_reference:
                    nll[e.name] = ref_nll  # the perplexity scorer is the reference: this pass serves both
            else:
                kl[e.name] = float(np.mean(token_kl(model, ref_model, tok, wrapped, responses, cfg.kl_batch_size)))
        if model is not None and model is not ref_model:
            del model
            gc.collect()
    for e in entries:
        if tokens[e.name] is None and length_tok is not None:
            tokens[e.name] = token_count(length_tok, completions[e.name])

    # ---- perplexity of every model's answers under one scorer ----
    if scorer_name is not None and any(e.name not in nll for e in entries):
        se = next(e for e in entries if e.name == scorer_name)
        if se.name == cfg.kl_reference:
            scorer, scorer_tok = ref_model, ref_tok
        else:
            scorer, scorer_tok = load_entry(se.model, se.adapter_path, device, checkpoint_of.get(se.name))
        seq2seq = bool(unwrap(scorer).config.is_encoder_decoder)
        wrapped = [wrap_prompt(p, cfg.data, scorer_tok) for p in prompts]
        for e in entries:
            if e.name in nll:
                continue
            ids = scored_ids.get(e.name)
            if ids is None or not same_tokenizer(toks[e.name], scorer_tok):
                ids = [encode_completion(scorer_tok, c, seq2seq) for c in completions[e.name]]  # EOS appended
            nll[e.name] = answer_nll(scorer, scorer_tok, wrapped, ids, cfg.kl_batch_size)
        del scorer
    del ref_model
    gc.collect()

    # ---- scores ----
    m: dict = {"command": "eval", "prompts": n_prompts, "samples_per_prompt": per_prompt, "models": names,
               "baseline": names[0], "judge": judge_name, "ci_level": cfg.ci_level,
               "bootstrap_resamples": cfg.bootstrap_resamples,
               "completions_from": {e.name: ("file" if e.from_file else "generated") for e in entries}}
    boot = Bootstrap(n_prompts, per_prompt, cfg.bootstrap_resamples, cfg.seed, cfg.ci_level)
    others = names[1:]
    judge: dict[str, list[float]] = {}
    scores: dict[str, dict[str, list[float]]] = {}  # judge -> model -> score of every answer
    if judge_cfgs:
        m["judges"] = {}
    for jc, jn in zip(judge_cfgs, jnames):
        fn = build_judge(jc)
        scores[jn] = {n: fn(prompts, completions[n]) for n in names}
        m["judges"][jn] = judge_summary(jc, scores[jn], names, boot)
        if judge_name == jn:
            judge = {n: ([1.0 - p for p in scores[jn][n]] if jc.lower_is_better else scores[jn][n]) for n in names}
    tox = scores[jnames[0]] if judge_cfgs and judge_cfgs[0].lower_is_better else {}
    if tox:  # the first judge under the names of the detoxification recipe
        m["toxicity"] = {n: {"mean": float(np.mean(tox[n])), "std": float(np.std(tox[n]))} for n in names}
        m["toxicity_change"] = {n: M.toxicity_change(tox[names[0]], tox[n]) for n in others}
    parts_per_model: dict[str, dict[str, list[float]]] = {}
    if composite is not None:
        m["reward_names"] = ["total"] + part_names if len(part_names) > 1 else part_names
        m["reward"], m["reward_change"] = {}, {}
        for n in names:
            total, raw = composite.score(prompts, completions[n], **columns)
            parts_per_model[n] = {"total": total, **raw}
            m["reward"][n] = {k: float(np.mean(v)) for k, v in parts_per_model[n].items()}
            if judge_name in parts_per_model[n]:
                judge[n] = parts_per_model[n][judge_name]
        m["reward_change"] = {n: {k: boot(_diff, parts_per_model[names[0]][k], parts_per_model[n][k])
                                  for k in m["reward_names"]} for n in others}
    if references is not None:
        rouge = {n: M.rouge_pairs(completions[n], references) for n in names}
        for n in names:
            rouge[n]["rouge_avg"] = list(np.mean([rouge[n][t] for t in ("rouge1", "rouge2", "rougeL")], axis=0))
        m["rouge"] = {n: {t: float(np.mean(v)) for t, v in rouge[n].items()} for n in names}
        m["rouge_change"] = {n: {t: boot(_diff, rouge[names[0]][t], rouge[n][t]) for t in rouge[n]} for n in others}
    copy = {n: [M.copy_rate(c, p, cfg.copy_ngram) for c, p in zip(completions[n], prompts)] for n in names}
    m["copy_ngram"] = cfg.copy_ngram
    m["copy_rate"] = {n: float(np.mean(copy[n])) for n in names}
    m["copy_rate_change"] = {n: boot(_diff, copy[names[0]], copy[n]) for n in others}
    relevance: dict[str, list[float]] = {}
    uncopied: dict[str, list[float]] = {}
    if sources is not None:
        relevance = {n: M.semantic_relevance_pairs(completions[n], sources, cfg.relevance_model) for n in names}
        uncopied = {n: M.relevance_uncopied(completions[n], prompts, sources, cfg.copy_ngram, cfg.relevance_model)
                    for n in names}
        m["semantic_relevance"] = {n: float(np.mean(relevance[n])) for n in names}
        m["relevance_uncopied"] = {n: float(np.mean(uncopied[n])) for n in names}
        m["relevance_ratio"] = {n: {"semantic_relevance": boot(_ratio, relevance[names[0]], relevance[n]),
                                    "relevance_uncopied": boot(_ratio, uncopied[names[0]], uncopied[n])}
                                for n in others}
    if nll:
        m["perplexity_scorer"] = scorer_name
        m["perplexity"] = {n: M.perplexity(*nll[n]) for n in names}
        m["perplexity_ratio"] = {n: boot(_perplexity_ratio, *nll[names[0]], *nll[n]) for n in others}
    if cut:
        m["cut_at_cap"] = {n: float(np.mean(v)) for n, v in cut.items()}
        if names[0] in cut:
            m["cut_at_cap_change"] = {n: boot(_diff, cut[names[0]], cut[n]) for n in others if n in cut}
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
        m["win_rate_vs_baseline"] = {n: comp["win_rate"][n][names[0]] for n in others}
        m["win_rate_ci"] = {n: boot(_win_rate, judge[names[0]], judge[n]) for n in others}
    if len(names) > 1 and cfg.win_rates:
        weights = {name: w for name, w, _ in composite.parts} if composite else {}

        def named(spec: str, n: str) -> list[float]:
            if spec.startswith("total-") and spec in without:
                part = spec[len("total-"):]
                return [t - weights[part] * r for t, r in zip(parts_per_model[n]["total"], parts_per_model[n][part])]
            if spec in scores:
                lower = next(c.lower_is_better for c, j in zip(judge_cfgs, jnames) if j == spec)
                return [1.0 - x for x in scores[spec][n]] if lower else scores[spec][n]
            return parts_per_model[n][spec]

        m["win_rate_by"] = {w: {n: boot(_win_rate, named(w, names[0]), named(w, n)) for n in others}
                            for w in cfg.win_rates}
    curves = checkpoint_curves(cfg.models, entries, checkpoint_of, m, judge_cfgs, jnames)
    if curves:
        m["checkpoint_curves"] = curves

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
        if scores:
            row["judges"] = {j: {n: scores[j][n][i] for n in names} for j in jnames}
        row["copy_rate"] = {n: copy[n][i] for n in names}
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
    images = {"reward_hist.png": histogram_png(judge, f"{judge_name}, every answer", judge_name)}
    if scores:
        images["toxicity_cdf.png"] = cdf_png({j: scores[j] for j in jnames}, {j: m["judges"][j] for j in jnames})
    if len(names) > 1:
        images["models.png"] = bars_png(change_panels(m, jnames))
    for family, curve in m.get("checkpoint_curves", {}).items():
        images[f"overoptimisation_{family}.png"] = overoptimisation_png(family, curve, m)
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
           "sequence_logps", "compare", "answer_nll", "load_trainable", "expand_checkpoints",
           "checkpoint_curves", "judge_summary", "Bootstrap"]
