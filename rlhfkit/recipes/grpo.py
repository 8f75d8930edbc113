"""Online group-relative policy optimisation: GRPO and RLOO (``rlhfkit grpo`` / ``rlhfkit rloo``).

GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models", section 4.1. RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting
REINFORCE-Style Optimization for Learning from Human Feedback in LLMs". Neither needs a value
model: the baseline of a response is computed from the other responses to the same prompt.

One iteration (one logged step, ``train.max_steps`` of them):

1. data: take ``prompts_per_step`` prompts (a seeded permutation per pass over the data, so a
   resumed run draws the same prompts) and repeat each ``group_size`` = G times, the copies of a
   prompt consecutive: ``[p0]*G + [p1]*G + ...``;
2. rollout: sample one response per row (``rollout.rollout``, ``generation.*``);
3. reward: score every response with the reward layer (``rewards:``, a weighted sum plus
   ``reward_bias``; each part is logged as ``reward/<name>``) or with a Python callable
   ``run(cfg, reward_fn=...)``, which replaces ``rewards:``;
4. advantages (``losses.group_advantages`` over the consecutive groups), one per response and
   the same for all its tokens:
   ``grpo``: A_i = (r_i - mean_g r) / (std_g r + 1e-4) (unbiased std; ``scale_rewards=false``
   keeps only r_i - mean_g r, as Dr. GRPO, Liu et al. 2025); ``rloo``: A_i = r_i - mean of the
   other G - 1 rewards;
5. no-grad passes: log-probs of the sampled tokens under the reference (``beta`` > 0 only) and,
   when an iteration makes more than one optimizer update, under the sampling policy (the "old"
   log-probs of the ratio; with one update they equal the live log-probs, detached);
6. update: ``ppo_epochs`` passes over the responses, each shuffled and cut into ``minibatches``
   minibatches, one optimizer step (``Engine.step``) per minibatch. Per token t of response i,
   with ratio = exp(log pi_theta - log pi_old):

       l_it = max(-A_i ratio, -A_i clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon))
              + beta * k3_it,   k3 = exp(ref - lp) - 1 - (ref - lp)   (losses.kl_penalty "k3")

   ``loss_aggregation=token`` (default; DAPO, Yu et al. 2025): the mean of l_it over all valid
   tokens of the minibatch; ``sequence`` (the GRPO paper's 1/G sum_i 1/|o_i| sum_t): the mean
   over each response's tokens, then the mean over responses. Gradient accumulation over
   micro-batches of ``train.batch_size`` responses is exact for both (the engine weighs each
   micro-batch by its tokens or its rows).

Per-step metrics: ``reward/mean``, ``reward/std`` (of the summed reward over all G x prompts
responses), ``reward/<part>`` (mean raw value of each part), ``advantage/zero_std_groups``
(fraction of groups whose rewards are all equal: they carry no signal), ``kl`` (mean per-token
**k3** estimate of KL(pi_theta || pi_ref) on the sampled tokens, in the update passes; only when
``beta`` > 0), ``clipfrac``, ``approx_kl`` (k3 of KL(pi_old || pi_theta), from
``losses.ppo_policy``), ``entropy`` (mean per-token entropy of the policy in the update passes),
``response_length/mean``, ``response_length/truncated`` (fraction that hit max_new_tokens
without EOS), ``loss``, ``grad_norm``, ``lr``, and seconds per phase: ``time/generate``,
``time/reward``, ``time/reference`` (reference and old-policy log-prob passes), ``time/update``.
Optimizer-update metrics are averaged over the iteration's updates. Evaluation: the mean reward
of greedy responses to the held-out prompts (at most ``eval_max_rows``) before training, every
``train.eval_every`` iterations, and at the end (``eval_reward_start`` / ``eval_reward_end`` in
summary.json; the responses in ``samples.jsonl``, the run viewer's format).

Deliberate deviations:
- GRPO's KL term is the paper's k3 estimator but averaged like the surrogate (token-level by
  default); the paper's outer iteration over reward-model updates (iterative GRPO) is left out.
- RLOO in the paper is REINFORCE on whole sequences with the KL penalty folded into the reward.
  Here the RLOO advantage goes through the same loss as GRPO: with ``ppo_epochs=1``,
  ``minibatches=1`` the ratio is 1 and the clipped surrogate's gradient is exactly REINFORCE's,
  -A_i grad log pi(o_i) summed over the tokens and divided by the batch's token count (token
  aggregation: the paper's sequence-sum loss up to one factor per batch, absorbed by the learning
  rate); the KL is a k3 loss term to the reference rather than a reward penalty.
- Rewards are not whitened across the batch beyond the group normalisation above.
- ``train.max_steps`` counts iterations; the learning-rate schedule (and ``warmup_steps``,
  also in iterations) spans all ``max_steps x ppo_epochs x minibatches`` optimizer updates
  (``Engine(updates_per_step=...)``). ``train.grad_accum`` must stay 1: a minibatch is one
  optimizer step, accumulated over micro-batches of ``train.batch_size`` responses.
- Across several processes each process samples its own prompts (its slice of the step's
  prompts) and normalises within its own groups, which never span processes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rlhfkit.config import (
    ConfigError, DataConfig, GenerationConfig, LoraConfig, ModelConfig, ReferenceConfig, RewardConfig, TrainConfig,
    UserError, _check_choice, _check_positive,
)
from rlhfkit.data import DataStats, check_some_kept, StepBatcher, encode_prompt, fit_lengths, load_splits, prompt_examples
from rlhfkit.engine import Engine, process_info, total_steps_for
from rlhfkit.losses import group_advantages, kl_penalty, masked_mean, ppo_policy
from rlhfkit.models import PolicyModel, build_reference, load_policy, save_pretrained
from rlhfkit.rewards import Composite, build_reward, validate_reward
from rlhfkit.rollout import rollout, sample_max_new_tokens, score
from rlhfkit.utils import atomic_write_text, logger, seed_everything

ALGORITHMS = ["grpo", "rloo"]
AGGREGATIONS = ["token", "sequence"]
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (and, for full fine-tunes, the reference it starts from)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune). With LoRA the reference is the base with the adapter
    disabled (no second copy), see ``reference.kind``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: a ``prompt`` column (or ``prompt_template``); the other columns of each row are
    passed to the reward functions as keyword arguments."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule and output. ``max_steps`` counts iterations (rollout + update);
    ``batch_size`` is the number of responses per forward/backward micro-batch."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling of the training responses. Evaluation decodes greedily with the same lengths."""
    rewards: list[RewardConfig] = field(default_factory=list)
    """Reward functions, summed with their weights (the composite reward), e.g.
    ``[{kind: toxicity}, {kind: length, weight: 0.1, max_words: 30}]``. Replaced by the
    ``reward_fn`` argument of ``run`` when one is given."""
    reward_bias: float = 0.0
    """Constant added to the summed reward (cancels in the group advantages; shown in logs)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The KL reference policy (loaded only when ``beta`` > 0)."""
    algorithm: str = "grpo"
    """Group baseline: ``grpo`` (group mean, optionally divided by the group std) or ``rloo``
    (mean of the other responses); ``rlhfkit rloo`` sets ``rloo``."""
    prompts_per_step: int = 8
    """Prompts per iteration (per process)."""
    group_size: int = 4
    """Responses sampled per prompt (G >= 2)."""
    ppo_epochs: int = 1
    """Passes over each iteration's responses (mu in the GRPO paper; 1 is fully on-policy)."""
    minibatches: int = 1
    """Optimizer steps per pass: the responses are shuffled and cut into this many minibatches."""
    clip_epsilon: float = 0.2
    """Clip range of the probability ratio in the surrogate."""
    beta: float = 0.04
    """Coefficient of the per-token k3 KL to the reference (0 loads no reference)."""
    scale_rewards: bool = True
    """``grpo``: divide by the group's reward std (false: only subtract the mean, as in Dr. GRPO).
    Not used by ``rloo``."""
    loss_aggregation: str = "token"
    """``token``: mean over all valid tokens of a minibatch (DAPO); ``sequence``: mean over each
    response's tokens, then over responses (the GRPO paper)."""
    eval_max_rows: Optional[int] = 64
    """Held-out prompts for the greedy-response reward evaluation (None: all)."""

    def validate(self) -> None:
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS)
        _check_positive("prompts_per_step", self.prompts_per_step)
        _check_positive("ppo_epochs", self.ppo_epochs)
        _check_positive("minibatches", self.minibatches)
        _check_positive("clip_epsilon", self.clip_epsilon)
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (the baseline needs other responses), got {self.group_size}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        n = self.prompts_per_step * self.group_size
        if n % self.minibatches:
            raise ConfigError(f"minibatches={self.minibatches} must divide prompts_per_step x group_size = {n}")
        if self.train.grad_accum != 1:
            raise ConfigError("train.grad_accum must be 1 for grpo/rloo: a minibatch is one optimizer step, "
                              "accumulated over micro-batches of train.batch_size responses")
        if self.eval_max_rows is not None and self.eval_max_rows < 0:
            raise ConfigError(f"eval_max_rows must be >= 0, got {self.eval_max_rows}")


