"""Critic-free online policy optimisation: GRPO, RLOO and REINFORCE++ (``rlhfkit grpo`` /
``rlhfkit rloo``; ``algorithm: reinforce_pp``).

GRPO: Shao et al. 2024, "DeepSeekMath", section 4.1. RLOO: Ahmadian et al. 2024, "Back to
Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback in LLMs".
REINFORCE++: Hu et al. 2025 (as OpenRLHF's and verl's ``reinforce_plus_plus``). None needs a value
model. They share PPO's experience core (``rollout.make_experience``) and differ from PPO and
from each other only in the advantages and the loss.

One iteration (one logged step, ``train.max_steps`` of them, or ``train.epochs`` passes over the
prompts):

1. data: ``prompts_per_step`` prompts (a seeded permutation per pass, length-grouped with
   ``train.group_by_length``), each answered ``samples_per_prompt`` = G times, the answers to a
   prompt consecutive;
2. experience (``rollout.make_experience``): sample, score with the reward layer (``rewards:``,
   or a Python ``reward_fn``; each part logged as ``reward/<name>``), and the no-grad passes:
   the reference's log-probs (``kl_coef`` > 0) and the sampling policy's when an iteration makes
   several updates (or REINFORCE++ needs them for its KL reward);
3. advantages:
   ``grpo``: A_i = (r_i - mean_g r) / (std_g r + 1e-4) (``scale_rewards=false``: only the mean is
   taken off, as Dr. GRPO); ``rloo``: A_i = r_i - mean of the other G - 1 rewards (both
   ``losses.group_advantages``, one value for all tokens of a response); ``reinforce_pp``: the
   per-token reward -kl_coef (log pi_old - log pi_ref) plus the score on the last token, summed
   to the end (gamma 1) and whitened over the whole batch (``losses.reinforce_pp_advantages``);
4. update: ``ppo_epochs`` passes, each shuffled by whole groups (``grouped_permutation``: the
   prefix-tree forward runs a group's prompt once) and cut into ``minibatches`` minibatches, one
   optimizer step per minibatch, of ``losses.clipped_policy``:
       l_it = max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range)) + kl_coef k3_it
   (no k3 term for REINFORCE++, whose KL is in the reward), reduced by ``loss_aggregation``:
   ``token`` (DAPO: mean over all tokens of the minibatch), ``sequence`` (the GRPO paper: mean per
   response, then over responses) or ``dr_grpo`` (Dr. GRPO: token sum / (responses x the
   generation budget)). Gradient accumulation over micro-batches of ``train.batch_size``
   responses is exact for all three (the engine weighs micro-batches by tokens or rows).

Metrics: ``reward/mean``, ``reward/std``, ``reward/<part>``, ``advantage/zero_std_groups``
(groups whose rewards are all equal carry no signal), ``kl`` (mean per-token k3 to the reference
in the update passes; for REINFORCE++ the k1 of the sampling pass), ``clipfrac``, ``approx_kl``,
``entropy``, ``response_length/mean``, ``response_length/truncated``, ``loss``, ``grad_norm``,
``lr``, ``time/generate``, ``time/reward``, ``time/reference`` (the no-grad passes),
``time/update``; update metrics are averaged over the iteration's updates. Held-out evaluation
(greedy; ``eval/reward``, ``eval/reward/<part>``, ``eval/kl``) before training, every
``eval.every`` iterations and at the end (``recipes/_online.py``).

Deliberate deviations:
- GRPO's KL term is the paper's k3 estimator but aggregated like the surrogate; the paper's outer
  iteration over reward-model updates (iterative GRPO) is left out.
- RLOO in the paper is REINFORCE on whole sequences with the KL folded into the reward. Here the
  RLOO advantage goes through the same clipped loss: with one update per iteration the ratio is
  1 and the gradient is exactly REINFORCE's, -A_i grad log pi(o_i), divided by the batch's token
  count (token aggregation); the KL is a k3 loss term rather than a reward penalty.
- ``train.max_steps`` counts iterations; the learning-rate schedule spans all ``max_steps x
  ppo_epochs x minibatches`` optimizer updates. ``train.grad_accum`` must stay 1: a minibatch is
  one optimizer step, accumulated over micro-batches of ``train.batch_size`` responses.
- Across several processes each process samples its own prompts and normalises within its own
  groups (REINFORCE++: within its own batch), which never span processes.
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Optional, Sequence

import torch

from rlhfkit import losses
from rlhfkit.config import (
    ConfigError, DataConfig, GenerationConfig, LoraConfig, ModelConfig, ReferenceConfig, RewardConfig, TrainConfig,
    EvalConfig, _check_choice, _check_positive, check_best_metric, check_live_reference,
)
from rlhfkit.data import StepBatcher
from rlhfkit.distributed import unsharded
from rlhfkit.engine import Engine, process_info, total_steps_for
from rlhfkit.generation import sample_max_new_tokens
from rlhfkit.models import save_pretrained
from rlhfkit.policy import PolicyModel, build_reference
from rlhfkit.recipes._online import HeldOutEval, check_sharded_generation, online_eval_metrics, online_prompts
from rlhfkit.rollout import (MODEL_KEYS, Rollout, grouped_permutation, load_online_policy, make_experience,
                             make_reward, take_rows)
from rlhfkit.utils import logger, seed_everything
from rlhfkit.backends import require_training_backend

ALGORITHMS = ["grpo", "rloo", "reinforce_pp"]
AGGREGATIONS = list(losses.AGGREGATIONS)


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"beta": "kl_coef", "clip_epsilon": "clip_range",
                                         "group_size": "samples_per_prompt", "train.eval_every": "eval.every",
                                         "eval_max_rows": "eval.max_rows"}
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
    """The KL reference policy (loaded only when ``kl_coef`` > 0)."""
    algorithm: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """Advantage: ``grpo`` (group mean, optionally divided by the group std), ``rloo`` (mean of
    the other responses; ``rlhfkit rloo`` sets it) or ``reinforce_pp`` (REINFORCE++: returns with
    a per-token KL reward, whitened over the batch)."""
    prompts_per_step: int = 8
    """Prompts per iteration (per process)."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt, G (>= 2 for grpo/rloo: the baseline needs other responses)."""
    ppo_epochs: int = 1
    """Passes over each iteration's responses (mu in the GRPO paper; 1 is fully on-policy)."""
    minibatches: int = 1
    """Optimizer steps per pass: the responses are shuffled and cut into this many minibatches."""
    clip_range: float = 0.2
    """Clip range of the probability ratio in the surrogate."""
    kl_coef: float = 0.04
    """Weight of the KL to the reference: the k3 loss term (grpo/rloo) or the per-token k1 reward
    penalty (reinforce_pp). 0 loads no reference."""
    scale_rewards: bool = True
    """``grpo``: divide by the group's reward std (false: only subtract the mean, as in Dr. GRPO).
    Not used by ``rloo`` / ``reinforce_pp``."""
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = "token"
    """``token``: mean over all valid tokens of a minibatch (DAPO); ``sequence``: mean over each
    response's tokens, then over responses (the GRPO paper); ``dr_grpo``: token sum / (responses x
    the generation budget, the longest ``max_new_tokens``) (Dr. GRPO)."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_rows=64))
    """Greedy-response reward evaluation on held-out prompts: how often (``every``), how many prompts
    (``max_rows``; None: all), and how many at a time (``batch_size``)."""

    def validate(self) -> None:
        check_live_reference(self.reference, self.algorithm)
        check_best_metric(self.train, self.algorithm, online_eval_metrics(self.rewards))
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_choice("loss_aggregation", self.loss_aggregation, AGGREGATIONS)
        _check_positive("prompts_per_step", self.prompts_per_step)
        _check_positive("ppo_epochs", self.ppo_epochs)
        _check_positive("minibatches", self.minibatches)
        _check_positive("clip_range", self.clip_range)
        _check_positive("samples_per_prompt", self.samples_per_prompt)
        if self.samples_per_prompt < 2 and self.algorithm != "reinforce_pp":
            raise ConfigError(f"samples_per_prompt must be >= 2 for {self.algorithm} (the baseline needs other "
                              f"responses), got {self.samples_per_prompt}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        n = self.prompts_per_step * self.samples_per_prompt
        if n % self.minibatches:
            raise ConfigError(f"minibatches={self.minibatches} must divide prompts_per_step x samples_per_prompt = {n}")
        if self.train.grad_accum != 1:
            raise ConfigError("train.grad_accum must be 1 for grpo/rloo: a minibatch is one optimizer step, "
                              "accumulated over micro-batches of train.batch_size responses")


# --------------------------------------------------------------------------------------------
# Advantages and the loss
# --------------------------------------------------------------------------------------------


def advantages(ro: Rollout, cfg: Config) -> torch.Tensor:
    """(B,) one advantage per response (grpo, rloo) or (B, T) per token (reinforce_pp)."""
    if cfg.algorithm != "reinforce_pp":
        return losses.group_advantages(ro.scores, cfg.samples_per_prompt, cfg.algorithm, cfg.scale_rewards)
    mask = ro.mask  # (B, T)
    token_rewards = torch.zeros(mask.shape)  # (B, T)
    if cfg.kl_coef > 0:
        token_rewards -= cfg.kl_coef * losses.kl_penalty(ro.old_logps, ro.ref_logps, "k1") * mask
    last = (mask * torch.arange(mask.shape[1])).argmax(1)  # (B,) column of each response's last token
    token_rewards[torch.arange(len(last)), last] += ro.scores
    return losses.reinforce_pp_advantages(token_rewards, mask)


def policy_loss(model, mb: dict, cfg: Config, max_tokens: int) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch for ``Engine.step``: a forward of the policy, then
    ``losses.clipped_policy``. Without ``old_logps`` in ``mb`` the live log-probs, detached, are the
    old ones (ratio = 1: the iteration's only update)."""
    out = model(**{k: mb[k] for k in MODEL_KEYS if k in mb}, with_entropy=True)
    entropy = out.pop("entropy").detach()  # (b, T); dropping the graph branch frees its memory
    old = mb["old_logps"] if "old_logps" in mb else out["logps"].detach()  # (b, T)
    kl_in_loss = cfg.kl_coef if cfg.algorithm != "reinforce_pp" else 0.0
    loss, metrics = losses.clipped_policy(out["logps"], old, mb["advantages"], out["mask"], cfg.clip_range,
                                          cfg.loss_aggregation, max_tokens, mb.get("ref_logps"), kl_in_loss)
    metrics["entropy"] = losses.masked_mean(entropy, out["mask"]).item()
    return loss, metrics


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def run(cfg: Config, resume: bool = False, reward_fn: Optional[Callable] = None,
        prompts: Optional[Sequence[str]] = None, model=None, tokenizer=None) -> dict:
    """Train with GRPO, RLOO or REINFORCE++. Python callers may pass ``reward_fn(prompts,
    completions, **columns) -> list[float]`` (replaces ``cfg.rewards``), a list of ``prompts``
    (replaces ``cfg.data``) and a loaded ``model`` + ``tokenizer`` (replace ``cfg.model``).
    Returns the summary; the trained policy is in ``summary["policy"]``."""
    require_training_backend(cfg.generation, cfg.algorithm)
    reward = make_reward(cfg.rewards, cfg.reward_bias, reward_fn, cfg.algorithm)
    seed_everything(cfg.train.seed)  # fresh LoRA weights too: the run does not depend on what ran before
    lm, tok = load_online_policy(cfg.model, cfg.lora, model, tokenizer)
    items, held, stats = online_prompts(cfg.data, cfg.model, cfg.generation, tok, lm, prompts, cfg.eval.max_rows)
    G = cfg.samples_per_prompt
    logger.info(f"{cfg.algorithm}: {len(items)} training prompts x {G} responses, {len(held)} held-out prompts")
    policy = PolicyModel(lm)
    reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy, needed=cfg.kl_coef > 0,
                                start_model=model)
    world, rank = process_info(cfg.train)
    batcher = StepBatcher([len(p.ids) for p in items], cfg.prompts_per_step, 1, cfg.train.seed,
                          cfg.train.group_by_length, world, rank)
    updates = cfg.ppo_epochs * cfg.minibatches
    engine = Engine(cfg.train, cfg.algorithm, cfg, policy, total_steps_for(cfg.train, batcher.steps_per_epoch),
                    resume=resume, updates_per_step=updates, eval_metrics=online_eval_metrics(cfg.rewards))
    engine.prepare_frozen(reference.model)  # a frozen reference copy: on the Engine's device
    engine.extra_summary["data"] = stats.as_dict()
    check_sharded_generation(engine, cfg.generation, cfg.algorithm)

    def save(out):
        save_pretrained(engine.unwrapped().lm, tok, out, merge=cfg.lora.merge_on_save,
                        state_dict=engine.saved_state("lm."))  # gathered weights under fsdp / ZeRO-3

    evaluation = HeldOutEval(engine, tok, held, reward, cfg.generation, reference if cfg.kl_coef > 0 else None,
                             cfg.eval.batch_size, cfg.eval.every, save=save)
    gather = (lambda x: engine.accelerator.gather(x.to(engine.device)).cpu()) if engine.world_size > 1 else None
    max_tokens = max(cfg.generation.output_length_range or [cfg.generation.max_new_tokens])
    evaluation.start()
    while not engine.done:
        it = engine.step_count
        rng = random.Random(cfg.train.seed * 1_000_003 + it)  # this iteration's draws, from (seed, step)
        # 1-2: prompts -> responses -> rewards -> no-grad passes
        with unsharded(engine.model):  # train.strategy=fsdp: the root's weights, for calls past its forward
            ro = make_experience(engine.unwrapped(), tok, [items[i] for i in batcher.step(it)[0]], reward,
                                 cfg.generation, samples_per_prompt=G,
                                 max_new_tokens=sample_max_new_tokens(cfg.generation, rng),
                                 reference=reference if cfg.kl_coef > 0 else None,
                                 old_logps=updates > 1 or cfg.algorithm == "reinforce_pp", chunk=cfg.train.batch_size)
        # 3: advantages
        tensors = {**ro.tensors, "advantages": advantages(ro, cfg)}
        if ro.ref_logps is not None and cfg.algorithm != "reinforce_pp":
            tensors["ref_logps"] = ro.ref_logps
        if updates > 1:
            tensors["old_logps"] = ro.old_logps
        # 4: ppo_epochs x minibatches optimizer steps
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        for _ in range(cfg.ppo_epochs):
            for mb_idx in grouped_permutation(len(ro.items), G, gen).chunk(cfg.minibatches):
                micro = [take_rows(tensors, idx, policy.is_seq2seq) for idx in mb_idx.split(cfg.train.batch_size)]
                # the engine weighs micro-batch losses by these units: tokens or responses
                weights = [float((m["labels"] != -100).sum()) if cfg.loss_aggregation == "token"
                           else float(len(m["labels"])) for m in micro]
                update = engine.step(functools.partial(policy_loss, cfg=cfg, max_tokens=max_tokens), micro, weights)
                for k, v in update.items():
                    sums[k] = sums.get(k, 0.0) + v
        metrics = {k: v / updates for k, v in sums.items()}
        metrics["lr"] = update["lr"]  # of the iteration's last update
        metrics.update(ro.metrics(gather))
        metrics.update(ro.engine_metrics())
        if G > 1:
            scores = gather(ro.scores[:, None])[:, 0] if gather else ro.scores
            groups = scores.reshape(-1, G)  # (prompts, G)
            metrics["advantage/zero_std_groups"] = float((groups.max(1).values == groups.min(1).values).float().mean())
        if cfg.algorithm == "reinforce_pp" and ro.ref_logps is not None:
            metrics["kl"] = float(losses.masked_mean(ro.old_logps - ro.ref_logps, ro.mask))
        metrics.update({"time/generate": ro.times["time/generate"], "time/reward": ro.times["time/reward"],
                        "time/reference": ro.times["time/no_grad"], "time/update": time.perf_counter() - t0})
        engine.end_step(metrics, extra_seconds=sum(ro.times.values()), evaluate=evaluation.periodic)
    extra = evaluation.end(cfg.algorithm)

    summary = engine.finish(save if cfg.train.save_model else None, extra)
    summary["policy"] = engine.unwrapped().lm  # for Python callers (rlhfkit.train); not in summary.json
    return summary


__all__ = ["Config", "run", "advantages", "policy_loss"]
