"""DPO family: the recipe's loss equals losses.dpo on log-probs from a plain transformers forward;
one concatenated forward equals two; the reference cache key; and every variant learns a
prompt-dependent preference (held-out accuracy >= 0.9), causal and seq2seq, full and LoRA, with
live, adapter and precomputed references."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import write_jsonl
from pref_data import metrics_lines, perturbed_copy, plain_logp, preference_rows
from rlhfkit import losses
from rlhfkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from rlhfkit.data import Example, PairExample, collate, collate_preferences
from rlhfkit.models import load_policy
from rlhfkit.policy import PolicyModel, Reference, build_reference
from rlhfkit.recipes import _preference as P
from rlhfkit.recipes import dpo

ROOT = Path(__file__).resolve().parents[1]

# Hand-made pairs (token ids of the tiny tokenizers; 1 is </s>), of different lengths so padding matters.
PAIRS = [
    PairExample([10, 11, 12, 13], [20, 21, 1], [30, 1]),
    PairExample([40, 41], [50, 1], [60, 61, 62, 1]),
    PairExample([70, 71, 72], [80, 81, 82, 83, 1], [90, 91, 1]),
]


# --------------------------------------------------------------------------------------------
# unit
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("fixture,loss", [("tiny_llama", "sigmoid"), ("tiny_llama", "ipo"), ("tiny_t5", "sigmoid"),
                                          ("tiny_t5", "ipo")])
def test_recipe_loss_equals_losses_dpo_on_plain_forward(fixture, loss, request):
    path = request.getfixturevalue(fixture)
    policy_lm, tok = load_policy(ModelConfig(name_or_path=path))
    ref_lm = perturbed_copy(path)
    seq2seq = bool(policy_lm.config.is_encoder_decoder)
    cfg = dpo.Config(loss=loss, beta=0.5)
    batch = collate_preferences(PAIRS, tok.pad_token_id, seq2seq)
    got, metrics = dpo.preference_loss(PolicyModel(policy_lm), batch, cfg, Reference("copy", model=ref_lm))

    def seqs(lm):  # (2B,) chosen then rejected, and completion lengths
        c = [plain_logp(lm, p.prompt_ids, p.chosen_ids, seq2seq) for p in PAIRS]
        r = [plain_logp(lm, p.prompt_ids, p.rejected_ids, seq2seq) for p in PAIRS]
        return torch.stack(c), torch.stack(r)

    n_c = torch.tensor([len(p.chosen_ids) for p in PAIRS], dtype=torch.float32)
    n_r = torch.tensor([len(p.rejected_ids) for p in PAIRS], dtype=torch.float32)
    pc, pr = seqs(policy_lm)
    rc, rr = seqs(ref_lm)
    if loss == "ipo":  # IPO gets per-token averages
        pc, pr, rc, rr = pc / n_c, pr / n_r, rc / n_c, rr / n_r
    want, want_metrics = losses.dpo(pc, pr, rc, rr, beta=0.5, variant=loss)
    assert abs(want_metrics["rewards/chosen"]) > 1e-3  # policy != reference: the reference matters
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-5), k
    assert got.requires_grad


@pytest.mark.unit
def test_orpo_and_simpo_use_averages_and_chosen_token_nll(tiny_llama):
    lm, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    batch = collate_preferences(PAIRS, tok.pad_token_id, False)
    c = torch.stack([plain_logp(lm, p.prompt_ids, p.chosen_ids, False) for p in PAIRS])
    r = torch.stack([plain_logp(lm, p.prompt_ids, p.rejected_ids, False) for p in PAIRS])
    n_c = torch.tensor([3.0, 2.0, 5.0])
    n_r = torch.tensor([2.0, 4.0, 3.0])
    got, _ = dpo.preference_loss(PolicyModel(lm), batch, dpo.Config(loss="orpo", orpo_lambda=0.3))
    # NLL = -(sum of chosen token log-probs) / (3 + 2 + 5 chosen tokens)
    want, _ = losses.orpo(c / n_c, r / n_r, -c.sum() / 10.0, lam=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got, _ = dpo.preference_loss(PolicyModel(lm), batch, dpo.Config(loss="simpo"))
    want, _ = losses.simpo(c / n_c, r / n_r, beta=2.0, gamma=0.5)  # default beta of simpo is 2.0
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_t5"])
def test_concatenated_forward_equals_two_forwards(fixture, request):
    lm, tok = load_policy(ModelConfig(name_or_path=request.getfixturevalue(fixture)))
    policy = PolicyModel(lm).eval()
    seq2seq = policy.is_seq2seq
    pad = tok.pad_token_id
    with torch.no_grad():
        both = policy(**collate_preferences(PAIRS, pad, seq2seq))
        chosen = policy(**collate([Example(p.prompt_ids, p.chosen_ids) for p in PAIRS], pad, seq2seq))
        rejected = policy(**collate([Example(p.prompt_ids, p.rejected_ids) for p in PAIRS], pad, seq2seq))
    s_both, n_both = P.sequence_logps(both["logps"], both["mask"])
    s_c, n_c = P.sequence_logps(chosen["logps"], chosen["mask"])
    s_r, n_r = P.sequence_logps(rejected["logps"], rejected["mask"])
    assert n_both.tolist() == [3, 2, 5, 2, 4, 3]
    assert torch.equal(n_both, torch.cat([n_c, n_r]))
    torch.testing.assert_close(s_both, torch.cat([s_c, s_r]), rtol=1e-5, atol=1e-5)
    # token by token too: same values at the same completion positions
    for out, rows in ((chosen, slice(0, 3)), (rejected, slice(3, 6))):
        T = out["logps"].shape[1]
        torch.testing.assert_close(both["logps"][rows, :T][out["mask"]], out["logps"][out["mask"]], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_cache_key_follows_data_lengths_and_adapter_files(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-1")
    (adapter / "adapter_config.json").write_text("{}")
    ident = {"kind": "adapter", "adapter": P.folder_identity(adapter)}
    ex = [Example([1, 2], [3, 4])]
    lengths = {"max_length": 64}
    key = P.cache_key(ident, ex, lengths)
    assert key == P.cache_key({"kind": "adapter", "adapter": P.folder_identity(adapter)}, [Example([1, 2], [3, 4])], lengths)
    assert key != P.cache_key(ident, [Example([1, 2], [3, 5])], lengths)  # one token differs
    assert key != P.cache_key(ident, [Example([1], [2, 3, 4])], lengths)  # same ids, other prompt/completion cut
    assert key != P.cache_key(ident, ex, {"max_length": 32})
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-2")  # same size, new content
    assert key != P.cache_key({"kind": "adapter", "adapter": P.folder_identity(adapter)}, ex, lengths)


@pytest.mark.unit
@pytest.mark.parametrize("overrides,message", [
    (["loss=ipo", "label_smoothing=0.1"], "label_smoothing applies"),
    (["loss=orpo", "beta=0.1"], "its weight is 'orpo_lambda'"),
    (["reference.kind=none"], "needs a reference"),
    (["loss=robust", "label_smoothing=0.5"], "[0, 0.5)"),
    (["loss=sigmod"], "did you mean 'sigmoid'"),
])
def test_config_rejects_conflicts(overrides, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(dpo.Config, None, overrides)
    assert message in str(e.value)


@pytest.mark.unit
@pytest.mark.parametrize("name,loss,kind", [("dpo_smollm2.yaml", "sigmoid", "disabled_adapter"),
                                            ("dpo_hh_rlhf.yaml", "sigmoid", "disabled_adapter")])
def test_example_configs_load(name, loss, kind):
    cfg = load_config(dpo.Config, ROOT / "examples" / name)
    assert (cfg.loss, cfg.reference.kind, cfg.lora.enabled) == (loss, kind, True)
    assert cfg.train.max_steps <= 200


@pytest.mark.unit
def test_summary_counts_pairs_as_samples(tiny_llama, tmp_path):
    """samples = preference pairs trained on, sequences = chosen + rejected (two per pair)."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12))
    cfg = dpo.Config(model=ModelConfig(name_or_path=tiny_llama, max_length=64),
                     data=DataConfig(path=data, eval_fraction=0.0, chat_template="false"),
                     train=TrainConfig(output_dir=str(tmp_path / "run"), batch_size=3, grad_accum=2, max_steps=2,
                                       progress=False, group_by_length=False, save_model=False))
    summary = dpo.run(cfg)
    # 2 steps x 2 micro-batches x 3 pairs = 12 pairs = 24 sequences
    assert summary["samples"] == 12 and summary["sequences"] == 24
    assert [line["samples"] for line in metrics_lines(tmp_path / "run") if "loss" in line] == [6, 12]


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------