# --------------------------------------------------------------------------------------------
# The loss (pure tensors)
# --------------------------------------------------------------------------------------------


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2, beta: float = 0.0,
              aggregation: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus ``beta`` x k3 KL to the reference, aggregated per ``aggregation``.

    ``logps``, ``old_logps``, ``ref_logps``: (B, T) log-probs of the sampled tokens; ``advantages``:
    (B,) one per response; ``mask``: (B, T) valid response tokens. The surrogate is
    ``losses.ppo_policy`` (a token mean). For ``sequence`` aggregation each response's advantages
    are scaled by n_tokens / (B |o_i|) first: the clipped term is positively homogeneous in A, so
    the token mean of the scaled terms is exactly (1/B) sum_i 1/|o_i| sum_t l_it (and clipfrac is
    unchanged).
    """
    mask = mask.bool()
    adv = advantages.detach().to(logps.dtype)[:, None].expand_as(logps)  # (B, T)
    if aggregation == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
        adv = adv * (mask.sum() / (lengths * mask.shape[0]))  # (B, T)
    elif aggregation != "token":
        raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    loss, metrics = ppo_policy(logps, old_logps, adv, mask, clip)
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = kl_penalty(logps, ref_logps.detach(), "k3")  # (B, T)
        kl_term = masked_mean(kl, mask) if aggregation == "token" else masked_mean(kl, mask, dim=1).mean()
        loss = loss + beta * kl_term
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
        metrics["loss/kl"] = float(beta * kl_term.detach())
    return loss, metrics


def policy_loss(model, mb: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch for ``Engine.step``: a forward of the policy, then ``grpo_loss``.

    ``mb`` holds the batch tensors, ``advantages`` (B,) and, when computed, ``ref_logps`` and
    ``old_logps`` (B, T); without ``old_logps`` the live log-probs, detached, are the old ones
    (ratio = 1: the iteration's only update)."""
    out = model(**{k: mb[k] for k in MODEL_KEYS if k in mb}, with_entropy=True)
    entropy = out.pop("entropy").detach()  # (B, T); dropping the graph branch frees its memory
    old = mb["old_logps"] if "old_logps" in mb else out["logps"].detach()
    loss, metrics = grpo_loss(out["logps"], old, mb.get("ref_logps"), mb["advantages"], out["mask"],
                              cfg.clip_epsilon, cfg.beta, cfg.loss_aggregation)
    metrics["entropy"] = masked_mean(entropy, out["mask"]).item()
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Prompts, rollouts, rewards, advantages
# --------------------------------------------------------------------------------------------


