"""The GPU tier: every recipe for 2 steps on CUDA in bf16 with tiny models (``pytest -m gpu``).

Skipped without CUDA. Each training run must use the GPU (the Engine's device is ``cuda``, its
precision bf16 where the GPU supports it), keep every module it runs on that device (the forward
hook of test_placement), and log finite metrics for both steps. With 2 GPUs visible the FSDP2
cases of test_distributed run over NCCL as well.

``RLHFKIT_GPU_TIER_ON_CPU=1`` runs the same tier on the CPU in fp32: a check of the tier itself
on a machine without a GPU (it proves nothing about CUDA).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp_cases import config as case_config
from fsdp_cases import run as case_run
from helpers import sft_rows, write_jsonl
from pref_data import preference_rows
from test_placement import placement  # noqa: F401  (fixture)

ON_CPU = os.environ.get("RLHFKIT_GPU_TIER_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU,
                                 reason="no CUDA device (the gpu tier runs on a GPU machine)")]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


def expect_device(engines, problems, out: Path) -> None:
    assert engines and not problems, sorted(set(problems))[:10]
    eng = engines[-1]
    if ON_CPU:
        assert eng.device.type == "cpu"
    else:
        assert eng.device.type == "cuda"
        assert eng.mixed_precision == ("bf16" if torch.cuda.is_bf16_supported() else "no")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "lr" in s]
    assert len(steps) == STEPS
    for s in steps:
        assert all(math.isfinite(v) for v in s.values() if isinstance(v, float)), s


def short(cfg, out: Path):
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.checkpoint_every = str(out), STEPS, 0
    return cfg


@pytest.mark.parametrize("case", ["sft", "dpo", "kto_lora"])
def test_offline_recipes(case, placement, tiny_llama, tmp_path):  # noqa: F811
    cfg = short(case_config(case, tiny_llama, tmp_path / "data", tmp_path / case, "auto", 4), tmp_path / case)
    case_run(case, cfg)
    expect_device(*placement, tmp_path / case)


def test_reward(placement, tiny_llama, tmp_path):  # noqa: F811
    from test_reward_recipe import rm_config

    from rlhfkit.recipes import reward

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(48))
    reward.run(rm_config(tiny_llama, data, tmp_path / "rm", max_steps=STEPS))
    expect_device(*placement, tmp_path / "rm")


@pytest.mark.parametrize("kind", ["copy", "disabled_adapter", "adapter", "none"])
def test_dpo_each_reference_kind(kind, placement, tiny_llama, tmp_path):  # noqa: F811
    from test_dpo import dpo_config

    from rlhfkit.config import LoraConfig, ReferenceConfig
    from rlhfkit.recipes import dpo, sft

    lora = LoraConfig(enabled=kind != "copy", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    if kind == "adapter":  # a trained adapter to start from (and to be the reference)
        sft_cfg = case_config("sft", tiny_llama, tmp_path / "data", tmp_path / "sft", "auto", 4)
        sft_cfg = short(sft_cfg, tmp_path / "sft")
        sft_cfg.lora = lora
        sft.run(sft_cfg)
        lora = LoraConfig(enabled=True, adapter_path=str(tmp_path / "sft"))
    cfg = dpo_config(tiny_llama, tmp_path, train={"max_steps": STEPS}, lora=lora,
                     reference=ReferenceConfig(kind=kind), loss="simpo" if kind == "none" else "sigmoid")
    summary = dpo.run(cfg)
    assert summary["reference"] == kind
    expect_device(*placement, tmp_path / "run")


@pytest.mark.parametrize("variant", ["value_head", "critic", "disabled_adapter", "seq2seq"])
def test_ppo(variant, placement, tiny_llama, tiny_t5, tmp_path):  # noqa: F811
    from test_ppo import config, lowercase_share, prompts_file

    from rlhfkit.config import LoraConfig
    from rlhfkit.recipes import ppo

    model = tiny_t5 if variant == "seq2seq" else tiny_llama
    cfg = config(model, prompts_file(tmp_path, 20), tmp_path / "ppo", ppo_epochs=1)
    cfg.train.max_steps = STEPS
    if variant == "critic":
        cfg.value_model = tiny_llama
    if variant == "disabled_adapter":
        cfg.lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    summary = ppo.run(cfg, reward_fn=lowercase_share)
    assert summary["steps"] == STEPS
    expect_device(*placement, tmp_path / "ppo")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_rloo(algorithm, placement, tiny_llama, tmp_path):  # noqa: F811
    from test_grpo import letter_a, make_config

    from rlhfkit.recipes import grpo

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    cfg = make_config(tiny_llama, data, tmp_path / algorithm, steps=STEPS, train={"batch_size": 8}, algorithm=algorithm)
    grpo.run(cfg, reward_fn=letter_a)
    expect_device(*placement, tmp_path / algorithm)


def test_ilql(placement, tiny_gpt2, tmp_path):  # noqa: F811
    from test_ilql import cat_samples, config, has_cat, quick_config

    from rlhfkit.recipes import ilql

    rows = [{"prompt": p, "output": o, "reward": r} for (p, o), r in
            zip(cat_samples(48), has_cat(None, [o for _, o in cat_samples(48)]))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    ilql.run(config(quick_config(tmp_path / "ilql", model=dict(name_or_path=tiny_gpt2),
                                 data=dict(path=data, eval_fraction=0.25), train=dict(max_steps=STEPS))))
    expect_device(*placement, tmp_path / "ilql")


def test_prefs_and_eval(tiny_llama, tmp_path):
    """Generation-only commands: they run on the GPU and write their outputs."""
    import yaml

    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"the {w} runs"} for w in ("cat", "dog", "sun")])
    (tmp_path / "prefs.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": tiny_llama}, "data": {"path": data, "chat_template": "false"},
        "generation": {"max_new_tokens": 6, "batch_size": 6}, "num_samples": 3,
        "rewards": [{"kind": "length", "min_words": 1, "max_words": 2}], "max_attempts": 2,
        "output_dir": str(tmp_path / "prefs"), "progress": False}))
    assert main(["prefs", "--config", str(tmp_path / "prefs.yaml")]) == 0
    assert json.loads((tmp_path / "prefs" / "summary.json").read_text())["prompts"] == 3
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "a", "model": {"name_or_path": tiny_llama}}],
        "data": {"path": data, "chat_template": "false"}, "generation": {"max_new_tokens": 6, "batch_size": 4},
        "rewards": [{"kind": "length", "min_words": 1, "max_words": 4, "name": "len"}], "judge": "len",
        "output_dir": str(tmp_path / "eval"), "progress": False}))
    assert main(["eval", "--config", str(tmp_path / "eval.yaml")]) == 0
    assert (tmp_path / "eval" / "samples.jsonl").read_text().count("\n") == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs 2 GPUs")
@pytest.mark.parametrize("case", ["sft", "dpo"])
def test_fsdp_on_two_gpus(case, tiny_llama, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29655", str(ROOT / "tests" / "scripts" / "fsdp_run.py"), case, tiny_llama,
                        str(tmp_path / "data"), str(tmp_path / "two")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / "full" / "summary.json").read_text())
    shard = summary["sharding"]
    assert summary["processes"] == 2 and max(shard["parameters_per_process"]) < 0.6 * shard["parameters"]
