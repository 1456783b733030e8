"""Tests for tunelab.objectives.policy_losses: hand-worked values, closed forms and TRL's GRPO maths."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.objectives.losses import masked_mean, whiten  # PPO whitens its advantages and rewards
from tunelab.objectives.policy_losses import gae, group_advantages, kl_penalty, ppo_policy_loss, ppo_value_loss

F64 = torch.float64


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=tol, rtol=tol)


def test_gae_hand_worked():
    # gamma = 0.5, lam = 0.5 -> gamma * lam = 0.25; rewards (0, 0, 0, 1), values (0.5, 0.4, 0.3, 0.2)
    # delta_3 = 1 + 0.5*0   - 0.2 =  0.8        A_3 = 0.8
    # delta_2 = 0 + 0.5*0.2 - 0.3 = -0.2        A_2 = -0.2  + 0.25*0.8   =  0.0
    # delta_1 = 0 + 0.5*0.3 - 0.4 = -0.25       A_1 = -0.25 + 0.25*0.0   = -0.25
    # delta_0 = 0 + 0.5*0.4 - 0.5 = -0.3        A_0 = -0.3  + 0.25*-0.25 = -0.3625
    # returns = A + V = (0.1375, 0.15, 0.3, 1.0)
    # Row 2: the same episode followed by 2 masked padding steps holding garbage that must not leak in.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 5.0, 7.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.0, 0.0], [0.5, 0.4, 0.3, 0.2, 9.0, -3.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    expected_adv = torch.tensor([-0.3625, -0.25, 0.0, 0.8, 0.0, 0.0], dtype=F64)
    expected_ret = torch.tensor([0.1375, 0.15, 0.3, 1.0, 0.0, 0.0], dtype=F64)
    for row in range(2):
        _close(adv[row], expected_adv, tol=1e-12)
        _close(ret[row], expected_ret, tol=1e-12)
    # the full 4-step mask (no tail) gives the same numbers
    adv4, ret4 = gae(rewards[:1, :4], values[:1, :4], mask[:1, :4], gamma=0.5, lam=0.5)
    _close(adv4[0], expected_adv[:4], tol=1e-12)
    _close(ret4[0], expected_ret[:4], tol=1e-12)


def test_gae_gamma_lambda_one_is_reward_to_go():
    g = torch.Generator().manual_seed(8)
    r = torch.randn(2, 7, generator=g, dtype=F64)
    v = torch.randn(2, 7, generator=g, dtype=F64)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    togo = (r * mask).flip(1).cumsum(1).flip(1) * mask
    _close(ret, togo, tol=1e-12)
    _close(adv, (togo - v) * mask, tol=1e-12)


def test_ppo_policy_loss_hand_worked():
    # eps = 0.2. ratio, A -> -A*ratio, -A*clip(ratio), max, clipped?
    # 1.5,  1 -> -1.5, -1.2 -> -1.2  clipped
    # 0.5,  1 -> -0.5, -0.8 -> -0.5
    # 1.1, -2 ->  2.2,  2.2 ->  2.2  (inside the range: tie, not clipped)
    # 1.0,  3 -> -3.0, -3.0 -> -3.0
    # 0.5, -1 ->  0.5,  0.8 ->  0.8  clipped
    # masked token (ratio 3, A 100) ignored.  loss = (-1.2 - 0.5 + 2.2 - 3 + 0.8) / 5 = -0.34, clipfrac = 2/5
    ratio = torch.tensor([[1.5, 0.5, 1.1], [1.0, 0.5, 3.0]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -2.0], [3.0, -1.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.randn(2, 3, dtype=F64)
    logp = (old + ratio.log()).requires_grad_()
    loss, clipfrac, approx_kl = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    _close(loss, -0.34, tol=1e-12)
    _close(clipfrac, 0.4, tol=1e-12)
    kl = sum((x - 1) - math.log(x) for x in (1.5, 0.5, 1.1, 1.0, 0.5)) / 5
    _close(approx_kl, kl, tol=1e-12)
    loss.backward()
    # clipped tokens and masked tokens get no gradient; unclipped ones get -A * ratio / n
    expected = torch.tensor([[0.0, -0.5 / 5, 2.2 / 5], [-3.0 / 5, 0.0, 0.0]], dtype=F64)
    _close(logp.grad, expected, tol=1e-12)
    # per-sequence advantages broadcast over tokens (GRPO)
    l_seq, *_ = ppo_policy_loss(logp.detach(), old, torch.tensor([1.0, -1.0], dtype=F64), mask, 0.2)
    l_tok, *_ = ppo_policy_loss(logp.detach(), old, torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=F64), mask, 0.2)
    _close(l_seq, l_tok, tol=1e-12)


def test_ppo_value_loss_hand_worked():
    # clip c = 0.2
    # V=1.0, Vold=0.5, R=1.0: (V-R)^2 = 0,    clip(V)=0.7 -> 0.09 -> max 0.09  clipped
    # V=0.4, Vold=0.5, R=0.0: 0.16,            clip(V)=0.4 -> 0.16 -> 0.16
    # V=0.0, Vold=0.5, R=1.0: 1.0,             clip(V)=0.3 -> 0.49 -> 1.0
    # loss = 0.5 * (0.09 + 0.16 + 1.0) / 3 = 0.208333..., clipfrac = 1/3; 4th token masked
    v = torch.tensor([1.0, 0.4, 0.0, 50.0], dtype=F64)
    v_old = torch.tensor([0.5, 0.5, 0.5, 0.0], dtype=F64)
    ret = torch.tensor([1.0, 0.0, 1.0, -50.0], dtype=F64)
    mask = torch.tensor([1, 1, 1, 0])
    loss, clipfrac = ppo_value_loss(v, v_old, ret, mask, clip=0.2)
    _close(loss, 0.5 * 1.25 / 3, tol=1e-12)
    _close(clipfrac, 1 / 3, tol=1e-12)


def test_kl_penalty_and_whiten():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)
    _close(kl_penalty(logp, ref, "k1"), [0.5, -1.0, 0.0])
    q = [-0.5, 1.0, 0.0]
    _close(kl_penalty(logp, ref, "k3"), [math.exp(x) - x - 1 for x in q])
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")

    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    w = whiten(x, mask)
    vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    mean = sum(vals) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 5)  # unbiased
    _close(w[0, 0], (1.0 - mean) / std)
    assert w[:, 3].abs().sum() == 0
    _close(masked_mean(w, mask), 0.0, tol=1e-12)
    _close(masked_mean(whiten(x, mask, shift_mean=False), mask), mean)


def test_group_advantages_matches_trl_grpo_formula():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.3, -1.2, 0.7, 5.0], dtype=F64)
    adv = group_advantages(rewards, group_size=4)
    # by hand: group 1 mean 0.5, unbiased std sqrt(1/3); group 2 constant -> 0
    s = math.sqrt(1 / 3)
    _close(adv[:4], [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)])
    _close(adv[4:8], [0.0] * 4)
    # TRL GRPOTrainer (scale_rewards="group"): (r - mean) / (nanstd + 1e-4), nanstd Bessel-corrected
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    _close(adv, (rewards - mean) / (std + 1e-4))
    _close(group_advantages(rewards, 4, scale=False), rewards - mean)
    _close(group_advantages(rewards, 1), torch.zeros(12))