@dataclass
class PromptItem:
    text: str
    """The prompt as the policy sees it (chat template applied when used)."""
    ids: list[int]
    """Its token ids (left-truncated per ``data.overlong``)."""
    row: dict
    """The dataset row: its columns go to the reward functions."""


@dataclass
class Batch:
    """One iteration's responses: G consecutive rows per prompt, with rewards and advantages."""

    prompts: list[str]
    completions: list[str]
    tensors: dict
    """The training layout of ``rollout.Experience.batch`` plus ``advantages`` (N,) and, when
    computed, ``old_logps`` / ``ref_logps`` (N, T)."""
    rewards: torch.Tensor
    """(N,) summed reward."""
    parts: dict[str, list[float]]
    response_lengths: list[int]
    truncated: list[bool]
    times: dict[str, float] = field(default_factory=dict)
    """Seconds spent: ``time/generate``, ``time/reward``."""


def prepare_prompts(table, cfg: Config, tokenizer, seq2seq: bool, stats: DataStats) -> list[PromptItem]:
    """Prompt texts, token ids and rows; prompts longer than there is room for follow ``data.overlong``."""
    longest_response = max(cfg.generation.output_length_range or [cfg.generation.max_new_tokens])
    room = cfg.model.max_length if seq2seq else cfg.model.max_length - longest_response
    if room <= 0:
        raise ConfigError(f"model.max_length={cfg.model.max_length} leaves no room for a prompt before "
                          f"{longest_response} generated tokens")
    items = []
    for text, row in prompt_examples(table, cfg.data, tokenizer, stats):
        fitted = fit_lengths(encode_prompt(tokenizer, text, seq2seq), [], cfg.data, room, stats, seq2seq)
        if fitted is not None:
            items.append(PromptItem(text, fitted[0], row))
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"over-long prompts: {stats.truncated} truncated, {stats.dropped_overlong} dropped (data.overlong)")
    check_some_kept(items, stats, cfg.data, room)
    return items


