"""Loss functions of every algorithm, as small pure functions of tensors.

This module imports torch only: no model, no config, no accelerator. Each function takes already
computed log-probabilities / values / logits and returns

    (loss, metrics)

where ``loss`` is a 0-dim tensor that carries gradients and ``metrics`` is a ``dict[str, float]``
of detached python floats (taken with ``.item()``). Key conventions:

- ``"loss"``: the value of a complete objective (``dpo``, ``simpo``, ``orpo``, ``kto``,
  ``pairwise_reward``, ``ilql_loss``);
- ``"loss/<term>"``: a term that the recipe combines with others (``loss/policy``, ``loss/value``,
  ``loss/q``, ``loss/v``, ``loss/cql``, ``loss/awac``);
- names shared across algorithms: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``clipfrac``, ``approx_kl``, ``kl``.

A few helpers return plain tensors, not ``(loss, metrics)``: ``masked_mean``, ``masked_var``,
``whiten``, ``gae`` (``(advantages, returns)``), ``kl_penalty`` (elementwise), ``group_advantages``
and ``entropy_from_logits``.

Token-level functions take a ``mask`` (bool or 0/1, same shape as the per-token tensors) and average
over *all valid tokens of the batch* (``sum(x * mask) / mask.sum()``), not per sequence first.
Positions outside the mask are zeroed (``masked_fill``), not multiplied by 0, so they never change a
returned value even if they hold inf or nan (for finite inputs their gradient is exactly 0).

Bad arguments (an unknown variant, a group size that does not divide the batch) raise
``ValueError``; the recipes validate user configuration before they get here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "masked_mean",
    "masked_var",
    "whiten",
    "dpo",
    "simpo",
    "orpo",
    "kto",
    "pairwise_reward",
    "ppo_policy",
    "ppo_value",
    "gae",
    "kl_penalty",
    "group_advantages",
    "reinforce_pp_advantages",
    "aggregate",
    "clipped_policy",
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "ilql_q_loss",
    "ilql_v_loss",
    "ilql_cql_loss",
    "ilql_awac_loss",
    "ilql_loss",
]

DPO_VARIANTS = ("sigmoid", "robust", "ipo", "hinge")
KL_KINDS = ("k1", "abs", "mse", "k3")
GROUP_VARIANTS = ("grpo", "rloo")
AGGREGATIONS = ("token", "sequence", "dr_grpo")


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with the positions outside ``mask`` set to 0 (so that inf/nan padding cannot leak)."""
    return x.masked_fill(~mask.bool(), 0.0)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true: ``sum(x * mask) / mask.sum()``.

    ``mask`` is bool or 0/1 and broadcastable to ``x``. With ``dim=None`` the result is a 0-dim
    tensor (the mean over all valid tokens of the batch), else the mean along ``dim``. The count
    is clamped to at least 1, so an all-masked input gives 0 instead of nan.
    """
    mask = mask.bool().expand_as(x)
    total = _zero_outside(x, mask).sum(dim=dim)
    count = mask.sum(dim=dim).clamp_min(1).to(x.dtype)
    return total / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the valid positions (0-dim tensor).

    ``unbiased=True`` applies Bessel's correction n / (n - 1) with n the number of valid tokens,
    as TRL and trlX do; with a single valid token the correction is skipped (variance 0).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().expand_as(x).sum().to(x.dtype)
        var = var * n / (n - 1).clamp_min(1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the valid positions of the batch.

    Returns ``(x - mean) / sqrt(var + 1e-8)`` with the masked mean and the masked variance with
    Bessel's correction (``masked_var(unbiased=True)``, as TRL/trlX whiten advantages). With
    ``shift_mean=False`` the mean is added back (only the scale changes), which is what PPO does to
    rewards. Positions outside the mask are transformed the same way (not zeroed); they are
    meaningless and every token-level loss ignores them.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) far from it. ``x`` is clamped
    just below 0 so that an average log-prob that rounds to 0 stays finite."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2.0)
    # each branch sees only inputs where it is finite, so the unused branch cannot put a nan
    # into the gradient (0 * inf) through torch.where
    x_near = torch.where(near_zero, x, -1.0)
    x_far = torch.where(near_zero, -1.0, x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def _preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """The implicit-reward metrics shared by the preference losses (TRL names)."""
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


# --------------------------------------------------------------------------------------------
# Preference losses (sequence level; every input is (B,))
# --------------------------------------------------------------------------------------------


def dpo(
    pi_chosen: Tensor,
    pi_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Direct Preference Optimization and its variants.

    Inputs are (B,) log-probabilities of the chosen / rejected completions under the policy (pi)
    and the frozen reference model (ref). With h = (pi_c - ref_c) - (pi_r - ref_r), s = sigmoid,
    b = ``beta`` and e = ``label_smoothing``:

    - ``sigmoid`` (Rafailov et al. 2023): (1-e)(-log s(b h)) + e(-log s(-b h)); e > 0 is
      conservative DPO (cDPO, Mitchell 2023), which assumes labels are flipped with probability e.
    - ``robust`` (Chowdhury et al. 2024, rDPO): ((1-e)(-log s(b h)) - e(-log s(-b h))) / (1-2e),
      an unbiased estimate of the clean-label loss; needs e < 0.5.
    - ``ipo`` (Azar et al. 2023): (h - 1/(2b))^2. The paper defines h on per-token *average*
      log-probs; the recipe passes those for IPO and summed log-probs otherwise.
    - ``hinge`` (SLiC, Zhao et al. 2023): relu(1 - b h).

    The loss is the mean over the batch. ``label_smoothing`` only applies to ``sigmoid`` and
    ``robust``; setting it with ``ipo``/``hinge`` is an error rather than silently ignored.

    Metrics: ``loss``; ``rewards/chosen`` = mean b(pi_c - ref_c), ``rewards/rejected`` likewise,
    ``rewards/margins`` (mean difference), ``rewards/accuracies`` (fraction of rows whose chosen
    reward is strictly larger); ``logps/chosen``, ``logps/rejected`` (means of pi_c, pi_r).
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; expected one of {', '.join(DPO_VARIANTS)}")
    e = float(label_smoothing)
    if not 0.0 <= e <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {e}")
    if variant == "robust" and e >= 0.5:
        raise ValueError("robust DPO divides by (1 - 2 label_smoothing): label_smoothing must be < 0.5")
    if variant in ("ipo", "hinge") and e > 0:
        raise ValueError(f"label_smoothing applies to the sigmoid and robust variants, not {variant!r}")

    chosen_logratio = pi_chosen - ref_chosen  # (B,)
    rejected_logratio = pi_rejected - ref_rejected  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)

    if variant == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif variant == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif variant == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    loss = losses.mean()

    metrics = {"loss": loss.item()}
    metrics.update(_preference_metrics(beta * chosen_logratio, beta * rejected_logratio))
    metrics["logps/chosen"] = pi_chosen.detach().mean().item()
    metrics["logps/rejected"] = pi_rejected.detach().mean().item()
    return loss, metrics


def simpo(
    pi_chosen_avg: Tensor,
    pi_rejected_avg: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised preference loss.

    Inputs are (B,) per-token *average* log-probs of the chosen / rejected completions. Loss:
    mean of -log s(b (c - r) - gamma), with gamma the target reward margin. (TRL's CPOTrainer
    parametrises the margin as gamma/beta ratio; here ``gamma`` is the margin itself, as in the
    paper's equation 6.)

    Metrics: ``loss``, ``rewards/*`` with the implicit reward b * avg log-prob, ``logps/*``.
    """
    chosen_rewards = beta * pi_chosen_avg  # (B,)
    rejected_rewards = beta * pi_rejected_avg  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # (B,)
    loss = losses.mean()
    metrics = {"loss": loss.item()}
    metrics.update(_preference_metrics(chosen_rewards, rejected_rewards))
    metrics["logps/chosen"] = pi_chosen_avg.detach().mean().item()
    metrics["logps/rejected"] = pi_rejected_avg.detach().mean().item()
    return loss, metrics


