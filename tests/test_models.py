"""Models: PolicyModel log-probs against a plain transformers forward, chunked log-softmax, LoRA
targets and trainable parameters, saving (full, adapter-only, merged) and reloading."""
from __future__ import annotations


import pytest
import torch

from rlhfkit.config import LoraConfig, ModelConfig, UserError
from rlhfkit.data import Example, collate
from rlhfkit.models import apply_lora, load_model, load_policy, load_tokenizer, save_pretrained, unwrap
from rlhfkit.policy import PolicyModel, load_value_head, token_logprobs

CPU = torch.device("cpu")
KINDS = ["tiny_gpt2", "tiny_llama", "tiny_t5"]
AUTO_TARGETS = {"tiny_gpt2": {"c_attn"}, "tiny_llama": {"q_proj", "v_proj"}, "tiny_t5": {"q", "v"}}
PAIRS = [("the cat sees a dog", " red fish runs"), ("hello", " one two three four five six"),
         ("big small fast slow good bad new old", " sun")]


def load(path: str):
    mc = ModelConfig(name_or_path=path)
    return load_model(mc, CPU).eval(), load_tokenizer(mc)


def examples(tok, seq2seq: bool) -> list[Example]:
    out = []
    for p, c in PAIRS:
        p_ids = tok(p, add_special_tokens=seq2seq)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Example(p_ids, c_ids))
    return out


def reference_logps(model, e: Example, seq2seq: bool) -> torch.Tensor:
    """log p(completion token | context) from one unpadded plain forward + full log_softmax."""
    with torch.no_grad():
        if seq2seq:
            logits = model(input_ids=torch.tensor([e.prompt_ids]), labels=torch.tensor([e.completion_ids])).logits[0]
        else:
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logits = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1: -1]  # (C, V): predicts each completion token
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(e.completion_ids)[:, None]).squeeze(-1)


