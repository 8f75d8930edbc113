"""Rollout: the experience core of the online recipes (PPO, GRPO, RLOO, REINFORCE++), and
generation (transformers ``generate`` with the KV cache).

``fit_prompts`` turns data rows into ``PromptItem`` s that fit the model; ``make_experience``
samples, scores and runs the no-grad passes into one typed ``Rollout`` record; the recipes only
add their advantages and loss. Generation goes through one entry point, ``generate_ids``.

Causal prompts are left-padded so every response starts at the same column; responses are cut
after their first EOS. Rows that repeat a prompt (several samples per prompt) share one prefill.
``GenerationConfig.output_length_range`` draws ``max_new_tokens`` per batch (trlX's LengthSampler).
``generation.backend`` ``vllm`` and ``openai`` are dispatched to :mod:`rlhfkit.backends` (token ids
from a colocated vLLM engine holding the policy's weights; text from an OpenAI-compatible endpoint).
"""
from __future__ import annotations

import dataclasses
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from rlhfkit.config import ConfigError, GenerationConfig, UserError
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
    engine_logps: Optional[torch.Tensor] = None
    """(B, T) aligned with ``batch["labels"]``: the generation engine's log-prob of each sampled
    token (``backend: vllm``; None for ``hf``, whose sampler is the trainer's own model)."""
    weight_sync_seconds: float = 0.0
    """Seconds spent pushing the policy's weights into the engine before this rollout."""


def engine_metrics(engine_logps: Optional[torch.Tensor], trainer_logps: torch.Tensor, mask: torch.Tensor,
                   sync_seconds: float) -> dict[str, float]:
    """``rollout/logprob_mismatch``: mean over response tokens (``mask`` (B, T)) of |engine log-prob -
    trainer log-prob| (both (B, T), the batch's layout), and ``rollout/weight_sync_seconds``; empty
    without engine log-probs (``backend: hf``)."""
    if engine_logps is None:
        return {}
    diff = (engine_logps - trainer_logps.detach().float().cpu()).abs()[mask]  # (N_tokens,)
    return {"rollout/logprob_mismatch": float(diff.mean()) if diff.numel() else 0.0,
            "rollout/weight_sync_seconds": sync_seconds}


def rollout(model: nn.Module, tokenizer, prompts: list[str], prompt_ids: list[list[int]], gen: GenerationConfig,
            max_new_tokens: Optional[int] = None) -> Experience:
    """Sample one response per prompt (repeat prompts for groups) and build the training batch.

    Prompts go to ``generate`` ``gen.batch_size`` at a time, prompts of similar length together (the
    prefill then spends little on left padding); the batch is collated once, in the given order."""
    from rlhfkit.backends import require_training_backend

    require_training_backend(gen, "rollout")
    responses: list[list[int]] = [[] for _ in prompt_ids]
    sampled = None
    if gen.backend == "vllm":
        sampled = backend_sample(model, tokenizer, prompt_ids, gen, max_new_tokens)
        responses = sampled.token_ids
    else:
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        with lora_merged(model):
            for s in range(0, len(order), gen.batch_size):
                chunk = order[s: s + gen.batch_size]
                for i, r in zip(chunk, generate_ids(model, tokenizer, [prompt_ids[i] for i in chunk], gen,
                                                    max_new_tokens)):
                    responses[i] = r
    eos = tokenizer.eos_token_id
    responses = [r if r else [eos] for r in responses]
    seq2seq = bool(getattr(unwrap(_lm(model)).config, "is_encoder_decoder", False))
    batch = collate([Example(p, r) for p, r in zip(prompt_ids, responses)], tokenizer.pad_token_id, seq2seq)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    exp = Experience(list(prompts), texts, batch, [len(r) for r in responses], [r[-1] != eos for r in responses])
    if sampled is not None:  # causal only: every response starts at column P
        P = batch["labels"].shape[1] - max(len(r) for r in responses)
        exp.engine_logps = torch.zeros(batch["labels"].shape, dtype=torch.float32)  # (B, T)
        for b, lp in enumerate(sampled.logprobs):
            exp.engine_logps[b, P: P + len(lp)] = torch.tensor(lp, dtype=torch.float32)
        exp.weight_sync_seconds = sampled.sync_seconds
    return exp


