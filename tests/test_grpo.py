"""GRPO / RLOO: the loss against hand computations, group bookkeeping, config, and learning runs.

Learning runs use an easy reward, the fraction of the response's characters that are the letter
"a": a random tiny model scores about 0.02, and a policy that learns to emit "a" tokens reaches
0.5 (" a a a") to 1.0 ("aaaa"). Evaluation is greedy decoding on held-out prompts.
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from helpers import sft_rows, write_jsonl
from rlhfkit import cli
from rlhfkit.config import (
    ConfigError, DataConfig, EvalConfig, GenerationConfig, LoraConfig, ModelConfig, RewardConfig, TrainConfig, load_config,
)
from rlhfkit.data import Example, collate
from rlhfkit.models import load_model, load_policy
from rlhfkit.policy import PolicyModel, Reference
from rlhfkit import losses as L
from rlhfkit import rollout as R
from rlhfkit.recipes import grpo


def letter_a(prompts, completions, **columns):
    """Fraction of the completion's characters that are 'a' (0 for an empty completion)."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_config(model: str, data: str, out, steps: int = 20, **kw) -> grpo.Config:
    train = dict(output_dir=str(out), lr=5e-3, max_steps=steps, batch_size=32, progress=False, seed=0)
    train.update(kw.pop("train", {}))
    cfg = grpo.Config(
        model=ModelConfig(name_or_path=model, max_length=128),
        lora=LoraConfig(enabled=kw.pop("lora", False), target_modules=["all-linear"]),
        data=DataConfig(path=data, prompt_template="Summarize: {dialogue}\nSummary:", chat_template="false",
                        eval_fraction=0.1),
        train=TrainConfig(**train),
        generation=GenerationConfig(max_new_tokens=8, batch_size=64),
        prompts_per_step=4, samples_per_prompt=8, eval=EvalConfig(max_rows=20),
    )
    for k, v in kw.items():
        assert hasattr(cfg, k), f"no config key {k}"  # a renamed key must not be set silently
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def metrics_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------

# three responses of 2, 3 and 1 tokens (right-padded to T = 4)
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0, 0.5])