def randomize_lora(model, seed: int = 0) -> None:
    """peft initialises lora_B to zero (the adapter starts as a no-op); make it matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lm_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        if "decoder_attention_mask" in batch:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"].masked_fill(batch["labels"] == -100, 0)).logits
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------
# log-probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kind", KINDS)
def test_policy_logprobs_equal_plain_forward(kind, request):
    model, tok = load(request.getfixturevalue(kind))
    seq2seq = kind == "tiny_t5"
    exs = examples(tok, seq2seq)
    batch = collate(exs, tok.pad_token_id, seq2seq)  # padded: prompts and completions of different lengths
    assert (batch["labels"] == -100).any()
    with torch.no_grad():
        out = PolicyModel(model)(**batch)
    logps, mask = out["logps"], out["mask"]
    assert logps.shape == batch["labels"].shape
    P = 0 if seq2seq else batch["input_ids"].shape[1] - max(len(e.completion_ids) for e in exs)
    for i, e in enumerate(exs):
        n = len(e.completion_ids)
        torch.testing.assert_close(logps[i, P: P + n], reference_logps(model, e, seq2seq), atol=1e-5, rtol=0)
        assert mask[i].sum() == n and mask[i, P: P + n].all()
    assert torch.all(logps[~mask] == 0)


def outputs_and_grads(policy: PolicyModel, batch: dict, **extra) -> tuple[dict, dict]:
    """A value-head policy's outputs on ``batch`` and the gradients of sum(logps) + sum(values)."""
    policy.zero_grad(set_to_none=True)
    out = policy(**batch, with_entropy=True, **extra)
    ((out["logps"] * out["mask"]).sum() + out["values"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["tiny_gpt2", "tiny_llama"])
def test_compacted_forward_equals_padded_forward(kind, request):
    """PolicyModel moves each row's real tokens to the front before the forward (collate's layout
    pads prompts on the left and completions on the right). Passing position_ids skips that: both
    must give the same outputs, in the caller's layout, and the same gradients."""
    model, tok = load(request.getfixturevalue(kind))
    model.train()
    policy = PolicyModel(model, value_head=True, min_shared=1.0)  # no prefix tree / packing: compaction alone
    torch.nn.init.normal_(policy.value_head.summary.weight, std=0.1)  # it starts at zero: make values informative
    batch = collate(examples(tok, False), tok.pad_token_id, False)
    real = batch["attention_mask"].bool()
    assert int(real.sum(-1).max()) < real.shape[1]  # the layout really wastes columns here
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    compact, g_compact = outputs_and_grads(policy, batch)
    padded, g_padded = outputs_and_grads(policy, batch, position_ids=position_ids)
    assert set(compact) == set(padded) == {"logps", "mask", "entropy", "values"}
    assert torch.equal(compact["mask"], padded["mask"])
    for k in ("logps", "entropy", "values"):
        assert compact[k].shape == batch["labels"].shape
        torch.testing.assert_close(compact[k], padded[k], atol=1e-5, rtol=0)
    assert g_compact.keys() == g_padded.keys() and len(g_compact) > 0
    for n in g_compact:
        torch.testing.assert_close(g_compact[n], g_padded[n], atol=1e-4, rtol=1e-4)


@pytest.mark.unit
@pytest.mark.parametrize("layout", ["shared_prompts", "packed"])
@pytest.mark.parametrize("kind", ["tiny_gpt2", "tiny_llama"])
def test_shared_prompt_forward_equals_padded_forward(kind, layout, request):
    """Rows with the same prompt (DPO's chosen/rejected, a GRPO group) go through one prefix-tree
    forward, and rows of different lengths are packed side by side into tree rows; outputs and
    gradients must equal the plain padded forward's."""
    from rlhfkit.policy import prefix_sharing_supported

    model, tok = load(request.getfixturevalue(kind))
    model.train()
    assert prefix_sharing_supported(model)
    policy = PolicyModel(model, value_head=True)
    torch.nn.init.normal_(policy.value_head.summary.weight, std=0.1)
    exs = examples(tok, False)
    c = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in (" a dog", " two cats and a bird")]
    rows = exs + [Example(exs[0].prompt_ids, c[0]), Example(exs[0].prompt_ids, c[1]), Example(exs[2].prompt_ids, c[0])]
    if layout == "packed":  # no two rows share a prompt; short rows beside long ones
        rows = [Example(tok(p, add_special_tokens=False)["input_ids"], c[i % 2]) for i, p in
                enumerate(["Hi", "A much longer prompt about the weather in the north today", "Two words", "Ok"])]
        policy.min_shared = 0.25
    batch = collate(rows, tok.pad_token_id, False)
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)

    calls = []
    original = policy._shared_prompts
    policy._shared_prompts = lambda *a: calls.append(1) or original(*a)
    shared, g_shared = outputs_and_grads(policy, batch)
    assert calls and original(batch["input_ids"], batch["labels"], batch["attention_mask"].bool(), False) is not None
    padded, g_padded = outputs_and_grads(policy, batch, position_ids=position_ids)
    assert torch.equal(shared["mask"], padded["mask"])
    for k in ("logps", "entropy", "values"):
        torch.testing.assert_close(shared[k], padded[k], atol=1e-5, rtol=0)
    assert g_shared.keys() == g_padded.keys() and len(g_shared) > 0
    for n in g_shared:
        torch.testing.assert_close(g_shared[n], g_padded[n], atol=1e-4, rtol=1e-4)


@pytest.mark.unit
def test_prefix_tree_layout_by_hand():
    from rlhfkit.policy import prefix_tree

    tree = prefix_tree([[1, 2, 3, 4], [1, 2, 5], [7, 8, 9]], [2, 2, 1], min_shared=0.0)
    assert tree.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert tree.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    assert tree.segments.tolist() == [[0, 0, 1, 1, 2], [0, 0, 0, -1, -1]]
    assert tree.where == [[0, 1, 2, 3], [0, 1, 4], [5, 6, 7]]
    m = tree.attention_mask(boolean=True, dtype=torch.float32)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                      [1, 1, 0, 0, 1]]  # token 5 sees the prompt and itself, not 3 and 4
    assert m[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding sees itself only (no empty softmax row)
    add = tree.attention_mask(boolean=False, dtype=torch.float32)
    assert add[0, 0, 4].tolist()[:2] == [0.0, 0.0] and add[0, 0, 4, 2] == torch.finfo(torch.float32).min
    assert tree.groups.tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, -1, -1]]
    # 2 tree rows x 5 slots instead of 3 rows x 4: 17% saved, below a 30% threshold
    assert prefix_tree([[1, 2, 3, 4], [1, 2, 5], [7, 8, 9]], [2, 2, 1], min_shared=0.3) is None
    # 8 long completions of one short prompt: one row of 2 + 8 x 10 tokens has 82^2 > 4 x 8 x 12^2 attention
    many = [[1, 2] + [10 + k] * 10 for k in range(8)]
    assert prefix_tree(many, [2] * 8, min_shared=0.0) is None
    assert prefix_tree(many[:2], [2] * 2, min_shared=0.0) is not None  # 22^2 <= 4 x 2 x 12^2


