"""rlhfkit.rollout.rollout: generation in length-sorted chunks, results in the caller's order."""
import pytest
import torch

from rlhfkit.config import GenerationConfig, ModelConfig
from rlhfkit.models import cache_kwarg, load_policy
from rlhfkit import rollout as R


@pytest.mark.unit
def test_rollout_generates_in_length_sorted_chunks_and_keeps_the_prompt_order(tiny_llama, monkeypatch):
    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    model.eval()
    texts = ["a b c d e f g h", "a", "a b c d", "a b"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    gen = GenerationConfig(do_sample=False, max_new_tokens=5, batch_size=2)
    alone = [R.generate_ids(model, tok, [p], gen)[0] for p in ids]  # each prompt by itself, no padding

    chunks = []
    original = R.generate_ids
    monkeypatch.setattr(R, "generate_ids", lambda m, t, p, *a, **k: chunks.append([len(x) for x in p]) or original(m, t, p, *a, **k))
    exp = R.rollout(model, tok, texts, ids, gen)
    # the two shortest prompts together, then the two longest: not the given order's (8, 1) and (4, 2)
    assert chunks == [sorted(len(p) for p in ids)[:2], sorted(len(p) for p in ids)[2:]]
    assert exp.prompts == texts
    assert exp.response_lengths == [len(r) for r in alone]
    assert exp.completions == [tok.decode(r, skip_special_tokens=True).strip() for r in alone]
    for i, (p, r) in enumerate(zip(ids, alone)):  # row i of the training batch is prompt i + its response
        row = exp.batch["input_ids"][i][exp.batch["attention_mask"][i].bool()].tolist()
        assert row == p + r


@pytest.mark.unit
def test_rollout_merges_lora_for_generation_and_restores_the_base(tiny_llama):
    from rlhfkit.config import LoraConfig

    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)  # a trained-looking adapter: it changes the outputs
    model.eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    texts = ["a b c d", "a", "a b"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    gen = GenerationConfig(do_sample=False, max_new_tokens=6, batch_size=3)
    unmerged = R.generate_ids(model, tok, ids, gen)  # adapters applied layer by layer
    with model.disable_adapter():
        plain = R.generate_ids(model, tok, ids, gen)
    assert unmerged != plain  # the adapter matters, so the comparison below means something

    calls = []
    original = R.generate_ids
    R.generate_ids = lambda m, *a, **k: calls.append(any(getattr(x, "merged", False) for x in m.modules())) or original(m, *a, **k)
    try:
        exp = R.rollout(model, tok, texts, ids, gen)
    finally:
        R.generate_ids = original
    assert calls == [True]  # generated with the adapter merged into the base
    assert exp.completions == [tok.decode(r, skip_special_tokens=True).strip() for r in unmerged]
    assert not any(getattr(x, "merged", False) for x in model.modules())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p.detach(), base[n], atol=1e-6, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("reserve", [1, 64])
def test_growing_cache_generates_what_the_dynamic_cache_does(fixture, reserve, request):
    """Left-padded prompts, sampled and greedy: the same tokens and logits as transformers' default
    cache, whether the buffers were big enough (reserve 64) or had to double (reserve 1)."""
    model, tok = load_policy(ModelConfig(name_or_path=request.getfixturevalue(fixture)))
    model.eval()
    batch = tok(["a b c d e f g h", "a", "a b c"], return_tensors="pt", padding=True, add_special_tokens=False)
    for do_sample in (False, True):
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=do_sample, top_k=0, pad_token_id=tok.pad_token_id,
                  output_logits=True, return_dict_in_generate=True)
        outs = []
        for cache in (None, R.growing_cache(model, reserve)):
            torch.manual_seed(0)
            with torch.inference_mode():
                outs.append(model.generate(**batch, **kw, **({cache_kwarg(model): cache} if cache is not None else {})))
            if cache is not None:
                grown = cache.layers[0]._k.shape[-2]
                assert grown >= batch["input_ids"].shape[1] + 12 and (reserve == 64 or grown > batch["input_ids"].shape[1] + 1)
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        torch.testing.assert_close(torch.stack(outs[0].logits), torch.stack(outs[1].logits), atol=1e-5, rtol=1e-5)


