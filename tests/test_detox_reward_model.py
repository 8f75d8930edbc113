"""examples/detox_reward_model.yaml on tiny models: pairs of the policy's own answers ranked by the
gold classifier -> reward model on them -> PPO with checkpoints -> eval of every checkpoint, and the
proxy/gold-vs-KL table and plot (the over-optimisation curve)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def detox_rm_run(tmp_path_factory, tiny_dir):
    from rlhfkit.recipes import pipeline
    from rlhfkit.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("detox_rm")
    gpt2 = save_tiny("gpt2", tiny_dir / "detox-rm-gpt2")
    bert = save_tiny("bert", tiny_dir / "detox-rm-bert")
    cfg = load_config(pipeline.Config, ROOT / "examples/detox_reward_model.yaml")
    cfg.output_dir = str(tmp / "pipe")
    data = ROOT / "examples/data"
    model = f"{{name_or_path: '{gpt2}'}}"
    rows = [json.loads(x) for x in (data / "detox_prompts.jsonl").read_text().splitlines()]
    short = [r for r in rows if r["split"] == "train" and len(r["prompt"]) < 120][:12]  # fit the tiny GPT-2
    (tmp / "pairs_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    over = [f"pairs.model.name_or_path={gpt2}", f"pairs.data.path={tmp / 'pairs_prompts.jsonl'}",
            "pairs.generation.max_new_tokens=8", "pairs.min_gap=0.0", "pairs.progress=false",
            f"reward.model.name_or_path={bert}", "reward.train.max_steps=4", "reward.train.batch_size=4",
            "reward.eval.every=0",
            f"ppo.model.name_or_path={gpt2}", "ppo.train.max_steps=3", "ppo.train.checkpoint_every=1",
            "ppo.rollout_batch_size=8", "ppo.train.batch_size=4", "ppo.generation.max_new_tokens=8",
            "ppo.data.max_rows=32", "ppo.data.max_prompt_length=64", f"ppo.data.path={data / 'detox_prompts.jsonl'}",
            f"eval.models=[{{name: start, model: {model}}}, {{name: ppo, model: {model}, "
            f"adapter_path: '{tmp / 'pipe' / 'ppo'}', checkpoints: true}}]",
            "eval.data.max_rows=6", "eval.generation.max_new_tokens=8", "eval.data.max_prompt_length=64",
            f"eval.data.path={data / 'detox_prompts.jsonl'}", "eval.bootstrap_resamples=200", "eval.progress=false"]
    pipeline.run(cfg, overrides=over)
    out = tmp / "pipe" / "eval"
    return json.loads((out / "metrics.json").read_text()), out, tmp / "pipe"


@pytest.mark.learning
def test_every_checkpoint_is_evaluated_along_kl(detox_rm_run):
    m, out, pipe = detox_rm_run
    # steps 1 and 2 from checkpoints/step-N; step 3 is the final policy itself (its checkpoint is skipped)
    assert m["models"] == ["start", "ppo@1", "ppo@2", "ppo"]
    curve = m["checkpoint_curves"]["ppo"]
    assert [(p["model"], p["step"]) for p in curve["points"]] == [("start", 0), ("ppo@1", 1), ("ppo@2", 2), ("ppo", 3)]
    assert curve["points"][0]["kl"] == 0.0 and all(p["kl"] != 0.0 for p in curve["points"][1:])
    assert len({p["kl"] for p in curve["points"]}) == 4  # four different policies
    assert curve["proxy"] == "proxy_rm" and m["judges"]["proxy_rm"]["trained_against"]
    assert not m["judges"]["gold"]["trained_against"] and m["judge"] == "gold"
    # the best checkpoint maximises the proxy's mean (a reward model: higher is better)
    members = ["ppo@1", "ppo@2", "ppo"]
    assert curve["best"] == max(members, key=lambda n: m["judges"]["proxy_rm"]["mean"][n])
    # every point's judge means are the per-answer scores of samples.jsonl averaged
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for p in curve["points"]:
        for j in ("proxy_rm", "gold"):
            assert p["judges"][j]["mean"] == pytest.approx(np.mean([s["judges"][j][p["model"]] for s in samples]))
            assert p["judges"][j]["low"] <= p["judges"][j]["mean"] <= p["judges"][j]["high"]
    # the reward model learned from the pairs stage's ranking of the policy's own answers by the gold judge
    from rlhfkit.rewards import Toxicity

    pairs = [json.loads(x) for x in (pipe / "pairs" / "prefs.jsonl").read_text().splitlines()]
    assert pairs and all(set(p) >= {"prompt", "chosen", "rejected"} for p in pairs)
    gold = Toxicity(backend="profanity_check", invert=True)
    for p in pairs[:4]:
        chosen, rejected = gold([p["prompt"]] * 2, [p["chosen"], p["rejected"]])
        assert chosen >= rejected
    # the proxy is the reward model of the reward stage, scored on prompt + answer
    from rlhfkit.rewards import RewardModel

    rm = RewardModel(str(pipe / "reward"))
    s0 = samples[0]
    assert rm([s0["prompt"]], [s0["completions"]["ppo@1"]])[0] == pytest.approx(s0["judges"]["proxy_rm"]["ppo@1"],
                                                                                 abs=1e-5)
    report = (out / "report.md").read_text()
    assert "## Over-optimisation: `ppo` over its checkpoints" in report and f"`{curve['best']}`" in report
    assert "![overoptimisation_ppo.png](overoptimisation_ppo.png)" in report
    assert (out / "overoptimisation_ppo.png").read_bytes()[:8] == PNG


@pytest.mark.learning
def test_checkpoint_weights_are_the_ones_evaluated(detox_rm_run, tiny_dir):
    """load_trainable puts a checkpoint's LoRA weights into the model (names carry the PPO wrapper's prefix)."""
    from safetensors.torch import load_file

    from rlhfkit.config import LoraConfig, ModelConfig
    from rlhfkit.models import load_policy
    from rlhfkit.recipes import evaluate

    _, _, pipe = detox_rm_run
    ck = pipe / "ppo" / "checkpoints" / "step-0000001"
    lora = {k: v for k, v in load_file(str(ck / "trainable.safetensors")).items() if "lora_" in k}
    assert lora

    peft_model, _ = load_policy(ModelConfig(name_or_path=str(tiny_dir / "detox-rm-gpt2")),
                                LoraConfig(enabled=True, adapter_path=str(pipe / "ppo")), torch.device("cpu"))
    params = dict(peft_model.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for k, v in lora.items() for n in params
               if k.endswith("." + n))  # the final adapter differs from step 1's
    evaluate.load_trainable(peft_model, ck)
    for key, value in lora.items():
        name = next(n for n in params if key.endswith("." + n) or key == n)
        assert torch.equal(params[name].detach(), value)
