"""PPO: consistency of the sampling and update passes, references, learning on tiny models."""
import json
import random

import pytest
import torch

from helpers import write_jsonl
from tiny import WORDS
from rlhfkit.config import EvalConfig, DataConfig, GenerationConfig, LoraConfig, ModelConfig, RewardConfig, TrainConfig
from rlhfkit.recipes import ppo


def lowercase_share(prompts, completions, **columns):
    """Dense easy reward: share of ASCII lowercase letters (a random tiny model emits ~0.3)."""
    return [sum(ch.isascii() and ch.islower() for ch in c) / max(len(c), 1) for c in completions]


def prompts_file(tmp_path, n=80):
    rng = random.Random(0)
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": " ".join(rng.choice(WORDS) for _ in range(5))} for _ in range(n)])


def config(model, data, out, **kw):
    c = ppo.Config(model=ModelConfig(name_or_path=model, max_length=128),
                   data=DataConfig(path=data, eval_fraction=0.2, chat_template="false"),
                   train=TrainConfig(output_dir=str(out), lr=1e-2, batch_size=8, max_steps=40, progress=False),
                   generation=GenerationConfig(max_new_tokens=8, top_k=0),
                   rewards=[RewardConfig(kind="python", function="test_ppo:lowercase_share")],
                   rollout_batch_size=16, ppo_epochs=4, kl_coef=0.01)
    for k, v in kw.items():
        assert hasattr(c, k), f"no config key {k}"  # a renamed key must not be set silently
        setattr(c, k, v)
    return c


@pytest.mark.learning
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_t5"])
def test_ppo_raises_easy_reward(fixture, request, tmp_path):
    cfg = config(request.getfixturevalue(fixture), prompts_file(tmp_path), tmp_path / "run")
    s = ppo.run(cfg, reward_fn=lowercase_share)
    # greedy held-out reward must rise by at least 0.3 (observed: llama 0.25 -> 0.99, t5 0.56 -> 1.0)
    assert s["eval_reward_end"] - s["eval_reward_start"] >= 0.3, s
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward/mean" in m]
    assert len(steps) == 40
    for key in ("kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "loss/value", "explained_variance",
                "response_length/mean", "time/generate", "time/update", "reward/std"):
        assert key in steps[-1], key
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference, and it is reported
    assert (tmp_path / "run" / "value_head.safetensors").exists()


@pytest.mark.learning
def test_ppo_with_word_segment_rewards_raises_easy_reward(tiny_llama, tmp_path):
    """Fine-grained rewards: the lowercase share is scored on every word prefix, and each word gets
    the change it made; learning is as good as with the whole-response reward."""
    cfg = config(tiny_llama, prompts_file(tmp_path), tmp_path / "run", reward_segments="word")
    s = ppo.run(cfg, reward_fn=lowercase_share)
    assert s["eval_reward_end"] - s["eval_reward_start"] >= 0.3, s
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the untrained model's responses hold several words (1.4 per response on average at step 1);
    # the trained one learns to emit one long lowercase word
    assert [m for m in steps if "reward/mean" in m][0]["reward/segments_per_response"] > 1.2


@pytest.mark.unit
def test_first_minibatch_ratio_is_one(tiny_gpt2, tmp_path):
    """Old log-probs (sampling pass) equal the update pass's: with lr ~ 0 nothing is clipped."""
    cfg = config(tiny_gpt2, prompts_file(tmp_path), tmp_path / "run", ppo_epochs=1)
    cfg.train.max_steps, cfg.train.lr, cfg.lora = 2, 1e-12, LoraConfig(enabled=True, dropout=0.3)
    s = ppo.run(cfg, reward_fn=lowercase_share)
    assert s["final"]["clipfrac"] == 0.0
    assert abs(s["final"]["approx_kl"]) < 1e-9
    assert s["reference"] == "disabled_adapter"


