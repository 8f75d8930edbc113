"""The online RL core shared by PPO, GRPO, RLOO and REINFORCE++: dropout off, prompt fitting,
prompts from Python, and runs stopped by SIGTERM and resumed that equal uninterrupted runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import sft_rows, trainable_params, write_jsonl
from rlhfkit.config import (EvalConfig, DataConfig, GenerationConfig, ModelConfig, RewardConfig, TrainConfig, load_config,
                            to_dict)
from rlhfkit.recipes import grpo, ppo

ROOT = Path(__file__).resolve().parents[1]


def letter_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def grpo_config(model: str, data: str, out, **kw) -> grpo.Config:
    train = dict(output_dir=str(out), lr=5e-3, max_steps=2, batch_size=8, progress=False, seed=0,
                 group_by_length=False)
    train.update(kw.pop("train", {}))
    cfg = grpo.Config(model=ModelConfig(name_or_path=model, max_length=128),
                      data=DataConfig(path=data, prompt_template="Summarize: {dialogue}\nSummary:",
                                      chat_template="false", eval_fraction=0.1),
                      train=TrainConfig(**train), generation=GenerationConfig(max_new_tokens=6, batch_size=32),
                      rewards=[RewardConfig(kind="token_frequency", token="a")],
                      prompts_per_step=4, samples_per_prompt=4, eval=EvalConfig(max_rows=4))
    for k, v in kw.items():
        assert hasattr(cfg, k), f"no config key {k}"  # a renamed key must not be set silently
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def ppo_config(model: str, data: str, out, **kw) -> ppo.Config:
    cfg = ppo.Config(model=ModelConfig(name_or_path=model, max_length=128),
                     data=DataConfig(path=data, prompt_template="Summarize: {dialogue}\nSummary:",
                                     chat_template="false", eval_fraction=0.1),
                     train=TrainConfig(output_dir=str(out), lr=1e-2, batch_size=4, max_steps=2, progress=False,
                                       group_by_length=False),
                     generation=GenerationConfig(max_new_tokens=6, top_k=0, output_length_range=[3, 6]),
                     rewards=[RewardConfig(kind="token_frequency", token="a")],
                     rollout_batch_size=8, ppo_epochs=2, kl_coef=0.01, eval=EvalConfig(max_rows=4))
    for k, v in kw.items():
        assert hasattr(cfg, k), f"no config key {k}"  # a renamed key must not be set silently
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def steps(out) -> list[dict]:
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def dropout_gpt2(tmp_path_factory):
    """The tiny GPT-2 with GPT-2's own dropout (0.1 everywhere)."""
    from rlhfkit.tiny import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("dropout_gpt2")
    tok = build_tokenizer()
    build_model("gpt2", len(tok), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.unit
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_dropout_is_off_so_a_policy_that_cannot_move_has_zero_approx_kl(dropout_gpt2, tmp_path, algorithm):
    """2 epochs x 2 minibatches at lr 1e-30: every update after the first is off-policy in name
    only. With GPT-2's dropout left on, the old-policy pass and the update pass drew different
    masks (approx_kl 0.196 at step 1, issue 17); with it off they compute the same function."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    cfg = grpo_config(dropout_gpt2, data, tmp_path / "run", algorithm=algorithm, ppo_epochs=2, minibatches=2,
                      train={"lr": 1e-30, "max_steps": 2})
    grpo.run(cfg)
    rows = steps(tmp_path / "run")
    assert len(rows) == 2
    for r in rows:
        assert abs(r["approx_kl"]) < 1e-9 and r["clipfrac"] == 0.0, r


@pytest.mark.unit
def test_ppo_fits_long_prompts_to_the_model_and_honours_overlong_drop(tiny_gpt2, tmp_path):
    """Prompts of ~300 tokens on a GPT-2 with 256 positions (model.max_length 512 does not know
    that): the held-out evaluation used to crash in the position embedding, and the training
    prompts were cut to max_prompt_length whatever data.overlong said."""
    rows = [{"prompt": " ".join(["the cat sees a dog"] * (60 if i % 2 else 1))} for i in range(32)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    long_rows = None
    for overlong in ("truncate", "drop"):
        cfg = ppo_config(tiny_gpt2, data, tmp_path / overlong, eval=EvalConfig(max_rows=8))
        cfg.model.max_length, cfg.data.prompt_template, cfg.data.eval_fraction = 512, None, 0.25
        cfg.data.overlong, cfg.train.max_steps = overlong, 1
        summary = ppo.run(cfg, reward_fn=letter_a)
        stats = summary["data"]
        if overlong == "truncate":  # 24 training rows (the rest held out), the long ones cut from the left
            long_rows = stats["truncated"]
            assert 0 < long_rows < 24 and stats["dropped_overlong"] == 0 and stats["rows"] == 24
        else:  # the same split: the same long rows are gone
            assert stats["dropped_overlong"] == long_rows and stats["truncated"] == 0
            assert stats["rows"] == 24 - long_rows
        assert summary["eval_reward_start"] is not None and summary["eval_reward_end"] is not None


@pytest.mark.unit
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "ppo"])
def test_train_api_takes_prompts_and_a_model_object_for_every_online_algorithm(tiny_gpt2, tmp_path, algorithm):
    import rlhfkit
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    seen = []

    def reward(prompts, completions, **columns):
        seen.extend(prompts)
        return letter_a(prompts, completions)

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2)
    prompts = [f"the {w} sees" for w in ("cat", "dog", "bird", "fish")] * 2
    policy = rlhfkit.train(model, reward_fn=reward, prompts=prompts, tokenizer=tok, algorithm=algorithm,
                           config={"train.max_steps": 1, "train.progress": False, "train.save_model": False,
                                   "train.output_dir": str(tmp_path), "generation.max_new_tokens": 4,
                                   **({"rollout_batch_size": 8} if algorithm == "ppo" else {"prompts_per_step": 2})})
    assert isinstance(policy, PreTrainedModel) and policy is model
    assert set(seen) <= set(prompts) and len(seen) == 8  # 2 prompts x 4 samples, or 8 prompts x 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == ["metrics.jsonl"]


@pytest.mark.learning
def test_reinforce_pp_raises_reward(tiny_gpt2, tmp_path):
    """REINFORCE++ (one sample per prompt, batch-whitened returns with a k1 KL reward to a frozen copy)."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = grpo_config(tiny_gpt2, data, tmp_path / "run", algorithm="reinforce_pp", samples_per_prompt=1,
                      prompts_per_step=32, kl_coef=0.01, eval=EvalConfig(max_rows=20),
                      train={"lr": 1e-2, "max_steps": 20, "batch_size": 32})
    summary = grpo.run(cfg, reward_fn=letter_a)
    start, end = summary["eval_reward_start"], summary["eval_reward_end"]
    assert start < 0.1 and end - start >= 0.2, summary
    rows = steps(tmp_path / "run")
    assert all("kl" in r for r in rows) and rows[-1]["kl"] > 0