# ---------------------------------------------------------------------------------------------
# The experience core of PPO, GRPO, RLOO and REINFORCE++: prompts -> one typed rollout record
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptItem:
    """One training or held-out prompt, fitted to the model."""

    prompt: str
    """The user prompt before any chat template (what the reward functions see)."""
    text: str
    """The prompt as the policy sees it (chat template applied when used)."""
    ids: list[int]
    """Its token ids (left-truncated or dropped per ``data.overlong``)."""
    row: dict
    """The dataset row: its columns go to the reward functions as keyword arguments."""


def prompt_room(hf_config, max_length: int, gen: GenerationConfig) -> int:
    """Prompt tokens that fit before the longest response: ``model.max_length`` capped by the
    model's position embeddings (GPT-2: 1024, a tiny one 256), minus the longest response for a
    causal model (its positions continue after the prompt)."""
    positions = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None)
    limit = min(max_length, positions) if positions else max_length
    if getattr(hf_config, "is_encoder_decoder", False):
        return limit
    longest = max(gen.output_length_range or [gen.max_new_tokens])
    room = limit - longest
    if room <= 0:
        raise ConfigError(f"model.max_length={max_length} (model positions: {positions}) leaves no room for a prompt "
                          f"before {longest} generated tokens")
    return room


def fit_prompts(table, data_cfg, tokenizer, hf_config, max_length: int, gen: GenerationConfig,
                stats=None) -> list[PromptItem]:
    """The rows of ``table`` as prompts that fit the model (``prompt_room``): the template (or
    ``prompt`` column) wrapped in the chat template and encoded; longer prompts follow
    ``data.overlong`` (``truncate``: keep the end; ``drop``), both counted in ``stats``."""
    from rlhfkit.data import (DataStats, check_some_kept, encode_prompt, fit_lengths, parse_rows, user_prompt,
                              wrap_prompt)
    from rlhfkit.utils import logger

    if table is None:
        return []
    stats = stats if stats is not None else DataStats()
    seq2seq = bool(getattr(hf_config, "is_encoder_decoder", False))
    room = prompt_room(hf_config, max_length, gen)

    def parse(i: int, row: dict) -> Optional[PromptItem]:
        user = user_prompt(table, i, data_cfg)
        text = wrap_prompt(user, data_cfg, tokenizer)
        fitted = fit_lengths(encode_prompt(tokenizer, text, seq2seq), [], data_cfg, room, stats, seq2seq)
        return PromptItem(user, text, fitted[0], row) if fitted is not None else None

    items = parse_rows(table, data_cfg, stats, parse)
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"{table.source}: over-long prompts: {stats.truncated} truncated, {stats.dropped_overlong} dropped "
                    f"(data.overlong={data_cfg.overlong}, room {room} tokens)")
    check_some_kept(items, stats, data_cfg, max_length)
    return items


