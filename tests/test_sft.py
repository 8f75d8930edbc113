"""SFT learns: held-out completion loss falls by a stated margin (causal and seq2seq, full and LoRA)."""
import json

import pytest

from helpers import sft_config, sft_rows, write_jsonl
from rlhfkit.recipes import sft


@pytest.mark.learning
@pytest.mark.parametrize("fixture,lora", [("tiny_llama", False), ("tiny_t5", False), ("tiny_gpt2", True)])
def test_sft_heldout_loss_falls(fixture, lora, request, tmp_path):
    model = request.getfixturevalue(fixture)
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = sft_config(model, data, tmp_path / "run", max_steps=60, lr=1e-2 if lora else 3e-3, batch_size=8)
    cfg.lora.enabled = lora
    cfg.lora.target_modules = ["all-linear"]  # a random tiny model needs more than attention adapters
    summary = sft.run(cfg)
    # Uniform guessing over 320 tokens costs ln(320) = 5.77 nats; the summaries are a function
    # of one dialogue word, so a model that learns them should at least halve the loss.
    assert summary["eval_start"]["eval/loss"] > 4.0
    assert summary["eval_end"]["eval/loss"] < 0.5 * summary["eval_start"]["eval/loss"], summary
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_second"} <= set(lines[1])
    saved = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= saved
    assert ("adapter_model.safetensors" in saved) == lora and ("model.safetensors" in saved) == (not lora)


@pytest.mark.learning
def test_sft_packing_learns(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = sft_config(tiny_llama, data, tmp_path / "run", max_steps=40, batch_size=2)
    cfg.packing = True
    summary = sft.run(cfg)
    assert summary["eval_end"]["eval/loss"] < 0.5 * summary["eval_start"]["eval/loss"], summary