def orpo(
    chosen_avg: Tensor,
    rejected_avg: Tensor,
    chosen_nll: Tensor,
    lam: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """ORPO (Hong et al. 2024): SFT loss plus an odds-ratio preference term, no reference model.

    ``chosen_avg``, ``rejected_avg``: (B,) per-token average log-probs (< 0) of the completions;
    ``chosen_nll``: the SFT negative log-likelihood of the chosen completions, a 0-dim tensor or
    (B,) (averaged). With log odds(y) = log p - log(1 - p) on average log-probs,

        log_odds = (c - r) - (log(1 - exp c) - log(1 - exp r))
        loss = nll + lam * mean(-log s(log_odds))

    log(1 - exp x) is computed without cancellation (``_log1mexp``).

    Metrics: ``loss``, ``nll``, ``log_odds_ratio`` (mean log s(log_odds), the paper's L_OR with
    its sign flipped, as TRL logs it), ``log_odds_chosen`` (mean log_odds), ``rewards/*`` with
    the implicit reward lam * avg log-prob (TRL's convention), ``logps/*``.
    """
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    nll = chosen_nll.mean()
    loss = nll - lam * ratio.mean()
    metrics = {
        "loss": loss.item(),
        "nll": nll.item(),
        "log_odds_ratio": ratio.detach().mean().item(),
        "log_odds_chosen": log_odds.detach().mean().item(),
    }
    metrics.update(_preference_metrics(lam * chosen_avg, lam * rejected_avg))
    metrics["logps/chosen"] = chosen_avg.detach().mean().item()
    metrics["logps/rejected"] = rejected_avg.detach().mean().item()
    return loss, metrics


def kto(
    pi_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_ref: Union[Tensor, float],
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """KTO, Kahneman-Tversky Optimization (Ethayarajh et al. 2024), for unpaired binary feedback.

    ``pi_logps``, ``ref_logps``: (B,) summed completion log-probs under policy and reference;
    ``desirable``: (B,) bool, true for the rows labelled good; ``kl_ref``: the batch estimate of
    KL(pi || ref) (a float or 0-dim tensor, in the paper the mean log-ratio on mismatched
    prompt/completion pairs). With lr = pi - ref and z0 = max(kl_ref, 0), detached:

        desirable rows:   w_d (1 - s(b (lr - z0)))
        undesirable rows: w_u (1 - s(b (z0 - lr)))

    The loss is the mean of these weighted per-row losses over the whole batch.

    Metrics: ``loss``; ``rewards/chosen`` and ``rewards/rejected`` = mean of b * lr over the
    desirable / undesirable rows (0.0 when there are none); ``kl`` = z0.
    """
    desirable = desirable.bool()
    z0 = torch.as_tensor(kl_ref, dtype=pi_logps.dtype, device=pi_logps.device).detach().clamp_min(0)
    logratio = pi_logps - ref_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))  # (B,)
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))  # (B,)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # (B,)
    loss = losses.mean()

    rewards = (beta * logratio).detach()  # (B,)
    n_good = int(desirable.sum().item())
    n_bad = desirable.numel() - n_good
    metrics = {
        "loss": loss.item(),
        "rewards/chosen": rewards[desirable].mean().item() if n_good else 0.0,
        "rewards/rejected": rewards[~desirable].mean().item() if n_bad else 0.0,
        "kl": z0.mean().item(),
    }
    return loss, metrics