@pytest.mark.unit
def test_growing_cache_only_for_full_attention_decoders(tiny_t5, tiny_llama):
    from transformers import AutoConfig, AutoModelForCausalLM

    t5, _ = load_policy(ModelConfig(name_or_path=tiny_t5))
    assert R.growing_cache(t5, 8) is None
    cfg = AutoConfig.from_pretrained(tiny_llama)
    assert R.growing_cache(AutoModelForCausalLM.from_config(cfg), 8) is not None
    cfg.sliding_window = 4
    assert R.growing_cache(AutoModelForCausalLM.from_config(cfg), 8) is None


@pytest.mark.unit
def test_generate_ids_runs_generate_under_inference_mode(tiny_llama, monkeypatch):
    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    seen = []
    original = type(model).generate
    monkeypatch.setattr(type(model), "generate",
                        lambda self, *a, **k: seen.append(torch.is_inference_mode_enabled()) or original(self, *a, **k))
    R.generate_ids(model, tok, [[5, 6, 7]], GenerationConfig(do_sample=False, max_new_tokens=2))
    assert seen == [True]


@pytest.mark.unit
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_repeated_prompts_are_prefilled_once(fixture, request, monkeypatch):
    """Rows that repeat a prompt share one prefill: the model's first forward sees each distinct
    prompt once (without its last token), and the tokens drawn, sampled or greedy, are the ones
    generate draws when it prefills every row itself."""
    model, tok = load_policy(ModelConfig(name_or_path=request.getfixturevalue(fixture)))
    model.eval()
    a, b, c = ([tok(t, add_special_tokens=False)["input_ids"] for t in ("a b c d e f g h", "a", "a b c")])
    ids = [a, b, a, c, b, a]  # 3 distinct prompts, 6 rows; b is one token: its prefill row is all padding
    width = max(map(len, ids))
    for do_sample in (True, False):
        gen = GenerationConfig(do_sample=do_sample, top_k=0, max_new_tokens=10, min_new_tokens=10)
        shapes = []
        hook = model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                               with_kwargs=True)
        torch.manual_seed(0)
        shared = R.generate_ids(model, tok, ids, gen)
        hook.remove()
        assert shapes[:2] == [(3, width - 1), (6, 1)]  # distinct prompts minus their last token; then every row's last
        assert len(shapes) == 11  # the prefill, then 10 decoding steps
        with monkeypatch.context() as mp:
            mp.setattr(R, "prefill_shared_prompts", lambda *a: None)
            torch.manual_seed(0)
            alone = R.generate_ids(model, tok, ids, gen)
        assert shared == alone
        assert shared[0] != shared[2] or not do_sample  # the repeats are separate samples


def _transformers_probs(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    return warpers(None, scores.clone()).softmax(-1)  # (B, V)


@pytest.mark.unit
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.9, 0, 0.95), (1.0, 0, 0.5), (0.7, 20, 0.9), (1.3, 0, 1.0),
                                                     (1.0, 5, 1.0)])
def test_nucleus_sampler_keeps_the_tokens_and_probabilities_transformers_warpers_keep(temperature, top_k, top_p):
    """The nucleus drawn from equals transformers' Temperature -> TopK -> TopP warpers' distribution,
    for peaked rows and for flat rows whose nucleus outgrows the first 64 candidates."""
    gen = torch.Generator().manual_seed(0)
    V = 3000
    scores = torch.randn(6, V, generator=gen) * torch.tensor([[8.0], [4.0], [2.0], [0.5], [0.05], [1.0]])  # (6, V)
    scores[5, :2] = torch.tensor([30.0, 29.0])  # one row with two tokens holding nearly all the mass
    sampler = R.NucleusSampler(temperature, top_k, top_p)
    logp, ids = sampler.candidates(scores)  # (6, K)
    ours = torch.zeros(6, V).scatter_(-1, ids, logp.exp())  # (6, V)
    torch.testing.assert_close(ours, _transformers_probs(scores, temperature, top_k, top_p), atol=1e-6, rtol=1e-4)
    if top_p < 1 and not top_k:
        assert ids.shape[1] > 64  # the flat rows made it grow past the first try