@pytest.mark.unit
def test_prefix_tree_packs_rows_without_a_shared_prompt_by_hand():
    from rlhfkit.policy import prefix_tree

    # longest first into rows of the longest length (3): [1 2 3] alone, then [4 5] and [6] together
    tree = prefix_tree([[6], [1, 2, 3], [4, 5]], [0, 0, 0], min_shared=0.3)  # 6 slots instead of 9
    assert tree.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert tree.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert tree.groups.tolist() == [[0, 0, 0], [0, 0, 1]]
    assert tree.where == [[5], [0, 1, 2], [3, 4]]
    m = tree.attention_mask(boolean=True, dtype=torch.float32)
    assert m[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # 6 sees neither 4 nor 5
    assert prefix_tree([[6], [1, 2, 3], [4, 5]], [0, 0, 0], min_shared=0.4) is None  # 33% saved < 40%


@pytest.mark.unit
def test_policy_entropy_equals_full_softmax_entropy(tiny_llama):
    model, tok = load(tiny_llama)
    batch = collate(examples(tok, False), tok.pad_token_id, False)
    with torch.no_grad():
        out = PolicyModel(model, chunk_tokens=5)(**batch, with_entropy=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits[:, :-1], -1)  # (B, T-1, V) predicts tokens 1..T-1
    ent = -(logp.exp() * logp).sum(-1)
    m = out["mask"][:, 1:]
    torch.testing.assert_close(out["entropy"][:, 1:][m], ent[m], atol=1e-5, rtol=0)
    assert torch.all(out["entropy"][~out["mask"]] == 0)


@pytest.mark.unit
def test_token_logprobs_chunked_equals_full_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 17, generator=g) * 3  # (N, V)
    targets = torch.randint(0, 17, (11,), generator=g)
    full = torch.log_softmax(logits, -1)
    expected = full.gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 3, 11, 2048):
        lp, ent = token_logprobs(logits, targets, chunk=chunk, with_entropy=True)
        torch.testing.assert_close(lp, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), atol=1e-5, rtol=0)
    lp, ent = token_logprobs(logits, targets, chunk=4)
    assert ent is None and lp.shape == (11,)
    empty, e_ent = token_logprobs(logits[:0], targets[:0], with_entropy=True)
    assert empty.shape == (0,) and e_ent.shape == (0,)
    # a hand-worked row: logits [0, ln 3] -> p = [1/4, 3/4]
    lp, _ = token_logprobs(torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]]), torch.tensor([1]))
    assert abs(float(lp) - float(torch.log(torch.tensor(0.75)))) < 1e-6


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["tiny_gpt2", "tiny_llama"])
def test_policy_logprobs_with_lora_use_the_adapters(kind, request):
    model, tok = load(request.getfixturevalue(kind))
    lm = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.0))
    randomize_lora(lm)
    lm.eval()
    exs = examples(tok, False)
    batch = collate(exs, tok.pad_token_id, False)
    with torch.no_grad():
        out = PolicyModel(lm)(**batch)
        with lm.disable_adapter():
            base = PolicyModel(lm)(**batch)
    P = batch["input_ids"].shape[1] - max(len(e.completion_ids) for e in exs)
    for i, e in enumerate(exs):
        n = len(e.completion_ids)
        torch.testing.assert_close(out["logps"][i, P: P + n], reference_logps(lm, e, False), atol=1e-5, rtol=0)
    assert (out["logps"] - base["logps"]).abs().max() > 1e-3  # the adapters change the result


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def lora_module_names(model) -> set[str]:
    return {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


@pytest.mark.unit
@pytest.mark.parametrize("kind", KINDS)
def test_apply_lora_auto_targets_and_trainable_params(kind, request):
    model, _ = load(request.getfixturevalue(kind))
    n_total = sum(p.numel() for p in model.parameters())
    lm = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    assert lora_module_names(lm) == AUTO_TARGETS[kind]
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    n_modules = sum(1 for _, m in lm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    # 2 layers; T5: encoder self-attention + decoder self- and cross-attention, q and v each
    expected_modules = {"tiny_gpt2": 2, "tiny_llama": 2 * 2, "tiny_t5": 2 * 2 + 2 * 2 * 2}[kind]
    assert n_modules == expected_modules, n_modules
    assert len(trainable) == 2 * n_modules  # one A and one B each
    assert sum(p.numel() for p in lm.parameters() if not p.requires_grad) == n_total


@pytest.mark.unit
def test_apply_lora_explicit_and_all_linear_targets(tiny_llama):
    model, _ = load(tiny_llama)
    assert lora_module_names(apply_lora(model, LoraConfig(enabled=True, target_modules=["k_proj", "o_proj"]))) == {
        "k_proj", "o_proj"}
    model, _ = load(tiny_llama)
    names = lora_module_names(apply_lora(model, LoraConfig(enabled=True, target_modules=["all-linear"])))
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


@pytest.mark.unit
def test_load_policy_with_lora_sets_pad_and_adapters(tiny_gpt2):
    model, tok = load_policy(ModelConfig(name_or_path=tiny_gpt2), LoraConfig(enabled=True), CPU)
    assert hasattr(model, "peft_config") and lora_module_names(model) == {"c_attn"}
    assert unwrap(model).config.pad_token_id == tok.pad_token_id == 0


# ---------------------------------------------------------------------------------------------
# save and reload
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("kind", KINDS)
def test_full_model_save_and_reload_identical(kind, request, tmp_path):
    model, tok = load(request.getfixturevalue(kind))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # differ from the fixture, so reloading the fixture instead would fail
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    batch = collate(examples(tok, kind == "tiny_t5"), tok.pad_token_id, kind == "tiny_t5")
    before = lm_logits(model, batch)
    save_pretrained(model, tok, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    reloaded, tok2 = load(str(tmp_path / "out"))
    assert torch.equal(lm_logits(reloaded, batch), before)
    assert tok2("the cat sees")["input_ids"] == tok("the cat sees")["input_ids"]
    original, _ = load(request.getfixturevalue(kind))
    assert not torch.equal(lm_logits(original, batch), before)


@pytest.mark.unit
@pytest.mark.parametrize("kind", KINDS)
def test_lora_save_is_adapter_only_and_reloads_identical(kind, request, tmp_path):
    path = request.getfixturevalue(kind)
    seq2seq = kind == "tiny_t5"
    model, tok = load(path)
    lm = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.0))
    randomize_lora(lm)
    lm.eval()
    batch = collate(examples(tok, seq2seq), tok.pad_token_id, seq2seq)
    before = lm_logits(lm, batch)
    out = tmp_path / "adapter"
    save_pretrained(lm, tok, out, merge=True)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= files
    assert "model.safetensors" not in files and not any(f.endswith((".bin", ".pt")) for f in files)
    n_adapter = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    assert (out / "adapter_model.safetensors").stat().st_size < 4 * n_adapter + 10_000  # no base weights in it
    # merged/: a full model with the adapter folded in
    assert {"config.json", "model.safetensors"} <= {p.name for p in (out / "merged").iterdir()}
    merged, _ = load(str(out / "merged"))
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(lm_logits(merged, batch), before, atol=1e-5, rtol=0)
    # reload: fresh base + adapter folder gives the saved model's logits
    base, _ = load(path)
    assert (lm_logits(base, batch) - before).abs().max() > 1e-3  # the adapter matters
    reloaded = apply_lora(base, LoraConfig(enabled=True, adapter_path=str(out))).eval()
    after = lm_logits(reloaded, batch)
    assert torch.equal(after, before) or (after - before).abs().max() < 1e-6
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)  # resumable training