@pytest.mark.unit
@pytest.mark.parametrize("aggregation,expected", [
    # token: -(2 * 1 + 3 * -2 + 1 * 0.5) / 6 tokens = 3.5 / 6
    ("token", 3.5 / 6),
    # sequence: -(1 - 2 + 0.5) / 3 responses
    ("sequence", 0.5 / 3),
])
def test_first_update_is_minus_mean_advantage_and_kl_zero(aggregation, expected):
    logps = torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-0.5, -1.5, -3.0, 0.0], [-2.5, 0.0, 0.0, 0.0]], requires_grad=True)
    loss, m = L.clipped_policy(logps, logps.detach(), ADV, MASK, clip=0.2, aggregation=aggregation,
                               ref_logprobs=logps.detach(), kl_coef=0.3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["kl"] == 0.0 and m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0
    loss.backward()
    # ratio = 1: the gradient is REINFORCE's, -A_i per token, over 6 tokens or over 3 x |o_i|
    n = torch.tensor([2.0, 3.0, 1.0])
    scale = torch.full((3,), 6.0) if aggregation == "token" else 3 * n
    expected_grad = (-ADV / scale)[:, None] * MASK
    assert torch.allclose(logps.grad, expected_grad, atol=1e-6)


def reference_loss(lp, old, ref, adv, mask, clip, beta, aggregation):
    """The objective written out token by token."""
    per_seq, total, count = [], 0.0, 0
    for i in range(lp.shape[0]):
        terms = []
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = float(torch.exp(lp[i, t] - old[i, t]))
            surrogate = max(-adv[i] * ratio, -adv[i] * min(max(ratio, 1 - clip), 1 + clip))
            d = float(ref[i, t] - lp[i, t])
            terms.append(float(surrogate) + beta * (torch.exp(torch.tensor(d)).item() - 1 - d))
        per_seq.append(sum(terms) / len(terms))
        total += sum(terms)
        count += len(terms)
    return total / count if aggregation == "token" else sum(per_seq) / len(per_seq)


@pytest.mark.unit
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_loss_equals_token_by_token_reference(aggregation):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand((3, 4), generator=g) * 3
    old = lp + (torch.rand((3, 4), generator=g) - 0.5)  # ratios from 0.6 to 1.6: some clipped
    ref = lp + (torch.rand((3, 4), generator=g) - 0.5)
    loss, m = L.clipped_policy(lp, old, ADV, MASK, clip=0.2, aggregation=aggregation, ref_logprobs=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(reference_loss(lp, old, ref, ADV, MASK, 0.2, 0.1, aggregation), abs=1e-6)
    assert 0 < m["clipfrac"] < 1


@pytest.mark.unit
def test_recipe_loss_on_a_hand_made_rollout(tiny_llama):
    """The loss the recipe hands to the engine, on a real model: no old log-probs means ratio 1, a
    frozen copy of the same weights as reference gives KL 0, so the loss is -token-mean(A)."""
    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    policy = PolicyModel(model)
    batch = collate([Example([5, 6, 7], [8, 9]), Example([5], [10, 11, 12]), Example([6, 7], [13])],
                    tok.pad_token_id, False)
    ref = Reference("copy", model=load_model(ModelConfig(name_or_path=tiny_llama)))
    mb = {**batch, "advantages": ADV, "ref_logps": ref.logps(batch)}
    cfg = grpo.Config(kl_coef=0.5)
    loss, m = grpo.policy_loss(policy, mb, cfg, max_tokens=8)
    assert loss.item() == pytest.approx(3.5 / 6, abs=1e-5)  # response lengths 2, 3, 1 as in MASK
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["ratio"] == pytest.approx(1.0)
    assert 0 < m["entropy"] < torch.log(torch.tensor(float(len(tok)))).item() + 1e-4
    # with the sampling policy's log-probs passed in (several updates per iteration): the same
    old = policy(**batch)["logps"].detach()
    loss2, _ = grpo.policy_loss(policy, {**mb, "old_logps": old}, cfg, max_tokens=8)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# groups, rows, rewards
# --------------------------------------------------------------------------------------------


def keyed_reward(prompts, completions, pid, **columns):
    """100 x the row's prompt id plus a value that depends on the sampled text."""
    return [100.0 * p + sum(map(ord, c)) % 7 for p, c in zip(pid, completions)]


@pytest.mark.unit
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_advantages_are_per_group_of_repeated_prompts(tiny_gpt2, algorithm):
    model, tok = load_policy(ModelConfig(name_or_path=tiny_gpt2))
    items = [R.PromptItem(f"the {w} sees", f"the {w} sees", tok(f"the {w} sees")["input_ids"], {"pid": k, "word": w})
             for k, w in enumerate(["cat", "dog", "bird"])]
    cfg = grpo.Config(algorithm=algorithm, samples_per_prompt=4,
                      generation=GenerationConfig(max_new_tokens=6, batch_size=5))
    torch.manual_seed(0)
    b = R.make_experience(PolicyModel(model), tok, items, R.make_reward([], 0.0, keyed_reward), cfg.generation,
                          samples_per_prompt=4, old_logps=False)
    prompts = [it.prompt for it in b.items]
    assert prompts == ["the cat sees"] * 4 + ["the dog sees"] * 4 + ["the bird sees"] * 4
    rewards = b.scores.tolist()
    # the rows' columns travel with their prompt: reward // 100 is the prompt id
    assert [int(r // 100) for r in rewards] == [0] * 4 + [1] * 4 + [2] * 4
    assert rewards == pytest.approx(keyed_reward(prompts, b.completions, [0] * 4 + [1] * 4 + [2] * 4))
    expected = []
    for k in range(3):
        g = rewards[4 * k: 4 * k + 4]
        if algorithm == "grpo":
            expected += [(r - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for r in g]
        else:
            expected += [r - (sum(g) - r) / 3 for r in g]
    # grouping the wrong rows together would leak the 100 x prompt id offsets into the advantages
    assert grpo.advantages(b, cfg).tolist() == pytest.approx(expected, abs=1e-4)
    assert max(abs(a) for a in expected) < 10
    # the training batch holds the same responses in the same order
    labels = b.tensors["labels"]
    texts = [tok.decode(row[row != -100], skip_special_tokens=True).strip() for row in labels]
    assert texts == b.completions


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_t5"])
def test_take_rows_drops_only_padding(fixture, request):
    path = request.getfixturevalue(fixture)
    model, tok = load_policy(ModelConfig(name_or_path=path))
    seq2seq = bool(model.config.is_encoder_decoder)
    policy = PolicyModel(model).eval()
    examples = [Example([5, 6, 7, 8, 9, 10], [11]), Example([5], [12, 13]), Example([6, 7], [14, 15, 16, 17])]
    batch = collate(examples, tok.pad_token_id, seq2seq)
    full = policy(**batch)
    idx = torch.tensor([2, 1])
    part = R.take_rows(batch, idx, seq2seq)
    assert part["input_ids"].shape[1] < batch["input_ids"].shape[1]  # the 6-token prompt's padding is gone
    sub = policy(**part)
    assert torch.allclose(sub["logps"][sub["mask"]], full["logps"][idx][full["mask"][idx]], atol=1e-5)


@pytest.mark.unit
def test_rloo_help_shows_rloo_defaults(capsys):
    assert cli.main(["rloo", "--help"]) == 0
    rloo_help = capsys.readouterr().out.splitlines()
    assert cli.main(["grpo", "--help"]) == 0
    grpo_help = capsys.readouterr().out.splitlines()
    assert "  algorithm = rloo" in rloo_help and "  algorithm = grpo" not in rloo_help
    assert "  algorithm = grpo" in grpo_help
    # the preset is the only difference (and the command name in the first line)
    diff = [(a, b) for a, b in zip(rloo_help, grpo_help) if a != b]
    assert len(rloo_help) == len(grpo_help) and len(diff) == 2 and diff[0][0].startswith("rlhfkit rloo ")


@pytest.mark.unit
def test_rloo_command_and_config_checks():
    module, preset = cli.COMMANDS["rloo"]
    assert module == "rlhfkit.recipes.grpo" and cli.COMMANDS["grpo"][0] == module
    assert load_config(grpo.Config, None, preset).algorithm == "rloo"
    assert load_config(grpo.Config).algorithm == "grpo"
    with pytest.raises(ConfigError, match="'algorithm' must be one of"):
        load_config(grpo.Config, None, ["algorithm=ppo"])
    with pytest.raises(ConfigError, match="minibatches=3 must divide"):
        load_config(grpo.Config, None, ["minibatches=3"])  # 8 x 4 = 32 responses
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        load_config(grpo.Config, None, ["samples_per_prompt=1"])
    assert load_config(grpo.Config, None, ["samples_per_prompt=1", "algorithm=reinforce_pp"]).samples_per_prompt == 1
    with pytest.raises(ConfigError, match="train.grad_accum must be 1"):
        load_config(grpo.Config, None, ["train.grad_accum=2"])
    with pytest.raises(ConfigError, match="loss_aggregation"):
        load_config(grpo.Config, None, ["loss_aggregation=mean"])


@pytest.mark.unit
def test_example_config_loads():
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "grpo_smollm2.yaml"
    cfg = load_config(grpo.Config, path)
    assert cfg.model.name_or_path == "asset:smollm2" and cfg.lora.enabled
    assert [r.kind for r in cfg.rewards] == ["toxicity"] and cfg.data.path == "examples/data/detox_prompts.jsonl"


@pytest.mark.unit
def test_configured_rewards_are_logged_per_part(tiny_llama, tmp_path):
    """Two config rewards: every part is logged, and reward/mean = bias + sum_k w_k reward/<k>."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    cfg = make_config(tiny_llama, data, tmp_path / "run", steps=2, kl_coef=0.0, reward_bias=0.25, eval=EvalConfig(max_rows=4),
                      rewards=[RewardConfig(kind="token_frequency", token="a", weight=2.0),
                               RewardConfig(kind="length", weight=0.5, min_words=3, max_words=4)])
    summary = grpo.run(cfg)
    rows = [r for r in metrics_lines(tmp_path / "run") if "reward/mean" in r]
    assert len(rows) == 2 and summary["steps"] == 2 and summary["command"] == "grpo"
    for r in rows:
        assert r["reward/mean"] == pytest.approx(0.25 + 2.0 * r["reward/token_frequency"] + 0.5 * r["reward/length"])
        assert {"loss", "entropy", "clipfrac", "approx_kl", "response_length/mean", "time/generate",
                "time/reward", "time/reference", "time/update"} <= set(r)
        assert "kl" not in r  # kl_coef = 0: no reference
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    assert statistics.mean(s["rewards"]["before"] for s in samples) == pytest.approx(summary["eval_reward_start"])


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------


def check_learned(summary, out, margin: float = 0.2):
    start, end = summary["eval_reward_start"], summary["eval_reward_end"]
    print(f"held-out greedy reward {start:.3f} -> {end:.3f}")
    assert start < 0.1, summary  # a random tiny model rarely writes 'a'
    assert end - start >= margin, summary
    train = [r["reward/mean"] for r in metrics_lines(out) if "reward/mean" in r]
    print(f"training reward (first 3, last 3): {train[:3]} ... {train[-3:]}")
    assert statistics.mean(train[-3:]) - statistics.mean(train[:3]) >= 0.1, train


@pytest.mark.learning
def test_grpo_lora_raises_reward_causal(tiny_llama, tmp_path):
    """GRPO, LoRA (reference: the base with the adapter disabled), kl_coef 0.04, token aggregation."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = make_config(tiny_llama, data, tmp_path / "run", steps=20, lora=True, train={"lr": 2e-2}, kl_coef=0.04)
    summary = grpo.run(cfg, reward_fn=letter_a)
    check_learned(summary, tmp_path / "run")
    kl = [r["kl"] for r in metrics_lines(tmp_path / "run") if "kl" in r]
    assert len(kl) == 20 and kl[-1] > 0.05  # the policy moved away from the disabled-adapter reference
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.learning
def test_rloo_raises_reward_causal(tiny_gpt2, tmp_path):
    """RLOO, full fine-tune (reference: a frozen copy), kl_coef 0.04."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = make_config(tiny_gpt2, data, tmp_path / "run", steps=20, train={"lr": 1e-2}, kl_coef=0.04, algorithm="rloo")
    summary = grpo.run(cfg, reward_fn=letter_a)
    assert summary["command"] == "rloo"
    check_learned(summary, tmp_path / "run")


@pytest.mark.learning
def test_grpo_raises_reward_seq2seq(tiny_t5, tmp_path):
    """GRPO on T5, no reference (kl_coef 0), sequence aggregation, 2 epochs x 2 minibatches per rollout."""
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = make_config(tiny_t5, data, tmp_path / "run", steps=12, kl_coef=0.0, loss_aggregation="sequence",
                      ppo_epochs=2, minibatches=2, train={"batch_size": 16})
    summary = grpo.run(cfg, reward_fn=letter_a)
    check_learned(summary, tmp_path / "run")
    rows = [r for r in metrics_lines(tmp_path / "run") if "clipfrac" in r]
    assert max(r["clipfrac"] for r in rows) > 0  # later updates of an iteration are off-policy


@pytest.mark.unit
@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
def test_micro_batches_weighted_like_the_recipe_equal_one_batch(tiny_llama, aggregation):
    """The recipe weighs micro-batch losses by tokens (token) or rows (sequence, dr_grpo): the
    weighted mean of the micro-batch losses (and so the accumulated gradient) is the loss of the
    whole minibatch."""
    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    policy = PolicyModel(model)
    batch = collate([Example([5, 6, 7], [8, 9]), Example([5], [10, 11, 12]), Example([6, 7], [13]),
                     Example([9, 9, 9, 9], [14, 15, 16, 17])], tok.pad_token_id, False)
    cfg = grpo.Config(kl_coef=0.0, loss_aggregation=aggregation)
    tensors = {**batch, "advantages": torch.tensor([1.0, -2.0, 0.5, 0.25])}
    tensors["old_logps"] = policy(**batch)["logps"].detach() + 0.1 * torch.arange(batch["labels"].shape[1])
    full, _ = grpo.policy_loss(policy, tensors, cfg, max_tokens=8)
    parts = [R.take_rows(tensors, idx, False) for idx in torch.tensor([2, 0, 3, 1]).split(2)]
    weights = [float((m["labels"] != -100).sum()) if aggregation == "token" else float(len(m["labels"])) for m in parts]
    losses_ = [grpo.policy_loss(policy, m, cfg, max_tokens=8)[0].item() for m in parts]
    assert sum(w * l for w, l in zip(weights, losses_)) / sum(weights) == pytest.approx(full.item(), abs=1e-6)
