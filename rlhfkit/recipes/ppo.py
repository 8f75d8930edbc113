"""PPO with a value head for causal and encoder-decoder policies (RLHF as in Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences", and Stiennon et al. 2020, "Learning to
summarize from human feedback"; PPO from Schulman et al. 2017).

One iteration (one logged step):
1. rollout: sample ``samples_per_prompt`` responses for each of ``rollout_batch_size /
   samples_per_prompt`` prompts (top-k / top-p / temperature, ``generation.output_length_range``
   for a sampled length);
2. score: the task reward r(x, y) from the reward layer (a composite of reward functions, or a
   Python ``reward_fn``), optionally running-normalised and clipped, minus
   ``truncation_penalty`` for responses cut at the length limit;
3. no-grad passes: log-probs and values of the sampling policy, log-probs of the reference
   (steps 1-3 are ``rollout.make_experience``, the experience core PPO shares with GRPO/RLOO);
4. per-token reward: r_t = -kl_coef * KL_t(pi || ref) on every response token, plus the task
   reward on the last one (kl_coef fixed, or adapted towards ``kl_target`` by Ziegler's
   controller). With ``reward_segments`` ``word`` or ``sentence`` the task reward is spread over
   the response instead, as in fine-grained RLHF (Wu et al. 2023, "Fine-Grained Human Feedback
   Gives Better Rewards for Language Model Training"): the reward function scores every prefix
   that ends a segment (and the empty response), and each segment's last token gets the change
   its segment made, so a toxic word is blamed on its own tokens;
5. advantages by GAE (gamma, lambda), whitened over the batch; returns = A + V;
6. ``ppo_epochs`` passes over shuffled minibatches of the clipped surrogate plus
   ``vf_coef`` x the clipped value loss; an epoch stops early when its approx_kl passes
   ``early_stop_kl``. A minibatch takes whole prompts: the samples of a prompt stay together
   (``grouped_permutation``), so the prefix-tree forward runs each prompt once. Shuffles and the sampled output length come from a generator seeded with
   (seed, iteration), so a resumed run draws what the uninterrupted run drew.

Held-out evaluation (greedy; ``eval/reward``, ``eval/reward/<part>``, ``eval/kl``) runs before
training, every ``eval.every`` iterations and at the end (``recipes/_online.py``).

The value head sits on the policy's backbone (``value_model`` unset) or on a separate critic
model (saved with its value head in ``<output_dir>/critic``). The reference is the LoRA base with
the adapter disabled (no second copy), a frozen copy, or a trained adapter loaded frozen next to the
trainable one (see ``ReferenceConfig``).

Deliberate deviations: the KL penalty enters the reward per token (as trlX / the OpenAI code),
not the loss; the value head reads the hidden state that predicts each token (so V(s_t) and
log pi(a_t | s_t) come from the same position); the value head starts at zero (V = 0: a random
head on a pretrained backbone predicts values noisier than the rewards); reward normalisation uses
running moments of the raw scores (Welford) updated before they are used.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional, Sequence

import torch
from torch import nn

from rlhfkit import losses
from rlhfkit.config import (DataConfig, GenerationConfig, LoraConfig, ModelConfig, ReferenceConfig, RewardConfig,
                            EvalConfig, TrainConfig, UserError, check_best_metric, check_live_reference)
from rlhfkit.data import StepBatcher
from rlhfkit.distributed import unsharded
from rlhfkit.engine import Engine, process_info, total_steps_for
from rlhfkit.generation import sample_max_new_tokens
from rlhfkit.models import disable_dropout, load_model, save_pretrained
from rlhfkit.policy import PolicyModel, build_reference
from rlhfkit.recipes._online import HeldOutEval, check_sharded_generation, online_eval_metrics, online_prompts
from rlhfkit.rollout import (MODEL_KEYS, grouped_permutation, load_online_policy, make_experience, make_reward,
                             reward_columns, take_rows)
from rlhfkit.backends import require_training_backend
from rlhfkit.utils import logger, seed_everything


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"cliprange": "clip_range", "cliprange_value": "value_clip_range",
                                         "target_kl": "early_stop_kl", "eval_prompts": "eval.max_rows",
                                         "train.eval_every": "eval.every"}
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The reference policy of the KL penalty."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt rows (``prompt`` column or ``prompt_template``); other columns go to reward functions."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, batch_size=8, max_steps=100))
    """Optimizer and steps; ``train.max_steps`` counts rollout iterations and ``train.batch_size`` is
    the PPO minibatch (rows per optimizer update, split into ``train.grad_accum`` micro-batches)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling during rollouts."""
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(kind="toxicity")])
    """Reward functions; several are summed with their weights (each part is logged)."""
    reward_bias: float = 0.0
    """Constant added to the composite reward."""
    rollout_batch_size: int = 16
    """Responses sampled per iteration (per process): ``rollout_batch_size / samples_per_prompt``
    prompts, each answered ``samples_per_prompt`` times."""
    samples_per_prompt: int = 1
    """Responses per prompt in a rollout batch. Several answers to one prompt put contrasting
    rewards for the same prompt in one update (as OpenRLHF's ``n_samples_per_prompt``); the
    advantages still come from GAE with the value head, not from group statistics."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    clip_range: float = 0.2
    """Clip epsilon of the policy ratio."""
    value_clip_range: float = 0.2
    """Clip range of the value prediction around the old value."""
    vf_coef: float = 0.1
    """Weight of the value loss (in the gradient of the shared backbone; it does not slow the value
    head itself, whose Adam steps are about ``value_lr`` per weight whatever the loss scale)."""
    value_lr: Optional[float] = None
    """Learning rate of the value head (or of the whole separate critic); unset: ``train.lr``."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """Lambda of GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens."""
    kl_coef: float = 0.05
    """Initial (or fixed) coefficient beta of the per-token KL penalty."""
    kl_estimator: Literal["k1", "abs", "mse", "k3"] = "k1"
    """Per-token KL estimate: ``k1`` (log ratio), ``abs``, ``mse`` or ``k3``."""
    adaptive_kl: bool = False
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in episodes) of the adaptive controller."""
    early_stop_kl: Optional[float] = None
    """Stop the PPO epochs of an iteration early once a minibatch's approx_kl exceeds this."""
    normalize_reward: bool = False
    """Divide scores by the running std (and subtract the running mean) of all scores so far."""
    reward_clip: Optional[float] = None
    """Clip (normalised) scores to [-c, c]."""
    truncation_penalty: Optional[float] = None
    """Subtract this from the score of responses cut at the length limit (no EOS)."""
    reward_segments: Literal["sequence", "word", "sentence"] = "sequence"
    """Where the task reward enters: ``sequence`` (all of it on the last token), or ``word`` /
    ``sentence``: each segment's last token gets score(response up to it) - score(response up to
    the previous segment), from the empty response on (fine-grained RLHF; a response's rewards sum
    to its score minus the empty response's, a per-prompt baseline). The reward functions then
    score every such prefix too: cheap for a classifier like profanity_check, one extra text per
    segment for a model. Normalisation, clipping and the truncation penalty act on the whole
    response's score."""
    value_model: Optional[str] = None
    """Separate critic (model name or path) with its own value head; unset: a value head on the policy.
    The trained critic is saved in ``<output_dir>/critic`` (its model and ``value_head.safetensors``)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_rows=32, batch_size=8))
    """Held-out prompts scored with greedy decoding at the start, every ``every`` iterations and at the
    end: at most ``max_rows`` of them (None: all), ``batch_size`` at a time; logged as ``eval/reward``,
    ``eval/reward/<part>`` and ``eval/kl``."""

    def validate(self) -> None:
        check_live_reference(self.reference, "ppo")
        for key in ("rollout_batch_size", "ppo_epochs", "samples_per_prompt"):
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.train.batch_size * self.train.grad_accum > self.rollout_batch_size:
            raise UserError(f"train.batch_size x train.grad_accum ({self.train.batch_size * self.train.grad_accum}) "
                            f"is larger than rollout_batch_size ({self.rollout_batch_size})")
        if self.rollout_batch_size % (self.train.batch_size * self.train.grad_accum):
            raise UserError("rollout_batch_size must be a multiple of train.batch_size x train.grad_accum")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise UserError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of samples_per_prompt "
                            f"({self.samples_per_prompt})")
        if self.value_lr is not None and self.value_lr <= 0:
            raise UserError(f"value_lr must be > 0, got {self.value_lr}")
        if self.reward_segments not in ("sequence", "word", "sentence"):
            raise UserError(f"reward_segments must be one of sequence, word, sentence, got '{self.reward_segments}'")
        if self.kl_estimator not in ("k1", "abs", "mse", "k3"):
            raise UserError(f"kl_estimator must be one of k1, abs, mse, k3, got '{self.kl_estimator}'")
        if not self.rewards:
            raise UserError("rewards is empty: give at least one reward function")
        check_best_metric(self.train, "ppo", online_eval_metrics(self.rewards))


class ActorCritic(nn.Module):
    """Policy (with a value head, or next to a separate critic): one module for the engine."""

    def __init__(self, policy: PolicyModel, critic: Optional[PolicyModel] = None):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, with_entropy: bool = False, **batch) -> dict[str, torch.Tensor]:
        out = self.policy(**batch, with_entropy=with_entropy)
        if self.critic is not None:
            out["values"] = self.critic(**batch)["values"]
        return out


class RunningMoments:
    """Running mean and std of all scores seen (Welford / Chan parallel update)."""

    def __init__(self, state: dict):
        self.s = state
        self.s.setdefault("count", 0.0)
        self.s.setdefault("mean", 0.0)
        self.s.setdefault("m2", 0.0)

    def update(self, x: torch.Tensor) -> None:
        n, mean, m2 = x.numel(), float(x.mean()), float(((x - x.mean()) ** 2).sum())
        tot = self.s["count"] + n
        delta = mean - self.s["mean"]
        self.s["mean"] += delta * n / tot
        self.s["m2"] += m2 + delta ** 2 * self.s["count"] * n / tot
        self.s["count"] = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.s["m2"] / max(self.s["count"] - 1, 1)) if self.s["count"] > 1 else 1.0


def segment_ends(prefixes: list[str], unit: str) -> list[int]:
    """Indices of the tokens that end a segment of one response, given ``prefixes[k]``, the decoded
    text of its first k + 1 tokens. A word ends where the next token's text starts with white
    space; a sentence ends there too, after ``.``, ``!``, ``?`` or before a line break. The last
    token always ends a segment (``unit="sequence"``: only it)."""
    n = len(prefixes)
    ends = []
    for k in range(n - 1):
        here, nxt = prefixes[k], prefixes[k + 1]
        piece = nxt[len(here):] if nxt.startswith(here) else ""
        if not piece[:1].isspace() or not here.strip():
            continue
        if unit == "word" or (unit == "sentence" and (here.rstrip()[-1:] in (".", "!", "?") or "\n" in piece)):
            ends.append(k)
    return ends + [n - 1] if n else []


def segment_rewards(labels: torch.Tensor, scores: torch.Tensor, tokenizer, unit: str,
                    score_fn: Callable[[list[str], list[int]], list[float]]) -> tuple[torch.Tensor, int]:
    """The task reward of each response token (B, R) and the number of segments.

    ``unit="sequence"``: each row's score on its last token. ``word`` / ``sentence``: at each
    segment's last token, score(prefix through it) - score(prefix through the previous segment),
    starting from the score of the empty response; the last segment takes ``scores`` (the whole
    responses' scores) minus the previous prefix's. A row then sums to score - score(empty
    response), a per-prompt constant taken off the return (potential-based shaping, Ng et al.
    1999: the optimal policy is unchanged), so clean responses get ~0 everywhere rather than their
    whole score on the first word. ``score_fn(texts, rows)`` scores texts as completions of those
    rows' prompts; ``labels`` (B, R): the response token ids, -100 after the end."""
    B, R = labels.shape
    dense = torch.zeros(B, R)
    mask = labels != -100  # (B, R)
    lengths = mask.sum(1).tolist()
    if unit == "sequence":
        dense[torch.arange(B), torch.tensor(lengths) - 1] = scores
        return dense, B
    ends, texts, owners = [], [], []
    for b in range(B):
        ids = labels[b, : lengths[b]].tolist()
        prefixes = [tokenizer.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
        row_ends = segment_ends(prefixes, unit)
        ends.append(row_ends)
        for text in [""] + [prefixes[k].strip() for k in row_ends[:-1]]:  # the full response is scored already
            texts.append(text)
            owners.append(b)
    prefix_scores = iter(score_fn(texts, owners))
    for b, row_ends in enumerate(ends):
        before = next(prefix_scores)  # the empty response
        for k in row_ends[:-1]:
            now = next(prefix_scores)
            dense[b, k] = now - before
            before = now
        dense[b, row_ends[-1]] = float(scores[b]) - before
    return dense, sum(len(e) for e in ends)


def run(cfg: Config, resume: bool = False, reward_fn: Optional[Callable] = None,
        prompts: Optional[Sequence[str]] = None, model: Optional[nn.Module] = None, tokenizer=None) -> dict:
    """Train with PPO. Python callers may pass a ``reward_fn(prompts, completions, **columns)``
    (replaces ``cfg.rewards``), a list of ``prompts`` (replaces ``cfg.data``) and a loaded
    ``model`` + ``tokenizer`` (replace ``cfg.model``). Returns the summary; the trained policy is
    in ``summary["policy"]`` when called from Python."""
    require_training_backend(cfg.generation, "ppo")
    reward = make_reward(cfg.rewards, cfg.reward_bias, reward_fn, "ppo")
    seed_everything(cfg.train.seed)  # LoRA / value-head initialisation happens before the Engine seeds

    # ---- models and prompts ----------------------------------------------------------------------
    lm, tok = load_online_policy(cfg.model, cfg.lora, model, tokenizer)
    policy = PolicyModel(lm, value_head=cfg.value_model is None)
    critic = None
    if cfg.value_model:
        import dataclasses

        critic_lm = load_model(dataclasses.replace(cfg.model, name_or_path=cfg.value_model),
                               next(lm.parameters()).device)
        critic = PolicyModel(disable_dropout(critic_lm), value_head=True)
    reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy, needed=True,
                                start_model=model)
    items, held, stats = online_prompts(cfg.data, cfg.model, cfg.generation, tok, lm, prompts, cfg.eval.max_rows)
    seq2seq = policy.is_seq2seq

    # ---- engine -----------------------------------------------------------------------------------
    world, rank = process_info(cfg.train)
    batcher = StepBatcher([len(p.ids) for p in items], cfg.rollout_batch_size // cfg.samples_per_prompt, 1,
                          cfg.train.seed, cfg.train.group_by_length, world, rank)
    n_mb = cfg.rollout_batch_size // (cfg.train.batch_size * cfg.train.grad_accum)
    state: dict = {"kl_coef": cfg.kl_coef, "moments": {}}
    engine = Engine(cfg.train, "ppo", cfg, ActorCritic(policy, critic),
                    total_steps_for(cfg.train, batcher.steps_per_epoch), resume=resume, state=state,
                    updates_per_step=cfg.ppo_epochs * n_mb, eval_metrics=online_eval_metrics(cfg.rewards),
                    lr_groups={"policy.value_head.": cfg.value_lr, "critic.": cfg.value_lr} if cfg.value_lr else None)
    engine.extra_summary["data"] = stats.as_dict()
    check_sharded_generation(engine, cfg.generation, "ppo")
    engine.prepare_frozen(reference.model)  # a frozen reference copy: on the Engine's device
    kl_ctl = (losses.AdaptiveKLController(state["kl_coef"], cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else losses.FixedKLController(state["kl_coef"]))
    moments = RunningMoments(state["moments"])
    logger.info(f"ppo: {len(items)} prompts, {len(held)} held-out; reference: {reference.kind}; "
                f"value: {'separate critic ' + cfg.value_model if critic else 'head on the policy'}")

    def save(out):
        save_pretrained(engine.unwrapped().policy, tok, out, merge=cfg.lora.merge_on_save,
                        state_dict=engine.saved_state("policy."))  # gathered weights under fsdp / ZeRO-3
        critic = engine.unwrapped().critic
        if critic is not None:  # the trained critic beside it: its model and value head
            save_pretrained(critic, tok, Path(out) / "critic", state_dict=engine.saved_state("critic."))

    evaluation = HeldOutEval(engine, tok, held, reward, cfg.generation, reference, cfg.eval.batch_size,
                             cfg.eval.every, save=save)
    evaluation.start()

    ac: ActorCritic = engine.unwrapped()
    while not engine.done:
        rng = random.Random(cfg.train.seed * 1_000_003 + engine.step_count)  # this iteration's draws
        # ---- experience: responses, scores, no-grad passes ------------------------------------------
        with unsharded(engine.model):  # train.strategy=fsdp: the root's weights, for calls past its forward
            ro = make_experience(ac.policy, tok, [items[i] for i in batcher.step(engine.step_count)[0]], reward,
                                 cfg.generation, samples_per_prompt=cfg.samples_per_prompt,
                                 max_new_tokens=sample_max_new_tokens(cfg.generation, rng), reference=reference,
                                 critic=ac.critic, chunk=cfg.train.batch_size)
        t0 = time.perf_counter()
        cols = slice(ro.response_start, None)  # the response columns: (B, T) -> (B, R), right-padded
        raw_scores = ro.scores  # (B,)

        def score_prefixes(texts: list[str], rows_b: list[int]) -> list[float]:
            rows = [ro.items[b] for b in rows_b]
            return reward.score([r.prompt for r in rows], texts, **reward_columns([r.row for r in rows]))[0]

        dense, n_segments = segment_rewards(ro.tensors["labels"][:, cols], raw_scores, tok, cfg.reward_segments,
                                            score_prefixes)
        scores = raw_scores
        if cfg.normalize_reward:
            moments.update(scores)
            scores = (scores - state["moments"]["mean"]) / moments.std
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.truncation_penalty is not None:
            scores = scores - cfg.truncation_penalty * ro.truncated.float()

        # ---- per-token rewards, GAE -----------------------------------------------------------------
        mask = ro.mask[:, cols].float()  # (B, R)
        old_values = ro.values[:, cols] * mask  # (B, R)
        kl_tok = losses.kl_penalty(ro.old_logps[:, cols], ro.ref_logps[:, cols], cfg.kl_estimator) * mask  # (B, R)
        last = mask.sum(1).long() - 1  # (B,) index of each response's last token
        # the raw task reward per token (all on the last token, or spread over segments), rescaled
        # like the score, plus on the last token what normalisation / clipping / penalty changed
        scale = 1.0 / moments.std if cfg.normalize_reward else 1.0
        task_tok = dense * scale  # (B, R)
        task_tok[torch.arange(len(last)), last] += scores - raw_scores * scale
        rewards_tok = -kl_ctl.value * kl_tok + task_tok  # (B, R)
        adv, returns = losses.gae(rewards_tok, old_values, mask, cfg.gamma, cfg.lam)  # (B, R)
        if cfg.whiten_advantages:
            adv = losses.whiten(adv, mask) * mask
        B, T = ro.mask.shape
        tensors = {**ro.tensors, "old_logps": ro.old_logps, "resp_mask": ro.mask.float()}
        for name, x in (("old_values", old_values), ("advantages", adv), ("returns", returns)):
            tensors[name] = torch.zeros((B, T)).index_copy(1, torch.arange(T)[cols], x)  # (B, T)
        t_adv = time.perf_counter()

        # ---- PPO epochs over shuffled minibatches -----------------------------------------------------
        mb_rows = cfg.train.batch_size * cfg.train.grad_accum
        update_metrics: list[dict] = []
        stopped_early = False
        for _epoch in range(cfg.ppo_epochs):
            perm = grouped_permutation(B, cfg.samples_per_prompt, torch.Generator().manual_seed(rng.randrange(2**31)))
            for s in range(0, B, mb_rows):
                micro = [take_rows(tensors, m, seq2seq) for m in perm[s: s + mb_rows].split(cfg.train.batch_size)]
                weights = [float(mb["resp_mask"].sum()) for mb in micro]
                m = engine.step(lambda model, mb: ppo_loss(model, mb, cfg), micro, weights)
                update_metrics.append(m)
                if cfg.early_stop_kl is not None and m["approx_kl"] > cfg.early_stop_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        t_upd = time.perf_counter()

        # ---- KL controller, metrics -------------------------------------------------------------------
        kl_seq = float((kl_tok.sum(1)).mean())  # nats per response
        kl_ctl.update(kl_seq, B * world)
        state["kl_coef"] = kl_ctl.value
        metrics = {k: sum(u[k] for u in update_metrics) / len(update_metrics) for k in update_metrics[0]}
        metrics.update(ro.metrics())
        metrics.update({
            "reward/score_used": float(scores.mean()),
            "kl": kl_seq, "kl_coef": kl_ctl.value, "entropy": float(losses.masked_mean(ro.entropy, ro.mask)),
            **({"reward/segments_per_response": n_segments / B} if cfg.reward_segments != "sequence" else {}),
            "truncated_fraction": float(ro.truncated.float().mean()),
            "explained_variance": explained_variance(old_values, returns, mask),
            "ppo/updates": len(update_metrics), "ppo/stopped_early": float(stopped_early),
            "time/generate": ro.times["time/generate"], "time/reward": ro.times["time/reward"] + t_adv - t0,
            "time/reference_value": ro.times["time/no_grad"], "time/update": t_upd - t_adv,
            **ro.engine_metrics(),
        })
        # engine.step timed the updates; add generation, scoring and the no-grad passes
        engine.end_step(metrics, extra_seconds=sum(ro.times.values()) + t_adv - t0,
                        evaluate=evaluation.periodic)

    extra = {**evaluation.end("ppo"), "reference": reference.kind, "kl_coef_final": kl_ctl.value}

    summary = engine.finish(save if cfg.train.save_model else None, extra)
    summary["policy"] = engine.unwrapped().policy.lm
    return summary


def ppo_loss(model: nn.Module, mb: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate + vf_coef x clipped value loss on one micro-batch; every tensor (b, T) in
    the batch's layout, ``resp_mask`` marking the response tokens."""
    out = model(**{k: mb[k] for k in MODEL_KEYS if k in mb})
    mask = mb["resp_mask"]  # (b, T)
    pg, pg_m = losses.ppo_policy(out["logps"], mb["old_logps"], mb["advantages"], mask, cfg.clip_range)
    vf, vf_m = losses.ppo_value(out["values"], mb["old_values"], mb["returns"], mask, cfg.value_clip_range)
    loss = pg + cfg.vf_coef * vf
    return loss, {"loss/policy": float(pg.detach()), "loss/value": float(vf.detach()), "clipfrac": pg_m["clipfrac"],
                  "approx_kl": pg_m["approx_kl"], "value_clipfrac": vf_m["value_clipfrac"]}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1: perfect critic, <= 0: no better than a constant)."""
    v, r = values[mask.bool()], returns[mask.bool()]
    var_r = r.var() if r.numel() > 1 else torch.tensor(0.0)
    return float(1 - (r - v).var() / var_r) if var_r > 0 else 0.0
