"""Direct preference optimisation and its family, on offline preference pairs.

Losses (``loss``), all from ``rlhfkit.losses``; s = sigmoid, b = ``beta``, and
h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)):

- ``sigmoid``: DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model"), -log s(b h). With ``label_smoothing`` e > 0 it is conservative DPO
  (cDPO, Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"):
  (1-e)(-log s(b h)) + e(-log s(-b h)).
- ``robust``: robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), the unbiased estimate
  of the clean-label loss when labels flip with probability e = ``label_smoothing``.
- ``ipo``: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
  Human Preferences"), (h - 1/(2b))^2.
- ``hinge``: SLiC-HF's calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
  Calibration with Human Feedback"), relu(1 - b h).
- ``simpo``: SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward"), -log s(b (c - r) - simpo_gamma) on per-token average log-probs c, r.
- ``orpo``: ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model"), NLL(chosen) + orpo_lambda * -log s(log odds ratio), on per-token average log-probs.

Steps: data (prompt/chosen/rejected, hh-rlhf dialogues with a shared prefix, or chat messages)
-> tokenize -> reference log-probs (live, or precomputed once and cached) -> for each optimizer
step: micro-batches of pairs, chosen and rejected through ONE concatenated forward (rows 0..B-1
chosen, B..2B-1 rejected) -> loss -> ``engine.step``. Held-out preference accuracy is measured
before training, every ``eval.every`` steps and at the end (``eval_start`` / ``eval_end`` in
summary.json).

``summary.json`` (and ``metrics.jsonl``) count ``samples`` in preference pairs (one pair is one
sample); ``sequences`` in the summary is the chosen + rejected sequences, 2 x ``samples``.

The reference (``reference.kind``): the LoRA base with the adapter disabled, a frozen copy of
the start model (or of ``reference.model``), or a trained adapter loaded frozen as a second,
named adapter on the same base. ``simpo`` and ``orpo`` are reference-free and load none.

Deliberate choices and deviations:
- Summed completion log-probs go into DPO, cDPO, robust DPO and hinge; IPO, SimPO and ORPO get
  per-token averages (IPO as TRL does; SimPO and ORPO as their papers define them).
- ``hinge`` is SLiC's calibration term only (margin 1, scaled by b as TRL does); SLiC's
  regularisation towards the SFT targets is left out (add it with an SFT stage).
- SimPO's ``simpo_gamma`` is the margin itself (paper eq. 6), not TRL's gamma/beta ratio.
- ORPO's NLL is the mean over all chosen tokens of the micro-batch, its odds-ratio term a mean
  over pairs; micro-batches are weighted by pairs in gradient accumulation, so with uneven
  lengths k micro-batches are not exactly one big batch for the NLL term.
- Held-out accuracy is the fraction of held-out pairs whose implicit reward margin
  b h is > 0 (ties count as wrong, as TRL's ``rewards/accuracies``); for IPO h is taken on the
  averages it trains, for SimPO/ORPO the margin is that of the average log-probs. A policy equal
  to its reference has margin 0 on every pair, so the start accuracy of the reference-based losses
  is 0 by definition; it measures how far training moved the policy the right way.
- ``reference.precompute`` computes the reference log-probs once with padding chosen for that
  pass; they equal the live ones up to float rounding (~1e-6), not bit for bit.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch

from rlhfkit import losses
from rlhfkit.config import (ConfigError, DataConfig, EvalConfig, LoraConfig, ModelConfig, ReferenceConfig, TrainConfig,
                            check_best_metric)
from rlhfkit.data import Example, PairExample, collate_preferences, preference_examples, tokenize_preferences
from rlhfkit.engine import resolve_precision
from rlhfkit.recipes._offline import load_data, make_engine, train_and_evaluate
from rlhfkit.models import load_policy, save_pretrained
from rlhfkit.policy import PolicyModel, Reference, build_reference
from rlhfkit.recipes._preference import (default_cache_dir, model_inputs, policy_scores, precompute_reference,
                                         reference_identity, reference_sums, release_reference, sequence_logps)
from rlhfkit.utils import logger, seed_everything

Loss = Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"]
LOSSES = list(typing.get_args(Loss))
EVAL_METRICS = ["eval/accuracy", "eval/margin", "eval/loss"]
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"simpo": 2.0}  # every other loss: 0.1


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {
        "train.eval_every": "eval.every", "eval_batch_size": "eval.batch_size", "eval_max_rows": "eval.max_rows",
        "precompute_reference": "reference.precompute", "reference_cache_dir": "reference.cache_dir",
        "gamma": "simpo_gamma", "lam": "orpo_lambda"}
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT model)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The frozen reference policy (not loaded for the reference-free losses simpo and orpo), and
    whether its log-probs are precomputed once (``reference.precompute``, ``reference.cache_dir``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference rows: ``prompt/chosen/rejected`` (or ``prompt_template`` + chosen/rejected),
    ``chosen/rejected`` full dialogues with a shared prefix (hh-rlhf), or chat-message lists."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, steps and output."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out preference accuracy: how often, sequences per forward (also of the reference
    precomputation), how many pairs."""
    loss: Loss = "sigmoid"
    """``sigmoid`` (DPO; cDPO with label_smoothing > 0), ``robust``, ``ipo``, ``hinge`` (SLiC),
    ``simpo`` or ``orpo`` (the last two are reference-free)."""
    beta: Optional[float] = None
    """Inverse temperature b of the implicit reward; None: 0.1 (2.0 for simpo). Not used by orpo."""
    label_smoothing: float = 0.0
    """Assumed probability e that a pair's label is flipped: ``sigmoid`` becomes cDPO, ``robust``
    needs it (e < 0.5). Other losses must leave it 0."""
    simpo_gamma: float = 0.5
    """``simpo``: target reward margin (the paper's gamma, not a gamma/beta ratio)."""
    orpo_lambda: float = 0.1
    """``orpo``: weight of the odds-ratio term next to the chosen NLL."""

    def validate(self) -> None:
        check_best_metric(self.train, "dpo", EVAL_METRICS)
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.loss == "orpo" and self.beta is not None:
            raise ConfigError("loss=orpo has no beta; its weight is 'orpo_lambda'")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(f"label_smoothing applies to loss=sigmoid (cDPO) and loss=robust, not '{self.loss}'")
        if self.orpo_lambda < 0:
            raise ConfigError(f"orpo_lambda must be >= 0, got {self.orpo_lambda}")
        if self.reference.kind == "none" and self.loss not in REFERENCE_FREE:
            raise ConfigError(f"loss={self.loss} needs a reference; reference.kind=none only suits "
                              f"{' and '.join(REFERENCE_FREE)}")


