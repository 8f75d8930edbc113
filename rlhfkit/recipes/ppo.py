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
3. no-grad passes: log-probs and values of the sampling policy, log-probs of the reference;
4. per-token reward: r_t = -beta * KL_t(pi || ref) on every response token, plus the task
   reward on the last one (beta fixed, or adapted towards ``kl_target`` by Ziegler's
   controller). With ``reward_segments`` ``word`` or ``sentence`` the task reward is spread over
   the response instead, as in fine-grained RLHF (Wu et al. 2023, "Fine-Grained Human Feedback
   Gives Better Rewards for Language Model Training"): the reward function scores every prefix
   that ends a segment (and the empty response), and each segment's last token gets the change
   its segment made, so a toxic word is blamed on its own tokens;
5. advantages by GAE (gamma, lambda), whitened over the batch; returns = A + V;
6. ``ppo_epochs`` passes over shuffled minibatches of the clipped surrogate plus
   ``vf_coef`` x the clipped value loss; an epoch stops early when its approx_kl passes
   ``target_kl``.

The value head sits on the policy's backbone (``value_model`` unset) or on a separate critic
model. The reference is the LoRA base with the adapter disabled (no second copy), a frozen copy,
or a trained adapter loaded frozen next to the trainable one (see ``ReferenceConfig``).

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
from typing import Callable, Optional

import torch
from torch import nn

from rlhfkit import losses
from rlhfkit.config import (DataConfig, GenerationConfig, LoraConfig, ModelConfig, ReferenceConfig, RewardConfig,
                            TrainConfig, UserError)
from rlhfkit.data import StepBatcher, Table, encode_prompt, load_splits, user_prompt, wrap_prompt
from rlhfkit.engine import Engine, process_info
from rlhfkit.models import PolicyModel, build_reference, disable_dropout, load_model, load_policy, save_pretrained, unwrap
from rlhfkit.backends import require_training_backend
from rlhfkit.rollout import engine_metrics, generate, rollout, sample_max_new_tokens
from rlhfkit.utils import logger, seed_everything


@dataclass
class Config:
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
    cliprange: float = 0.2
    """Clip epsilon of the policy ratio."""
    cliprange_value: float = 0.2
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
    kl_estimator: str = "k1"
    """Per-token KL estimate: ``k1`` (log ratio), ``abs``, ``mse`` or ``k3``."""
    adaptive_kl: bool = False
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in episodes) of the adaptive controller."""
    target_kl: Optional[float] = None
    """Stop the PPO epochs of an iteration early once a minibatch's approx_kl exceeds this."""
    normalize_reward: bool = False
    """Divide scores by the running std (and subtract the running mean) of all scores so far."""
    reward_clip: Optional[float] = None
    """Clip (normalised) scores to [-c, c]."""
    truncation_penalty: Optional[float] = None
    """Subtract this from the score of responses cut at the length limit (no EOS)."""
    reward_segments: str = "sequence"
    """Where the task reward enters: ``sequence`` (all of it on the last token), or ``word`` /
    ``sentence``: each segment's last token gets score(response up to it) - score(response up to
    the previous segment), from the empty response on (fine-grained RLHF; a response's rewards sum
    to its score minus the empty response's, a per-prompt baseline). The reward functions then
    score every such prefix too: cheap for a classifier like profanity_check, one extra text per
    segment for a model. Normalisation, clipping and the truncation penalty act on the whole
    response's score."""
    value_model: Optional[str] = None
    """Separate critic (model name or path) with its own value head; unset: a value head on the policy."""
    eval_prompts: int = 32
    """Held-out prompts scored with greedy decoding at the start and the end."""

    def validate(self) -> None:
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


def response_slice(batch: dict, is_seq2seq: bool) -> slice:
    """Columns of the (B, T) tensors that hold the responses (right-padded)."""
    if is_seq2seq:
        return slice(0, None)
    valid = batch["labels"] != -100  # (B, T)
    first = int(valid.float().argmax(dim=1).min())
    return slice(first, None)


def left_trim(batch: dict, rows: torch.Tensor, is_seq2seq: bool) -> tuple[dict, int]:
    """Rows ``rows`` of a collated batch without the leading columns that are left padding in all
    of them, and the number of columns dropped. Causal only (seq2seq batches are returned whole):
    positions count from each row's first real token, so the outputs are those of the full batch."""
    sub = {k: v[rows] for k, v in batch.items()}
    if is_seq2seq:
        return sub, 0
    lo = int(sub["attention_mask"].float().argmax(dim=1).min())  # first column any row uses
    return {k: v[:, lo:] for k, v in sub.items()}, lo


