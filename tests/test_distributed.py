"""Sharded training (train.strategy=fsdp, FSDP2) with 2 processes on the CPU (torchrun, gloo).

For each case (sft, dpo with a separate reference, kto with LoRA, a reward model, ppo with a
value head on a LoRA policy whose reference is the adapter-disabled base: generation and the
no-grad passes run on the sharded model, and ilql, whose target Q heads move without gradients
and are checkpointed beside the trainable weights), a 2-process FSDP2 run with 4 rows per
process must equal a 1-process run with 8 rows (grpo with LoRA, which samples its responses
from each process's own random stream, equals DDP on the same 2 processes instead): the loss of every
step to 1e-5 relative, the gathered final model to 1e-5; each process must hold about half of
the parameters (its local shards); and a run that one process gets SIGTERM in (both stop after
step 2 and write the sharded checkpoint), continued with ``--resume``, must equal the
uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp_cases import SAMPLED, STEPS, config, run
from helpers import trainable_params

ROOT = Path(__file__).resolve().parents[1]
PORTS = {"sft": 29641, "dpo": 29642, "kto_lora": 29643, "reward": 29644, "ppo_lora": 29645,
         "grpo_lora": 29646, "ilql": 29647}


def losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [line["loss"] for line in lines if "loss" in line]


def max_rel(a: dict, b: dict) -> float:
    """Largest difference of two state dicts relative to each tensor's largest entry (at least
    1e-3: a tensor that stays ~0, like the reward head's bias that the pairwise loss cannot see,
    is compared to 1e-8 absolute)."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / max(float(b[k].float().abs().max()), 1e-3))
               for k in a)


def torchrun(case: str, model: str, tmp_path: Path) -> Path:
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a process that aborts prints its Python stack
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(PORTS[case]), str(ROOT / "tests" / "scripts" / "fsdp_run.py"), case, model,
                        str(tmp_path / "data"), str(out)], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-12000:]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["sft", "dpo", "kto_lora", "reward", "ppo_lora", "grpo_lora", "ilql"])
def test_fsdp_two_processes_equal_one_process(case, tiny_llama, tmp_path):
    one = tmp_path / "one"
    if case not in SAMPLED:
        run(case, config(case, tiny_llama, tmp_path / "data", one, "auto", 8))
    two = torchrun(case, tiny_llama, tmp_path)
    if case in SAMPLED:  # the reference is DDP on the same 2 processes (same random streams)
        one = two / "ddp"

    ref_losses, fsdp_losses = losses(one), losses(two / "full")
    assert len(ref_losses) == len(fsdp_losses) == STEPS
    # GRPO's loss is a sum of terms of size |advantage| ~ 1 that cancel to ~1e-4: there 1e-5
    # relative to the loss would ask for 1e-9 of each term, so the bound is at least 1e-7
    floor = 1e-2 if case in SAMPLED else 0.0
    for a, b in zip(fsdp_losses, ref_losses):
        assert abs(a - b) <= 1e-5 * max(abs(b), floor), (fsdp_losses, ref_losses)
    assert max_rel(trainable_params(two / "full"), trainable_params(one)) < 1e-5
    if case in ("ppo_lora", "reward"):  # train.best_metric: best/ is saved from the gathered shards
        assert max_rel(trainable_params(two / "full" / "best"), trainable_params(one / "best")) < 1e-5
    if case == "reward":  # ... with the reward statistics of the sharded model, as one process computes them
        stats = [json.loads((d / "best" / "reward_stats.json").read_text()) for d in (two / "full", one)]
        assert stats[0]["mean"] == pytest.approx(stats[1]["mean"], rel=1e-5, abs=1e-6)
        assert stats[0]["std"] == pytest.approx(stats[1]["std"], rel=1e-5)
    if case in ("reward", "ppo_lora"):  # the value head (PPO's sits on the policy)
        from safetensors.torch import load_file

        head = [load_file(str(d / "value_head.safetensors")) for d in (two / "full", one)]
        assert max_rel(*head) < 1e-5
    if case == "ilql":  # Q, target Q and V heads; the decoding on the sharded model gives the same rewards
        from safetensors.torch import load_file

        from rlhfkit.recipes.ilql import HEADS_FILE

        heads = [load_file(str(d / HEADS_FILE)) for d in (two / "full", one, two / "resumed")]
        assert any(k.startswith("target_q.") for k in heads[0])
        assert max_rel(heads[0], heads[1]) < 1e-5 and max_rel(heads[2], heads[0]) < 1e-6
        rewards = [json.loads((d / "summary.json").read_text())["eval_reward"] for d in (two / "full", one)]
        assert rewards[0] == pytest.approx(rewards[1], abs=1e-9) and set(rewards[0]) == {"beta=0", "beta=1"}

    summary = json.loads((two / "full" / "summary.json").read_text())
    assert summary["processes"] == 2
    shard = summary["sharding"]
    for held in shard["parameters_per_process"]:  # each process holds about half of every tensor
        assert 0.45 * shard["parameters"] <= held <= 0.55 * shard["parameters"], shard
    assert sum(shard["parameters_per_process"]) >= shard["parameters"]
    if case == "dpo":  # the separate reference is sharded too: no full copy per process
        assert shard["frozen_parameters"] == shard["parameters"]
        for held in shard["frozen_parameters_per_process"]:
            assert 0.45 * shard["frozen_parameters"] <= held <= 0.55 * shard["frozen_parameters"], shard
    assert (two / "full" / "checkpoints" / "step-0000002" / "sharded").is_dir()

    # SIGTERM to one process after step 2, then --resume: step 3 and the final model equal the
    # uninterrupted run
    assert sorted(p.name for p in (two / "resumed" / "checkpoints").iterdir()) == ["step-0000002"]
    assert losses(two / "resumed")[-1] == pytest.approx(fsdp_losses[-1], rel=1e-6)
    assert max_rel(trainable_params(two / "resumed"), trainable_params(two / "full")) < 1e-6
    assert json.loads((two / "resumed" / "summary.json").read_text())["steps"] == STEPS

    if case in ("sft", "kto_lora", "ppo_lora", "grpo_lora"):  # the gathered folder (merged for LoRA) loads
        from transformers import AutoModelForCausalLM

        sub = "merged" if case.endswith("_lora") else ""
        model = AutoModelForCausalLM.from_pretrained(two / "full" / sub)
        ref = AutoModelForCausalLM.from_pretrained(one / sub)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_save_from_gathered_weights_equals_a_plain_save(fixture, request, tmp_path):
    """Gathered weights are separate tensors even where the model ties them (GPT-2's LM head,
    T5's embeddings); the folder saved from them holds the same tensors as a plain save."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from rlhfkit.models import save_pretrained

    cls = AutoModelForSeq2SeqLM if fixture == "tiny_t5" else AutoModelForCausalLM
    model = cls.from_pretrained(request.getfixturevalue(fixture))
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_pretrained(model, None, tmp_path / "plain")
    save_pretrained(model, None, tmp_path / "gathered", state_dict=gathered)
    plain, got = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "gathered"))
    assert plain.keys() == got.keys()
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], rtol=0, atol=0)