def dpo_config(model: str, tmp_path: Path, out: str = "run", **kw) -> dpo.Config:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(240))
    train = dict(output_dir=str(tmp_path / out), lr=3e-3, batch_size=8, max_steps=30, progress=False,
                 group_by_length=False, max_grad_norm=None, seed=0)
    train.update(kw.pop("train", {}))
    return dpo.Config(model=ModelConfig(name_or_path=model, max_length=64),
                      data=DataConfig(path=data, eval_fraction=1 / 6, chat_template="false"),  # 40 held-out pairs
                      train=TrainConfig(**train), **kw)


def assert_learned(summary: dict, out: Path, reference_free: bool = False):
    start, end = summary["eval_start"]["eval/accuracy"], summary["eval_end"]["eval/accuracy"]
    print(f"[accuracy] {out.name} loss={summary['loss']}: {start:.3f} -> {end:.3f}")
    # With a reference, the policy equals it at the start: every margin is 0 and counts as wrong.
    # Reference-free, a fixed bias for "yes" or "no" gets half the pairs right (the data is balanced).
    assert (0.2 <= start <= 0.7) if reference_free else start == 0.0, summary
    assert end >= 0.9, summary
    lines = metrics_lines(out)
    evals = [l for l in lines if "eval/accuracy" in l]
    assert evals[0]["eval/accuracy"] == start and evals[-1]["eval/accuracy"] == end
    steps = [l for l in lines if "loss" in l]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(steps[0])
    assert summary["tokens"] > 0 and summary["final"]["step"] == summary["steps"]


