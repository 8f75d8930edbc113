"""The set-up that the offline recipes (sft, reward, dpo, kto, ilql) share.

Each of them reads a table, splits off held-out rows, tokenizes both parts with its own function,
builds one model, and trains it with the same loop: evaluate, train (evaluating every
``eval.every`` steps), evaluate (``Engine.run_loop``). This module holds the data half and the
engine half of that; the recipe keeps its tokenizer, its model and its loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from torch import nn

from rlhfkit.data import DataStats, StepBatcher, Table, load_splits
from rlhfkit.engine import Engine, process_info, total_steps_for


@dataclass
class OfflineData:
    """Tokenized training and held-out units (whatever the recipe's tokenizer returns per row)."""

    train: list
    """Training units (examples, pairs, scored samples)."""
    held: list
    """Held-out units, at most ``eval.max_rows``."""
    stats: DataStats
    """Counts of the training rows (dropped, truncated), written to summary.json as ``data``."""


def load_data(cfg: Any, tokenize: Callable[[Table, DataStats], list]) -> OfflineData:
    """Read ``cfg.data``, split off the held-out rows, ``tokenize(table, stats)`` both parts, and
    keep at most ``cfg.eval.max_rows`` held-out units."""
    train_table, held_table = load_splits(cfg.data)
    stats = DataStats()
    train = tokenize(train_table, stats)
    held = tokenize(held_table, DataStats()) if held_table else []
    if cfg.eval.max_rows is not None:
        held = held[: cfg.eval.max_rows]
    return OfflineData(list(train), list(held), stats)


def make_engine(cfg: Any, command: str, model: nn.Module, lengths: Sequence[int], data: OfflineData, resume: bool,
                eval_metrics: list[str], engine_cls: type = Engine, **kwargs: Any) -> tuple[Engine, StepBatcher]:
    """The step batcher over the training units (``lengths``) and the ``Engine`` (``engine_cls``)
    that trains ``model`` for ``train.epochs`` or ``train.max_steps``."""
    world, rank = process_info(cfg.train)
    batcher = StepBatcher(list(lengths), cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed,
                          cfg.train.group_by_length, world, rank)
    engine = engine_cls(cfg.train, command, cfg, model, total_steps_for(cfg.train, batcher.steps_per_epoch),
                        resume=resume, eval_metrics=eval_metrics, **kwargs)
    engine.extra_summary["data"] = data.stats.as_dict()
    return engine, batcher


def train_and_evaluate(engine: Engine, batcher: StepBatcher, cfg: Any, train_step: Callable[[list[list[int]]], dict],
                       evaluate: Callable[[], Optional[dict]], save: Callable,
                       prepare: Optional[Callable] = None) -> tuple[Optional[dict], Optional[dict]]:
    """``Engine.run_loop`` with one step = ``train_step(batcher.step(step))`` (the micro-batches'
    row indices)."""
    return engine.run_loop(lambda: train_step(batcher.step(engine.step_count)), evaluate, cfg.eval.every, save,
                           prepare)


__all__ = ["OfflineData", "load_data", "make_engine", "train_and_evaluate"]