@pytest.mark.unit
def test_nucleus_sampler_draws_from_the_renormalised_nucleus_by_hand():
    """p = (0.5, 0.3, 0.15, 0.05), top_p 0.75: the mass before token 1 is 0.5 < 0.75 (kept), before
    token 2 it is 0.8 (dropped), so the draws are token 0 with 0.5 / 0.8 = 0.625 and token 1 with
    0.375. The processor returns -inf everywhere but the drawn token."""
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(20000, 4).contiguous()  # (N, 4)
    sampler = R.NucleusSampler(temperature=1.0, top_p=0.75)
    logp, ids = sampler.candidates(scores[:1])
    torch.testing.assert_close(logp.exp()[0, :2], torch.tensor([0.625, 0.375]))
    assert ids[0, :2].tolist() == [0, 1] and torch.isinf(logp[0, 2:]).all()
    torch.manual_seed(0)
    out = sampler(None, scores)  # (N, 4)
    assert bool((torch.isfinite(out).sum(-1) == 1).all()) and out.max() == 0.0
    freq = torch.bincount(out.argmax(-1), minlength=4).float() / len(out)
    assert freq[2:].sum() == 0 and abs(float(freq[0]) - 0.625) < 0.01


@pytest.mark.unit
def test_sampled_generation_is_seeded_and_greedy_generation_is_transformers_own(tiny_llama):
    model, tok = load_policy(ModelConfig(name_or_path=tiny_llama))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("a b c d", "a b")]
    sampled = GenerationConfig(do_sample=True, temperature=0.9, top_p=0.9, max_new_tokens=8, min_new_tokens=8)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(R.generate_ids(model, tok, ids, sampled))
    assert draws[0] == draws[1] and all(len(r) == 8 for r in draws[0])
    greedy = R.generate_ids(model, tok, [ids[0]], GenerationConfig(do_sample=False, max_new_tokens=6, min_new_tokens=6))
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids[0]]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                             pad_token_id=tok.pad_token_id)
    assert greedy[0] == ref[0, len(ids[0]):].tolist()


@pytest.mark.unit
def test_grouped_permutation_shuffles_whole_groups_and_is_randperm_for_single_rows():
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(3, generator=g)  # the group order the same seed gives
    got = R.grouped_permutation(6, 2, torch.Generator().manual_seed(0))
    assert got.tolist() == [r for o in order.tolist() for r in (2 * o, 2 * o + 1)]
    for group in (1, 4):  # 4 does not divide 6: rows shuffled one by one, exactly as randperm
        assert torch.equal(R.grouped_permutation(6, group, torch.Generator().manual_seed(5)),
                           torch.randperm(6, generator=torch.Generator().manual_seed(5)))


@pytest.mark.unit
def test_no_grad_pass_keeps_a_prompts_samples_in_one_chunk_and_reassembles_rows():
    """3 prompts x 2 samples, chunk 4: two calls, of 2 whole groups and then 1 (the groups in
    order of their longest row), and the outputs land back on their own rows and columns."""
    lengths = [5, 3, 2, 2, 4, 6]  # real tokens per row; rows 2k and 2k+1 share a prompt
    T = 6
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])  # (6, T) left-padded
    ids = (torch.arange(6)[:, None] * 10 + torch.arange(T)) * mask  # (6, T) distinct per row
    labels = ids.masked_fill(mask == 0, -100)
    calls = []

    def fn(sub):
        calls.append(sorted({int(r[r > 0].min()) // 10 for r in sub["input_ids"]}))
        return {"x": sub["input_ids"].float()}

    out = R.no_grad_pass(fn, {"input_ids": ids, "attention_mask": mask, "labels": labels}, 4, False, group=2)
    assert calls == [[0, 1, 2, 3], [4, 5]]  # longest rows: group 0 -> 5, group 1 -> 2, group 2 -> 6
    assert torch.equal(out["x"], ids.float())
