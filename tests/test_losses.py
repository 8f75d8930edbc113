"""Every loss checked against numbers worked out by hand (the arithmetic is in the comments).

Notation: s = sigmoid, ln = natural log. Identities used throughout:
-log s(ln k) = ln(1 + 1/k), -log s(-ln k) = ln(1 + k), s(ln k) = k / (1 + k).
"""
from __future__ import annotations

import math

import pytest
import torch

from rlhfkit import losses as L

pytestmark = pytest.mark.unit

LN2, LN3 = math.log(2.0), math.log(3.0)
NAN, INF = float("nan"), float("inf")


def t(*rows):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float64)


def approx(x, rel=1e-9, abs=1e-9):
    return pytest.approx(x, rel=rel, abs=abs)


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_masked_mean_averages_valid_tokens_of_whole_batch_and_ignores_nan_padding():
    x = t([1.0, 2.0, NAN], [3.0, INF, NAN])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 3) / 3 tokens = 2 (not the mean of the row means, 1.5 and 3 -> 2.25)
    assert L.masked_mean(x, mask).item() == approx(2.0)
    # per row: [1.5, 3]
    assert L.masked_mean(x, mask, dim=1).tolist() == approx([1.5, 3.0])
    # all masked -> 0, not nan
    assert L.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.unit