def pairwise_reward(
    r_chosen: Tensor,
    r_rejected: Tensor,
    margin: Union[Tensor, float, None] = None,
) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry loss of a pairwise reward model (Ouyang et al. 2022; Stiennon et al. 2020).

    ``r_chosen``, ``r_rejected``: (B,) scalar rewards. Loss: mean of -log s(r_c - r_r - margin),
    where ``margin`` (float or (B,), default 0) is the optional preference-strength margin of
    Llama 2 (Touvron et al. 2023).

    Metrics: ``loss``, ``rewards/accuracies`` (fraction with r_c > r_r, ties count as wrong),
    ``rewards/margins`` (mean r_c - r_r), ``rewards/chosen``, ``rewards/rejected`` (means).
    """
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    metrics = {"loss": loss.item()}
    metrics.update(_preference_metrics(r_chosen, r_rejected))
    return loss, metrics


# --------------------------------------------------------------------------------------------
# PPO (token level; every tensor is (B, T) with `mask` marking the response tokens)
# --------------------------------------------------------------------------------------------


def ppo_policy(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    Per token, with ratio = exp(logprobs - old_logprobs):
    max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)), averaged over the valid tokens.
    ``old_logprobs`` and ``advantages`` are treated as constants (detached).

    Metrics: ``loss/policy``; ``clipfrac`` = fraction of valid tokens where the clipped term is
    strictly larger (the gradient is cut); ``approx_kl`` = masked mean of (ratio - 1) - log ratio
    (the k3 estimator of KL(old || new), Schulman 2020); ``ratio`` = masked mean ratio.
    """
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "loss/policy": loss.item(),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, metrics


