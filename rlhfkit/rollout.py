"""Rollout: the experience core of the online recipes (PPO, GRPO, RLOO, REINFORCE++).

``fit_prompts`` turns data rows into ``PromptItem`` s that fit the model; ``make_experience``
samples (through :mod:`rlhfkit.generation`), scores and runs the no-grad passes into one typed
``Rollout`` record; the recipes only add their advantages and loss. ``grouped_permutation`` and
``no_grad_pass`` keep a prompt's samples together (one prefix-tree forward per prompt).

The generation functions (``generate``, ``generate_ids``, ``NucleusSampler``, ...) live in
:mod:`rlhfkit.generation`; the names under ``rlhfkit.rollout`` that earlier versions documented
still import from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from rlhfkit.config import ConfigError, GenerationConfig, UserError
from rlhfkit.data import Example, collate
# re-exported: rlhfkit.rollout.generate and the others were documented under this module
from rlhfkit.generation import (NucleusSampler, _lm, backend_sample, generate, generate_ids,  # noqa: F401
                                generation_kwargs, growing_cache, lora_merged, prefill_shared_prompts,
                                sample_max_new_tokens)
from rlhfkit.models import unwrap
from rlhfkit.policy import PolicyModel


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