# --------------------------------------------------------------------------------------------
# stopped by SIGTERM and resumed == uninterrupted
# --------------------------------------------------------------------------------------------


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.learning
@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_sigterm_and_resume_equals_the_uninterrupted_run(tiny_gpt2, tmp_path, algorithm):
    """The run is stopped by SIGTERM after a few iterations (a checkpoint at step k), resumed to
    k + 2, and compared with an uninterrupted run of k + 2 iterations: weights and the loss of
    every step to 1e-6. PPO used to end 4.5e-3 away (its shuffles and output lengths came from a
    stream seeded once per run); now every iteration's draws come from (seed, step)."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(80))
    if algorithm == "ppo":
        cfg = ppo_config(tiny_gpt2, data, tmp_path / "run")
    else:
        cfg = grpo_config(tiny_gpt2, data, tmp_path / "run", algorithm=algorithm, ppo_epochs=2, minibatches=2,
                          kl_coef=0.04)
    cfg.train.max_steps = 100000
    command = "ppo" if algorithm == "ppo" else algorithm
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    proc = _cli([command, "--config", str(tmp_path / "c.yaml")])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or len(steps(tmp_path / "run")) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (ck,) = sorted((tmp_path / "run" / "checkpoints").iterdir())
    k = json.loads((ck / "state.json").read_text())["step"]
    res = _cli([command, "--config", str(tmp_path / "c.yaml"), f"train.max_steps={k + 2}", "--resume"])
    _, err = res.communicate(timeout=180)
    assert res.returncode == 0, err[-2000:]
    ref = _cli([command, "--config", str(tmp_path / "c.yaml"), f"train.max_steps={k + 2}",
                f"train.output_dir={tmp_path / 'ref'}"])
    _, err = ref.communicate(timeout=180)
    assert ref.returncode == 0, err[-2000:]

    resumed, straight = steps(tmp_path / "run"), steps(tmp_path / "ref")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, k + 3))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0), (a["step"], a["loss"], b["loss"])
        assert a["reward/mean"] == pytest.approx(b["reward/mean"], abs=1e-6, rel=0)
    wa, wb = trainable_params(tmp_path / "run"), trainable_params(tmp_path / "ref")
    assert wa.keys() == wb.keys()
    assert max(float((wa[n] - wb[n]).abs().max()) for n in wa) < 1e-6
    from safetensors.torch import load_file  # and training moved them, so equality means something
    init = load_file(str(Path(tiny_gpt2) / "model.safetensors"))
    assert max(float((wa[n] - init[n]).abs().max()) for n in wa if n in init) > 1e-3


@pytest.mark.unit
def test_ppo_honours_train_epochs_and_eval_every(tiny_gpt2, tmp_path):
    """train.epochs: one pass over the training prompts (rollout_batch_size 8 a step);
    eval.every 2: held-out reward, KL and reward parts at steps 0, 2 and the end."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    cfg = ppo_config(tiny_gpt2, data, tmp_path / "run", ppo_epochs=1)
    cfg.train.epochs, cfg.eval.every, cfg.train.max_steps = 1, 2, 1000
    summary = ppo.run(cfg)
    assert summary["steps"] == summary["data"]["rows"] // 8 == 4  # 36 training prompts (4 held out)
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert {"eval/reward", "eval/kl", "eval/reward/token_frequency"} <= set(r)
    assert abs(evals[0]["eval/kl"]) < 1e-4  # before training the policy is its reference
    assert evals[-1]["eval/reward"] == pytest.approx(summary["eval_reward_end"])


@pytest.mark.unit
def test_renamed_keys_still_load():
    """The old names of one release ago map to the agreed vocabulary (config.py's RENAMED loader)."""
    cfg = load_config(grpo.Config, None, ["beta=0.1", "group_size=3", "clip_epsilon=0.3"])
    assert (cfg.kl_coef, cfg.samples_per_prompt, cfg.clip_range) == (0.1, 3, 0.3)
    cfg = load_config(ppo.Config, None, ["cliprange=0.3", "cliprange_value=0.4", "target_kl=0.02", "eval_prompts=5"])
    assert (cfg.clip_range, cfg.value_clip_range, cfg.early_stop_kl, cfg.eval.max_rows) == (0.3, 0.4, 0.02, 5)