@pytest.mark.unit
def test_disabled_adapter_reference_equals_base_model(tiny_llama):
    from rlhfkit.config import ReferenceConfig
    from rlhfkit.data import Example, collate
    from rlhfkit.models import load_policy
    from rlhfkit.policy import PolicyModel, build_reference

    lm, tok = load_policy(ModelConfig(name_or_path=tiny_llama), LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # make the adapter do something, so equality is not trivial
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    policy = PolicyModel(lm)
    ref = build_reference(ReferenceConfig(), ModelConfig(name_or_path=tiny_llama), LoraConfig(enabled=True), policy)
    batch = collate([Example([5, 6, 7], [8, 9, 1]), Example([5], [10, 11, 12, 1])], 0, False)
    base, _ = load_policy(ModelConfig(name_or_path=tiny_llama))
    expected = PolicyModel(base)(**batch)["logps"]
    assert torch.allclose(ref.logps(batch), expected, atol=1e-6)
    assert not torch.allclose(policy(**batch)["logps"], expected, atol=1e-3)


@pytest.mark.unit
def test_trained_adapter_is_the_reference(tiny_llama, tmp_path):
    """Starting from a trained adapter, the reference is that adapter (frozen), not the bare base."""
    from rlhfkit.config import ReferenceConfig
    from rlhfkit.data import Example, collate
    from rlhfkit.models import load_policy, save_pretrained
    from rlhfkit.policy import PolicyModel, build_reference

    lm, tok = load_policy(ModelConfig(name_or_path=tiny_llama), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    save_pretrained(lm, tok, tmp_path / "adapter")
    lora = LoraConfig(enabled=True, adapter_path=str(tmp_path / "adapter"))
    lm2, _ = load_policy(ModelConfig(name_or_path=tiny_llama), lora)
    policy = PolicyModel(lm2)
    ref = build_reference(ReferenceConfig(), ModelConfig(name_or_path=tiny_llama), lora, policy)
    assert ref.kind == "adapter"
    batch = collate([Example([5, 6, 7], [8, 9, 1])], 0, False)
    start = policy(**batch)["logps"].detach()
    assert torch.allclose(ref.logps(batch), start, atol=1e-6)
    # training the policy's adapter leaves the reference adapter alone
    trainable = [p for p in lm2.parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n, p in lm2.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.5)
    assert torch.allclose(ref.logps(batch), start, atol=1e-6)
    assert not torch.allclose(policy(**batch)["logps"], start, atol=1e-3)


@pytest.mark.unit
def test_train_api_runs_ppo_with_a_python_reward(tiny_gpt2, tmp_path):
    import rlhfkit

    prompts = [" ".join(random.Random(i).choice(WORDS) for _ in range(4)) for i in range(16)]
    policy = rlhfkit.train(tiny_gpt2, reward_fn=lowercase_share, prompts=prompts,
                           config={"train.max_steps": 2, "train.progress": False, "train.output_dir": str(tmp_path),
                                   "rollout_batch_size": 8, "generation.max_new_tokens": 4, "train.save_model": False})
    from transformers import PreTrainedModel
    assert isinstance(policy, PreTrainedModel)


@pytest.mark.unit
def test_bad_reward_function_output_is_a_user_error(tiny_gpt2, tmp_path):
    from rlhfkit.config import UserError

    cfg = config(tiny_gpt2, prompts_file(tmp_path), tmp_path / "run")
    with pytest.raises(UserError, match="returned 1 values for 16"):
        ppo.run(cfg, reward_fn=lambda p, c, **k: [0.0])


@pytest.mark.unit
def test_train_api_offline_and_grpo_routes(tiny_gpt2, tmp_path):
    import rlhfkit
    from transformers import PreTrainedModel

    prompts = [" ".join(random.Random(i).choice(WORDS) for _ in range(4)) for i in range(16)]
    policy = rlhfkit.train(tiny_gpt2, reward_fn=lowercase_share, prompts=prompts, algorithm="grpo",
                           config={"train.max_steps": 1, "train.progress": False, "train.output_dir": str(tmp_path / "g"),
                                   "generation.max_new_tokens": 4, "train.save_model": False, "data.eval_fraction": 0.25})
    assert isinstance(policy, PreTrainedModel)
    assert not (tmp_path / "g" / "prompts.jsonl").exists()  # the prompts go in as a list, not a file
    with pytest.raises(rlhfkit.config.UserError, match="same length"):
        rlhfkit.train(tiny_gpt2, samples=["a", "b"], rewards=[1.0])


@pytest.mark.unit
def test_samples_per_prompt_repeats_each_prompt(tiny_gpt2, tmp_path, monkeypatch):
    """rollout_batch_size 8 with samples_per_prompt 4: each iteration answers 2 prompts 4 times
    each, and the update's minibatches take a prompt's samples together."""
    seen: list[list[str]] = []

    def recording(prompts, completions, **columns):
        seen.append(list(prompts))
        return lowercase_share(prompts, completions)

    minibatches: list[list[int]] = []
    take_rows = ppo.take_rows

    def recording_rows(tensors, idx, seq2seq):
        minibatches.append(idx.tolist())
        return take_rows(tensors, idx, seq2seq)

    monkeypatch.setattr(ppo, "take_rows", recording_rows)
    cfg = config(tiny_gpt2, prompts_file(tmp_path), tmp_path / "run", rollout_batch_size=8, samples_per_prompt=4,
                 ppo_epochs=1, eval=EvalConfig(max_rows=0))
    cfg.train.max_steps, cfg.train.batch_size = 2, 4
    ppo.run(cfg, reward_fn=recording)
    rollouts = [p for p in seen if len(p) == 8]
    assert len(rollouts) == 2
    for batch in rollouts:
        assert sorted(batch.count(p) for p in set(batch)) == [4, 4]
    # a minibatch of 4 rows is one prompt's 4 samples (rows 0-3 or 4-7), in both iterations
    assert len(minibatches) == 4 and all(sorted(m) in ([0, 1, 2, 3], [4, 5, 6, 7]) for m in minibatches)
    with pytest.raises(Exception, match="multiple of samples_per_prompt"):
        config(tiny_gpt2, "x.jsonl", tmp_path / "r2", rollout_batch_size=8, samples_per_prompt=3).validate()


@pytest.mark.unit
def test_value_lr_sets_the_value_heads_step(tiny_gpt2, tmp_path):
    """The head starts at zero and Adam moves a weight by at most lr per update (about lr on the
    first): after 2 updates at value_lr 1e-5 no head weight is past 2e-5, while the policy's LoRA
    weights took steps of train.lr (1e-2)."""
    from safetensors.torch import load_file

    cfg = config(tiny_gpt2, prompts_file(tmp_path), tmp_path / "run", ppo_epochs=1, eval=EvalConfig(max_rows=0), value_lr=1e-5)
    cfg.train.max_steps, cfg.lora = 1, LoraConfig(enabled=True)
    ppo.run(cfg, reward_fn=lowercase_share)  # rollout 16, minibatch 8: 2 updates
    head = load_file(str(tmp_path / "run" / "value_head.safetensors"))["summary.weight"]
    assert 1e-6 < float(head.abs().max()) <= 2e-5 * (1 + 1e-3)
    lora_b = [v for k, v in load_file(str(tmp_path / "run" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert max(float(v.abs().max()) for v in lora_b) > 5e-3  # B starts at 0; two steps of 1e-2
    with pytest.raises(Exception, match="value_lr must be > 0"):
        config(tiny_gpt2, "x.jsonl", tmp_path / "r2", value_lr=0.0).validate()


class _PieceTokenizer:
    """Token id i decodes to PIECES[i]; id 0 is a special token (EOS)."""
    PIECES = ["</s>", "Hello", ",", " you", " stupid", " fool", ".", " Bye", "!"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i == 0))


@pytest.mark.unit
def test_segment_ends_words_and_sentences():
    pieces = _PieceTokenizer.PIECES[1:]  # Hello , you stupid fool . Bye !
    prefixes = ["".join(pieces[: k + 1]) for k in range(len(pieces))]
    # a word ends before each piece that starts with a space: after ",", "you", "stupid", "." and at the end
    assert ppo.segment_ends(prefixes, "word") == [1, 2, 3, 5, 7]
    assert ppo.segment_ends(prefixes, "sentence") == [5, 7]
    assert ppo.segment_ends(prefixes, "sequence") == [7]
    assert ppo.segment_ends(prefixes[:1], "word") == [0]


@pytest.mark.unit
@pytest.mark.parametrize("unit", ["sequence", "word", "sentence"])
def test_segment_rewards_put_each_change_on_its_segment(unit):
    """Reward = 1 - 0.5 x (number of "stupid" and "fool") + 0.25 if "Bye!"; the empty response scores 1.
    Response "Hello, you stupid fool. Bye!</s>" (score 0.25): word segments Hello, | you | stupid |
    fool. | Bye!</s> -> 0, 0, -0.5, -0.5, +0.25 at tokens 1, 2, 3, 5, 8; sentences "Hello, you stupid
    fool." | " Bye!</s>" -> -1 at token 5 and +0.25 at token 8. Segmented rows sum to score - 1 (the
    empty response's score); sequence: the score on the last token."""
    def reward(texts):
        return [1.0 - 0.5 * sum(t.split().count(w) + t.split().count(w + ".") for w in ("stupid", "fool"))
                + 0.25 * ("Bye!" in t.split()) for t in texts]

    labels = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0], [1, 2, 3, 0, -100, -100, -100, -100, -100]])
    tok = _PieceTokenizer()
    full = [tok.decode(r[r != -100].tolist()).strip() for r in labels]
    scores = torch.tensor(reward(full))  # 0.25 and 1.0
    seen_rows = []

    def score_fn(texts, rows):
        seen_rows.extend(rows)
        return reward(texts)

    dense, n = ppo.segment_rewards(labels, scores, tok, unit, score_fn)
    expected = torch.zeros(2, 9)
    if unit == "sequence":
        expected[0, 8], expected[1, 3] = 0.25, 1.0
        assert n == 2
    elif unit == "word":
        expected[0, [1, 2, 3, 5, 8]] = torch.tensor([0.0, 0.0, -0.5, -0.5, 0.25])
        expected[1, [1, 3]] = torch.tensor([0.0, 0.0])  # "Hello," | " you</s>"
        assert n == 7 and seen_rows == [0, 0, 0, 0, 0, 1, 1]  # the empty response, then 4 (1) prefixes
    else:
        expected[0, [5, 8]] = torch.tensor([-1.0, 0.25])
        assert n == 3
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(dense.sum(1), scores - (0.0 if unit == "sequence" else 1.0))


@pytest.mark.unit
def test_separate_critic_is_saved_beside_the_policy(tiny_llama, tmp_path):
    """The trained critic goes to output_dir/critic: its weights and value head equal the last
    checkpoint's ``critic.*`` tensors (the state the run ended in), and they moved from the start."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = config(tiny_llama, prompts_file(tmp_path, 20), tmp_path / "run", value_model=tiny_llama, ppo_epochs=1)
    cfg.train.max_steps, cfg.train.checkpoint_every = 2, 2
    ppo.run(cfg, reward_fn=lowercase_share)
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    folder = tmp_path / "run" / "critic"
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    critic = {k[len("critic.lm."):]: v for k, v in ckpt.items() if k.startswith("critic.lm.")}
    assert critic and critic.keys() <= saved.keys()
    for k, v in critic.items():
        assert torch.equal(saved[k], v), k
    assert any(not torch.equal(saved[k], start[k]) for k in critic)
    head = load_file(str(folder / "value_head.safetensors"))
    assert head.keys() == {k[len("critic.value_head."):] for k in ckpt if k.startswith("critic.value_head.")}
    for k, v in head.items():
        assert torch.equal(v, ckpt["critic.value_head." + k]) and v.abs().sum() > 0, k  # trained from its zero start