VARIANTS = {  # id: (loss, extra config); beta 0.5 moves a random tiny model within 30 steps
    "sigmoid": ("sigmoid", {"beta": 0.5}),
    "cdpo": ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1}),
    "robust": ("robust", {"beta": 0.5, "label_smoothing": 0.1}),
    "ipo": ("ipo", {"beta": 0.5}),
    "hinge": ("hinge", {"beta": 0.5}),
    "simpo": ("simpo", {}),
    "orpo": ("orpo", {"orpo_lambda": 1.0, "train": {"max_steps": 40}}),
}


@pytest.mark.learning
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dpo_variant_learns_preference(variant, tiny_llama, tmp_path):
    loss, kw = VARIANTS[variant]
    cfg = dpo_config(tiny_llama, tmp_path, loss=loss, **dict(kw))
    summary = dpo.run(cfg)
    assert summary["reference"] == ("none" if loss in ("simpo", "orpo") else "copy")
    assert_learned(summary, tmp_path / "run", reference_free=loss in ("simpo", "orpo"))


@pytest.mark.learning
def test_dpo_seq2seq_learns_preference(tiny_t5, tmp_path):
    summary = dpo.run(dpo_config(tiny_t5, tmp_path, beta=0.5))
    assert_learned(summary, tmp_path / "run")


LORA_TRAIN = {"lr": 5e-3, "max_grad_norm": 1.0, "max_steps": 40}  # unclipped 1e-2 swung back and forth


