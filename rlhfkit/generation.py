"""Generation: sampling token ids from a policy with transformers ``generate`` (the rollouts of the
online recipes, ``eval``, ``prefs``, the labelling app), or from ``generation.backend`` ``vllm``
(token ids from a colocated engine) and ``openai`` (text from an endpoint).

One entry point, ``generate_ids``, takes token-id prompts; ``generate`` takes text and batches it.
What makes the transformers path fast on a CPU, each equal in output to plain ``generate``:

* ``NucleusSampler``: temperature / top-k / top-p sampling over the nucleus only (no sort of the
  whole vocabulary at every step);
* ``growing_cache``: a KV cache that writes into preallocated buffers instead of concatenating;
* ``prefill_shared_prompts``: rows that repeat a prompt share one prefill;
* ``lora_merged``: a LoRA policy decodes with its adapters merged into the base weights.

Causal prompts are left-padded so every response starts at the same column; responses are cut
after their first EOS. ``GenerationConfig.output_length_range`` draws ``max_new_tokens`` per batch
(trlX's LengthSampler).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from rlhfkit.config import GenerationConfig, UserError
from rlhfkit.data import Example, collate
from rlhfkit.models import cache_kwarg, left_pad_positions, unwrap
from rlhfkit.policy import PolicyModel


def generation_kwargs(gen: GenerationConfig, tokenizer, max_new_tokens: Optional[int] = None) -> dict:
    """``generate`` keyword arguments for ``gen``. Sampling runs in ``NucleusSampler`` at the end of
    transformers' logits-processor chain (after its repetition penalty and minimum length), and
    transformers' own step is greedy: it takes the one token the sampler left."""
    kw = dict(max_new_tokens=max_new_tokens or gen.max_new_tokens, min_new_tokens=gen.min_new_tokens or None,
              do_sample=False, temperature=None, top_k=None, top_p=None, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, repetition_penalty=gen.repetition_penalty)
    if gen.do_sample:
        kw["logits_processor"] = LogitsProcessorList([NucleusSampler(gen.temperature, gen.top_k, gen.top_p)])
    return kw


class NucleusSampler(LogitsProcessor):
    """A transformers logits processor that draws the next token with temperature, top-k and top-p
    (nucleus) sampling and returns scores that are -inf everywhere but the drawn token, so a greedy
    ``generate`` step emits it.

    The distribution is transformers' own (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
    ``TopPLogitsWarper`` in that order, at least one token kept): the nucleus is the smallest set of
    most likely tokens whose probability reaches ``top_p``. What differs is the cost. transformers'
    top-p sorts the whole vocabulary at every step and ``torch.multinomial`` draws one exponential
    per vocabulary entry; here ``topk`` is grown (64, 256, ... tokens) until it holds every row's
    nucleus, and the draw (the exponential race: argmax of p / Exp(1), as ``torch.multinomial``
    does for one sample) runs over those tokens only. With SmolLM2's 49,152-token vocabulary on a
    CPU, 60 rows x 48 tokens take 37.2 s that way and 27.7 s this way (``benchmarks/sampling.py``).
    The draws use torch's global generator, so a seeded ``generate`` is reproducible, but its
    samples are not transformers' samples."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) scores -> the distribution drawn from: (B, K) log-probabilities of each row's K best
        tokens (-inf outside its nucleus; renormalised over it) and their (B, K) token ids. K is the
        smallest tried that holds every row's nucleus (the top-k, or the whole vocabulary)."""
        x = scores.float() / self.temperature  # (B, V)
        V = x.shape[-1]
        if 0 < self.top_k < V:  # top-k first: the nucleus is measured within the top k (as transformers does)
            x, ids = x.topk(self.top_k, dim=-1)  # (B, k), best first
        else:
            ids = torch.arange(V, device=x.device).expand_as(x)  # (B, V)
        logz = x.logsumexp(-1, keepdim=True)  # (B, 1)
        if self.top_p >= 1.0:
            return x - logz, ids
        k = min(64, x.shape[-1])
        while True:
            vals, idx = x.topk(k, dim=-1)  # (B, K), best first
            logp = vals - logz  # (B, K)
            p = logp.exp()  # (B, K)
            keep = p.cumsum(-1) - p < self.top_p  # (B, K): the better tokens' mass is short of top_p
            keep[:, 0] = True
            if k == x.shape[-1] or bool((~keep).any(-1).all()):  # every row's nucleus ends inside the K
                logp = logp.masked_fill(~keep, float("-inf"))
                return logp - logp.logsumexp(-1, keepdim=True), ids.gather(-1, idx)  # renormalised
            k = min(4 * k, x.shape[-1])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp, ids = self.candidates(scores)  # (B, K) each
        race = logp - torch.empty_like(logp).exponential_().log()  # (B, K): argmax draws with prob p
        token = ids.gather(-1, race.argmax(-1, keepdim=True))  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)  # (B, V)


def sample_max_new_tokens(gen: GenerationConfig, rng: random.Random) -> int:
    if gen.output_length_range:
        lo, hi = gen.output_length_range
        return rng.randint(lo, hi)
    return gen.max_new_tokens


