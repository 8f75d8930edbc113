"""``rlhfkit constitutional``: critique-and-revise with principles from the config (the supervised
stage of Constitutional AI, Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

For each prompt the model answers, then for each round: critiques its answer against a principle's
``critique`` request and rewrites it following the principle's ``revision`` request
(``rlhfkit.feedback.constitutional_revisions``). Round r uses ``principles[r % len]`` (or a seeded
random draw with ``sample_principles``, as in the paper).

Writes into ``output_dir``:
- ``revisions.jsonl``: one record per prompt ``{prompt, original, revision, steps: [{principle,
  critique, revision}]}``, appended batch by batch (a re-run skips prompts already there);
- ``sft.jsonl``: ``{prompt, completion}`` with the final revision (for ``rlhfkit sft``);
- ``prefs.jsonl``: ``{prompt, chosen: revision, rejected: original}`` (for ``rlhfkit dpo``), pairs
  whose revision equals the original are left out;
- ``config.yaml``, ``summary.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from rlhfkit.config import ConfigError, DataConfig, GenerationConfig, LoraConfig, ModelConfig, save_config
from rlhfkit.feedback import (ChatFn, ChatGenerator, Principle, constitutional_revisions, default_principles, load_lm,
                              revision_preference_rows, sft_rows)
from rlhfkit.utils import append_jsonl, atomic_write_json, atomic_write_jsonl, logger


@dataclass
class Config:
    UNUSED: ClassVar[tuple[str, ...]] = (
        "data.eval_path", "data.eval_split", "data.eval_fraction", "data.shuffle_seed", "data.max_prompt_length",
        "data.max_completion_length", "data.overlong", "data.drop_invalid")
    model: ModelConfig = field(default_factory=ModelConfig)
    """The assistant that answers, critiques and revises."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Answer with a trained adapter: ``lora.enabled=true lora.adapter_path=...``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt rows (``prompt`` column or ``prompt_template``; ``chat_template``, ``system_prompt``,
    ``where``, ``max_rows``)."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=128, batch_size=8))
    """Decoding of answers, critiques and revisions."""
    principles: list[Principle] = field(default_factory=default_principles)
    """The constitution: ``[{name, critique, revision}, ...]`` (default: two harmlessness principles)."""
    rounds: int = 1
    """Critique-revision rounds per prompt."""
    sample_principles: bool = False
    """Draw the principle of each prompt and round at random (seeded) instead of in order."""
    seed: int = 0
    """Seed of sampling and of the principle draws."""
    output_dir: str = "runs/constitutional"
    """Folder for revisions.jsonl, sft.jsonl, prefs.jsonl, config.yaml and summary.json."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not self.principles:
            raise ConfigError("principles is empty")


def run(cfg: Config, resume: bool = False, chat: Optional[ChatFn] = None) -> dict:
    """Revise every prompt's answer. Python callers may pass ``chat`` (a ``ChatFn``) instead of a model.

    ``revisions.jsonl`` is the state: prompts revised by an earlier run in ``output_dir`` are kept
    and skipped whether or not ``resume`` (``--resume``) is set, as ``prefs`` does; delete the folder
    to start again."""
    import torch

    from rlhfkit.recipes.prefs import load_prompts, read_rows

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    records_file = out / "revisions.jsonl"
    prompts, _, source = load_prompts(cfg.data)
    records = read_rows(records_file)
    done = {r["prompt"] for r in records}
    todo = list(dict.fromkeys(p for p in prompts if p not in done))
    logger.info(f"constitutional: {len(prompts)} prompts from {source}, {len(todo)} to revise")
    if todo and chat is None:
        model, tok = (None, None) if cfg.generation.backend == "openai" else \
            load_lm(cfg.model, cfg.lora.adapter_path if cfg.lora.enabled else None, cfg.cpu)
        chat = ChatGenerator(model, tok, cfg.generation, cfg.data.chat_template, cfg.data.system_prompt)
    torch.manual_seed(cfg.seed)
    from tqdm.auto import tqdm

    bs = cfg.generation.batch_size
    for s in tqdm(range(0, len(todo), bs), desc="constitutional", unit="batch", disable=not todo):
        batch = todo[s: s + bs]
        for rec in constitutional_revisions(chat, batch, cfg.principles, cfg.rounds,
                                            sample_principles=cfg.sample_principles, seed=cfg.seed + s):
            append_jsonl(records_file, rec)
            records.append(rec)
    sft, prefs = sft_rows(records), revision_preference_rows(records)
    atomic_write_jsonl(out / "sft.jsonl", sft)
    atomic_write_jsonl(out / "prefs.jsonl", prefs)
    summary = {"command": "constitutional", "prompts": len(records), "sft_rows": len(sft), "preference_rows": len(prefs),
               "unchanged": sum(r["revision"] == r["original"] for r in records),
               "principles": [p.name for p in cfg.principles], "rounds": cfg.rounds}
    atomic_write_json(out / "summary.json", summary)
    logger.info(f"constitutional: {summary}")
    return summary


__all__ = ["Config", "run"]
