"""Supervised fine-tuning (SFT) with a completion-only loss.

The loss is the mean negative log-likelihood of the completion tokens of the batch: prompt and
padding tokens are masked (Ouyang et al. 2022 fine-tune on demonstrations the same way). Causal
and encoder-decoder models, full or LoRA. With ``packing`` (causal only) whole examples are
packed first-fit into rows of ``model.max_length`` tokens, with position ids restarting per
example so transformers masks attention across examples.

Steps: data -> tokenize -> (pack) -> for each optimizer step: micro-batches -> NLL -> engine.step.
Held-out loss is measured before training, every ``train.eval_every`` steps, and at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from rlhfkit.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, UserError
from rlhfkit.data import DataStats, StepBatcher, collate, collate_packed, load_splits, pack, sft_examples, tokenize_pairs
from rlhfkit.engine import Engine, process_info, total_steps_for
from rlhfkit.models import PolicyModel, load_policy, save_pretrained
from rlhfkit.utils import logger, seed_everything


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to fine-tune."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(columns={"prompt": "prompt", "completion": "completion"}))
    """Rows with a prompt (or ``prompt_template``) and a ``completion`` column, or chat ``messages``."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, steps and output."""
    packing: bool = False
    """Pack several examples into each row of ``model.max_length`` tokens (causal models only)."""
    eval_batch_size: int = 16
    """Rows per forward when measuring held-out loss."""
    eval_max_rows: Optional[int] = None
    """Measure held-out loss on at most this many rows."""

    def validate(self) -> None:
        if self.eval_batch_size <= 0:
            raise UserError(f"eval_batch_size must be > 0, got {self.eval_batch_size}")


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
    train_table, held_table = load_splits(cfg.data)
    stats = DataStats()
    train = tokenize_pairs(sft_examples(train_table, cfg.data, tok, stats), tok, cfg.data, cfg.model.max_length,
                           seq2seq, stats)
    held_stats = DataStats()
    held = tokenize_pairs(sft_examples(held_table, cfg.data, tok, held_stats), tok, cfg.data, cfg.model.max_length,
                          seq2seq, held_stats) if held_table else []
    if cfg.eval_max_rows is not None:
        held = held[: cfg.eval_max_rows]
    units = pack(train, cfg.model.max_length, tok.pad_token_id) if cfg.packing else train
    logger.info(f"sft: {len(train)} training rows{f' packed into {len(units)} rows' if cfg.packing else ''}, "
                f"{len(held)} held-out rows")

    policy = PolicyModel(model)
    lengths = [len(u["input_ids"]) if cfg.packing else len(u) for u in units]
    world, rank = process_info(cfg.train)
    batcher = StepBatcher(lengths, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed,
                          cfg.train.group_by_length, world, rank)
    engine = Engine(cfg.train, "sft", cfg, policy, total_steps_for(cfg.train, batcher.steps_per_epoch), resume=resume)
    engine.extra_summary["data"] = stats.as_dict()

    def make_batch(idx: list[int]) -> dict:
        if cfg.packing:
            return collate_packed([units[i] for i in idx], tok.pad_token_id)
        return collate([units[i] for i in idx], tok.pad_token_id, seq2seq)

    def evaluate() -> Optional[float]:
        if not held:
            return None
        loss = heldout_loss(engine.unwrapped(), held, tok.pad_token_id, seq2seq, cfg.eval_batch_size)
        engine.log({"eval/loss": loss})
        return loss

    start_loss = engine.state.get("eval_loss_start")
    if start_loss is None:
        start_loss = evaluate()
        engine.state["eval_loss_start"] = start_loss
    while not engine.done:
        micro = [make_batch(idx) for idx in batcher.step(engine.step_count)]
        weights = [float((mb["labels"] != -100).sum()) for mb in micro]  # completion tokens
        metrics = engine.step(nll_loss, micro, weights)
        engine.end_step(metrics)
        if cfg.train.eval_every and engine.step_count % cfg.train.eval_every == 0 and not engine.done:
            evaluate()
    end_loss = evaluate()
    extra = {"eval_loss_start": start_loss, "eval_loss_end": end_loss}
    if start_loss and end_loss is not None:
        extra["eval_loss_drop_pct"] = 100.0 * (start_loss - end_loss) / start_loss
        logger.info(f"sft: held-out loss {start_loss:.4f} -> {end_loss:.4f} "
                    f"({extra['eval_loss_drop_pct']:.1f}% lower)")

    def save(out):
        save_pretrained(engine.unwrapped().lm, tok, out, merge=cfg.lora.merge_on_save,
                        state_dict=engine.saved_state("lm."))  # gathered weights under fsdp / ZeRO-3

    return engine.finish(save if cfg.train.save_model else None, extra)


__all__ = ["Config", "run", "nll_loss", "heldout_loss"]