def _lm(model: nn.Module) -> nn.Module:
    """The generating module: a peft model stays wrapped (its adapters must be active)."""
    while isinstance(model, PolicyModel) or (hasattr(model, "module") and isinstance(model.module, nn.Module)):
        model = model.lm if isinstance(model, PolicyModel) else model.module
    return model


@contextmanager
def lora_merged(model: nn.Module):
    """Inside the block a LoRA policy's adapters are merged into its float32 base weights (W + s B A),
    so generation runs plain linear layers instead of base + adapter per layer (~20% faster decoding
    of SmolLM2 + LoRA r16 on a CPU); they are unmerged on the way out. The merged weights give the
    same function up to float rounding; the unmerge restores the base to within float32 rounding
    (about 1e-7 relative per merge), so an adapter-disabled reference stays the base. Other models,
    bf16/fp16 bases (whose rounding would drift) and FSDP2-sharded ones pass through unchanged."""
    from rlhfkit.distributed import is_sharded

    lm = _lm(model)
    peft_configs = getattr(lm, "peft_config", None)
    mergeable = (hasattr(lm, "merge_adapter") and isinstance(peft_configs, dict) and peft_configs
                 and not is_sharded(lm)  # FSDP2 shards (train.strategy=fsdp): no in-place merge
                 and all(type(c).__name__ == "LoraConfig" for c in peft_configs.values())
                 and not any(getattr(m, "_disable_adapters", False) or getattr(m, "merged", False)
                             for m in lm.modules())  # inside disable_adapter(), or merged already
                 and all(p.dtype == torch.float32 for n, p in lm.named_parameters() if "lora_" not in n))
    if not mergeable:
        yield
        return
    with torch.no_grad():
        lm.merge_adapter()
    try:
        yield
    finally:
        with torch.no_grad():
            lm.unmerge_adapter()


def growing_cache(hf: nn.Module, reserve: int):
    """A KV cache for ``generate`` that writes each step's keys and values into preallocated
    buffers (``reserve`` tokens beyond the prompt, doubled if outgrown) where transformers'
    ``DynamicCache`` concatenates: ``torch.cat`` re-copies the whole cache of every layer at every
    step, which for SmolLM2 (30 layers, 32 rows, ~190 tokens) is ~280 MB of copying per decoded
    token. Attention reads a view of the filled part, so the outputs are the same. None (use the
    default) for encoder-decoders and for models with sliding-window or other non-full attention."""
    from transformers.cache_utils import Cache, DynamicLayer

    cfg = hf.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    if cfg.is_encoder_decoder or getattr(cfg, "sliding_window", None) or set(types) != {"full_attention"}:
        return None

    class GrowingLayer(DynamicLayer):
        def _regrow(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            n = keys.shape[-2]
            self._k = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])  # (B, H, capacity, D)
            self._v = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
            self._k[..., :n, :], self._v[..., :n, :] = keys, values
            self._n = n

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            L = key_states.shape[-2]
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._regrow(key_states[..., :0, :], value_states[..., :0, :], L + reserve)
            elif self.keys is not self._k_view:  # replaced (crop, beam reordering): restart from them
                self._regrow(self.keys, self.values, self.keys.shape[-2] + L + reserve)
            n = self._n
            if n + L > self._k.shape[-2]:
                self._regrow(self._k[..., :n, :], self._v[..., :n, :], 2 * (n + L))
            self._k[..., n: n + L, :], self._v[..., n: n + L, :] = key_states, value_states
            self._n = n + L
            self.keys = self._k_view = self._k[..., : self._n, :]  # (B, H, n + L, D) view
            self.values = self._v[..., : self._n, :]
            return self.keys, self.values

    return Cache(layer_class_to_replicate=GrowingLayer)


def prefill_shared_prompts(lm: nn.Module, cache, prompt_ids: list[list[int]], inputs: dict) -> None:
    """When prompts repeat in a batch (several samples per prompt: PPO's ``samples_per_prompt``,
    GRPO's groups, eval's ``samples_per_prompt``), run the prefill once per distinct prompt and copy
    its keys and values to the repeats: ``generate`` then only feeds each row's last prompt token.
    ``generate`` itself prefills every row, so 4 samples per prompt cost 4 prefills. The logits
    are the same up to float rounding and the sampling draws the same random numbers. Nothing is
    done when every prompt is distinct. ``generate_ids`` calls it only with the growing cache
    (full-attention decoders) and a transformers model under ``lm``, not ILQL's shifted decoder."""
    slot: dict[tuple, int] = {}
    rows = [slot.setdefault(tuple(p), len(slot)) for p in prompt_ids]  # each row's distinct prompt
    if len(slot) == len(prompt_ids) or inputs["input_ids"].shape[1] < 2:
        return
    device = inputs["input_ids"].device
    first = torch.tensor([rows.index(u) for u in range(len(slot))], device=device)  # (U,) a row of each
    ids = inputs["input_ids"][first, :-1]  # (U, P - 1) all but the last prompt token
    mask = inputs["attention_mask"][first, :-1]  # (U, P - 1)
    position_ids = left_pad_positions(mask)  # (U, P - 1)
    lm(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
       **{cache_kwarg(lm): cache})
    cache.batch_select_indices(torch.tensor(rows, device=device))  # (U, ...) -> (B, ...)


