"""Rollout: generation (transformers ``generate`` with the KV cache) and no-grad scoring passes.

Causal prompts are left-padded so every response starts at the same column; responses are cut
after their first EOS. Rows that repeat a prompt (several samples per prompt) share one prefill.
``GenerationConfig.output_length_range`` draws ``max_new_tokens`` per batch (trlX's LengthSampler).
The vLLM backend (``generation.backend=vllm``) is an optional GPU extra.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from rlhfkit.config import GenerationConfig, UserError
from rlhfkit.data import Example, collate
from rlhfkit.models import PolicyModel, cache_kwarg, left_pad_positions, unwrap


def generation_kwargs(gen: GenerationConfig, tokenizer, max_new_tokens: Optional[int] = None) -> dict:
    kw = dict(max_new_tokens=max_new_tokens or gen.max_new_tokens, min_new_tokens=gen.min_new_tokens or None,
              do_sample=gen.do_sample, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
              repetition_penalty=gen.repetition_penalty)
    if gen.do_sample:
        kw.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


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
    and bf16/fp16 bases (whose rounding would drift), pass through unchanged."""
    lm = _lm(model)
    peft_configs = getattr(lm, "peft_config", None)
    mergeable = (hasattr(lm, "merge_adapter") and isinstance(peft_configs, dict) and peft_configs
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


@torch.inference_mode()
def generate_ids(model: nn.Module, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
                 max_new_tokens: Optional[int] = None) -> list[list[int]]:
    """Response token ids for each prompt (cut after the first EOS, which is kept).

    Runs under ``torch.inference_mode`` (less per-op bookkeeping than ``no_grad``: ~8% faster
    decoding of a small model on a CPU); only Python lists leave it."""
    if gen.backend == "vllm":
        raise UserError("generation.backend=vllm needs the 'gpu' extra and a CUDA device; use backend=hf here")
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
    if cache is not None and isinstance(hf, PreTrainedModel):  # not a wrapper with its own generate (ILQL's)
        prefill_shared_prompts(lm, cache, prompt_ids, inputs)
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


def generate(model: nn.Module, tokenizer, prompts: list[str], gen: GenerationConfig, progress: bool = False,
             seed: Optional[int] = None, desc: str = "generate", return_ids: bool = False):
    """Completions (text, special tokens removed) for ``prompts``, ``gen.batch_size`` at a time.

    With ``return_ids`` also the sampled token ids of each completion (cut after EOS): what a
    log-prob computation must score, since decoding and re-encoding can change the tokens."""
    from rlhfkit.data import encode_prompt

    hf = unwrap(_lm(model))
    seq2seq = bool(getattr(hf.config, "is_encoder_decoder", False))
    if seed is not None:
        torch.manual_seed(seed)
    rng = random.Random(seed)
    ids = [encode_prompt(tokenizer, p, seq2seq) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    responses: list[list[int]] = [[] for _ in ids]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc=desc, unit="prompt", dynamic_ncols=True)
    for s in range(0, len(order), gen.batch_size):
        chunk = order[s: s + gen.batch_size]
        for i, r in zip(chunk, generate_ids(model, tokenizer, [ids[i] for i in chunk], gen,
                                            sample_max_new_tokens(gen, rng))):
            responses[i] = r
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return (texts, responses) if return_ids else texts


@dataclass
class Scored:
    """No-grad pass over a batch: per-token log-probs (B, T) aligned with labels, and mask."""

    logps: torch.Tensor
    mask: torch.Tensor
    values: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None


@torch.no_grad()
def score(policy: PolicyModel, batch: dict, with_entropy: bool = False) -> Scored:
    was = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    out = policy(**{k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}, with_entropy=with_entropy)
    policy.train(was)
    return Scored(out["logps"], out["mask"], out.get("values"), out.get("entropy"))


@dataclass
class Experience:
    """One batch of sampled responses, ready to score and train on.

    ``batch`` uses the shared training layout (see ``rlhfkit.data.collate``): for causal
    models ``input_ids`` = left-padded prompt + right-padded response and ``labels`` marks the
    response tokens; for seq2seq the encoder gets the prompt and ``labels`` the response.
    """

    prompts: list[str]
    completions: list[str]
    batch: dict
    response_lengths: list[int]
    truncated: list[bool]


def rollout(model: nn.Module, tokenizer, prompts: list[str], prompt_ids: list[list[int]], gen: GenerationConfig,
            max_new_tokens: Optional[int] = None) -> Experience:
    """Sample one response per prompt (repeat prompts for groups) and build the training batch.

    Prompts go to ``generate`` ``gen.batch_size`` at a time, prompts of similar length together (the
    prefill then spends little on left padding); the batch is collated once, in the given order."""
    responses: list[list[int]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    with lora_merged(model):
        for s in range(0, len(order), gen.batch_size):
            chunk = order[s: s + gen.batch_size]
            for i, r in zip(chunk, generate_ids(model, tokenizer, [prompt_ids[i] for i in chunk], gen, max_new_tokens)):
                responses[i] = r
    eos = tokenizer.eos_token_id
    responses = [r if r else [eos] for r in responses]
    seq2seq = bool(getattr(unwrap(_lm(model)).config, "is_encoder_decoder", False))
    batch = collate([Example(p, r) for p, r in zip(prompt_ids, responses)], tokenizer.pad_token_id, seq2seq)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return Experience(list(prompts), texts, batch, [len(r) for r in responses], [r[-1] != eos for r in responses])
