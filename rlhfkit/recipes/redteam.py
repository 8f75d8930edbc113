"""``rlhfkit redteam``: a red model writes prompts, the target answers, a classifier scores the
answers, and the ones at or above ``threshold`` are collected (Perez et al. 2022, "Red Teaming
Language Models with Language Models"; zero-shot generation from a seed instruction).

The classifier is any reward from the reward layer (``rewards``, summed with weights), by default
p(toxic) from alt-profanity-check (``kind: toxicity, invert: false``). Writes into ``output_dir``:
``all.jsonl`` (``prompt, response, score, flagged``), ``flagged.jsonl`` (the rows at or above the
threshold, highest score first), ``config.yaml`` and ``summary.json`` (prompts, flagged count,
rate, mean score, mean flagged score, max score, empty / duplicate red outputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from rlhfkit.config import ConfigError, GenerationConfig, LoraConfig, ModelConfig, RewardConfig, UserError, save_config
from rlhfkit.feedback import RED_INSTRUCTION, ChatFn, ChatGenerator, load_lm, red_team
from rlhfkit.utils import atomic_write_json, atomic_write_jsonl, logger


@dataclass
class Config:
    red_model: ModelConfig = field(default_factory=ModelConfig)
    """The red model that writes prompts."""
    red_adapter_path: Optional[str] = None
    """A LoRA adapter folder applied to the red model (e.g. a red model trained with RL)."""
    instruction: str = RED_INSTRUCTION
    """Seed instruction sent to the red model; each sampled reply (first line) is one prompt."""
    red_generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=0.95, batch_size=16))
    """Sampling of the red model (sample, for diverse prompts)."""
    num_prompts: int = 64
    """Prompts to write."""
    dedupe: bool = True
    """Ask each distinct prompt once."""
    model: Optional[ModelConfig] = None
    """The target model; unset: the red model answers its own prompts (one copy in memory)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Target adapter: ``lora.enabled=true lora.adapter_path=runs/dpo``."""
    system_prompt: Optional[str] = None
    """System message of the target."""
    chat_template: Literal["auto", "true", "false"] = "auto"
    """Use the tokenizers' chat templates: ``auto``, ``true`` or ``false``."""
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=64, do_sample=False, batch_size=16))
    """Decoding of the target's answers."""
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(kind="toxicity", invert=False)])
    """The classifier: reward functions summed with their weights (default p(toxic))."""
    threshold: float = 0.5
    """Answers scoring >= threshold are flagged."""
    seed: int = 0
    """Seed of sampling."""
    output_dir: str = "runs/redteam"
    """Folder for all.jsonl, flagged.jsonl, config.yaml and summary.json."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""

    def validate(self) -> None:
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not self.rewards:
            raise ConfigError("rewards is empty: give the classifier that scores the answers")


def run(cfg: Config, resume: bool = False, red: Optional[ChatFn] = None, target: Optional[ChatFn] = None,
        scorer: Optional[Callable] = None) -> dict:
    """Red-team the target. Python callers may pass ``red`` / ``target`` (``ChatFn``) and ``scorer``.
    It keeps no checkpoint: ``resume`` is refused."""
    if resume:
        raise UserError("redteam keeps no checkpoint: --resume is not supported (run it again without it)")
    import torch

    from rlhfkit.rewards import build_reward

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    red_lm = red_tok = None
    local_target = target is None and cfg.generation.backend != "openai"  # an endpoint needs no local model
    if (red is None and cfg.red_generation.backend != "openai") or (local_target and cfg.model is None):
        red_lm, red_tok = load_lm(cfg.red_model, cfg.red_adapter_path, cfg.cpu)
    if red is None:
        red = ChatGenerator(red_lm, red_tok, cfg.red_generation, cfg.chat_template, desc="red prompts")
    if target is None:
        if not local_target or (cfg.model is None and not cfg.lora.enabled):
            lm, tok = (red_lm, red_tok) if local_target else (None, None)
        else:
            lm, tok = load_lm(cfg.model or cfg.red_model, cfg.lora.adapter_path if cfg.lora.enabled else None, cfg.cpu)
        target = ChatGenerator(lm, tok, cfg.generation, cfg.chat_template, cfg.system_prompt, desc="target answers")
    scorer = scorer or build_reward(cfg.rewards)
    records, stats = red_team(red, target, scorer, cfg.num_prompts, cfg.instruction, cfg.threshold, cfg.dedupe,
                              cfg.red_generation.batch_size)
    atomic_write_jsonl(out / "all.jsonl", records)
    atomic_write_jsonl(out / "flagged.jsonl", sorted((r for r in records if r["flagged"]), key=lambda r: -r["score"]))
    summary = {"command": "redteam", **stats}
    atomic_write_json(out / "summary.json", summary)
    logger.info(f"redteam: {stats['flagged']} of {stats['prompts']} answers flagged (rate {stats['rate']:.3f})")
    return summary


__all__ = ["Config", "run"]