def reward_columns(rows: list[dict]) -> dict[str, list]:
    """Per-row lists of every column (None where a row lacks it): the reward functions' ``**columns``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def make_reward(rewards: list, bias: float, reward_fn=None, command: str = "online RL"):
    """The composite reward of a run: ``rewards:`` from the config, or a Python ``reward_fn`` (or
    ``Composite``) that replaces them."""
    from rlhfkit.rewards import Composite, build_reward, validate_reward
    from rlhfkit.utils import logger

    if reward_fn is None:
        if not rewards:
            raise ConfigError(f"{command} needs a reward: set 'rewards' in the config (e.g. [{{kind: toxicity}}]) "
                              "or pass reward_fn= from Python")
        return build_reward(rewards, bias)
    if isinstance(reward_fn, Composite):
        return reward_fn
    if rewards:
        logger.info(f"reward_fn replaces the {len(rewards)} configured reward(s)")
    name = getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", None) or type(reward_fn).__name__
    name = "reward" if name.startswith("<") else name
    return Composite([(name, 1.0, validate_reward(reward_fn, name))], bias)


def take_rows(tensors: dict, idx: torch.Tensor, seq2seq: bool) -> dict:
    """Rows ``idx`` of a batch in the training layout, without the columns that are padding in
    every one of them (the encoder's and the decoder's spans apart for seq2seq). 2-D tensors are
    per-token (B, T) and cut; 1-D ones are per-row (B,)."""
    return _take_rows(tensors, idx, seq2seq)[0]


def _take_rows(tensors: dict, idx: torch.Tensor, seq2seq: bool) -> tuple[dict, slice]:
    """``take_rows`` and the slice of the label-aligned columns kept."""
    out = {k: v[idx] for k, v in tensors.items()}
    if seq2seq:
        enc, dec = _span(out["attention_mask"]), _span(out["decoder_attention_mask"])
        return {k: (v[:, enc] if k in ("input_ids", "attention_mask") else v[:, dec]) if v.dim() == 2 else v
                for k, v in out.items()}, dec
    cols = _span(out["attention_mask"])
    return {k: (v[:, cols] if v.dim() == 2 else v) for k, v in out.items()}, cols


def _span(mask: torch.Tensor) -> slice:
    used = mask.bool().any(dim=0).nonzero().flatten()  # columns holding a real token in some row
    return slice(int(used.min()), int(used.max()) + 1) if used.numel() else slice(0, mask.shape[1])


MODEL_KEYS = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")


def grouped_permutation(n_rows: int, group: int, generator: torch.Generator) -> torch.Tensor:
    """(n_rows,) a random order of the rows that keeps each ``group`` of consecutive rows (the
    samples of one prompt) together, groups shuffled: minibatches of whole groups, in which the
    prefix-tree forward runs each prompt once. One group per row when ``group`` does not divide
    ``n_rows``."""
    g = _group_size(n_rows, group)
    return _rows_of_groups(torch.randperm(n_rows // g, generator=generator), g)  # (n_rows,)


def _group_size(n_rows: int, group: int) -> int:
    return group if group > 0 and n_rows % group == 0 else 1


def _rows_of_groups(group_order: torch.Tensor, g: int) -> torch.Tensor:
    """(n_groups,) an order of the groups of ``g`` consecutive rows -> (n_groups * g,) their rows."""
    return (group_order[:, None] * g + torch.arange(g)).flatten()


@torch.no_grad()
def no_grad_pass(fn, tensors: dict, chunk: int, seq2seq: bool, group: int = 1) -> dict[str, torch.Tensor]:
    """``fn(sub-batch) -> {name: (b, T') tensor}`` over about ``chunk`` rows at a time, trimmed of
    their shared padding (``take_rows``), reassembled into (B, T) float32 tensors on the CPU in the
    batch's layout. Each ``group`` of consecutive rows (the samples of one prompt) stays in one
    sub-batch, where the policy's prefix-tree forward runs their prompt once; groups are taken in
    order of their longest row (chunks of ``chunk // group`` whole groups)."""
    B, T = tensors["labels"].shape
    model_in = {k: tensors[k] for k in MODEL_KEYS if k in tensors}
    g = _group_size(B, group)
    longest = model_in["attention_mask"].sum(1).view(-1, g).amax(1)  # (B / g,)
    order = _rows_of_groups(longest.argsort(), g)  # (B,) whole groups, shortest first
    out: dict[str, torch.Tensor] = {}
    for rows in order.split(max(1, chunk // g) * g):
        sub, cols = _take_rows(model_in, rows, seq2seq)
        for k, v in fn(sub).items():
            if k not in out:
                out[k] = torch.zeros((B, T), dtype=torch.float32)
            out[k][rows, cols] = v.float().cpu()
    return out


@dataclass
class Rollout:
    """One iteration's experience, B = prompts x samples_per_prompt rows (the samples of a prompt
    consecutive), in the shared training layout (``rlhfkit.data.collate``): causal rows are the
    left-padded prompt then the right-padded response, so every response starts at column
    ``response_start``; seq2seq rows put the prompt in the encoder and the response in
    ``labels``. Every (B, T) tensor is aligned with ``labels``: column t holds the value for the
    token ``labels[:, t]``."""

    items: list[PromptItem]
    """(B,) the prompt of each row."""
    completions: list[str]
    """(B,) the decoded responses (special tokens removed)."""
    tensors: dict[str, torch.Tensor]
    """``input_ids``, ``attention_mask``, ``labels`` (B, T) (-100 off the response), and for seq2seq
    ``decoder_attention_mask`` (B, T); the encoder's tensors are (B, P) there."""
    mask: torch.Tensor
    """(B, T) bool: the response tokens (``labels != -100``)."""
    response_start: int
    """First column that holds response tokens (0 for seq2seq)."""
    scores: torch.Tensor
    """(B,) the composite reward (bias + weighted parts)."""
    parts: dict[str, torch.Tensor]
    """name -> (B,) raw value of each reward part."""
    truncated: torch.Tensor
    """(B,) bool: the response hit the length limit without EOS."""
    old_logps: Optional[torch.Tensor] = None
    """(B, T) log-probs of the response tokens under the sampling policy (0 off the mask)."""
    ref_logps: Optional[torch.Tensor] = None
    """(B, T) log-probs under the reference policy (0 off the mask)."""
    values: Optional[torch.Tensor] = None
    """(B, T) the critic's V(s_t) before each response token (0 off the mask)."""
    entropy: Optional[torch.Tensor] = None
    """(B, T) entropy of the sampling policy at each response token (0 off the mask)."""
    times: dict[str, float] = field(default_factory=dict)
    """Seconds: ``time/generate``, ``time/reward``, ``time/no_grad``."""
    engine_logps: Optional[torch.Tensor] = None
    """(B, T) the generation engine's log-prob of each sampled token (``generation.backend: vllm``;
    None for ``hf``, whose sampler is the trainer's own model)."""
    weight_sync_seconds: float = 0.0
    """Seconds spent pushing the policy's weights into the engine before this rollout."""

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) tokens per response (EOS included)."""
        return self.mask.sum(1)

    def engine_metrics(self) -> dict[str, float]:
        """``rollout/logprob_mismatch`` (mean |engine log-prob - trainer log-prob| over response
        tokens) and ``rollout/weight_sync_seconds``; empty for ``backend: hf``."""
        if self.old_logps is None:
            return {}
        return engine_metrics(self.engine_logps, self.old_logps, self.mask, self.weight_sync_seconds)

    def metrics(self, gather=None) -> dict[str, float]:
        """Reward and response statistics (over every process when ``gather`` collects rows)."""
        names = list(self.parts)
        table = torch.stack([self.scores] + [self.parts[n] for n in names]
                            + [self.response_lengths.float(), self.truncated.float()], dim=1)  # (B, 3 + parts)
        if gather is not None:
            table = gather(table)
        r = table[:, 0]
        out = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0}
        out.update({f"reward/{n}": float(table[:, 1 + j].mean()) for j, n in enumerate(names)})
        out["response_length/mean"] = float(table[:, -2].mean())
        out["response_length/truncated"] = float(table[:, -1].mean())
        return out


def make_experience(policy: PolicyModel, tokenizer, items: list[PromptItem], reward, gen: GenerationConfig, *,
                    samples_per_prompt: int = 1, max_new_tokens: Optional[int] = None, reference=None,
                    old_logps: bool = True, critic: Optional[PolicyModel] = None, chunk: int = 8) -> Rollout:
    """Sample ``samples_per_prompt`` responses to each prompt, score them, and run the no-grad
    passes: the one way PPO, GRPO, RLOO and REINFORCE++ collect experience.

    1. generation (``rollout``: ``generate_ids`` in length-sorted chunks, the LoRA adapter merged);
    2. the composite ``reward`` of each response, with every column of its row as ``**columns``;
    3. no-grad passes over chunks of ``chunk`` rows (a prompt's samples in one chunk), in eval
       mode: the sampling policy's log-probs and entropies (and values, from its value head or
       ``critic``) when ``old_logps``; the reference's log-probs when ``reference`` is given.
    The policy's dropout must be off (``load_online_policy``), or these log-probs and the training
    pass's differ before any update."""
    import time

    rows = [it for it in items for _ in range(samples_per_prompt)]
    t0 = time.perf_counter()
    exp = rollout(policy, tokenizer, [it.text for it in rows], [it.ids for it in rows], gen, max_new_tokens)
    t1 = time.perf_counter()
    total, parts = reward.score([it.prompt for it in rows], exp.completions, **reward_columns([it.row for it in rows]))
    t2 = time.perf_counter()
    tensors = exp.batch
    mask = tensors["labels"] != -100  # (B, T)
    seq2seq = policy.is_seq2seq
    start = 0 if seq2seq else int(mask.float().argmax(dim=1).min())
    ro = Rollout(rows, exp.completions, tensors, mask, start, torch.tensor(total, dtype=torch.float32),
                 {n: torch.tensor(v, dtype=torch.float32) for n, v in parts.items()},
                 torch.tensor(exp.truncated, dtype=torch.bool), engine_logps=exp.engine_logps,
                 weight_sync_seconds=exp.weight_sync_seconds)
    old_logps = old_logps or exp.engine_logps is not None  # the trainer's own, also vs the engine's
    device = next(policy.parameters()).device

    def on_device(b: dict) -> dict:
        return {k: v.to(device) for k, v in b.items()}

    if old_logps:
        def sampling_pass(b: dict) -> dict:
            was = policy.training
            policy.eval()
            try:
                out = policy(**on_device(b), with_entropy=True)
                if critic is not None:
                    critic.eval()
                    out["values"] = critic(**on_device(b))["values"]
                    critic.train(was)
            finally:
                policy.train(was)
            return {k: v for k, v in out.items() if k != "mask"}

        passes = no_grad_pass(sampling_pass, tensors, chunk, seq2seq, samples_per_prompt)
        ro.old_logps, ro.entropy, ro.values = passes["logps"], passes["entropy"], passes.get("values")
    if reference is not None:
        ro.ref_logps = no_grad_pass(lambda b: {"ref": reference.logps(on_device(b))}, tensors, chunk, seq2seq,
                                    samples_per_prompt)["ref"]
    ro.times = {"time/generate": t1 - t0, "time/reward": t2 - t1, "time/no_grad": time.perf_counter() - t2}
    return ro


def load_online_policy(model_cfg, lora_cfg, model: Optional[nn.Module] = None, tokenizer=None):
    """(language model, tokenizer) of an online RL run: loaded from ``model_cfg`` or a model object
    passed from Python (with its tokenizer), LoRA applied, every dropout off (the sampling pass,
    the old-policy pass and the update pass must compute one function, or the PPO ratio is noise
    before any update: models.py ``disable_dropout``)."""
    from rlhfkit.models import apply_lora, disable_dropout, load_policy

    if model is None:
        lm, tok = load_policy(model_cfg, lora_cfg)
    else:
        lm, tok = model, tokenizer
        if tok is None:
            raise UserError("pass tokenizer= with a model object")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if lora_cfg.enabled and not hasattr(lm, "peft_config"):
            lm = apply_lora(lm, lora_cfg)
    return disable_dropout(lm), tok


@torch.no_grad()
def evaluate_prompts(policy: PolicyModel, tokenizer, items: list[PromptItem], reward, gen: GenerationConfig,
                     reference=None, chunk: int = 8) -> Optional[dict]:
    """Greedy responses to held-out prompts: ``reward`` (mean), ``reward/<part>`` (mean of each
    part), ``kl`` (mean over responses of sum_t log pi - log ref, nats per response, when a
    ``reference`` is given), plus ``rewards`` and ``completions`` per prompt. None without prompts.
    The recipes log these as ``eval/<name>``: ``train.best_metric: eval/reward`` picks them up."""
    if not items:
        return None
    greedy = dataclasses.replace(gen, do_sample=False, output_length_range=None)
    ro = make_experience(policy, tokenizer, items, reward, greedy, reference=reference,
                         old_logps=reference is not None, chunk=chunk)
    out = {"reward": float(ro.scores.mean()), **{f"reward/{n}": float(v.mean()) for n, v in ro.parts.items()}}
    if reference is not None:
        out["kl"] = float(((ro.old_logps - ro.ref_logps) * ro.mask).sum(1).mean())
    return {**out, "rewards": ro.scores.tolist(), "completions": ro.completions}
