"""Configs shared by the two-process FSDP2 tests and their one-process references.

Every case runs 3 optimizer steps with a checkpoint at step 2; ``batch_size`` is per process, so
2 processes x ``batch_size`` equals the one-process batch. ``adam_eps=1.0`` keeps the Adam update
proportional to the gradient, so a wrong gradient shows in the weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from helpers import sft_config, sft_rows, write_jsonl
from pref_data import preference_rows, unpaired_rows

STEPS = 3


def train_kw(strategy: str, batch_size: int) -> dict:
    return dict(batch_size=batch_size, max_steps=STEPS, adam_eps=1.0, lr=0.05, strategy=strategy, checkpoint_every=2,
                keep_checkpoints=5, max_grad_norm=1.0)


def config(case: str, model: str, data_dir: Path, out: Path, strategy: str, batch_size: int):
    from rlhfkit.config import DataConfig, LoraConfig, ModelConfig, ReferenceConfig, TrainConfig

    if case == "sft":
        data = write_jsonl(data_dir / "sft.jsonl", sft_rows(40))
        return sft_config(model, data, out, **train_kw(strategy, batch_size))
    train = TrainConfig(output_dir=str(out), progress=False, group_by_length=False, seed=0,
                        **train_kw(strategy, batch_size))
    if case == "dpo":  # full fine-tune with a separate frozen reference (sharded too)
        from rlhfkit.recipes import dpo

        data = write_jsonl(data_dir / "prefs.jsonl", preference_rows(48))
        return dpo.Config(model=ModelConfig(name_or_path=model, max_length=64), reference=ReferenceConfig(kind="copy"),
                          data=DataConfig(path=data, eval_fraction=1 / 6, chat_template="false"), train=train, beta=0.5)
    if case == "reward":  # a value head on a causal model, full fine-tune
        from rlhfkit.recipes import reward

        data = write_jsonl(data_dir / "prefs.jsonl", preference_rows(48))
        # best/ (with its reward statistics, a forward of the sharded model) is saved under fsdp
        return reward.Config(model=ModelConfig(name_or_path=model, max_length=64),
                             data=DataConfig(path=data, eval_fraction=1 / 6, chat_template="false"),
                             train=dataclasses.replace(train, best_metric="eval/loss", best_mode="min"))
    if case == "kto_lora":  # LoRA, the reference is the base with the adapter disabled
        from rlhfkit.recipes import kto

        data = write_jsonl(data_dir / "kto.jsonl", unpaired_rows(preference_rows(24)))
        return kto.Config(model=ModelConfig(name_or_path=model, max_length=64),
                          lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                          merge_on_save=True),
                          data=DataConfig(path=data, eval_fraction=1 / 6, chat_template="false"), train=train)
    if case == "ppo_lora":  # value head on the policy, LoRA, the reference is the base with the adapter disabled
        from rlhfkit.config import EvalConfig, GenerationConfig, RewardConfig
        from rlhfkit.recipes import ppo

        data = write_jsonl(data_dir / "prompts.jsonl", sft_rows(40))
        # greedy responses: both runs answer each prompt alike, whichever process owns it; one
        # minibatch per PPO epoch (train.batch_size = rollout_batch_size) and no whitening (it
        # would use each process's rows only), so each update's gradient is that of the global batch
        return ppo.Config(model=ModelConfig(name_or_path=model, max_length=64),
                          lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                          merge_on_save=True),
                          data=DataConfig(path=data, prompt_template="Summarize: {dialogue}\nSummary:",
                                          chat_template="false", eval_fraction=0.1),
                          # best/ is saved from the gathered shards under fsdp
                          train=dataclasses.replace(train, best_metric="eval/reward"),
                          generation=GenerationConfig(max_new_tokens=6, do_sample=False),
                          rewards=[RewardConfig(kind="python", function="fsdp_cases:letter_share")],
                          rollout_batch_size=batch_size, ppo_epochs=2, whiten_advantages=False, kl_coef=0.05,
                          reward_bias=1.0,  # returns ~1: a loss far from 0, so 1e-5 relative is a real bound
                          eval=EvalConfig(max_rows=2, batch_size=2, every=1))
    if case == "grpo_lora":  # sampled responses: compared with DDP on the same 2 processes (see SAMPLED)
        from rlhfkit.config import EvalConfig, GenerationConfig, RewardConfig
        from rlhfkit.recipes import grpo

        data = write_jsonl(data_dir / "prompts.jsonl", sft_rows(40))
        return grpo.Config(model=ModelConfig(name_or_path=model, max_length=64),
                           lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0,
                                           target_modules=["q_proj", "v_proj"], merge_on_save=True),
                           data=DataConfig(path=data, prompt_template="Summarize: {dialogue}\nSummary:",
                                           chat_template="false", eval_fraction=0.1),
                           train=train, generation=GenerationConfig(max_new_tokens=6, top_k=0),
                           rewards=[RewardConfig(kind="python", function="fsdp_cases:letter_share")],
                           prompts_per_step=batch_size // 2, samples_per_prompt=2, ppo_epochs=2, kl_coef=0.05,
                           eval=EvalConfig(max_rows=2, batch_size=2))
    if case == "ilql":  # Q, target Q and V heads on the root; the moving target heads are checkpointed
        from rlhfkit.config import EvalConfig, GenerationConfig, RewardConfig
        from rlhfkit.recipes import ilql

        rows = [{"prompt": f"Summarize: {r['dialogue']}\nSummary:", "output": " " + r["summary"],
                 "reward": letter_share(None, [r["summary"]])[0]} for r in sft_rows(40)]
        data = write_jsonl(data_dir / "ilql.jsonl", rows)
        # greedy decoding of the held-out prompts at the end, on the sharded model (every process
        # decodes them all: the same tokens as one process)
        return ilql.Config(model=ModelConfig(name_or_path=model, max_length=64),
                           data=DataConfig(path=data, eval_fraction=0.1, chat_template="false"), train=train,
                           tau_target=0.3, generation=GenerationConfig(max_new_tokens=6, do_sample=False),
                           eval_reward=[RewardConfig(kind="python", function="fsdp_cases:letter_share")],
                           eval_betas=[0.0, 1.0], eval=EvalConfig(max_rows=4, batch_size=2))
    raise ValueError(case)


SAMPLED = ("grpo_lora",)
"""Cases that sample their responses: each process draws from its own random stream, so a
1-process run draws other responses. Their reference is a DDP run on the same 2 processes (same
streams, the same global batch); tests/scripts/fsdp_run.py writes it to ``ddp/``."""


def letter_share(prompts, completions, **columns) -> list[float]:
    """PPO's reward in the ``ppo_lora`` case: the share of the letter a in the response."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def run(case: str, cfg, resume: bool = False) -> dict:
    from importlib import import_module

    return import_module(f"rlhfkit.recipes.{case.split('_')[0]}").run(cfg, resume=resume)