def uses_reference(cfg: Config) -> bool:
    return cfg.loss not in REFERENCE_FREE


def resolved_beta(cfg: Config) -> float:
    return cfg.beta if cfg.beta is not None else DEFAULT_BETA.get(cfg.loss, 0.1)


def objective(cfg: Config, logps: torch.Tensor, counts: torch.Tensor,
              ref_logps: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """The configured loss from summed completion log-probs of 2B sequences (chosen, then rejected).

    ``logps``, ``counts``: (2B,) policy sums and completion token counts; ``ref_logps``: (2B,)
    reference sums (None for simpo/orpo).
    """
    B = logps.shape[0] // 2
    avg = logps / counts.clamp(min=1)  # (2B,) per-token averages
    if cfg.loss == "simpo":
        return losses.simpo(avg[:B], avg[B:], beta=resolved_beta(cfg), gamma=cfg.simpo_gamma)
    if cfg.loss == "orpo":
        chosen_nll = -logps[:B].sum() / counts[:B].sum().clamp(min=1)  # mean NLL of the chosen tokens
        return losses.orpo(avg[:B], avg[B:], chosen_nll, lam=cfg.orpo_lambda)
    if ref_logps is None:
        raise RuntimeError(f"loss={cfg.loss} needs reference log-probs")
    pi, ref = logps, ref_logps
    if cfg.loss == "ipo":
        pi, ref = avg, ref_logps / counts.clamp(min=1)
    return losses.dpo(pi[:B], pi[B:], ref[:B], ref[B:], beta=resolved_beta(cfg), variant=cfg.loss,
                      label_smoothing=cfg.label_smoothing)


def preference_loss(model: torch.nn.Module, batch: dict, cfg: Config,
                    reference: Optional[Reference] = None) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch from ``collate_preferences`` (one forward over chosen + rejected).

    Reference log-probs come from ``batch["ref_logps"]`` (2B,) when precomputed, else from
    ``reference`` (no grad).
    """
    inputs = model_inputs(batch)
    out = model(**inputs)
    logps, counts = sequence_logps(out["logps"], out["mask"])  # (2B,), (2B,)
    ref = None
    if uses_reference(cfg):
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_sums(reference, inputs)  # (2B,)
    return objective(cfg, logps, counts, ref)


def pair_examples(pairs: list[PairExample]) -> list[Example]:
    """The 2N sequences of N pairs in the concatenated layout: chosen 0..N-1, rejected N..2N-1."""
    return [Example(p.prompt_ids, p.chosen_ids) for p in pairs] + [Example(p.prompt_ids, p.rejected_ids) for p in pairs]


def run(cfg: Config, resume: bool = False) -> dict:
    seed_everything(cfg.train.seed)  # before the fresh LoRA weights are drawn: the run is reproducible
    model, tok = load_policy(cfg.model, cfg.lora)
    seq2seq = bool(model.config.is_encoder_decoder)
    data = load_data(cfg, lambda table, stats: tokenize_preferences(
        preference_examples(table, cfg.data, tok, stats), tok, cfg.data, cfg.model.max_length, seq2seq, stats))
    train, held = data.train, data.held
    logger.info(f"dpo: loss={cfg.loss}, {len(train)} training pairs, {len(held)} held-out pairs")

    policy = PolicyModel(model)
    if not uses_reference(cfg):
        if cfg.reference.kind not in ("auto", "none"):
            logger.warning(f"loss={cfg.loss} is reference-free: reference.kind={cfg.reference.kind} is not loaded")
        if cfg.reference.precompute:
            logger.warning(f"loss={cfg.loss} is reference-free: reference.precompute has nothing to compute")
    reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy, needed=uses_reference(cfg))
    engine, batcher = make_engine(cfg, "dpo", policy, [len(p) for p in train], data, resume, EVAL_METRICS)
    engine.prepare_frozen(reference.model)  # the frozen copy: on the Engine's device, sharded under fsdp
    autocast = engine.accelerator.autocast
    pad = tok.pad_token_id

    # Reference log-probs: held-out pairs always once (the reference never changes), training
    # pairs once when asked to precompute, else live in every step.
    ref_train, ref_held, cache_info, ref_kind = None, None, {}, reference.kind
    if uses_reference(cfg):
        precompute = cfg.reference.precompute
        common = dict(pad_id=pad, seq2seq=seq2seq, batch_size=cfg.eval.batch_size, device=engine.device,
                      autocast=autocast)
        if precompute:
            common.update(
                cache_dir=cfg.reference.cache_dir or default_cache_dir(),
                identity=reference_identity(reference, cfg.model, cfg.lora, cfg.reference,
                                            next(policy.parameters()).dtype,
                                            resolve_precision(cfg.train, engine.device.type), engine.device.type),
                lengths={"max_length": cfg.model.max_length, "max_prompt_length": cfg.data.max_prompt_length,
                         "max_completion_length": cfg.data.max_completion_length})
            ref_train, cache_info["train"] = precompute_reference(reference, pair_examples(train), what="dpo-train",
                                                                  **common)
        if held:
            ref_held, info = precompute_reference(reference, pair_examples(held), what="dpo-heldout", **common)
            if precompute:
                cache_info["heldout"] = info
        if precompute:
            release_reference(reference)

    def make_batch(idx: list[int]) -> dict:
        batch = collate_preferences([train[i] for i in idx], pad, seq2seq)
        batch["n_samples"] = len(idx)  # the engine counts pairs, not the 2B rows of the forward
        if ref_train is not None:
            t = torch.tensor(idx)
            batch["ref_logps"] = torch.cat([ref_train[t], ref_train[len(train) + t]])  # (2B,)
        return batch

    def loss_fn(m, batch):
        return preference_loss(m, batch, cfg, reference)

    def train_step(step_idx: list[list[int]]) -> dict:
        return engine.step(loss_fn, [make_batch(idx) for idx in step_idx], [float(len(idx)) for idx in step_idx])

    def evaluate() -> Optional[dict]:
        if not held:
            return None
        pi, counts = policy_scores(engine.unwrapped(), pair_examples(held), pad, seq2seq, cfg.eval.batch_size, autocast)
        _, m = objective(cfg, pi, counts, ref_held)
        return {"eval/accuracy": m["rewards/accuracies"], "eval/margin": m["rewards/margins"], "eval/loss": m["loss"]}

    def save(out):
        save_pretrained(engine.unwrapped().lm, tok, out, merge=cfg.lora.merge_on_save,
                        state_dict=engine.saved_state("lm."))  # gathered weights under fsdp / ZeRO-3

    start, end = train_and_evaluate(engine, batcher, cfg, train_step, evaluate, save)
    if start is not None and end is not None:
        logger.info(f"dpo: held-out preference accuracy {start['eval/accuracy']:.3f} -> {end['eval/accuracy']:.3f}")
    extra = {"sequences": 2 * engine.samples * engine.world_size,
             "loss": cfg.loss, "beta": None if cfg.loss == "orpo" else resolved_beta(cfg),
             "reference": ref_kind, "reference_precomputed": bool(cache_info)}
    if cache_info:
        extra["reference_cache"] = cache_info
    return engine.finish(save if cfg.train.save_model else None, extra)


__all__ = ["Config", "run", "objective", "preference_loss", "pair_examples", "LOSSES"]
