"""benchmarks/vs_trl.py: the token rule, the clock window, the FLOP/MFU formulas and the table, by
hand; the rlhfkit command of every row loads; with TRL installed, both libraries count the same
tokens for the same rows and agree on the step-0 loss."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


V = _bench()


@pytest.mark.unit
def test_real_tokens_rule_by_hand():
    att = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]])
    assert V.real_tokens({"input_ids": torch.zeros(3, 4), "attention_mask": att}) == 8
    # rlhfkit KTO: the nested KL batch and TRL's KL_attention_mask are no-grad passes, not counted
    assert V.real_tokens({"attention_mask": att, "kl": {"attention_mask": torch.ones(3, 9)},
                          "KL_attention_mask": torch.ones(3, 9)}) == 8
    # TRL GRPO/RLOO: prompt and completion masks apart
    assert V.real_tokens({"prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                          "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}) == 11
    with pytest.raises(KeyError):
        V.real_tokens({"input_ids": torch.zeros(2, 2)})


@pytest.mark.unit
def test_measured_rate_skips_the_warmup_steps():
    clock = [(10.0, 100), (11.0, 300), (12.0, 500), (12.5, 700), (14.0, 1000)]  # (time, cumulative tokens)
    # warm-up 2: from the end of step 2 (t=11, 300 tokens) to the end of step 5 (t=14, 1000 tokens)
    assert V.measured_rate(clock, 2) == (700 / 3.0, 700, 3.0)
    with pytest.raises(ValueError):
        V.measured_rate(clock[:2], 2)


@pytest.mark.unit
def test_flops_and_mfu_by_hand():
    # 2 N + 4 L d c: N = 1e6, L = 2, d = 64, c = 10 -> 2e6 + 5,120
    assert V.model_flops_per_token(1_000_000, 2, 64, 10.0) == 2_005_120.0
    # 3 F x 100 train tok/s + F x 100 reference tok/s = 4 x 2e6 x 100 = 8e8 of a 1.6e9 peak: 50%
    assert V.mfu(100.0, 100.0, 2e6, 1.6e9) == pytest.approx(0.5)
    assert V.mfu(100.0, 0.0, 2e6, 1.2e9) == pytest.approx(0.5)  # no reference: 6 N per token


@pytest.mark.unit
def test_matmul_params_counts_a_tied_head_once():
    from rlhfkit.tiny import build_model

    untied = build_model("llama", 100, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                         num_key_value_heads=2)
    total = sum(p.numel() for p in untied.parameters())
    assert V.matmul_params(untied) == total - 100 * 8  # the input embedding is a lookup
    tied = build_model("llama", 100, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                       num_key_value_heads=2, tie_word_embeddings=True)
    assert V.matmul_params(tied) == sum(p.numel() for p in tied.parameters())  # = the head, counted once
    assert V.matmul_params(tied) == total - 100 * 8


@pytest.mark.unit
def test_table_ratio_and_verdict():
    results = [{"row": "sft", "rlhfkit": [300.0, 320.0, 310.0], "trl": [200.0, 190.0, 210.0],
                "loss_rlhfkit": 8.25, "loss_trl": 8.25},
               {"row": "grpo", "rlhfkit": [120.0], "trl": [100.0], "loss_note": "sampled: n/a"}]
    table = V.format_table(results, "1.00 1.00 1.00")
    lines = table.splitlines()
    assert lines[2] == "| SFT | 310 | 200 | 1.55x | 8.25000 | 8.25000 | 0.0e+00 | meets 1.5x |"
    assert lines[3] == "| GRPO | 120 | 100 | 1.20x | sampled: n/a | - | - | below 1.5x |"
    assert "load average 1.00 1.00 1.00" in table


@pytest.mark.unit
def test_computed_tokens_counts_a_shared_prompt_once():
    from rlhfkit.data import PairExample, collate_preferences

    pairs = [PairExample([5, 6, 7, 8], [9, 1], [10, 11, 1]), PairExample([12, 13, 14], [15, 1], [16, 1])]
    batch = collate_preferences(pairs, 0, False)
    assert V.real_tokens(batch) == 6 + 7 + 5 + 5
    assert V.computed_tokens(batch) == (4 + 2 + 3) + (3 + 2 + 2)  # each prompt once
    assert V.computed_tokens(batch, min_shared=0.9) == 23  # not worth sharing: every token runs


@pytest.mark.unit
@pytest.mark.parametrize("row", V.ROWS)
def test_every_row_is_a_valid_rlhfkit_command(row, tmp_path):
    import importlib

    from rlhfkit.cli import COMMANDS

    files = {k: str(tmp_path / f"{k}.jsonl") for k in ("sft", "prefs", "kto", "prompts")}
    overrides = V.rlhfkit_overrides(row, str(tmp_path / "model"), files, str(tmp_path / "out"), 23)
    module_name, preset = COMMANDS[V.COMMANDS[row]]
    cfg = load_config(importlib.import_module(module_name).Config, None, preset + overrides)
    assert cfg.train.batch_size == V.BATCH and cfg.train.max_steps == 23 and cfg.model.max_length == V.MAX_LENGTH
    assert cfg.train.precision == "fp32" and not cfg.train.save_model and cfg.data.eval_fraction == 0
    if row == "dpo_lora":
        assert cfg.lora.enabled and cfg.reference.kind == "disabled_adapter"
    if row in ("grpo", "rloo"):
        assert cfg.prompts_per_step * cfg.samples_per_prompt == V.BATCH
        assert cfg.algorithm == row and cfg.kl_coef == (0.0 if row == "grpo" else 0.05)


# ---------------------------------------------------------------------------------------------
# with TRL (the optional `bench` extra)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    pytest.importorskip("trl")
    work = tmp_path_factory.mktemp("vs_trl")
    model = V.build_model(work / "tiny-llama")
    files = V.make_data(work / "data", model, n=24)
    return work, model, files


@pytest.mark.unit
@pytest.mark.parametrize("row", ["sft", "dpo"])
def test_both_libraries_count_the_same_tokens_and_step0_loss(row, bench_setup):
    work, model, files = bench_setup
    ours = V.rlhfkit_step0(row, model, files, work)
    trainer = V.trl_trainer(row, model, files, str(work / f"trl-{row}"), 2, False)
    theirs = V.trl_step0(row, trainer)
    assert ours["tokens"] == theirs["tokens"] > 0
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    if row == "dpo":  # policy = reference: log 2, and the same chosen log-probs
        assert ours["loss"] == pytest.approx(0.693147, abs=1e-5)
        assert ours["logp_chosen"] == pytest.approx(theirs["logp_chosen"], abs=1e-3)


@pytest.mark.unit
def test_benchmark_data_has_real_padding_and_fits(bench_setup):
    from transformers import AutoTokenizer

    work, model, files = bench_setup
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in Path(files["sft"]).read_text().splitlines()]
    lengths = [len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows]
    assert max(lengths) <= V.MAX_LENGTH and max(lengths) - min(lengths) > 30  # batches hold real padding
    assert all(r["completion"].startswith(" ") and r["prompt"].endswith(":") for r in rows)
    assert len(tok) > 3000  # the ~4k BPE
