"""KTO: the recipe's loss equals losses.kto on plain-forward log-probs with the KL term from
mismatched pairs; data unpairing and labels; held-out measures; and KTO learns a prompt-dependent
preference (held-out pair accuracy >= 0.9), causal and seq2seq, full and LoRA, with live and
precomputed references."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import write_jsonl
from pref_data import metrics_lines, perturbed_copy, plain_logp, preference_rows, unpaired_rows
from rlhfkit import losses
from rlhfkit.config import DataConfig, ModelConfig, TrainConfig, UserError, load_config
from rlhfkit.data import DataStats, Example, Table, collate
from rlhfkit.models import load_policy
from rlhfkit.policy import PolicyModel, Reference
from rlhfkit.recipes import kto

ROWS = [  # (prompt ids, completion ids, desirable)
    Example([10, 11, 12], [20, 21, 1]),
    Example([30, 31], [40, 1]),
    Example([50, 51, 52, 53], [60, 61, 62, 1]),
]
LABELS = [True, False, True]


# --------------------------------------------------------------------------------------------
# unit
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_t5"])
def test_kto_loss_equals_losses_kto_with_mismatched_kl(fixture, request):
    path = request.getfixturevalue(fixture)
    lm, tok = load_policy(ModelConfig(name_or_path=path))
    ref_lm = perturbed_copy(path)
    seq2seq = bool(lm.config.is_encoder_decoder)
    partners = [1, 2, 0]  # row i's prompt with row partners[i]'s completion
    kl_rows = kto.kl_examples(ROWS, partners, DataConfig(), 64, seq2seq)
    assert [e.completion_ids for e in kl_rows] == [[40, 1], [60, 61, 62, 1], [20, 21, 1]]
    batch = collate(ROWS, tok.pad_token_id, seq2seq)
    batch["desirable"] = torch.tensor(LABELS)
    batch["kl"] = collate(kl_rows, tok.pad_token_id, seq2seq)
    cfg = kto.Config(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    got, metrics = kto.kto_loss(PolicyModel(lm), batch, cfg, Reference("copy", model=ref_lm))

    def sums(model, rows):
        return torch.stack([plain_logp(model, e.prompt_ids, e.completion_ids, seq2seq) for e in rows])

    kl = (sums(lm, kl_rows) - sums(ref_lm, kl_rows)).mean()
    want, want_metrics = losses.kto(sums(lm, ROWS), sums(ref_lm, ROWS), torch.tensor(LABELS), kl, beta=0.5,
                                    desirable_weight=1.0, undesirable_weight=1.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert metrics["kl"] == pytest.approx(max(kl.item(), 0.0), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected"):
        assert metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    assert abs(metrics["rewards/chosen"]) > 1e-3 and got.requires_grad


@pytest.mark.unit
def test_kl_partners_are_other_prompts_and_fixed_by_seed():
    # prompts A A B B C: nobody may be paired with a row that has its own prompt
    rows = [Example([1], [9]), Example([1], [8]), Example([2], [7]), Example([2], [6]), Example([3], [5])]
    partners = kto.kl_partners(rows, seed=0)
    assert all(rows[j].prompt_ids != rows[i].prompt_ids for i, j in enumerate(partners))
    assert partners == kto.kl_partners(rows, seed=0)
    assert kto.kl_partners([Example([1], [2])], seed=0) == [0]  # a single row has only itself
    # every prompt equal: no choice but the next row of the shuffle, still never itself
    same = [Example([1], [k]) for k in range(4)]
    assert all(j != i for i, j in enumerate(kto.kl_partners(same, seed=3)))


@pytest.mark.unit
def test_unpaired_rows_labels_and_paired_files(tiny_llama, tmp_path):
    _, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    cfg = DataConfig(chat_template="false", columns={"completion": "response", "label": "good"})
    table = Table([{"prompt": "a", "response": "x", "good": True}, {"prompt": "b", "response": "y", "good": "false"},
                   {"prompt": "c", "response": "z", "good": 1}], "f.jsonl", [1, 2, 4])
    assert kto.unpaired_examples(table, cfg, tok, DataStats()) == [("a", "x", True), ("b", "y", False), ("c", "z", True)]
    bad = Table([{"prompt": "a", "response": "x", "good": "maybe"}], "f.jsonl", [7])
    with pytest.raises(UserError, match=r"f.jsonl: row 7: column 'good' must be true"):
        kto.unpaired_examples(bad, cfg, tok, DataStats())
    stats = DataStats()
    kept = kto.unpaired_examples(bad, DataConfig(chat_template="false", drop_invalid=True,
                                                 columns={"completion": "response", "label": "good"}), tok, stats)
    assert kept == [] and stats.dropped_invalid == 1
    paired = Table([{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": "c", "rejected": "d"}],
                   "pairs.jsonl")
    stats = DataStats()
    assert kto.unpaired_examples(paired, DataConfig(chat_template="false"), tok, stats) == [
        ("p", "good", True), ("p", "bad", False), ("q", "c", True), ("q", "d", False)]
    assert stats.rows == 4


@pytest.mark.unit
def test_heldout_metrics_by_hand():
    rows = [Example([1], [5]), Example([1], [6]), Example([2], [7]), Example([2], [8]), Example([2], [9])]
    rewards = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.0])
    labels = torch.tensor([True, False, True, False, False])
    m = kto.heldout_metrics(rewards, labels, rows)
    # signs: 1 > 0 yes, -0.5 < 0 yes, 0 (desirable) no, 2 (undesirable) no, -1 < 0 yes -> 3/5
    assert m["eval/accuracy"] == pytest.approx(0.6)
    # pairs with one prompt: (0,1): 1 > -0.5 yes; (2,3): 0 > 2 no; (2,4): 0 > -1 yes -> 2/3
    assert m["eval/pair_accuracy"] == pytest.approx(2 / 3)
    assert m["eval/rewards_desirable"] == pytest.approx(0.5) and m["eval/rewards_undesirable"] == pytest.approx(1 / 6)


@pytest.mark.unit
def test_kto_example_config_loads():
    cfg = load_config(kto.Config, Path(__file__).resolve().parents[1] / "examples" / "kto_smollm2.yaml")
    assert (cfg.reference.kind, cfg.lora.enabled, cfg.model.name_or_path) == ("disabled_adapter", True, "asset:smollm2")
    assert cfg.train.batch_size > 1


@pytest.mark.unit
def test_summary_counts_labelled_rows_as_samples(tiny_llama, tmp_path):
    """samples = labelled (prompt, completion) rows trained on; the mismatched KL rows are not counted."""
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_rows(preference_rows(12)))  # 24 rows
    cfg = kto.Config(model=ModelConfig(name_or_path=tiny_llama, max_length=64),
                     data=DataConfig(path=data, eval_fraction=0.0, chat_template="false"),
                     train=TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, grad_accum=2, max_steps=2,
                                       progress=False, group_by_length=False, save_model=False))
    summary = kto.run(cfg)
    # 2 steps x 2 micro-batches x 4 rows = 16 rows (each with a KL partner row, not counted)
    assert summary["samples"] == 16
    assert [line["samples"] for line in metrics_lines(tmp_path / "run") if "loss" in line] == [8, 16]


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------


def kto_config(model: str, tmp_path: Path, paired: bool = False, out: str = "run", **kw) -> kto.Config:
    pairs = preference_rows(240)
    if paired:  # a preference file; the held-out fraction is split off before unpairing
        data = DataConfig(path=write_jsonl(tmp_path / "pairs.jsonl", pairs), eval_fraction=1 / 6, chat_template="false")
    else:  # prompt / completion / label rows, held-out rows in their own file (both labels per prompt)
        data = DataConfig(path=write_jsonl(tmp_path / "kto.jsonl", unpaired_rows(pairs[:200])),
                          eval_path=write_jsonl(tmp_path / "kto_eval.jsonl", unpaired_rows(pairs[200:])),
                          chat_template="false")
    # KTO's per-row signal is noisier than DPO's pairwise one: clip gradients (the default 1.0)
    # and take 60 steps; beta 0.2 kept the full fine-tunes stable across seeds.
    train = dict(output_dir=str(tmp_path / out), lr=3e-3, batch_size=8, max_steps=60, progress=False,
                 group_by_length=False, max_grad_norm=1.0, seed=0)
    train.update(kw.pop("train", {}))
    kw.setdefault("beta", 0.2)
    return kto.Config(model=ModelConfig(name_or_path=model, max_length=64), data=data, train=TrainConfig(**train), **kw)


def assert_kto_learned(summary: dict, out: Path):
    print(f"[accuracy] kto {out}: pairs {summary['eval_start']['eval/pair_accuracy']:.3f} -> "
          f"{summary['eval_end']['eval/pair_accuracy']:.3f}, signs {summary['eval_end']['eval/accuracy']:.3f}")
    # 40 held-out pairs; at the start the policy equals the reference: every reward and margin is 0
    assert summary["eval_start"]["eval/pair_accuracy"] == 0.0 and summary["eval_start"]["eval/accuracy"] == 0.0, summary
    assert summary["eval_end"]["eval/pair_accuracy"] >= 0.9, summary
    lines = metrics_lines(out)
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl"} <= set(lines[1])
    assert [l for l in lines if "eval/pair_accuracy" in l][-1]["eval/pair_accuracy"] == summary["eval_end"]["eval/pair_accuracy"]


@pytest.mark.learning
@pytest.mark.parametrize("fixture,paired", [("tiny_llama", False), ("tiny_t5", True)])
def test_kto_learns_preference(fixture, paired, request, tmp_path):
    summary = kto.run(kto_config(request.getfixturevalue(fixture), tmp_path, paired=paired))
    assert summary["reference"] == "copy" and summary["data"]["rows"] == 400
    assert_kto_learned(summary, tmp_path / "run")


@pytest.mark.learning
def test_kto_lora_disabled_adapter_learns(tiny_llama, tmp_path):
    cfg = kto_config(tiny_llama, tmp_path, beta=0.5, train={"lr": 5e-3, "max_steps": 50})
    cfg.lora.enabled, cfg.lora.target_modules = True, ["all-linear"]
    summary = kto.run(cfg)
    assert summary["reference"] == "disabled_adapter"
    assert_kto_learned(summary, tmp_path / "run")
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.learning
def test_kto_precomputed_reference_equals_live(tiny_llama, tmp_path):
    other = perturbed_copy(tiny_llama, 0.1)
    other.save_pretrained(tmp_path / "ref_model")

    def go(out, precompute):
        cfg = kto_config(tiny_llama, tmp_path, out=out, train={"max_steps": 2})
        cfg.reference.kind, cfg.reference.model = "copy", str(tmp_path / "ref_model")
        cfg.reference.precompute, cfg.reference.cache_dir = precompute, str(tmp_path / "cache")
        return kto.run(cfg), metrics_lines(tmp_path / out)

    _, live = go("live", False)
    first, pre = go("pre1", True)
    second, again = go("pre2", True)
    assert not first["reference_cache"]["train"]["reused"] and second["reference_cache"]["train"]["reused"]
    assert len(list((tmp_path / "cache").glob("kto-train-*.safetensors"))) == 1
    assert live[1]["kl"] > 0.01  # the reference differs from the policy, so the KL pairs matter
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        assert pre[1][key] == pytest.approx(live[1][key], abs=1e-6), key
        assert again[1][key] == pre[1][key], key
    assert pre[0]["eval/rewards_desirable"] == pytest.approx(live[0]["eval/rewards_desirable"], abs=1e-6)


@pytest.mark.unit
def test_concat_batches_pads_the_narrower_batch():
    from rlhfkit.recipes._preference import concat_batches

    a = collate([Example([5, 6], [7, 1])], 0, False)  # width 4
    b = collate([Example([8], [9, 10, 11, 1])], 0, False)  # width 5
    both = concat_batches({**a, "desirable": torch.tensor([True])}, b)
    assert set(both) == {"input_ids", "attention_mask", "labels"}
    assert both["input_ids"].tolist() == [[5, 6, 7, 1, 0], [8, 9, 10, 11, 1]]
    assert both["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert both["labels"].tolist() == [[-100, -100, 7, 1, -100], [-100, 9, 10, 11, 1]]
