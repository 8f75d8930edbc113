"""Supervised fine-tuning (SFT) with a completion-only loss.

The loss is the mean negative log-likelihood of the completion tokens of the batch: prompt and
padding tokens are masked (Ouyang et al. 2022 fine-tune on demonstrations the same way). Causal
and encoder-decoder models, full or LoRA. With ``packing`` (causal only) whole examples are
packed first-fit into rows of ``model.max_length`` tokens, with position ids restarting per
example so transformers masks attention across examples.

Steps: data -> tokenize -> (pack) -> for each optimizer step: micro-batches -> NLL -> engine.step.
Held-out loss (``eval/loss``) is measured before training, every ``eval.every`` steps, and at the end
(``eval_start`` / ``eval_end`` in summary.json).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from rlhfkit.config import DataConfig, EvalConfig, LoraConfig, ModelConfig, TrainConfig, UserError, check_best_metric
from rlhfkit.data import collate, collate_packed, pack, sft_examples, tokenize_pairs
from rlhfkit.recipes._offline import load_data, make_engine, train_and_evaluate
from rlhfkit.models import load_policy, save_pretrained
from rlhfkit.policy import PolicyModel
from rlhfkit.utils import logger, seed_everything


EVAL_METRICS = ["eval/loss"]


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"train.eval_every": "eval.every", "eval_batch_size": "eval.batch_size",
                                         "eval_max_rows": "eval.max_rows"}
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to fine-tune."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(columns={"prompt": "prompt", "completion": "completion"}))
    """Rows with a prompt (or ``prompt_template``) and a ``completion`` column, or chat ``messages``."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, steps and output."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out loss: how often, rows per forward, how many rows."""
    packing: bool = False
    """Pack several examples into each row of ``model.max_length`` tokens (causal models only)."""

    def validate(self) -> None:
        check_best_metric(self.train, "sft", EVAL_METRICS)


def nll_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean NLL over the completion tokens of the batch."""
    out = model(**batch)
    mask = out["mask"]  # (B, T)
    n = mask.sum().clamp(min=1)
    loss = -(out["logps"] * mask).sum() / n
    return loss, {}


@torch.no_grad()
def heldout_loss(policy: PolicyModel, examples, pad_id: int, seq2seq: bool, batch_size: int) -> float:
    """Token-weighted mean NLL of the completions of ``examples``."""
    was = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s: s + batch_size], pad_id, seq2seq)
        out = policy(**{k: v.to(device) for k, v in batch.items()})
        total += float(-(out["logps"] * out["mask"]).sum())
        count += int(out["mask"].sum())
    policy.train(was)
    return total / max(count, 1)


def run(cfg: Config, resume: bool = False) -> dict:
    seed_everything(cfg.train.seed)  # LoRA / value-head initialisation happens before the Engine seeds
    model, tok = load_policy(cfg.model, cfg.lora)
    seq2seq = bool(model.config.is_encoder_decoder)
    if cfg.packing and seq2seq:
        raise UserError("packing=true works for causal models only; this model is encoder-decoder")
    data = load_data(cfg, lambda table, stats: tokenize_pairs(sft_examples(table, cfg.data, tok, stats), tok, cfg.data,
                                                              cfg.model.max_length, seq2seq, stats))
    train, held = data.train, data.held
    units = pack(train, cfg.model.max_length, tok.pad_token_id) if cfg.packing else train
    logger.info(f"sft: {len(train)} training rows{f' packed into {len(units)} rows' if cfg.packing else ''}, "
                f"{len(held)} held-out rows")

    policy = PolicyModel(model)
    lengths = [len(u["input_ids"]) if cfg.packing else len(u) for u in units]
    engine, batcher = make_engine(cfg, "sft", policy, lengths, data, resume, EVAL_METRICS)

    def make_batch(idx: list[int]) -> dict:
        if cfg.packing:
            return collate_packed([units[i] for i in idx], tok.pad_token_id)
        return collate([units[i] for i in idx], tok.pad_token_id, seq2seq)

    def train_step(step_idx: list[list[int]]) -> dict:
        micro = [make_batch(idx) for idx in step_idx]
        weights = [float((mb["labels"] != -100).sum()) for mb in micro]  # completion tokens
        return engine.step(nll_loss, micro, weights)

    def evaluate() -> Optional[dict]:
        if not held:
            return None
        return {"eval/loss": heldout_loss(engine.unwrapped(), held, tok.pad_token_id, seq2seq, cfg.eval.batch_size)}

    def save(out):
        save_pretrained(engine.unwrapped().lm, tok, out, merge=cfg.lora.merge_on_save,
                        state_dict=engine.saved_state("lm."))  # gathered weights under fsdp / ZeRO-3

    start, end = train_and_evaluate(engine, batcher, cfg, train_step, evaluate, save)
    if start and end:
        logger.info(f"sft: held-out loss {start['eval/loss']:.4f} -> {end['eval/loss']:.4f}")
    return engine.finish(save if cfg.train.save_model else None)


__all__ = ["Config", "run", "nll_loss", "heldout_loss"]