def generate_ids(model: nn.Module, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
                 max_new_tokens: Optional[int] = None) -> list[list[int]]:
    """Response token ids for each prompt (cut after the first EOS, which is kept).

    Runs under ``torch.inference_mode`` (less per-op bookkeeping than ``no_grad``: ~8% faster
    decoding of a small model on a CPU); only Python lists leave it. A model sharded by FSDP2
    (``train.strategy=fsdp``; its root's own weights gathered by ``distributed.unsharded``)
    generates under ``no_grad`` (FSDP2 keeps the gathered-weight buffers it allocates, which must
    not be inference tensors) with ``synced_gpus``: every block's forward is a collective, so each
    process runs forwards until every process's rows are done."""
    from rlhfkit.distributed import is_sharded

    if gen.backend != "hf":
        return backend_sample(model, tokenizer, prompt_ids, gen, max_new_tokens).token_ids
    sharded = is_sharded(_lm(model))
    with torch.no_grad() if sharded else torch.inference_mode():
        return _generate_ids(model, tokenizer, prompt_ids, gen, max_new_tokens, sharded)


def _generate_ids(model: nn.Module, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
                  max_new_tokens: Optional[int], sharded: bool) -> list[list[int]]:
    lm = _lm(model)
    hf = unwrap(lm)
    seq2seq = bool(getattr(hf.config, "is_encoder_decoder", False))
    device = next(hf.parameters()).device
    batch = collate([Example(p, []) for p in prompt_ids], tokenizer.pad_token_id, seq2seq)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    was_training = lm.training
    lm.eval()
    kwargs = generation_kwargs(gen, tokenizer, max_new_tokens)
    cache = growing_cache(hf, kwargs["max_new_tokens"])
    if cache is not None and isinstance(hf, PreTrainedModel) and not sharded:  # not ILQL's wrapper; under FSDP2
        prefill_shared_prompts(lm, cache, prompt_ids, inputs)  # every process must run the same forwards
    if sharded:
        kwargs["synced_gpus"] = True
    out = lm.generate(**inputs, **kwargs, **({cache_kwarg(hf): cache} if cache is not None else {}))
    lm.train(was_training)
    start = 1 if seq2seq else inputs["input_ids"].shape[1]  # seq2seq output starts with decoder_start
    responses = []
    eos = tokenizer.eos_token_id
    for row in out[:, start:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        else:
            while row and row[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id != eos:
                row.pop()
        responses.append(row)
    return responses


def backend_sample(model: nn.Module, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
                   max_new_tokens: Optional[int] = None):
    """Token ids (and the engine's log-probs) from ``generation.backend: vllm`` for all prompts at
    once (the engine batches them itself); ``backends.vllm.Sampled``."""
    if gen.backend != "vllm":
        raise UserError(f"generation.backend={gen.backend} returns text, not token ids; use backend hf or vllm here")
    from rlhfkit.backends import vllm

    return vllm.generate_ids(unwrap(_lm(model)), tokenizer, prompt_ids, gen, max_new_tokens or gen.max_new_tokens)


def generate(model: nn.Module, tokenizer, prompts: list[str], gen: GenerationConfig, progress: bool = False,
             seed: Optional[int] = None, desc: str = "generate", return_ids: bool = False):
    """Completions (text, special tokens removed) for ``prompts``, ``gen.batch_size`` at a time.

    With ``return_ids`` also the sampled token ids of each completion (cut after EOS): what a
    log-prob computation must score, since decoding and re-encoding can change the tokens."""
    from rlhfkit.data import encode_prompt

    if seed is not None:
        torch.manual_seed(seed)
    rng = random.Random(seed)
    if gen.backend == "openai":  # text in, text out; ids re-encoded with the local tokenizer
        from rlhfkit.backends.openai import complete

        texts = complete(prompts, gen, sample_max_new_tokens(gen, rng), progress=progress, desc=desc)
        if not return_ids:
            return texts
        return texts, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    hf = unwrap(_lm(model))
    seq2seq = bool(getattr(hf.config, "is_encoder_decoder", False))
    ids = [encode_prompt(tokenizer, p, seq2seq) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    responses: list[list[int]] = [[] for _ in ids]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc=desc, unit="prompt", dynamic_ncols=True)
    step = gen.batch_size if gen.backend == "hf" else len(order)  # vLLM batches by itself
    for s in range(0, len(order), step):
        chunk = order[s: s + step]
        for i, r in zip(chunk, generate_ids(model, tokenizer, [ids[i] for i in chunk], gen,
                                            sample_max_new_tokens(gen, rng))):
            responses[i] = r
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return (texts, responses) if return_ids else texts