@pytest.mark.unit
def test_lora_save_without_merge_has_no_merged_folder(tiny_gpt2, tmp_path):
    model, tok = load(tiny_gpt2)
    lm = apply_lora(model, LoraConfig(enabled=True))
    save_pretrained(lm, None, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "a" / "merged").exists() and not (tmp_path / "a" / "model.safetensors").exists()


@pytest.mark.unit
def test_value_head_saved_and_reloaded(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    policy = PolicyModel(model, value_head=True)
    batch = collate(examples(tok, False), tok.pad_token_id, False)
    with torch.no_grad():
        assert torch.all(policy(**batch)["values"] == 0)  # a new head predicts V = 0 everywhere
        torch.nn.init.normal_(policy.value_head.summary.weight, std=0.1)  # as if trained
        values = policy(**batch)["values"]
    mask = policy(**batch)["mask"]
    assert values.shape == batch["labels"].shape and torch.all(values[~mask] == 0) and torch.all(values[mask] != 0)
    save_pretrained(policy, tok, tmp_path / "v")
    assert (tmp_path / "v" / "value_head.safetensors").is_file()
    m2, _ = load(str(tmp_path / "v"))
    p2 = PolicyModel(m2, value_head=True)  # a new (zero) head, replaced by the saved one
    load_value_head(p2, tmp_path / "v")
    with torch.no_grad():
        assert torch.equal(p2(**batch)["values"], values)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_missing_model_folder_is_a_user_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(UserError, match="no_such_model"):
        load_model(ModelConfig(name_or_path=missing), CPU)
    with pytest.raises(UserError, match="no_such_model: model folder not found"):
        load_tokenizer(ModelConfig(name_or_path=missing))
    with pytest.raises(UserError, match="no_such_org/no_such_model"):  # a hub name, offline
        load_model(ModelConfig(name_or_path="no_such_org/no_such_model"), CPU)


@pytest.mark.unit
def test_adapter_path_without_adapter_is_a_user_error(tiny_gpt2, tmp_path):
    model, _ = load(tiny_gpt2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        apply_lora(model, LoraConfig(enabled=True, adapter_path=str(tmp_path / "empty")))


@pytest.mark.unit
@pytest.mark.parametrize("kind", KINDS)
def test_every_layout_equals_the_plain_forward(kind, request):
    """plain_forward (one transformers forward, full log-softmax) is the reference: each layout of
    forward gives its outputs and its gradients (value head included)."""
    model, tok = load(request.getfixturevalue(kind))
    model.train()
    seq2seq = kind == "tiny_t5"
    policy = PolicyModel(model, value_head=True)
    torch.nn.init.normal_(policy.value_head.summary.weight, std=0.1)  # it starts at zero: make values informative
    exs = examples(tok, seq2seq)
    c = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in (" a dog", " two cats and a bird")]
    rows = exs + [Example(exs[0].prompt_ids, c[0]), Example(exs[0].prompt_ids, c[1])]  # a shared prompt
    batch = collate(rows, tok.pad_token_id, seq2seq)

    def run(fn, **kw):
        policy.zero_grad(set_to_none=True)
        out = fn(**batch, with_entropy=True, **kw)
        ((out["logps"] * out["mask"]).sum() + out["values"].sum() + out["entropy"].sum()).backward()
        return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in policy.named_parameters()
                                                        if p.grad is not None}

    plain, g_plain = run(policy.plain_forward)
    assert int(plain["mask"].sum()) == sum(len(e.completion_ids) for e in rows)
    layouts = ["padded"] if seq2seq else ["padded", "compact", "prefix"]
    assert policy.choose_layout(batch["labels"], batch["attention_mask"]) == ("padded" if seq2seq else "prefix")
    for layout in layouts:
        out, grads = run(policy, layout=layout)
        assert torch.equal(out["mask"], plain["mask"]), layout
        for k in ("logps", "entropy", "values"):
            torch.testing.assert_close(out[k], plain[k], atol=2e-5, rtol=0, msg=f"{layout} {k}")
        assert grads.keys() == g_plain.keys() and len(grads) > 0
        for n in grads:
            torch.testing.assert_close(grads[n], g_plain[n], atol=1e-4, rtol=1e-3, msg=f"{layout} {n}")
    assert policy._layouts_seen == set(layouts)  # each logged once when first used


@pytest.mark.unit
def test_prefix_sharing_probe_raises_instead_of_answering_no(tiny_llama, monkeypatch):
    from rlhfkit import policy as M

    model, _ = load(tiny_llama)
    monkeypatch.setattr(M, "_PREFIX_SUPPORT", {})

    def broken(*a, **k):
        raise TypeError("4D masks are not supported")

    monkeypatch.setattr(M, "prefix_tree_states", broken)
    with pytest.raises(TypeError, match="4D masks"):
        M.prefix_sharing_supported(model)