def forward_by_length(fn: Callable[[dict], dict], batch: dict, size: int, is_seq2seq: bool) -> dict:
    """Apply ``fn`` (a sub-batch -> dict of (b, T') tensors) to chunks of ``size`` rows taken in
    order of length, each without its common left padding, and reassemble (B, T) tensors: the
    no-grad passes then spend little compute on padding."""
    B, T = batch["labels"].shape
    order = batch["attention_mask"].sum(1).argsort()  # (B,) shortest first
    out: dict[str, torch.Tensor] = {}
    for rows in order.split(size):
        sub, lo = left_trim(batch, rows, is_seq2seq)
        for k, v in fn(sub).items():
            if k not in out:
                out[k] = v.new_zeros((B, T))
            out[k][rows, lo:] = v
    return out


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


def run(cfg: Config, resume: bool = False, reward_fn: Optional[Callable] = None, prompts: Optional[list[str]] = None,
        model: Optional[nn.Module] = None, tokenizer=None) -> dict:
    """Train with PPO. Python callers may pass a ``reward_fn(prompts, completions, **columns)``
    (replaces ``cfg.rewards``), a list of ``prompts`` (replaces ``cfg.data``) and a loaded
    ``model`` + ``tokenizer`` (replace ``cfg.model``). Returns the summary; the trained policy is
    in ``summary["policy"]`` when called from Python."""
    from rlhfkit.rewards import Composite, build_reward, validate_reward
    require_training_backend(cfg.generation, "ppo")
    seed_everything(cfg.train.seed)  # LoRA / value-head initialisation happens before the Engine seeds

    # ---- models -------------------------------------------------------------------------------
    if model is None:
        lm, tok = load_policy(cfg.model, cfg.lora)
    else:
        from rlhfkit.models import apply_lora

        lm, tok = model, tokenizer
        if tok is None:
            raise UserError("pass tokenizer= with a model object")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if cfg.lora.enabled and not hasattr(lm, "peft_config"):
            lm = apply_lora(lm, cfg.lora)
    seq2seq = bool(unwrap(lm).config.is_encoder_decoder)
    disable_dropout(lm)
    policy = PolicyModel(lm, value_head=cfg.value_model is None)
    critic = None
    if cfg.value_model:
        import dataclasses

        critic_lm = load_model(dataclasses.replace(cfg.model, name_or_path=cfg.value_model),
                               next(lm.parameters()).device)
        critic = PolicyModel(disable_dropout(critic_lm), value_head=True)
    reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy, needed=True)

    # ---- data -----------------------------------------------------------------------------------
    if prompts is not None:
        table, held = Table([{"prompt": p} for p in prompts], "<prompts>"), None
        data_cfg = DataConfig(chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt)
    else:
        table, held = load_splits(cfg.data)
        data_cfg = cfg.data
    # (user prompt before any chat template -> reward functions; wrapped prompt -> the policy; row)
    rows = [(user_prompt(table, i, data_cfg), table.rows[i]) for i in range(len(table.rows))]
    held_rows = [(user_prompt(held, i, data_cfg), held.rows[i]) for i in range(len(held.rows))][: cfg.eval_prompts] \
        if held else []
    wrapped = [wrap_prompt(p, data_cfg, tok) for p, _ in rows]
    prompt_ids = [encode_prompt(tok, p, seq2seq)[-data_cfg.max_prompt_length:] for p in wrapped]

    # ---- rewards --------------------------------------------------------------------------------
    if reward_fn is not None:
        scorer = Composite([("reward", 1.0, validate_reward(reward_fn))], bias=0.0)
    else:
        scorer = build_reward(cfg.rewards, bias=cfg.reward_bias)

    def score(completions: list[str], idx: list[int], src_rows) -> tuple[list, dict]:
        """Composite reward of the completions of rows ``idx``; the rows' columns are passed on."""
        columns = {k: [src_rows[i][1].get(k) for i in idx] for k in src_rows[idx[0]][1] if k != "prompt"}
        return scorer.score([src_rows[i][0] for i in idx], completions, **columns)

    # ---- engine ---------------------------------------------------------------------------------
    world, rank = process_info(cfg.train)
    batcher = StepBatcher([len(p) for p in prompt_ids], cfg.rollout_batch_size // cfg.samples_per_prompt, 1,
                          cfg.train.seed,
                          group_by_length=False, world_size=world, rank=rank)
    n_mb = cfg.rollout_batch_size // (cfg.train.batch_size * cfg.train.grad_accum)
    state: dict = {"kl_coef": cfg.kl_coef, "moments": {}}
    engine = Engine(cfg.train, "ppo", cfg, ActorCritic(policy, critic), cfg.train.max_steps, resume=resume,
                    state=state, updates_per_step=cfg.ppo_epochs * n_mb,
                    lr_groups={"policy.value_head.": cfg.value_lr, "critic.": cfg.value_lr} if cfg.value_lr else None)
    kl_ctl = (losses.AdaptiveKLController(state["kl_coef"], cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else losses.FixedKLController(state["kl_coef"]))
    moments = RunningMoments(state["moments"])
    rng = random.Random(cfg.train.seed + engine.step_count)
    logger.info(f"ppo: {len(rows)} prompts, {len(held_rows)} held-out; reference: {reference.kind}; "
                f"value: {'separate critic ' + cfg.value_model if critic else 'head on the policy'}")

    def evaluate(tag: str) -> Optional[float]:
        if not held_rows:
            return None
        greedy = GenerationConfig(**{**cfg.generation.__dict__, "do_sample": False, "output_length_range": None})
        prompts_w = [wrap_prompt(p, data_cfg, tok) for p, _ in held_rows]
        texts = generate(engine.unwrapped().policy, tok, prompts_w, greedy, seed=cfg.train.seed)
        total, _ = score(texts, list(range(len(held_rows))), held_rows)
        mean = sum(total) / len(total)
        engine.log({f"eval/reward_{tag}": mean})
        return mean

    if "eval_reward_start" not in state:
        state["eval_reward_start"] = evaluate("start")

    ac: ActorCritic = engine.unwrapped()
    while not engine.done:
        t0 = time.perf_counter()
        idx = [i for i in batcher.step(engine.step_count)[0] for _ in range(cfg.samples_per_prompt)]
        exp = rollout(ac.policy, tok, [wrapped[i] for i in idx], [prompt_ids[i] for i in idx], cfg.generation,
                      sample_max_new_tokens(cfg.generation, rng))
        t_gen = time.perf_counter()
        total, parts = score(exp.completions, idx, rows)
        scores = torch.tensor(total, dtype=torch.float32)  # (B,)
        raw_scores = scores.clone()
        cols = response_slice(exp.batch, seq2seq)
        dense, n_segments = segment_rewards(exp.batch["labels"][:, cols], raw_scores, tok, cfg.reward_segments,
                                            lambda texts, rows_b: score(texts, [idx[b] for b in rows_b], rows)[0])
        if cfg.normalize_reward:
            moments.update(scores)
            scores = (scores - state["moments"]["mean"]) / moments.std
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.truncation_penalty is not None:
            scores = scores - cfg.truncation_penalty * torch.tensor(exp.truncated, dtype=torch.float32)
        t_score = time.perf_counter()

        # ---- no-grad passes: old log-probs and values, reference log-probs ------------------------
        batch = exp.batch
        with torch.no_grad():
            ac.eval()
            old = forward_by_length(lambda b: ac(**{k: v.to(engine.device) for k, v in b.items()}, with_entropy=True),
                                    batch, cfg.train.batch_size, seq2seq)
            ac.train()
            ref_logps = forward_by_length(lambda b: {"ref": reference.logps({k: v.to(engine.device) for k, v in b.items()})},
                                          batch, cfg.train.batch_size, seq2seq)["ref"]
        mask = old["mask"][:, cols].float()  # (B, R)
        old_logps = old["logps"][:, cols]  # (B, R)
        old_values = old["values"][:, cols] * mask  # (B, R)
        ref_lp = ref_logps[:, cols]  # (B, R)
        kl_tok = losses.kl_penalty(old_logps, ref_lp, cfg.kl_estimator) * mask  # (B, R)
        last = mask.sum(1).long() - 1  # (B,) index of each response's last token
        # the raw task reward per token (all on the last token, or spread over segments), rescaled
        # like the score, plus on the last token what normalisation / clipping / penalty changed
        scale = 1.0 / moments.std if cfg.normalize_reward else 1.0
        task_tok = dense.to(mask.device) * scale  # (B, R)
        task_tok[torch.arange(len(last)), last] += (scores - raw_scores * scale).to(mask.device)
        rewards_tok = -kl_ctl.value * kl_tok + task_tok  # (B, R)
        advantages, returns = losses.gae(rewards_tok, old_values, mask, cfg.gamma, cfg.lam)  # (B, R)
        if cfg.whiten_advantages:
            advantages = losses.whiten(advantages, mask) * mask
        t_ref = time.perf_counter()

        # ---- PPO epochs over shuffled minibatches -------------------------------------------------
        B = len(idx)
        mb_rows = cfg.train.batch_size * cfg.train.grad_accum
        update_metrics: list[dict] = []
        stopped_early = False
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            for s in range(0, B, mb_rows):
                rows_mb = perm[s: s + mb_rows]
                micro = []
                for m in rows_mb.split(cfg.train.batch_size):
                    sub, lo = left_trim(batch, m, seq2seq)
                    micro.append({**sub, "cols": slice(cols.start - lo, None), "old_logps": old_logps[m],
                                  "old_values": old_values[m], "advantages": advantages[m], "returns": returns[m],
                                  "resp_mask": mask[m]})
                weights = [float(mb["resp_mask"].sum()) for mb in micro]
                m = engine.step(lambda model, mb: ppo_loss(model, mb, cfg), micro, weights)
                update_metrics.append(m)
                if cfg.target_kl is not None and m["approx_kl"] > cfg.target_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        t_upd = time.perf_counter()

        # ---- KL controller, metrics ---------------------------------------------------------------
        kl_seq = float((kl_tok.sum(1)).mean())  # nats per response
        kl_ctl.update(kl_seq, B * world)
        state["kl_coef"] = kl_ctl.value
        metrics = {k: sum(u[k] for u in update_metrics) / len(update_metrics) for k in update_metrics[0]}
        entropy = float((old["entropy"][:, cols] * mask).sum() / mask.sum())
        metrics.update({
            "reward/mean": float(raw_scores.mean()), "reward/std": float(raw_scores.std()) if B > 1 else 0.0,
            "reward/score_used": float(scores.mean()),
            **({f"reward/{n}": sum(v) / len(v) for n, v in parts.items()} if len(parts) > 1 else {}),
            "kl": kl_seq, "kl_coef": kl_ctl.value, "entropy": entropy,
            "response_length/mean": sum(exp.response_lengths) / B,
            **({"reward/segments_per_response": n_segments / B} if cfg.reward_segments != "sequence" else {}),
            "truncated_fraction": sum(exp.truncated) / B,
            "explained_variance": explained_variance(old_values, returns, mask),
            "ppo/updates": len(update_metrics), "ppo/stopped_early": float(stopped_early),
            "time/generate": t_gen - t0, "time/reward": t_score - t_gen, "time/reference_value": t_ref - t_score,
            "time/update": t_upd - t_ref,
            **engine_metrics(exp, old["logps"]),
        })
        # engine.step timed the updates; add generation, scoring and the no-grad passes
        engine.end_step(metrics, extra_seconds=t_ref - t0)

    state["eval_reward_end"] = evaluate("end")
    extra = {"eval_reward_start": state.get("eval_reward_start"), "eval_reward_end": state["eval_reward_end"],
             "reference": reference.kind, "kl_coef_final": kl_ctl.value}

    def save(out):
        save_pretrained(engine.unwrapped().policy, tok, out, merge=cfg.lora.merge_on_save)

    summary = engine.finish(save if cfg.train.save_model else None, extra)
    summary["policy"] = engine.unwrapped().policy.lm
    return summary


def ppo_loss(model: nn.Module, mb: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate + vf_coef x clipped value loss on one micro-batch (``mb["cols"]``: its
    response columns)."""
    out = model(**{k: mb[k] for k in ("input_ids", "attention_mask", "labels", "decoder_attention_mask") if k in mb})
    cols = mb["cols"]
    mask = mb["resp_mask"]  # (b, R)
    logps = out["logps"][:, cols]  # (b, R)
    values = out["values"][:, cols]  # (b, R)
    pg, pg_m = losses.ppo_policy(logps, mb["old_logps"], mb["advantages"], mask, cfg.cliprange)
    vf, vf_m = losses.ppo_value(values, mb["old_values"], mb["returns"], mask, cfg.cliprange_value)
    loss = pg + cfg.vf_coef * vf
    return loss, {"loss/policy": float(pg.detach()), "loss/value": float(vf.detach()), "clipfrac": pg_m["clipfrac"],
                  "approx_kl": pg_m["approx_kl"], "value_clipfrac": vf_m["value_clipfrac"]}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1: perfect critic, <= 0: no better than a constant)."""
    v, r = values[mask.bool()], returns[mask.bool()]
    var_r = r.var() if r.numel() > 1 else torch.tensor(0.0)
    return float(1 - (r - v).var() / var_r) if var_r > 0 else 0.0