def test_whiten_uses_bessel_corrected_masked_variance():
    x = t([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased var ((1 + 0 + 1) / (3 - 1)) = 1 -> (x - 2) / sqrt(1 + 1e-8)
    w = L.whiten(x, mask)
    assert w[0, :3].tolist() == approx([-1.0, 0.0, 1.0], rel=1e-7)
    # shift_mean=False keeps the mean: (x - 2) / 1 + 2
    w = L.whiten(x, mask, shift_mean=False)
    assert w[0, :3].tolist() == approx([1.0, 2.0, 3.0], rel=1e-7)
    assert L.masked_var(x, mask, unbiased=False).item() == approx(2.0 / 3.0)


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------

# Two rows, beta = 0.5. Row 1: pi_c - ref_c = 2 ln 2, pi_r - ref_r = 0 -> h = 2 ln 2, b h = ln 2.
# Row 2: everything equal -> h = 0.
PI_C = t([-1.0, -3.0])
REF_C = t([-1.0 - 2 * LN2, -3.0])
PI_R = t([-2.0, -3.0])
REF_R = t([-2.0, -3.0])


def _dpo(**kw):
    return L.dpo(PI_C, PI_R, REF_C, REF_R, beta=0.5, **kw)


@pytest.mark.unit
def test_dpo_sigmoid_by_hand():
    loss, m = _dpo()
    # row 1: -log s(ln 2) = ln 1.5; row 2: -log s(0) = ln 2; mean = (ln 1.5 + ln 2) / 2 = ln 3 / 2
    assert loss.item() == approx(LN3 / 2)  # 0.549306
    assert m["loss"] == approx(LN3 / 2)
    # rewards = b (pi - ref): chosen [ln 2, 0] -> mean ln2/2; rejected [0, 0]
    assert m["rewards/chosen"] == approx(LN2 / 2)
    assert m["rewards/rejected"] == approx(0.0)
    assert m["rewards/margins"] == approx(LN2 / 2)
    assert m["rewards/accuracies"] == approx(0.5)  # row 2 is a tie: not counted as correct
    assert m["logps/chosen"] == approx(-2.0)  # mean(-1, -3)
    assert m["logps/rejected"] == approx(-2.5)  # mean(-2, -3)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.unit
def test_cdpo_label_smoothing_by_hand():
    loss, _ = _dpo(label_smoothing=0.1)
    # row 1: 0.9 ln 1.5 + 0.1 (-log s(-ln 2) = ln 3); row 2: 0.9 ln 2 + 0.1 ln 2 = ln 2
    expected = (0.9 * math.log(1.5) + 0.1 * LN3 + LN2) / 2  # 0.583964
    assert loss.item() == approx(expected)


@pytest.mark.unit
def test_robust_dpo_by_hand():
    loss, _ = _dpo(variant="robust", label_smoothing=0.1)
    # row 1: (0.9 ln 1.5 - 0.1 ln 3) / 0.8; row 2: (0.9 ln 2 - 0.1 ln 2) / 0.8 = ln 2
    expected = ((0.9 * math.log(1.5) - 0.1 * LN3) / 0.8 + LN2) / 2  # 0.505984
    assert loss.item() == approx(expected)
    # e = 0 is plain DPO
    assert _dpo(variant="robust")[0].item() == approx(LN3 / 2)


@pytest.mark.unit
def test_ipo_by_hand():
    loss, _ = _dpo(variant="ipo")
    # 1/(2b) = 1: row 1 (2 ln 2 - 1)^2 = 0.149223; row 2 (0 - 1)^2 = 1
    assert loss.item() == approx(((2 * LN2 - 1) ** 2 + 1) / 2)  # 0.574612


@pytest.mark.unit
def test_hinge_by_hand():
    loss, _ = _dpo(variant="hinge")
    # row 1: relu(1 - ln 2) = 0.306853; row 2: relu(1 - 0) = 1
    assert loss.item() == approx((1 - LN2 + 1) / 2)  # 0.653426
    # large margin: relu(1 - 0.5 * 4) = 0
    loss, _ = L.dpo(t([4.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.5, variant="hinge")
    assert loss.item() == 0.0


@pytest.mark.unit
def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown DPO variant"):
        _dpo(variant="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        _dpo(variant="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="< 0.5"):
        _dpo(variant="robust", label_smoothing=0.5)


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["sigmoid", "robust", "ipo", "hinge"])
def test_dpo_gradients_raise_chosen_and_lower_rejected(variant):
    pi_c = PI_C.clone().requires_grad_()
    pi_r = PI_R.clone().requires_grad_()
    loss, _ = L.dpo(pi_c, pi_r, REF_C, REF_R, beta=0.5, variant=variant)
    loss.backward()
    # row 2 (h = 0) is in the active region of every variant
    assert pi_c.grad[1].item() < 0
    assert pi_r.grad[1].item() > 0
    assert (pi_c.grad + pi_r.grad).abs().max().item() == approx(0.0)  # loss depends on h only
    if variant == "sigmoid":
        # d/dpi_c of -log s(b h) / B = -b (1 - s(b h)) / B: row 1 -0.5 (1 - 2/3) / 2 = -1/12,
        # row 2 -0.5 (1/2) / 2 = -1/8
        assert pi_c.grad.tolist() == approx([-1 / 12, -1 / 8])


@pytest.mark.unit
def test_simpo_by_hand():
    c, r = t([-1.0, -2.0]), t([-1.5, -1.5])
    loss, m = L.simpo(c, r, beta=2.0, gamma=0.5)
    # b (c - r) - gamma: row 1: 2 (0.5) - 0.5 = 0.5; row 2: 2 (-0.5) - 0.5 = -1.5
    # -log s(0.5) = ln(1 + e^-0.5) = 0.474077; -log s(-1.5) = ln(1 + e^1.5) = 1.701413
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2  # 1.087745
    assert loss.item() == approx(expected)
    assert m["rewards/chosen"] == approx(-3.0)  # 2 * mean(-1, -2)
    assert m["rewards/rejected"] == approx(-3.0)
    assert m["rewards/accuracies"] == approx(0.5)
    c = c.clone().requires_grad_()
    L.simpo(c, r)[0].backward()
    assert (c.grad < 0).all()


@pytest.mark.unit
def test_orpo_by_hand():
    # row 1: p_c = 0.5 (odds 1), p_r = 0.2 (odds 1/4) -> log_odds = 0 - ln(1/4) = ln 4,
    #        -log s(ln 4) = ln(1 + 1/4) = ln 1.25
    # row 2: p_c = 0.5, p_r = 0.8 (odds 4) -> log_odds = -ln 4, -log s(-ln 4) = ln 5
    # mean = (ln 1.25 + ln 5) / 2 = ln 6.25 / 2 = ln 2.5; nll = mean(0.6, 0.8) = 0.7
    c = t([math.log(0.5), math.log(0.5)])
    r = t([math.log(0.2), math.log(0.8)])
    loss, m = L.orpo(c, r, t([0.6, 0.8]), lam=0.1)
    assert loss.item() == approx(0.7 + 0.1 * math.log(2.5))  # 0.791629
    assert m["nll"] == approx(0.7)
    assert m["log_odds_chosen"] == approx(0.0)  # mean(ln 4, -ln 4)
    assert m["log_odds_ratio"] == approx(-math.log(2.5))
    assert m["rewards/accuracies"] == approx(0.5)


@pytest.mark.unit
def test_orpo_log1mexp_is_stable_near_zero_in_float32():
    # avg log-prob -1e-9: naive log1p(-exp(x)) gives log(0) = -inf in float32 (exp(-1e-9) == 1);
    # log(1 - e^x) ~ log(-x) = ln 1e-9 = -20.7233
    c = torch.tensor([-1e-9], dtype=torch.float32, requires_grad=True)
    r = torch.tensor([math.log(0.5)], dtype=torch.float32)
    loss, m = L.orpo(c, r, torch.tensor(0.0), lam=1.0)
    # log_odds = (-1e-9 - ln .5) - (ln 1e-9 - ln .5) = -ln 1e-9 = 20.7233
    assert m["log_odds_chosen"] == approx(-math.log(1e-9), rel=1e-5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all()


@pytest.mark.unit
def test_kto_by_hand_with_negative_kl_clamped():
    # beta 0.5, kl_ref -0.3 -> z0 = 0; lr = [2 ln 3, -2 ln 3, 0]; desirable [T, F, T]; w_u = 2
    # row 1: 1 - s(ln 3) = 1/4; row 2: 2 (1 - s(0.5 (0 + 2 ln 3))) = 2/4; row 3: 1 - s(0) = 1/2
    pi = t([2 * LN3, -2 * LN3, 0.0])
    ref = torch.zeros(3, dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    loss, m = L.kto(pi, ref, desirable, kl_ref=-0.3, beta=0.5, undesirable_weight=2.0)
    assert loss.item() == approx((0.25 + 0.5 + 0.5) / 3)  # 0.416667
    assert m["rewards/chosen"] == approx(LN3 / 2)  # mean(0.5 * 2 ln 3, 0)
    assert m["rewards/rejected"] == approx(-LN3)  # 0.5 * -2 ln 3
    assert m["kl"] == 0.0


@pytest.mark.unit
def test_kto_by_hand_with_positive_kl_and_no_undesirable_rows():
    # z0 = 2 ln 3, beta 0.5, all desirable; lr = [2 ln 3, 4 ln 3, 0]
    # row 1: 1 - s(0) = 0.5; row 2: 1 - s(ln 3) = 0.25; row 3: 1 - s(-ln 3) = 0.75 -> mean 0.5
    kl = torch.tensor(2 * LN3, dtype=torch.float64, requires_grad=True)
    pi = t([2 * LN3, 4 * LN3, 0.0]).requires_grad_()
    loss, m = L.kto(pi, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool), kl, beta=0.5)
    assert loss.item() == approx(0.5)
    assert m["rewards/rejected"] == 0.0  # no undesirable rows
    assert m["kl"] == approx(2 * LN3)
    loss.backward()
    assert (pi.grad < 0).all()  # desirable rows: raise their log-ratio
    assert kl.grad is None  # z0 is detached


@pytest.mark.unit
def test_pairwise_reward_by_hand():
    rc, rr = t([2.0, 0.0]), t([1.0, 0.0])
    loss, m = L.pairwise_reward(rc, rr)
    # diffs [1, 0]: ln(1 + e^-1) = 0.313262, ln 2 -> mean 0.503204
    assert loss.item() == approx((math.log1p(math.exp(-1)) + LN2) / 2)
    assert m["rewards/accuracies"] == approx(0.5)  # the tie is not correct
    assert m["rewards/margins"] == approx(0.5)
    # margin 1: diffs [0, -1]: ln 2, ln(1 + e) = 1.313262
    loss, _ = L.pairwise_reward(rc, rr, margin=1.0)
    assert loss.item() == approx((LN2 + math.log1p(math.e)) / 2)
    # per-row margin [1, 0]: diffs [0, 0] -> ln 2
    loss, _ = L.pairwise_reward(rc, rr, margin=t([1.0, 0.0]))
    assert loss.item() == approx(LN2)
    rc = rc.clone().requires_grad_()
    L.pairwise_reward(rc, rr)[0].backward()
    assert (rc.grad < 0).all()


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_ppo_policy_by_hand():
    # clip 0.2; ratios [1.5, 0.5, 0.5], advantages [1, 1, -1], 4th token is padding (inf/nan)
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(-0.5, -0.8) = -0.5; t2: max(0.5, 0.8) = 0.8 (clipped)
    lp = t([[math.log(1.5), math.log(0.5), math.log(0.5), INF]]).requires_grad_()
    old = t([[0.0, 0.0, 0.0, 0.0]])
    adv = t([[1.0, 1.0, -1.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = L.ppo_policy(lp, old, adv, mask, clip=0.2)
    assert loss.item() == approx((-1.2 - 0.5 + 0.8) / 3)  # -0.3
    assert m["loss/policy"] == approx(-0.3)
    assert m["clipfrac"] == approx(2 / 3)
    # (r - 1) - ln r: 0.5 - ln 1.5, -0.5 + ln 2, -0.5 + ln 2 -> mean (-0.5 + ln(8/3)) / 3 = 0.160276
    assert m["approx_kl"] == approx((-0.5 + math.log(8 / 3)) / 3)
    assert m["ratio"] == approx(2.5 / 3)
    # ratio 1 everywhere: both branches equal, so nothing counts as clipped (strictly larger)
    assert L.ppo_policy(old, old, adv, mask)[1]["clipfrac"] == 0.0
    loss.backward()
    # only t1 is unclipped: d/dlp (-A r) / 3 = -0.5 / 3; clipped tokens and padding get 0
    assert lp.grad[0, :3].tolist() == approx([0.0, -0.5 / 3, 0.0])


@pytest.mark.unit
def test_ppo_value_by_hand():
    # clip 0.2, old 0.5 everywhere. t0: v 1, R 0: (1)^2 = 1 vs clipped v 0.7: 0.49 -> 1
    # t1: v 1, R 2: 1 vs (0.7 - 2)^2 = 1.69 -> 1.69 (clipped). loss 0.5 (1 + 1.69) / 2 = 0.6725
    v = t([[1.0, 1.0, 5.0]])
    loss, m = L.ppo_value(v, t([[0.5, 0.5, 0.5]]), t([[0.0, 2.0, NAN]]), torch.tensor([[1, 1, 0]]), clip=0.2)
    assert loss.item() == approx(0.6725)
    assert m["value_clipfrac"] == approx(0.5)
    assert m["values/mean"] == approx(1.0)


@pytest.mark.unit
def test_token_losses_ignore_padding_columns():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 7
    lp, old, adv = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    v, ov, ret = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)

    def pad(x, value):  # append 2 garbage columns (masked out)
        extra = torch.full((B, 2) + x.shape[2:], value, dtype=x.dtype)
        return torch.cat([x, extra], dim=1)

    pmask = pad(mask, False)
    assert L.ppo_policy(lp, old, adv, mask)[0].item() == approx(
        L.ppo_policy(pad(lp, 3.0), pad(old, -3.0), pad(adv, 1e6), pmask)[0].item()
    )
    assert L.ppo_value(v, ov, ret, mask)[1] == approx(
        L.ppo_value(pad(v, 9.0), pad(ov, 0.0), pad(ret, NAN), pmask)[1]
    )
    assert torch.allclose(L.whiten(v, mask), L.whiten(pad(v, 1e3), pmask)[:, :T], rtol=1e-12, atol=1e-12)
    assert L.entropy_from_logits(logits, mask).item() == approx(
        L.entropy_from_logits(pad(logits, NAN), pmask).item()
    )
    assert L.ilql_cql_loss(logits, logits * 2, actions, mask)[0].item() == approx(
        L.ilql_cql_loss(pad(logits, 5.0), pad(logits * 2, 5.0), pad(actions, -100), pmask)[0].item()
    )
    adv_a, ret_a = L.gae(lp, v, mask)
    adv_b, ret_b = L.gae(pad(lp, NAN), pad(v, INF), pmask)
    assert torch.allclose(adv_b[:, :T], adv_a, rtol=1e-12, atol=1e-12)
    assert adv_b[:, T:].abs().sum().item() == 0.0


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
    """The plain loop, one row at a time, over the valid tokens only (right padding)."""
    advantages = torch.zeros_like(values)
    for b in range(values.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for i in reversed(range(n)):
            next_value = values[b, i + 1].item() if i + 1 < n else 0.0
            delta = rewards[b, i].item() + gamma * next_value - values[b, i].item()
            last = delta + gamma * lam * last
            advantages[b, i] = last
    return advantages, advantages + values


@pytest.mark.unit
def test_gae_by_hand():
    # row 1, gamma 0.9, lam 0.5: rewards [0, 1], values [0.5, 0.25]
    #   t1: delta = 1 + 0 - 0.25 = 0.75 = A1; t0: delta = 0 + 0.9 * 0.25 - 0.5 = -0.275,
    #   A0 = -0.275 + 0.45 * 0.75 = 0.0625; returns [0.5625, 1.0]
    # row 2: one valid token, reward 2, value 1: A0 = 2 - 1 = 1; padding A = 0, returns = V
    rewards = t([0.0, 1.0], [2.0, 9.0])
    values = t([0.5, 0.25], [1.0, 7.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == approx([0.0625, 0.75])
    assert adv[1].tolist() == approx([1.0, 0.0])
    assert ret.tolist()[0] == approx([0.5625, 1.0])
    assert ret.tolist()[1] == approx([2.0, 7.0])


@pytest.mark.unit
def test_gae_equals_plain_loop_on_random_ragged_batch():
    g = torch.Generator().manual_seed(1)
    B, T = 6, 9
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), right padded
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_()
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)]:
        adv, ret = L.gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = gae_reference(rewards, values.detach(), mask, gamma, lam)
        assert torch.allclose(adv, ref_adv, atol=1e-6, rtol=0)
        assert torch.allclose(ret, ref_ret, atol=1e-6, rtol=0)
        assert not adv.requires_grad and not ret.requires_grad  # targets are constants


# --------------------------------------------------------------------------------------------
# KL, group advantages, controllers, entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_kl_penalty_kinds_by_hand():
    lp, ref = t([LN2, 0.0]), t([0.0, LN2])  # d = lp - ref = [ln 2, -ln 2]
    assert L.kl_penalty(lp, ref, "k1").tolist() == approx([LN2, -LN2])
    assert L.kl_penalty(lp, ref, "abs").tolist() == approx([LN2, LN2])
    assert L.kl_penalty(lp, ref, "mse").tolist() == approx([0.5 * LN2**2] * 2)  # 0.240227
    # k3 = exp(ref - lp) - 1 - (ref - lp): [1/2 - 1 + ln 2, 2 - 1 - ln 2] = [0.193147, 0.306853]
    assert L.kl_penalty(lp, ref, "k3").tolist() == approx([LN2 - 0.5, 1 - LN2])
    with pytest.raises(ValueError, match="unknown KL"):
        L.kl_penalty(lp, ref, "k2")


@pytest.mark.unit
def test_group_advantages_by_hand():
    r = t([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1; group 2: constant -> 0
    grpo = L.group_advantages(r, 3)
    assert grpo.tolist() == approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0])
    assert L.group_advantages(r, 3, scale=False).tolist() == approx([-1.0, 0.0, 1.0, 0, 0, 0])
    # rloo: 1 - (2 + 3) / 2 = -1.5, 2 - (1 + 3) / 2 = 0, 3 - (1 + 2) / 2 = 1.5
    assert L.group_advantages(r[:3], 3, variant="rloo").tolist() == approx([-1.5, 0.0, 1.5])
    # groups are consecutive: [1, 2] and [3, 10] -> rloo [-1, 1, -7, 7]
    assert L.group_advantages(r[:4], 2, variant="rloo").tolist() == approx([-1.0, 1.0, -7.0, 7.0])


@pytest.mark.unit
def test_reinforce_pp_advantages_by_hand():
    r = t([0.0, 1.0], [2.0, 5.0])  # 5.0 is padding: masked out before the sums
    mask = t([1, 1], [1, 0]).bool()
    # gamma 1: returns [[0 + 1, 1], [2, 0]]; valid 1, 1, 2: mean 4/3, deviations -1/3, -1/3, 2/3,
    # unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3, std 0.57735 -> -0.57735, -0.57735, 1.154700
    adv = L.reinforce_pp_advantages(r, mask)
    assert adv.tolist() == [approx([-0.5773502, -0.5773502], rel=1e-6), approx([1.1547005, 0.0], rel=1e-6)]
    # gamma 0.5: returns [[0.5 x 1, 1], [2, 0]]; mean 7/6, deviations -2/3, -1/6, 5/6,
    # var (4/9 + 1/36 + 25/36) / 2 = 7/12, std 0.7637626 -> -0.872872, -0.218218, 1.091089
    adv = L.reinforce_pp_advantages(r, mask, gamma=0.5)
    assert adv.tolist() == [approx([-0.8728716, -0.2182179], rel=1e-6), approx([1.0910895, 0.0], rel=1e-6)]


@pytest.mark.unit
def test_loss_aggregations_by_hand():
    x = t([1.0, 2.0, 9.0], [3.0, NAN, INF])  # padding never counts
    mask = t([1, 1, 0], [1, 0, 0]).bool()
    assert float(L.aggregate(x, mask, "token")) == approx((1 + 2 + 3) / 3)  # DAPO: 2
    assert float(L.aggregate(x, mask, "sequence")) == approx((1.5 + 3) / 2)  # GRPO: 2.25
    assert float(L.aggregate(x, mask, "dr_grpo", max_tokens=4)) == approx(6 / (2 * 4))  # Dr. GRPO: 0.75
    with pytest.raises(ValueError, match="max_tokens"):
        L.aggregate(x, mask, "dr_grpo")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        L.aggregate(x, mask, "mean")


@pytest.mark.unit
def test_clipped_policy_with_kl_by_hand():
    old = t([0.0, 0.0])[None]
    lp = torch.log(t([1.5, 0.5]))[None].requires_grad_(True)  # ratios 1.5 and 0.5
    mask = t([1, 1])[None].bool()
    adv = t([2.0])  # one advantage per response, broadcast over its tokens
    # token 0: max(-2 x 1.5, -2 x 1.2) = -2.4 (clipped); token 1: max(-2 x 0.5, -2 x 0.8) = -1.0
    # k3 to ref = 0 with d = lp: 1/1.5 - 1 + ln 1.5 = 0.0721318, 2 - 1 + ln 0.5 = 0.3068528
    loss, m = L.clipped_policy(lp, old, adv, mask, clip=0.2, ref_logprobs=t([0.0, 0.0])[None], kl_coef=0.1)
    kl = (0.0721318 + 0.3068528) / 2
    assert loss.item() == approx(-1.7 + 0.1 * kl, rel=1e-6)
    assert m["loss/policy"] == approx(-1.7) and m["clipfrac"] == approx(0.5) and m["kl"] == approx(kl, rel=1e-6)
    loss.backward()
    # token 0: the clipped term has no gradient; k3' = 1 - exp(-d) = 1/3, x 0.1 / 2 tokens
    # token 1: -A ratio / 2 = -0.5; k3' = 1 - 2 = -1, x 0.1 / 2 = -0.05
    assert lp.grad.tolist() == [approx([0.1 / 3 / 2, -0.55], rel=1e-6)]
    # per-token advantages (REINFORCE++) and no KL: token mean of max(-A r, -A clip(r))
    lp2 = torch.log(t([1.5, 0.5]))[None]
    loss, m = L.clipped_policy(lp2, old, t([1.0, -1.0])[None], mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8 -> mean -0.2, both clipped
    assert float(loss) == approx(-0.2) and m["clipfrac"] == approx(1.0) and "kl" not in m


@pytest.mark.unit
def test_group_advantages_errors():
    r = t([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="groups of 2"):
        L.group_advantages(r, 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        L.group_advantages(r, 1, variant="rloo")
    with pytest.raises(ValueError, match="unknown group"):
        L.group_advantages(r, 3, variant="ppo")


@pytest.mark.unit
def test_adaptive_kl_controller_by_hand():
    ctl = L.AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)  # error = clip(12/6 - 1) = 0.2 -> 0.2 (1 + 0.2 * 256 / 10000)
    assert ctl.value == approx(0.2 * (1 + 0.2 * 256 / 10000))  # 0.201024
    ctl = L.AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(torch.tensor(4.5), n_steps=100)  # error = 4.5/6 - 1 = -0.25 -> -0.2
    assert ctl.value == approx(0.2 * (1 - 0.2 * 100 / 10000))  # 0.1996
    ctl = L.AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(6.6, n_steps=100)  # error 0.1, inside the clip
    assert ctl.value == approx(0.2 * (1 + 0.1 * 100 / 10000), rel=1e-12)
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


@pytest.mark.unit
def test_entropy_from_logits_by_hand():
    # t0 uniform over 2: ln 2; t1 one token banned (-inf): 0; t2 probs [1/4, 3/4]:
    # -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335; t3 padding (nan)
    logits = t([[[0.0, 0.0], [0.0, -INF], [0.0, LN3], [NAN, NAN]]]).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0]])
    h3 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = (LN2 + 0.0 + h3) / 3
    ent = L.entropy_from_logits(logits, mask)
    assert ent.item() == approx(expected)
    assert L.entropy_from_logits(logits, mask, chunk_size=1).item() == approx(expected)
    ent.backward()
    assert torch.isfinite(logits.grad[0, :3]).all()
    # the uniform row is a maximum: zero gradient
    assert logits.grad[0, 0].abs().max().item() == approx(0.0)


# --------------------------------------------------------------------------------------------
# ILQL
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_ilql_q_loss_by_hand():
    # gamma 0.5; actions t0, t1 real, t2 padding. rewards [0, 1]; V(s_1) = 3, V(s_2) = 5 but s_2
    # is terminal (action 2 is padding) -> targets y = [0 + 0.5 * 3, 1 + 0] = [1.5, 1]
    # q1 [1, 2]: ((1 - 1.5)^2 + (2 - 1)^2) / 2 = 0.625; q2 [0, 1]: (2.25 + 0) / 2 = 1.125
    q1 = t([[1.0, 2.0, 7.0]]).requires_grad_()
    q2 = t([[0.0, 1.0, 7.0]])
    v_next = t([[3.0, 5.0, 7.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0]])
    loss, m = L.ilql_q_loss(q1, q2, v_next, t([[0.0, 1.0, 0.0]]), mask, gamma=0.5)
    assert loss.item() == approx(1.75)
    assert m["loss/q"] == approx(1.75)
    assert m["qvalues/mean"] == approx(1.0)  # mean over heads of (1.5, 0.5)
    loss.backward()
    assert v_next.grad is None  # the TD target is a constant
    assert q1.grad[0].tolist() == approx([2 * (1 - 1.5) / 2, 2 * (2 - 1) / 2, 0.0])
    # one head only
    assert L.ilql_q_loss(q1, None, v_next, t([[0.0, 1.0, 0.0]]), mask, gamma=0.5)[0].item() == approx(0.625)


@pytest.mark.unit
def test_ilql_v_loss_expectile_by_hand():
    # tau 0.7; u = target - v = [2 - 1, 1 - 2] = [1, -1]: weights [0.7, 0.3] -> (0.7 + 0.3) / 2 = 0.5
    v = t([[1.0, 2.0, 0.0]]).requires_grad_()
    target = t([[2.0, 1.0, 100.0]]).requires_grad_()
    loss, m = L.ilql_v_loss(v, target, torch.tensor([[1, 1, 0]]), tau=0.7)
    assert loss.item() == approx(0.5)
    assert m["values/mean"] == approx(1.5)
    loss.backward()
    # d/dv w u^2 / n = -2 w u / 2: [-0.7, 0.3]; padding 0
    assert v.grad[0].tolist() == approx([-0.7, 0.3, 0.0])
    assert target.grad is None


@pytest.mark.unit
def test_ilql_cql_loss_by_hand():
    # V = 2, one real action (token 0) + one padding (id -100, any id is safe)
    # head 1 logits [0, 0] -> -log 1/2 = ln 2; head 2 [ln 3, 0] -> -log 3/4 = ln 4/3; sum ln 8/3
    q1 = t([[[0.0, 0.0], [1.0, 2.0]]])
    q2 = t([[[LN3, 0.0], [1.0, 2.0]]])
    actions = torch.tensor([[0, -100]])
    loss, m = L.ilql_cql_loss(q1, q2, actions, torch.tensor([[1, 0]]))
    assert loss.item() == approx(math.log(8 / 3))  # 0.980829
    assert m["loss/cql"] == approx(math.log(8 / 3))


@pytest.mark.unit
def test_ilql_awac_loss_by_hand():
    # logits t0 [0, 0] action 1: ln 2; t1 [ln 3, 0] action 0: ln 4/3 -> mean ln(8/3) / 2
    logits = t([[[0.0, 0.0], [LN3, 0.0]]])
    actions = torch.tensor([[1, 0]])
    mask = torch.tensor([[1, 1]])
    loss, m = L.ilql_awac_loss(logits, actions, mask)
    assert loss.item() == approx(math.log(8 / 3) / 2)  # 0.490415
    # weighted: advantages [0, ln 2], beta 1 -> weights [1, 2]: (ln 2 + 2 ln 4/3) / 2
    loss, m = L.ilql_awac_loss(logits, actions, mask, advantages=t([[0.0, LN2]]), beta=1.0)
    assert loss.item() == approx((LN2 + 2 * math.log(4 / 3)) / 2)  # 0.634242
    assert m["awac_weight/mean"] == approx(1.5)


@pytest.mark.unit
def test_ilql_loss_composes_terms_by_hand():
    # B 1, T 2, V 2; actions [0, 1]; rewards [0, 1]; gamma 1; tau 0.5; alpha 0.1; awac weight 1
    # Q1 of actions: t0 [1, 0][0] = 1, t1 [0, 2][1] = 2; Q2: t0 [0, 0][0] = 0, t1 [0, 1][1] = 1
    # target heads: [1, 2] and [2, 0] -> min [1, 0]
    # values [0.5, 1.5] -> V(s_{t+1}) = [1.5, 0 (terminal)] -> TD targets [1.5, 1]
    # loss_q = ((1-1.5)^2 + (2-1)^2)/2 + ((0-1.5)^2 + (1-1)^2)/2 = 0.625 + 1.125 = 1.75
    # loss_v: u = [1 - 0.5, 0 - 1.5] = [0.5, -1.5], tau 0.5: 0.5 (0.25 + 2.25) / 2 = 0.625
    # loss_cql = mean(ln(1 + e^-1), ln(1 + e^-2)) + mean(ln 2, ln(1 + e^-1)) = 0.220095 + 0.503205
    # loss_awac: LM logits uniform -> ln 2
    q1 = t([[[1.0, 0.0], [0.0, 2.0]]]).requires_grad_()
    q2 = t([[[0.0, 0.0], [0.0, 1.0]]]).requires_grad_()
    tq1 = q1.detach().clone().requires_grad_()
    tq2 = t([[[2.0, 0.0], [0.0, 0.0]]])
    values = t([[0.5, 1.5]]).requires_grad_()
    logits = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([[0, 1]])
    loss, m = L.ilql_loss(
        logits, (q1, q2), (tq1, tq2), values, actions, t([[0.0, 1.0]]), torch.tensor([[1, 1]]),
        gamma=1.0, tau=0.5, alpha=0.1, awac_weight=1.0,
    )
    l1e = math.log1p(math.exp(-1))
    cql = (l1e + math.log1p(math.exp(-2))) / 2 + (LN2 + l1e) / 2  # 0.723300
    assert m["loss/q"] == approx(1.75)
    assert m["loss/v"] == approx(0.625)
    assert m["loss/cql"] == approx(cql)
    assert m["loss/awac"] == approx(LN2)
    assert loss.item() == approx(1.75 + 0.625 + 0.1 * cql + LN2)  # 3.140477
    assert m["loss"] == approx(loss.item())
    loss.backward()
    # values get gradient from loss_v only (the TD target is detached):
    # d/dv 0.5 u^2 / 2 = -u / 2 = [-0.25, 0.75]
    assert values.grad[0].tolist() == approx([-0.25, 0.75])
    assert tq1.grad is None  # target heads are not trained
    # a single Q head: loss_q = 0.625, loss_cql = 0.220095, target min is head 1 alone -> u = [0.5, 0.5]
    _, m1 = L.ilql_loss(
        logits, (q1,), (tq1,), values, actions, t([[0.0, 1.0]]), torch.tensor([[1, 1]]), gamma=1.0, tau=0.5
    )
    assert m1["loss/q"] == approx(0.625)
    assert m1["loss/cql"] == approx((l1e + math.log1p(math.exp(-2))) / 2)
    assert m1["loss/v"] == approx(0.5 * 0.25)  # 0.5 (0.25 + 0.25) / 2


@pytest.mark.unit
def test_ilql_loss_takes_target_q_at_the_actions():
    # Target heads given as Q of the taken actions (B, T) instead of (B, T, V): same numbers as
    # the by-hand test above. Target head 1 at actions [0, 1]: [1, 2]; head 2: [2, 0] -> min [1, 0].
    q1 = t([[[1.0, 0.0], [0.0, 2.0]]])
    q2 = t([[[0.0, 0.0], [0.0, 1.0]]])
    values = t([[0.5, 1.5]])
    logits = torch.zeros(1, 2, 2, dtype=torch.float64)
    actions, rewards, mask = torch.tensor([[0, 1]]), t([[0.0, 1.0]]), torch.tensor([[1, 1]])
    full = L.ilql_loss(logits, (q1, q2), (q1.clone(), t([[[2.0, 0.0], [0.0, 0.0]]])), values, actions, rewards,
                       mask, gamma=1.0, tau=0.5)[1]
    at = L.ilql_loss(logits, (q1, q2), (t([[1.0, 2.0]]), t([[2.0, 0.0]])), values, actions, rewards, mask,
                     gamma=1.0, tau=0.5)[1]
    assert at["loss/v"] == approx(0.625)  # u = [1 - 0.5, 0 - 1.5], as worked out above
    assert at == approx(full)
    # Q of the taken actions given apart from the logits: same loss and same gradients
    q1g, q2g = q1.clone().requires_grad_(), q2.clone().requires_grad_()
    taken = [q1g.gather(-1, actions[..., None]).squeeze(-1), q2g.gather(-1, actions[..., None]).squeeze(-1)]
    assert [q.tolist() for q in taken] == [[[1.0, 2.0]], [[0.0, 1.0]]]
    apart = L.ilql_loss(logits, (q1g, q2g), (t([[1.0, 2.0]]), t([[2.0, 0.0]])), values, actions, rewards, mask,
                        gamma=1.0, tau=0.5, q_taken=taken)
    assert apart[1] == approx(full)
    q1r, q2r = q1.clone().requires_grad_(), q2.clone().requires_grad_()
    L.ilql_loss(logits, (q1r, q2r), (t([[1.0, 2.0]]), t([[2.0, 0.0]])), values, actions, rewards, mask,
                gamma=1.0, tau=0.5)[0].backward()
    apart[0].backward()
    assert torch.allclose(q1g.grad, q1r.grad) and torch.allclose(q2g.grad, q2r.grad)