@pytest.mark.learning
def test_dpo_lora_disabled_adapter_then_trained_adapter_as_reference(tiny_llama, tmp_path):
    # 1) fresh LoRA, reference = the base with the adapter switched off
    cfg = dpo_config(tiny_llama, tmp_path, out="first", beta=0.5, train=LORA_TRAIN)
    cfg.lora.enabled, cfg.lora.dropout, cfg.lora.target_modules = True, 0.0, ["all-linear"]
    first = dpo.run(cfg)
    assert first["reference"] == "disabled_adapter"
    assert_learned(first, tmp_path / "first")
    saved = {p.name for p in (tmp_path / "first").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved

    # 2) start from that adapter, reference = a frozen second copy of it on the same base
    cfg = dpo_config(tiny_llama, tmp_path, out="second", beta=0.5, train={**LORA_TRAIN, "max_steps": 30})
    cfg.lora.enabled, cfg.lora.adapter_path = True, str(tmp_path / "first")
    cfg.reference.kind = "adapter"
    # the reference log-probs equal the starting policy's, sequence by sequence
    lm, tok = load_policy(cfg.model, cfg.lora)
    policy = PolicyModel(lm)
    ref = build_reference(cfg.reference, cfg.model, cfg.lora, policy)
    batch = collate_preferences(PAIRS, tok.pad_token_id, False)
    pi = policy(**batch)["logps"]
    torch.testing.assert_close(ref.logps(batch), pi.detach(), rtol=0, atol=1e-6)
    assert pi.abs().sum() > 1.0 and pi.requires_grad  # real log-probs, and the policy still trains
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and not any(".reference." in n for n in trainable)  # the reference adapter is frozen

    second = dpo.run(cfg)
    assert second["reference"] == "adapter"
    step1 = metrics_lines(tmp_path / "second")[1]
    assert step1["step"] == 1  # computed before the first update: policy == reference
    assert abs(step1["rewards/chosen"]) < 1e-6 and abs(step1["rewards/rejected"]) < 1e-6
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_learned(second, tmp_path / "second")
    # only the trained adapter is saved, not the frozen reference beside it
    assert not (tmp_path / "second" / "reference").exists()


@pytest.mark.learning
def test_precomputed_reference_is_cached_reused_and_equals_live(tiny_llama, tmp_path):
    other = perturbed_copy(tiny_llama, 0.1)  # a reference that differs from the policy: step-0 loss != ln 2
    other.save_pretrained(tmp_path / "ref_model")
    cache = tmp_path / "cache"

    def go(out, precompute):
        cfg = dpo_config(tiny_llama, tmp_path, out=out, beta=0.5, train={"max_steps": 2})
        cfg.reference.kind, cfg.reference.model = "copy", str(tmp_path / "ref_model")
        cfg.reference.precompute, cfg.reference.cache_dir = precompute, str(cache)
        return dpo.run(cfg), metrics_lines(tmp_path / out)

    live, live_lines = go("live", False)
    first, first_lines = go("pre1", True)
    files = sorted(cache.glob("*.safetensors"))
    assert [f.name.split("-")[0] + "-" + f.name.split("-")[1] for f in files] == ["dpo-heldout", "dpo-train"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    second, second_lines = go("pre2", True)
    assert first["reference_cache"]["train"]["reused"] is False
    assert second["reference_cache"]["train"]["reused"] is True and second["reference_cache"]["heldout"]["reused"]
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))] == mtimes

    loss0 = live_lines[1]["loss"]
    assert abs(loss0 - math.log(2)) > 1e-2  # the reference matters
    assert first_lines[1]["loss"] == pytest.approx(loss0, abs=1e-6)
    assert second_lines[1]["loss"] == first_lines[1]["loss"]
    assert first_lines[0]["eval/loss"] == pytest.approx(live_lines[0]["eval/loss"], abs=1e-6)
    assert second["reference_precomputed"] and not live["reference_precomputed"]
