"""What the online RL recipes (``ppo``, ``grpo``/``rloo``/REINFORCE++) share around the experience
core (``rlhfkit.rollout``): the training and held-out prompts, and the held-out evaluation at the
start, every ``eval.every`` iterations and at the end; ``train.best_metric`` (e.g. ``eval/reward``)
keeps the best model in ``output_dir/best``.

Evaluation decodes greedily and logs ``eval/reward``, ``eval/reward/<part>`` and ``eval/kl`` (nats
per response to the reference, when the run has one) at the current step, so a best checkpoint
keyed on ``train.best_metric: eval/reward`` can read them; summary.json gets
``eval_reward_start`` / ``eval_reward_end`` and samples.jsonl the held-out responses before and
after training (the run viewer's format).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional, Sequence

from rlhfkit.config import DataConfig, GenerationConfig, ModelConfig, UserError
from rlhfkit.data import DataStats, Table, load_splits
from rlhfkit.distributed import unsharded
from rlhfkit.engine import Engine
from rlhfkit.models import unwrap
from rlhfkit.rollout import PromptItem, evaluate_prompts, fit_prompts
from rlhfkit.utils import atomic_write_text, logger


def online_eval_metrics(rewards) -> list[str]:
    """What ``HeldOutEval`` logs for these reward configs: ``train.best_metric`` may name any."""
    return ["eval/reward", "eval/kl"] + [f"eval/reward/{r.name or r.kind}" for r in rewards]


def online_prompts(data: DataConfig, model_cfg: ModelConfig, gen: GenerationConfig, tokenizer, lm,
                   prompts: Optional[Sequence[str]] = None, eval_max_rows: Optional[int] = None,
                   ) -> tuple[list[PromptItem], list[PromptItem], DataStats]:
    """Training and held-out prompts fitted to the model (``rollout.fit_prompts``), from
    ``data`` or, from Python, a list of ``prompts`` (then used as they are: no template, no
    held-out split). At most ``eval_max_rows`` held-out prompts (None: all)."""
    stats = DataStats()
    if prompts is not None:
        table, held_table = Table([{"prompt": p} for p in prompts], "<prompts>"), None
        data = dataclasses.replace(data, prompt_template=None, columns={}, where={})
    else:
        table, held_table = load_splits(data)
    hf_config = unwrap(lm).config
    items = fit_prompts(table, data, tokenizer, hf_config, model_cfg.max_length, gen, stats)
    held = fit_prompts(held_table, data, tokenizer, hf_config, model_cfg.max_length, gen, DataStats())
    return items, held[:eval_max_rows] if eval_max_rows is not None else held, stats


def check_sharded_generation(engine: Engine, gen: GenerationConfig, command: str) -> None:
    """Under ``train.strategy=fsdp`` the policy generates itself (``generation.backend=hf``): a
    vLLM engine's weight sync reads whole tensors, not FSDP2 shards."""
    if engine.sharded and gen.backend != "hf":
        raise UserError(f"{command}: generation.backend={gen.backend} is not supported with train.strategy=fsdp "
                        "(its weight sync reads whole tensors, not FSDP2 shards); use generation.backend=hf")


class HeldOutEval:
    """Greedy held-out evaluation of an online run (see the module docstring)."""

    def __init__(self, engine: Engine, tokenizer, held: list[PromptItem], reward, gen: GenerationConfig,
                 reference=None, chunk: int = 8, every: int = 0, save: Optional[Callable] = None):
        self.engine, self.tok, self.held, self.reward, self.gen = engine, tokenizer, held, reward, gen
        self.reference, self.chunk, self.every, self.save = reference, chunk, every, save
        if not held and (every or engine.cfg.best_metric):
            key = "eval.every" if every else "train.best_metric"
            raise UserError(f"{key} needs held-out prompts: set data.eval_path, data.eval_split or data.eval_fraction > 0")

    def run(self) -> Optional[dict]:
        """Evaluate, log ``eval/<name>``, and keep the best model (``train.best_metric``)."""
        policy = self.engine.unwrapped()
        policy = getattr(policy, "policy", policy)  # PPO's ActorCritic: generate with its policy
        with unsharded(self.engine.model):  # train.strategy=fsdp: the root's weights, outside its forward
            result = evaluate_prompts(policy, self.tok, self.held, self.reward, self.gen, self.reference, self.chunk)
        if result is not None:
            logged = {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
            self.engine.log(logged)
            if self.save is not None:
                self.engine.keep_best(logged, self.save)
        return result

    def start(self) -> None:
        """At step 0 of a fresh run (a resumed run keeps the first run's)."""
        if self.held and self.engine.state.get("eval_start") is None:
            self.engine.state["eval_start"] = self.run()

    def periodic(self) -> None:
        """``Engine.end_step(evaluate=...)``: before the step's checkpoint, so a resumed run has it."""
        if self.every and self.engine.step_count % self.every == 0 and not self.engine.done:
            self.run()

    def end(self, command: str) -> dict:
        """The last evaluation; summary fields ``eval_reward_start`` / ``eval_reward_end``."""
        start, end = self.engine.state.get("eval_start"), self.run()
        if start and end:
            logger.info(f"{command}: held-out greedy reward {start['reward']:.4f} -> {end['reward']:.4f}")
            if self.engine.is_main:
                write_samples(self.engine.out / "samples.jsonl", self.held, start, end)
            self.engine.log_table("eval/samples", [
                {"prompt": it.text, "before": c0, "after": c1, "reward_before": r0, "reward_after": r1}
                for it, c0, c1, r0, r1 in zip(self.held, start["completions"], end["completions"], start["rewards"],
                                              end["rewards"])])
        return {"eval_reward_start": start["reward"] if start else None,
                "eval_reward_end": end["reward"] if end else None}


def write_samples(path, held: list[PromptItem], start: dict, end: dict) -> None:
    """Held-out greedy responses before and after training, in the run viewer's samples format."""
    lines = []
    for item, c0, c1, r0, r1 in zip(held, start["completions"], end["completions"], start["rewards"], end["rewards"]):
        lines.append(json.dumps({"prompt": item.text, "completions": {"before": c0, "after": c1},
                                 "rewards": {"before": r0, "after": r1}, "gain": r1 - r0}))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