def ppo_value(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss of PPO (as in OpenAI baselines / Ziegler et al. 2019).

    Per token: 0.5 max((v - R)^2, (old + clip(v - old, -c, c) - R)^2), averaged over the valid
    tokens. ``old_values`` and ``returns`` are constants (detached).

    Metrics: ``loss/value``; ``value_clipfrac`` = fraction of valid tokens where the clipped
    error is strictly larger; ``values/mean`` (masked mean of v).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    err = (values - returns) ** 2  # (B, T)
    err_clipped = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {
            "loss/value": loss.item(),
            "value_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask).item(),
            "values/mean": masked_mean(values, mask).item(),
        }
    return loss, metrics


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016).

    ``rewards``, ``values``, ``mask``: (B, T), one column per response token, right-padded
    (``mask`` marks the real tokens). The value after the last valid token is 0 (the episode ends
    there): delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t and A_t = (delta_t + gamma lam A_{t+1}) m_t,
    computed by one reversed loop over T, vectorised over the batch. Returns ``(advantages,
    returns)``, both (B, T) and detached (they are regression/advantage targets); advantages are 0
    at padded positions and returns = advantages + values everywhere.
    """
    values = values.detach()
    rewards = _zero_outside(rewards.detach(), mask)  # (B, T)
    masked_values = _zero_outside(values, mask)  # (B, T)
    mask = mask.to(values.dtype)
    B, T = values.shape
    advantages = torch.zeros_like(values)  # (B, T)
    next_advantage = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,) V_{t+1} m_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - masked_values[:, t]  # (B,)
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]  # (B,)
        advantages[:, t] = next_advantage
        next_value = masked_values[:, t]
    returns = advantages + values
    return advantages, returns


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from sampled-token log-probs; **elementwise**.

    Returns a tensor of the same shape as the inputs (not a ``(loss, metrics)`` pair); the caller
    masks and sums/averages it. With d = logprobs - ref_logprobs (Schulman 2020, "Approximating
    KL divergence"):
    ``k1``: d (unbiased, can be negative); ``abs``: |d|; ``mse``: 0.5 d^2 (k2);
    ``k3``: exp(-d) - 1 + d = exp(ref - lp) - 1 - (ref - lp) (unbiased and >= 0).
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL penalty {kind!r}; expected one of {', '.join(KL_KINDS)}")


# --------------------------------------------------------------------------------------------
# Group-relative advantages (GRPO, RLOO) and KL controllers
# --------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor,
    group_size: int,
    variant: str = "grpo",
    scale: bool = True,
) -> Tensor:
    """Advantages relative to the other completions of the same prompt.

    ``rewards``: (N,), N = n_prompts * group_size, the completions of one prompt consecutive.
    - ``grpo`` (Shao et al. 2024, DeepSeekMath): r - mean_g, divided by (std_g + 1e-4) when
      ``scale`` (unbiased std, torch's default; Dr. GRPO, Liu et al. 2025, turns scale off).
    - ``rloo`` (Ahmadian et al. 2024): r - mean of the other g - 1 rewards of the group
      (``scale`` is ignored).
    Returns a (N,) tensor. Raises ValueError when N is not a multiple of ``group_size``, or the
    group has fewer than 2 members where the estimate needs them (rloo, scaled grpo).
    """
    if variant not in GROUP_VARIANTS:
        expected = ", ".join(GROUP_VARIANTS)
        raise ValueError(f"unknown group advantage variant {variant!r}; expected one of {expected}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if group_size < 2 and (variant == "rloo" or scale):
        raise ValueError(f"{variant} needs group_size >= 2, got {group_size}")
    grouped = rewards.reshape(-1, group_size)  # (N/g, g)
    if variant == "grpo":
        adv = grouped - grouped.mean(dim=1, keepdim=True)
        if scale:
            adv = adv / (grouped.std(dim=1, keepdim=True) + 1e-4)
    else:
        others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        adv = grouped - others_mean
    return adv.reshape(rewards.shape)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantages (Hu et al. 2025, "REINFORCE++"; OpenRLHF / verl's
    ``reinforce_plus_plus``): no critic and no group baseline.

    ``token_rewards`` (B, T): the per-token reward of each response, right-padded (the recipe puts
    -kl_coef x KL_t on every token and the task score on the last one); ``mask`` (B, T) marks the
    response tokens. The return G_t = sum_{s >= t} gamma^(s - t) r_s (reversed discounted sum,
    0 after the last valid token) is whitened over **all valid tokens of the batch** (global-batch
    normalisation: the baseline is the batch mean, the scale the batch std with Bessel's
    correction, ``whiten``) and zeroed outside the mask. Returns (B, T), detached.
    """
    rewards = _zero_outside(token_rewards.detach(), mask)  # (B, T)
    returns = torch.zeros_like(rewards)  # (B, T)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running  # (B,)
        returns[:, t] = running
    return _zero_outside(whiten(returns, mask), mask)


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str = "token", max_tokens: Optional[int] = None) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar over the valid tokens of ``mask`` (B, T).

    - ``token`` (DAPO, Yu et al. 2025): sum over all valid tokens / their count: every token weighs
      the same, so long responses are not down-weighted;
    - ``sequence`` (the GRPO paper): each response's token mean, then the mean over responses;
    - ``dr_grpo`` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training"): sum over all
      valid tokens / (B x ``max_tokens``), a constant normaliser (the generation budget), so
      neither the response length nor the batch's token count biases the gradient.
    """
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if aggregation == "dr_grpo":
        if not max_tokens or max_tokens <= 0:
            raise ValueError("dr_grpo aggregation needs max_tokens > 0")
        return _zero_outside(per_token, mask).sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")


def clipped_policy(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    aggregation: str = "token",
    max_tokens: Optional[int] = None,
    ref_logprobs: Optional[Tensor] = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The critic-free policy loss of GRPO, RLOO and REINFORCE++: PPO's clipped surrogate plus
    ``kl_coef`` x the k3 KL to the reference, both reduced by ``aggregate``.

    Per token, ratio = exp(logprobs - old_logprobs):
    l_t = max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)) + kl_coef k3(logprobs, ref_logprobs).
    ``advantages``: (B,) one per response (GRPO/RLOO) or (B, T) per token (REINFORCE++);
    ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask``: (B, T). ``old_logprobs``,
    ``advantages`` and ``ref_logprobs`` are constants. Metrics: ``loss/policy`` (the surrogate
    term), ``clipfrac``, ``approx_kl`` (k3 of KL(old || new)), ``ratio`` (token means) and, with
    ``kl_coef`` > 0, ``kl`` (token mean of k3) and ``loss/kl``.
    """
    adv = advantages.detach().to(logprobs.dtype)
    adv = adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv  # (B, T)
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    pg = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    loss = pg
    with torch.no_grad():
        metrics = {
            "loss/policy": pg.item(),
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = kl_penalty(logprobs, ref_logprobs.detach(), "k3")  # (B, T)
        kl_term = aggregate(kl, mask, aggregation, max_tokens)
        loss = loss + kl_coef * kl_term
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
        metrics["loss/kl"] = float(kl_coef * kl_term.detach())
    return loss, metrics


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", section 2.2): a proportional controller that steers the KL towards ``target``.

    ``update(current_kl, n_steps)``: error = clip(current_kl / target - 1, -0.2, 0.2);
    value *= 1 + error * n_steps / horizon. ``n_steps`` is the number of samples (or steps, in
    the unit that ``horizon`` uses) since the last update.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Union[float, Tensor], n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient with the interface of ``AdaptiveKLController``."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: Union[float, Tensor], n_steps: int) -> None:
        pass


def entropy_from_logits(logits: Tensor, mask: Tensor, chunk_size: int = 1024) -> Tensor:
    """Masked mean entropy (nats) of the categorical distributions given by ``logits``.

    ``logits``: (B, T, V); ``mask``: (B, T). Per token H = logsumexp(z) - sum softmax(z) z, which
    needs no log-softmax copy and tolerates -inf logits (tokens banned by a logits processor).
    Rows are processed ``chunk_size`` at a time, so that under ``torch.no_grad()`` only one
    chunk's (chunk, V) softmax is alive. Returns a 0-dim tensor (it keeps gradients, for use as
    an entropy bonus).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    parts = []
    for chunk in flat.split(chunk_size):
        probs = torch.softmax(chunk, dim=-1)  # (c, V)
        finite = chunk.clamp(min=torch.finfo(chunk.dtype).min)  # -inf (banned token) * p=0 -> 0, not nan
        parts.append(torch.logsumexp(chunk, dim=-1) - (probs * finite).sum(dim=-1))  # (c,)
    entropy = torch.cat(parts).reshape(logits.shape[:-1])  # (B, T)
    return masked_mean(entropy, mask)


# --------------------------------------------------------------------------------------------
# ILQL (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language Q
# Learning"), term by term as trlX implemented it (trlx/models/modeling_ilql.py, ILQLConfig.loss).
#
# Layout: column t of every (B, T) tensor is action t (the t-th completion token) taken in state
# s_t (the prefix before it). `mask` marks the real actions (right-padded). The episode ends after
# the last real action, so V(s_{t+1}) counts only where action t+1 is real.
# --------------------------------------------------------------------------------------------


def _next_state_mask(mask: Tensor) -> Tensor:
    """(B, T) 1 where the state after action t is not terminal, i.e. action t+1 is real."""
    mask = mask.bool()
    return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)


def ilql_q_loss(
    q1: Tensor,
    q2: Optional[Tensor],
    target_v_next: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 0.99,
) -> tuple[Tensor, dict[str, float]]:
    """Temporal-difference loss of the Q heads.

    ``q1``, ``q2``: (B, T) Q(s_t, a_t) of the taken actions from the two Q heads (``q2=None``
    for a single head); ``target_v_next``: (B, T) V(s_{t+1}), the value of the state after each
    action (trlX: ``vs[:, 1:]`` of the online V head), detached here and zeroed where s_{t+1} is
    terminal (after the last real action); ``rewards``: (B, T) per-action rewards.
    Target y = r + gamma V(s_{t+1}); loss = sum over heads of masked_mean((Q_i - y)^2).

    Metrics: ``loss/q``, ``qvalues/mean`` (masked mean of Q over the heads).
    """
    target = rewards + gamma * target_v_next.detach() * _next_state_mask(mask).to(q1.dtype)  # (B, T)
    heads = [q for q in (q1, q2) if q is not None]
    loss = sum(masked_mean((q - target) ** 2, mask) for q in heads)
    with torch.no_grad():
        q_mean = sum(masked_mean(q, mask) for q in heads) / len(heads)
    return loss, {"loss/q": loss.item(), "qvalues/mean": q_mean.item()}


def ilql_v_loss(
    v: Tensor,
    target_q: Tensor,
    mask: Tensor,
    tau: float = 0.7,
) -> tuple[Tensor, dict[str, float]]:
    """Expectile regression of V towards the target Q (IQL, Kostrikov et al. 2021).

    ``v``: (B, T) V(s_t); ``target_q``: (B, T) min over the target Q heads of Q(s_t, a_t),
    detached here. With u = target_q - v: loss = masked_mean(|tau - 1(u < 0)| u^2), so that V
    tends to the tau-expectile of Q (an upper expectile for tau > 0.5).

    Metrics: ``loss/v``, ``values/mean``.
    """
    u = target_q.detach() - v  # (B, T)
    weight = (tau - (u < 0).to(u.dtype)).abs()  # (B, T) |tau - 1(u < 0)|: tau above, 1 - tau below
    loss = masked_mean(weight * u**2, mask)
    return loss, {"loss/v": loss.item(), "values/mean": masked_mean(v.detach(), mask).item()}


def _token_cross_entropy(logits: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """(B, T) -log softmax(logits)[action]; padded actions are replaced by 0 before the lookup
    (their loss is masked out), so any padding id is safe."""
    actions = actions.masked_fill(~mask.bool(), 0)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1), reduction="none")
    return ce.reshape(actions.shape)


def ilql_cql_loss(
    q_logits_1: Tensor,
    q_logits_2: Optional[Tensor],
    actions: Tensor,
    mask: Tensor,
) -> tuple[Tensor, dict[str, float]]:
    """Conservative Q-learning regulariser in ILQL's form (Snell et al. 2022, eq. 5).

    ``q_logits_i``: (B, T, V) Q-values of every vocabulary token from each Q head (``None`` for a
    single head); ``actions``: (B, T) token ids taken. Per head: masked mean cross-entropy of
    softmax(Q) towards the taken action (pushes down Q of tokens absent from the data); summed
    over heads.

    Metrics: ``loss/cql``.
    """
    heads = [q for q in (q_logits_1, q_logits_2) if q is not None]
    loss = sum(masked_mean(_token_cross_entropy(q, actions, mask), mask) for q in heads)
    return loss, {"loss/cql": loss.item()}


def ilql_awac_loss(
    logits: Tensor,
    actions: Tensor,
    mask: Tensor,
    advantages: Optional[Tensor] = None,
    beta: float = 1.0,
    max_weight: float = 100.0,
) -> tuple[Tensor, dict[str, float]]:
    """Policy term of ILQL: (advantage-weighted) NLL of the dataset actions under the LM head.

    ``logits``: (B, T, V) language-model logits predicting each action; ``actions``: (B, T).
    Without ``advantages``: masked mean NLL (behaviour cloning). This is what trlX trained with in
    practice: its weight exp(beta (targetQ - V)) uses ``beta=0`` in every shipped config. With
    ``advantages`` (B, T), e.g. min target Q - V: each token is weighted by exp(beta A) (AWAC,
    Nair et al. 2020; the paper's weighted variant), detached and clamped at ``max_weight`` as
    IQL does (trlX does not clamp; the clamp only matters where exp overflows the useful range).

    Metrics: ``loss/awac`` and, when weighted, ``awac_weight/mean``.
    """
    nll = _token_cross_entropy(logits, actions, mask)  # (B, T)
    metrics: dict[str, float] = {}
    if advantages is not None:
        weight = torch.exp(beta * advantages.detach()).clamp(max=max_weight)  # (B, T)
        nll = nll * weight
        metrics["awac_weight/mean"] = masked_mean(weight, mask).item()
    loss = masked_mean(nll, mask)
    metrics["loss/awac"] = loss.item()
    return loss, metrics


def ilql_loss(
    logits: Tensor,
    q_logits: Sequence[Tensor],
    target_q_logits: Sequence[Tensor],
    values: Tensor,
    actions: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 0.99,
    tau: float = 0.7,
    alpha: float = 0.1,
    awac_weight: float = 1.0,
    awac_beta: float = 0.0,
    q_taken: Optional[Sequence[Tensor]] = None,
) -> tuple[Tensor, dict[str, float]]:
    """The full ILQL objective: loss_q + loss_v + alpha loss_cql + awac_weight loss_awac.

    Shapes (column t = action t in state s_t, ``mask`` marks the real actions):
    ``logits`` (B, T, V) LM logits predicting the actions; ``q_logits`` one or two (B, T, V)
    tensors from the Q heads; ``target_q_logits`` the same from the target Q heads (the slow
    Polyak copies, no gradient), each either per vocabulary token (B, T, V) or already taken at
    the actions (B, T): only Q_target(s_t, a_t) enters the loss, so a recipe may skip the
    full-vocabulary target logits; ``values`` (B, T) V(s_t); ``actions`` (B, T) token ids;
    ``rewards`` (B, T). ``q_taken`` (optional): one (B, T) tensor per Q head, Q_i(s_t, a_t) computed
    apart from ``q_logits`` (same values, e.g. as a dot product with the action's weight row), so
    that the TD gradient does not pass through a gather of the (B, T, V) logits; the logits then
    serve the CQL term only.

    Naming: ``alpha`` is the CQL weight as in the paper (trlX calls it ``cql_scale`` and uses
    ``alpha`` for the target-network sync rate); ``awac_weight`` is trlX's ``awac_scale`` and
    ``awac_beta`` its ``beta`` (0 = plain NLL, trlX's shipped setting). V(s_{t+1}) for the TD target
    is ``values`` shifted left by one, 0 after the last column (terminal in any case).

    Metrics: ``loss`` and every term's metrics (``loss/q``, ``loss/v``, ``loss/cql``,
    ``loss/awac``, ``qvalues/mean``, ``values/mean``, ``awac_weight/mean`` when weighted).
    """
    if len(q_logits) not in (1, 2) or len(target_q_logits) != len(q_logits):
        raise ValueError("ILQL needs one or two Q heads and as many target Q heads")
    index = actions.masked_fill(~mask.bool(), 0).unsqueeze(-1)  # (B, T, 1)
    if q_taken is not None and len(q_taken) != len(q_logits):
        raise ValueError("q_taken needs one tensor per Q head")
    qs = list(q_taken) if q_taken is not None else [q.gather(-1, index).squeeze(-1) for q in q_logits]  # each (B, T)
    target_q = torch.stack([q.gather(-1, index).squeeze(-1) if q.dim() == 3 else q for q in target_q_logits])
    target_q = target_q.min(dim=0).values  # (B, T)
    target_q = target_q.detach()  # (B, T)
    v_next = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)

    loss_q, m_q = ilql_q_loss(qs[0], qs[1] if len(qs) > 1 else None, v_next, rewards, mask, gamma)
    loss_v, m_v = ilql_v_loss(values, target_q, mask, tau)
    loss_cql, m_cql = ilql_cql_loss(q_logits[0], q_logits[1] if len(q_logits) > 1 else None, actions, mask)
    advantages = (target_q - values).detach() if awac_beta != 0 else None
    loss_awac, m_awac = ilql_awac_loss(logits, actions, mask, advantages, awac_beta)

    loss = loss_q + loss_v + alpha * loss_cql + awac_weight * loss_awac
    metrics = {"loss": loss.item(), **m_q, **m_v, **m_cql, **m_awac}
    return loss, metrics
