"""Tests for tunelab.objectives.policy_losses: hand-worked values, closed forms and TRL's GRPO maths."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.objectives.losses import masked_mean, whiten  # PPO whitens its advantages and rewards
from tunelab.objectives.policy_losses import (
    GRPO_LOSS_TYPES,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    overlong_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    zero_std_groups,
)

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
    _close(group_advantages(rewards, 4, scale="none"), rewards - mean)
    _close(group_advantages(rewards, 1), torch.zeros(12))
    # scale_rewards="batch" (TRL): group mean, the whole batch's nanstd
    _close(group_advantages(rewards, 4, scale="batch"), (rewards - mean) / (nanstd(rewards) + 1e-4))
    assert zero_std_groups(rewards, 4).tolist() == [False, True, False]


def test_overlong_penalty_matches_trl_soft_overlong_punishment():
    from trl.rewards import get_soft_overlong_punishment

    trl_fn = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=8)
    lengths = torch.arange(0, 25)
    expected = trl_fn([[1] * int(n) for n in lengths])
    _close(overlong_penalty(lengths, 20, 8), expected, tol=1e-12)
    assert overlong_penalty(torch.tensor([12, 16, 20]), 20, 8).tolist() == [0.0, -0.5, -1.0]


# ------------------------------------------------------------------------------------------------
# The GRPO family against TRL 1.16 GRPOTrainer._compute_loss
# ------------------------------------------------------------------------------------------------


def _trl_grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, loss_type, level, eps_low, eps_high, beta, max_len):
    """TRL 1.16 keeps the GRPO losses inside GRPOTrainer._compute_loss; call it unbound on a stand-in carrying only
    the attributes it reads, with the model's per-token log-probs replaced by the given tensor (everything after
    that is TRL's own code). One process, no gradient accumulation, no vLLM, no entropy masking or bonus."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logp.shape
    reduce = lambda x, reduction="sum": x  # noqa: E731  single process
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=SimpleNamespace(num_processes=1, reduce=reduce, gather=lambda x: x),
        aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "num_items_in_batch": mask.sum(),
    }
    if old_logp is not None:
        inputs["old_per_token_logps"] = old_logp
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logp
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


def _grpo_batch(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=F64)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)  # ratios both sides of the clip
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    lengths = torch.tensor([9, 1, 5, 7, 3, 8])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta,clip_high,on_policy", [(0.0, None, False), (0.04, 0.28, False), (0.04, 4.0, True)])
def test_grpo_losses_match_trl(loss_type, level, beta, clip_high, on_policy):
    logp, old, ref, adv, mask = _grpo_batch()
    old = None if on_policy else old
    if loss_type == "cispo" and clip_high is None:
        clip_high = 4.0  # ScaleRL's recommended ratio cap of 5
    ours_in = logp.clone().requires_grad_()
    loss_sum, units, stats = grpo_loss(ours_in, old, adv, mask, loss_type=loss_type, level=level, clip_low=0.2,
                                       clip_high=clip_high, ref_logp=ref, beta=beta, max_length=12)
    ours = loss_sum / units
    ours.backward()
    trl_in = logp.clone().requires_grad_()
    # TRL's cispo takes the ratio cap itself as epsilon_high (ScaleRL's eps_max); ours is 1 + clip_range_high
    eps_high = 0.2 if clip_high is None else clip_high + (1 if loss_type == "cispo" else 0)
    theirs, metrics = _trl_grpo_loss(trl_in, old, ref, adv, mask, loss_type=loss_type, level=level, eps_low=0.2,
                                     eps_high=eps_high, beta=beta, max_len=12)
    theirs.backward()
    _close(ours, theirs, tol=1e-12)
    _close(ours_in.grad, trl_in.grad, tol=1e-12)
    assert ours_in.grad.abs().sum() > 0
    # TRL logs its statistics through float32 token counts
    if beta:
        _close(stats["kl_k3"], metrics["kl"][0])
    if loss_type != "cispo":
        _close(stats["clip_low"], metrics["clip_ratio/low_mean"][0])
        _close(stats["clip_high"], metrics["clip_ratio/high_mean"][0])
    else:
        _close(stats["clip_high"], metrics["cispo_clip_ratio"][0])


def test_grpo_loss_normalisers_by_hand():
    # two sequences, one token of loss -A each at ratio 1: A = (1, -1), lengths 1 and 3
    logp = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 0.5], dtype=F64)
    expect = {"grpo": ((-1.0 - 0.5) / 2, 2), "dapo": ((-1.0 - 1.5) / 4, 4), "dr_grpo": ((-1.0 - 1.5) / 10, 10),
              "bnpo": ((-1.0 - 1.5) / 4, 1)}
    for loss_type, (value, units) in expect.items():
        loss, n, _ = grpo_loss(logp, None, adv, mask, loss_type=loss_type, max_length=5)
        assert n == units
        _close(loss / n, value, tol=1e-12)
    with pytest.raises(ValueError):
        grpo_loss(logp, None, adv, mask, loss_type="ppo")