def repeat_groups(items: list, group_size: int) -> list:
    """``[a, b] -> [a]*G + [b]*G``: the copies of a prompt consecutive, as group_advantages expects."""
    return [x for x in items for _ in range(group_size)]


def row_columns(rows: list[dict]) -> dict[str, list]:
    """Per-row lists of every column (None where a row lacks it), the reward functions' ``**columns``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def sample_and_score(model, tokenizer, items: list[PromptItem], reward: Composite, cfg: Config,
                     max_new_tokens: Optional[int] = None, gen: Optional[GenerationConfig] = None,
                     group_size: Optional[int] = None) -> Batch:
    """Steps 1-4: repeat prompts, sample, score, and attach the group advantages."""
    G = cfg.group_size if group_size is None else group_size
    rows = repeat_groups(items, G)
    t0 = time.perf_counter()
    exp = rollout(model, tokenizer, [it.text for it in rows], [it.ids for it in rows], gen or cfg.generation,
                  max_new_tokens)
    t1 = time.perf_counter()
    total, parts = reward.score(exp.prompts, exp.completions, **row_columns([it.row for it in rows]))
    times = {"time/generate": t1 - t0, "time/reward": time.perf_counter() - t1}
    rewards = torch.tensor(total, dtype=torch.float32)  # (N,)
    tensors = dict(exp.batch)
    if G > 1:
        tensors["advantages"] = group_advantages(rewards, G, cfg.algorithm, cfg.scale_rewards)  # (N,)
    return Batch(exp.prompts, exp.completions, tensors, rewards, parts, exp.response_lengths, exp.truncated, times)


def take_rows(tensors: dict, idx: torch.Tensor, seq2seq: bool) -> dict:
    """Rows ``idx`` of a batch, without the columns that are padding in every one of them."""
    out = {k: v[idx] for k, v in tensors.items()}
    if seq2seq:
        enc = _span(out["attention_mask"])
        dec = _span(out["decoder_attention_mask"])
        for k, v in out.items():
            if v.dim() == 2:
                out[k] = v[:, enc] if k in ("input_ids", "attention_mask") else v[:, dec]
    else:
        cols = _span(out["attention_mask"])
        out = {k: (v[:, cols] if v.dim() == 2 else v) for k, v in out.items()}
    return out


def _span(mask: torch.Tensor) -> slice:
    used = mask.bool().any(dim=0).nonzero().flatten()  # columns holding a real token in some row
    return slice(int(used.min()), int(used.max()) + 1) if used.numel() else slice(0, mask.shape[1])


@torch.no_grad()
def no_grad_logps(fn: Callable[[dict], torch.Tensor], tensors: dict, chunk: int, device: torch.device) -> torch.Tensor:
    """(N, T) log-probs from ``fn(batch)`` run ``chunk`` rows at a time (same layout as the batch)."""
    N, T = tensors["labels"].shape
    out = torch.zeros((N, T), dtype=torch.float32)
    keys = [k for k in MODEL_KEYS if k in tensors]
    for s in range(0, N, chunk):
        part = {k: tensors[k][s: s + chunk].to(device) for k in keys}
        out[s: s + chunk] = fn(part).float().cpu()
    return out


# --------------------------------------------------------------------------------------------
# Evaluation: mean reward of greedy responses to held-out prompts
# --------------------------------------------------------------------------------------------


def evaluate(model, tokenizer, items: list[PromptItem], reward: Composite, cfg: Config) -> Optional[dict]:
    if not items:
        return None
    greedy = dataclasses.replace(cfg.generation, do_sample=False)
    b = sample_and_score(model, tokenizer, items, reward, cfg, cfg.generation.max_new_tokens, greedy, group_size=1)
    return {"reward": float(b.rewards.mean()), "rewards": b.rewards.tolist(), "completions": b.completions}


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def make_reward(cfg: Config, reward_fn: Optional[Callable]) -> Composite:
    if reward_fn is None:
        if not cfg.rewards:
            raise UserError(f"{cfg.algorithm} needs a reward: set 'rewards' in the config (e.g. "
                            "[{kind: toxicity}]) or pass reward_fn= from Python")
        return build_reward(cfg.rewards, cfg.reward_bias)
    if isinstance(reward_fn, Composite):
        return reward_fn
    if cfg.rewards:
        logger.info(f"reward_fn replaces the {len(cfg.rewards)} configured reward(s)")
    name = getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", None) or type(reward_fn).__name__
    name = "reward_fn" if name.startswith("<") else name
    return Composite([(name, 1.0, validate_reward(reward_fn, name))], cfg.reward_bias)


def run(cfg: Config, resume: bool = False, reward_fn: Optional[Callable] = None) -> dict:
    """Train with GRPO or RLOO; ``reward_fn(prompts, completions, **columns) -> list[float]``
    replaces ``cfg.rewards`` when given. Returns the summary (also written to summary.json)."""
    reward = make_reward(cfg, reward_fn)
    seed_everything(cfg.train.seed)  # fresh LoRA weights too: the run does not depend on what ran before
    model, tok = load_policy(cfg.model, cfg.lora)
    seq2seq = bool(model.config.is_encoder_decoder)
    train_table, held_table = load_splits(cfg.data)
    stats, held_stats = DataStats(), DataStats()
    prompts = prepare_prompts(train_table, cfg, tok, seq2seq, stats)
    held = prepare_prompts(held_table, cfg, tok, seq2seq, held_stats) if held_table else []
    if cfg.eval_max_rows is not None:
        held = held[: cfg.eval_max_rows]
    logger.info(f"{cfg.algorithm}: {len(prompts)} training prompts x {cfg.group_size} responses, "
                f"{len(held)} held-out prompts")

    policy = PolicyModel(model)
    reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy, needed=cfg.beta > 0)
    world, rank = process_info(cfg.train)
    batcher = StepBatcher([len(p.ids) for p in prompts], cfg.prompts_per_step, 1, cfg.train.seed, False, world, rank)
    updates = cfg.ppo_epochs * cfg.minibatches
    engine = Engine(cfg.train, cfg.algorithm, cfg, policy, total_steps_for(cfg.train, batcher.steps_per_epoch),
                    resume=resume, updates_per_step=updates)
    engine.extra_summary["data"] = stats.as_dict()
    device = engine.device

    def run_eval() -> Optional[dict]:
        result = evaluate(engine.unwrapped(), tok, held, reward, cfg)
        if result is not None:
            engine.log({"eval/reward": result["reward"]})
        return result

    start = engine.state.get("eval_start")
    if start is None and held:
        start = run_eval()
        engine.state["eval_start"] = start
    while not engine.done:
        it = engine.step_count
        # 1-4: prompts -> responses -> rewards -> advantages
        t0 = time.perf_counter()
        items = [prompts[i] for i in batcher.step(it)[0]]
        max_new = sample_max_new_tokens(cfg.generation, random.Random(cfg.train.seed * 1_000_003 + it))
        b = sample_and_score(engine.unwrapped(), tok, items, reward, cfg, max_new)
        times = dict(b.times)
        # 5: no-grad passes (reference; old policy when the iteration makes several updates)
        t1 = time.perf_counter()
        if cfg.beta > 0:
            b.tensors["ref_logps"] = no_grad_logps(reference.logps, b.tensors, cfg.train.batch_size, device)
        if updates > 1:
            b.tensors["old_logps"] = no_grad_logps(lambda x: score(engine.unwrapped(), x).logps, b.tensors,
                                                   cfg.train.batch_size, device)
        times["time/reference"] = time.perf_counter() - t1
        # 6: ppo_epochs x minibatches optimizer steps
        t2 = time.perf_counter()
        N = len(b.completions)
        sums: dict[str, float] = {}
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + it)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(N, generator=gen)
            for mb_idx in order.chunk(cfg.minibatches):
                micro = [take_rows(b.tensors, idx, seq2seq) for idx in mb_idx.split(cfg.train.batch_size)]
                # the engine weighs micro-batch losses by these units: tokens or responses
                weights = [float((m["labels"] != -100).sum()) if cfg.loss_aggregation == "token"
                           else float(len(m["labels"])) for m in micro]
                update = engine.step(functools.partial(policy_loss, cfg=cfg), micro, weights)
                for k, v in update.items():
                    sums[k] = sums.get(k, 0.0) + v
        times["time/update"] = time.perf_counter() - t2
        metrics = {k: v / updates for k, v in sums.items()}
        metrics["lr"] = update["lr"]  # of the iteration's last update
        metrics.update(reward_metrics(b, cfg.group_size, engine))
        metrics.update(times)
        engine.end_step(metrics, extra_seconds=t2 - t0)
        if cfg.train.eval_every and engine.step_count % cfg.train.eval_every == 0 and not engine.done:
            run_eval()
    end = run_eval()
    extra = {"eval_reward_start": start["reward"] if start else None, "eval_reward_end": end["reward"] if end else None}
    if start and end:
        logger.info(f"{cfg.algorithm}: held-out greedy reward {start['reward']:.4f} -> {end['reward']:.4f}")
        if engine.is_main:
            write_samples(engine.out / "samples.jsonl", held, start, end)

    def save(out):
        save_pretrained(engine.unwrapped().lm, tok, out, merge=cfg.lora.merge_on_save)

    summary = engine.finish(save if cfg.train.save_model else None, extra)
    summary["policy"] = engine.unwrapped().lm  # for Python callers (rlhfkit.train); not in summary.json
    return summary


def reward_metrics(b: Batch, group_size: int, engine: Engine) -> dict[str, float]:
    """Reward and response statistics over the responses of every process."""
    names = list(b.parts)
    cols = [b.rewards] + [torch.tensor(b.parts[n], dtype=torch.float32) for n in names]
    cols += [torch.tensor(b.response_lengths, dtype=torch.float32), torch.tensor(b.truncated, dtype=torch.float32)]
    table = torch.stack(cols, dim=1)  # (N, 3 + parts)
    if engine.world_size > 1:
        table = engine.accelerator.gather(table.to(engine.device)).cpu()
    r = table[:, 0]
    groups = r.reshape(-1, group_size)  # (n_prompts, G)
    out = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0}
    for j, n in enumerate(names):
        out[f"reward/{n}"] = float(table[:, 1 + j].mean())
    out["advantage/zero_std_groups"] = float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean())
    out["response_length/mean"] = float(table[:, -2].mean())
    out["response_length/truncated"] = float(table[:, -1].mean())
    return out


def write_samples(path, held: list[PromptItem], start: dict, end: dict) -> None:
    """Held-out greedy responses before and after training, in the run viewer's samples format."""
    lines = []
    for item, c0, c1, r0, r1 in zip(held, start["completions"], end["completions"], start["rewards"], end["rewards"]):
        lines.append(json.dumps({"prompt": item.text, "completions": {"before": c0, "after": c1},
                                 "rewards": {"before": r0, "after": r1}, "gain": r1 - r0}))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


__all__ = ["Config", "run", "grpo_loss", "policy_loss", "sample_and_score", "repeat_groups", "prepare_prompts",
           "take_rows"]
