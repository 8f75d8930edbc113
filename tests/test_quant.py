"""QLoRA: a 4-bit (bitsandbytes NF4) base with LoRA adapters loads as ``Linear4bit`` layers, refuses
full training, and learns in sft, dpo, ppo and grpo by the same margins as the full-precision
tests; the merged save dequantises and computes what was trained.

bitsandbytes' CPU kernels quantise blocks of 64 input features, so the tiny Llama here has hidden
size 64 and MLP size 128 (the shared tiny Llama's 32 is too narrow)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import sft_config, sft_rows, write_jsonl
from rlhfkit.config import ConfigError, LoraConfig, ModelConfig, load_config
from rlhfkit.config import validate as validate_config

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install 'rlhfkit[quant]')")


@pytest.fixture(scope="session")
def llama64(tmp_path_factory) -> str:
    """A tiny random Llama (hidden 64, MLP 128, 2 layers, 4 heads) with the shared chat tokenizer."""
    from tiny import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("llama64")
    tok = build_tokenizer(chat=True)
    build_model("llama", len(tok), 0, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=4).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def q4(path: str, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=path, max_length=128, load_in_4bit=True, **kw)


# --------------------------------------------------------------------------------------------
# unit
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_quantised_base_needs_lora_and_no_separate_critic(tmp_path):
    from rlhfkit.recipes import ppo, sft

    with pytest.raises(ConfigError, match=r"model.load_in_4bit needs lora.enabled=true"):
        load_config(sft.Config, None, ["model.load_in_4bit=true"])
    with pytest.raises(ConfigError, match=r"model.load_in_8bit needs lora.enabled=true"):
        load_config(sft.Config, None, ["model.load_in_8bit=true"])
    with pytest.raises(ConfigError, match="choose one"):
        load_config(sft.Config, None, ["model.load_in_4bit=true", "model.load_in_8bit=true", "lora.enabled=true"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(sft.Config, None, ["model.bnb_4bit_quant_type=int4"])
    with pytest.raises(ConfigError, match="separate critic"):
        validate_config(ppo.Config(model=ModelConfig(load_in_4bit=True), lora=LoraConfig(enabled=True),
                                   value_model="critic"))
    cfg = load_config(sft.Config, None, ["model.load_in_4bit=true", "lora.enabled=true",
                                         "model.bnb_4bit_quant_type=fp4", "model.bnb_4bit_use_double_quant=true"])
    assert cfg.model.quantized and cfg.model.bnb_4bit_quant_type == "fp4"


@pytest.mark.unit
def test_missing_bitsandbytes_is_one_line_naming_the_install(monkeypatch, llama64):
    from rlhfkit.config import UserError
    from rlhfkit.models import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError) as e:
        load_model(q4(llama64))
    assert str(e.value) == "model.load_in_4bit needs bitsandbytes, which is not installed: pip install 'rlhfkit[quant]'"


@needs_bnb
@pytest.mark.unit
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_layers_are_linear4bit_and_only_adapters_train(kind, llama64):
    import bitsandbytes as bnb

    from rlhfkit.models import is_quantized, load_policy
    from rlhfkit.policy import PolicyModel, Reference

    lm, tok = load_policy(q4(llama64, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True),
                          LoraConfig(enabled=True, r=4, target_modules=["all-linear"]))
    assert is_quantized(lm)
    layers = {n: type(m) for n, m in lm.named_modules() if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))}
    assert len(layers) == 4 and all(t is bnb.nn.Linear4bit for t in layers.values()), layers
    w = lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == kind and w.numel() == 64 * 64 // 2  # 2 per byte
    assert type(lm.get_base_model().lm_head) is torch.nn.Linear  # the output layer stays in full precision
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the disabled-adapter reference is the 4-bit base itself; a fresh adapter (B = 0) changes nothing
    policy = PolicyModel(lm)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone().fill_(-100)}
    batch["labels"][0, 3:] = ids[0, 3:]
    pi = policy(**batch)["logps"]
    ref = Reference("disabled_adapter", policy=policy).logps(batch)
    torch.testing.assert_close(ref, pi.detach(), rtol=0, atol=1e-6)
    assert pi[0, 3:].abs().min() > 0.1  # real log-probs (vocab ~320: about -5.8)
    pi[0, 3:].sum().backward()
    grads = [p.grad for n, p in lm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    out = lm.generate(ids, max_new_tokens=4, do_sample=False)  # generation from the 4-bit model
    assert out.shape == (1, 10)


@needs_bnb
@pytest.mark.unit
def test_8bit_layers_are_linear8bitlt_and_adapters_get_gradients(llama64):
    import bitsandbytes as bnb

    from rlhfkit.models import load_policy
    from rlhfkit.policy import PolicyModel, Reference

    lm, _ = load_policy(ModelConfig(name_or_path=llama64, load_in_8bit=True),
                        LoraConfig(enabled=True, r=4, dropout=0.0, target_modules=["all-linear"]))
    q = lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q) is bnb.nn.Linear8bitLt and q.weight.dtype == torch.int8
    policy = PolicyModel(lm)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    pi = policy(**batch)["logps"]
    ref = Reference("disabled_adapter", policy=policy).logps(batch)
    torch.testing.assert_close(ref, pi.detach(), rtol=0, atol=1e-6)
    pi.sum().backward()
    grads = [p.grad for n, p in lm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------------------------
# learning: the full-precision tests, with a 4-bit base
# --------------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.learning
def test_qlora_sft_heldout_loss_falls_and_merged_save_is_dequantised(llama64, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.models import load_policy
    from rlhfkit.recipes import sft

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = sft_config(llama64, data, tmp_path / "run", max_steps=60, lr=1e-2, batch_size=8)
    cfg.model.load_in_4bit = True
    cfg.lora.enabled, cfg.lora.target_modules, cfg.lora.merge_on_save = True, ["all-linear"], True
    summary = sft.run(cfg)
    # as test_sft: from about ln(320) = 5.8 nats, the loss must at least halve
    start, end = summary["eval_start"]["eval/loss"], summary["eval_end"]["eval/loss"]
    assert start > 4.0
    assert end < 0.5 * start, summary
    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    # merged/: plain float weights (no quantization config), computing what the QLoRA model computed
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    trained, _ = load_policy(q4(llama64), LoraConfig(enabled=True, adapter_path=str(out)))
    trained.eval()  # loaded trainable: its LoRA dropout would be on
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(llama64)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
    assert (got - base).abs().max() > 0.1  # the adapter is in the merged weights
    # `rlhfkit eval` with adapter_path on the 4-bit base: the adapter stays unmerged (peft's merge into
    # a 4-bit base would quantise the sum again), so it computes the trained function and generates
    from rlhfkit.recipes.evaluate import load_entry

    ev, _ = load_entry(q4(llama64), str(out), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(ev(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert ev.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 11)


@needs_bnb
@pytest.mark.learning
def test_qlora_dpo_learns_preference_with_disabled_adapter_reference(llama64, tmp_path):
    from test_dpo import LORA_TRAIN, assert_learned, dpo_config

    from rlhfkit.recipes import dpo

    cfg = dpo_config(llama64, tmp_path, beta=0.5, train=LORA_TRAIN)
    cfg.model.load_in_4bit = True
    cfg.lora.enabled, cfg.lora.dropout, cfg.lora.target_modules = True, 0.0, ["all-linear"]
    summary = dpo.run(cfg)
    assert summary["reference"] == "disabled_adapter"
    assert_learned(summary, tmp_path / "run")  # held-out accuracy 0 at step 0 (policy == reference), >= 0.9 at the end


@needs_bnb
@pytest.mark.learning
def test_qlora_ppo_raises_easy_reward(llama64, tmp_path):
    from test_ppo import config, lowercase_share, prompts_file

    from rlhfkit.recipes import ppo

    cfg = config(llama64, prompts_file(tmp_path), tmp_path / "run")
    cfg.model.load_in_4bit = True
    cfg.lora = LoraConfig(enabled=True, dropout=0.0, target_modules=["all-linear"])
    validate_config(cfg)
    s = ppo.run(cfg, reward_fn=lowercase_share)
    assert s["eval_reward_end"] - s["eval_reward_start"] >= 0.3, s  # as test_ppo's margin
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@needs_bnb
@pytest.mark.learning
def test_qlora_grpo_raises_reward(llama64, tmp_path):
    from test_grpo import check_learned, letter_a, make_config

    from rlhfkit.recipes import grpo

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(200))
    cfg = make_config(llama64, data, tmp_path / "run", steps=20, lora=True, train={"lr": 2e-2})
    cfg.model.load_in_4bit = True
    validate_config(cfg)
    summary = grpo.run(cfg, reward_fn=letter_a)
    check_learned(summary, tmp_path / "run")  # held-out greedy reward +0.2, training reward +0.1
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@needs_bnb
@pytest.mark.learning
def test_qlora_reward_model_learns_marker_and_saved_model_reproduces_it(llama64, tmp_path):
    from test_reward_recipe import check_saved_matches_recipe, marker_rows, rm_config

    from rlhfkit.recipes import reward

    data = write_jsonl(tmp_path / "prefs.jsonl", marker_rows(240))
    cfg = rm_config(llama64, data, tmp_path / "rm", max_steps=60, lr=3e-3)
    cfg.model.load_in_4bit = True
    cfg.lora.enabled, cfg.lora.dropout, cfg.lora.target_modules = True, 0.0, ["all-linear"]
    summary = reward.run(cfg)
    # as test_reward_recipe: a random scorer near 0.5 on the held-out pairs, one that found the marker near 1.0
    assert summary["eval_start"]["eval/accuracy"] <= 0.75 and summary["eval_end"]["eval/accuracy"] >= 0.9, summary
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert "quantization_config" not in config  # saved merged into the dequantised base
    check_saved_matches_recipe(cfg, summary)  # RewardModel(output_dir) reproduces the recipe's held-out numbers
