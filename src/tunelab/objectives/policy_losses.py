"""Policy-gradient losses for on-policy RL (PPO, GRPO): advantages, clipped surrogates, KL estimators.

Pure tensor maths, no model code, as losses.py; shapes [B, T] are per response token, [B] per sequence.
"""

from __future__ import annotations

import torch

from tunelab.objectives.losses import masked_mean

def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per row of [B, T] tensors.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = sum_l (gamma * lam)^l delta_{t+l}, returns = A + V.
    `mask` marks each row's valid steps as one contiguous block; the value after the last valid step
    is 0 (episode end). Advantages and returns are 0 outside the mask.
    """
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        # m[t+1] = 0 past the last valid step: no bootstrap value and no advantage carried back
        m_next = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        v_next = values[:, t + 1] * m_next if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        last = delta + gamma * lam * m_next * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017): masked token mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)).

    rho = exp(logp - old_logp). Returns (loss, clipfrac, approx_kl), where clipfrac is the fraction of
    tokens whose clipped term is the active (larger) one and approx_kl = mean((rho - 1) - log rho), the
    non-negative k3 estimator of KL(pi_old || pi) (Schulman, "Approximating KL divergence", 2020).
    `advantages` may be per token [B, T] or per sequence [B] (GRPO).
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(unclipped.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)) over masked tokens
    (Huang et al., "The N implementation details of RLHF with PPO"). Returns (loss, clipfrac)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(unclipped.dtype), mask)
    return loss, clipfrac


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence", 2020).

    k1 = logp - ref_logp (unbiased, can be negative); k2 = 0.5 (logp - ref_logp)^2;
    k3 = exp(q) - q - 1 with q = ref_logp - logp (unbiased, non-negative; GRPO, Shao et al. 2024).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        q = ref_logp - logp
        return torch.exp(q) - q - 1
    raise ValueError(f"unknown KL estimator {kind!r}: k1, k2, k3")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): r - group mean, for N = groups * group_size rewards laid out group
    after group, divided by (std + eps) where `scale` says which std:
    - "group": the group's (GRPO); taken as 0 when group_size == 1;
    - "batch": the whole batch's (PPO Lite, Liu et al. 2025, "Part I: Tricks or Traps?"); `batch_std` overrides
      it when the batch spans several ranks;
    - "none": no division (Dr. GRPO, Liu et al. 2025: the std divides easy and hard questions unequally).
    Matches TRL GRPOTrainer's scale_rewards: unbiased (Bessel-corrected) std, eps added to the std.
    """
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return adv
    if scale == "group":
        std = r.std(dim=1, keepdim=True).expand_as(r).reshape(-1) if group_size > 1 else torch.zeros_like(adv)
    elif scale == "batch":
        std = batch_std if batch_std is not None else (rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()))
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}: group, batch, none")
    return adv / (std + eps)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups' rewards all agree [groups]: their advantages are 0, so they carry no learning signal
    (DAPO's dynamic sampling drops them). Tested with isclose, as TRL's frac_reward_zero_std."""
    r = rewards.view(-1, group_size)
    return torch.isclose(r.std(dim=1), torch.zeros((), dtype=r.dtype, device=r.device)) if group_size > 1 else \
        torch.ones(r.shape[0], dtype=torch.bool, device=r.device)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), added to the reward: 0 up to
    max_length - buffer tokens, then falling linearly to -1 at max_length, and -1 beyond it."""
    start = max_length - buffer
    return ((start - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    level: str = "token",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    max_length: int | None = None,
) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """The GRPO family's policy loss on one batch: (loss summed over its units, units, statistics).

    logp / old_logp / ref_logp [B, T] per response token (old_logp None: the sampling policy is this one, so
    the ratio is 1 with the gradient of logp), advantages [B], mask [B, T] the tokens that carry loss.
    The importance ratio rho is per token (`level` "token") or the exp of the sequence's mean token log-ratio,
    one per sequence (`level` "sequence": GSPO, Zheng et al. 2025). Per token,
    - clipped types: -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) (PPO's surrogate; clip_high > clip_low
      is DAPO's clip-higher, Yu et al. 2025);
    - "cispo" (MiniMax-M1, 2025): -sg(min(rho, 1 + clip_high)) A log pi: the ratio is clipped, not the update,
      so clipped tokens keep their gradient;
    plus beta * k3 KL to the reference (GRPO, Shao et al. 2024). The per-token losses are then averaged:
    - "grpo": over each sequence's tokens, then over sequences (Shao et al. 2024; favours short right answers
      and long wrong ones); units = sequences;
    - "bnpo": over the tokens of this batch (TRL's bnpo: a micro-batch mean, then the mean over micro-batches);
      units = 1 per batch;
    - "dr_grpo": summed, divided by sequences x max_length (Dr. GRPO, Liu et al. 2025: a constant, no length
      bias); units = sequences x max_length;
    - "dapo" / "cispo": over all tokens of the update (DAPO's token-level loss); units = tokens.
    loss_sum / units equals TRL GRPOTrainer's loss on the same tensors (tests/test_policy_losses.py).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: {', '.join(GRPO_LOSS_TYPES)}")
    clip_high = clip_low if clip_high is None else clip_high
    m = mask.to(logp.dtype)
    adv = advantages.unsqueeze(-1)
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp)
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif level != "token":
        raise ValueError(f"unknown importance_sampling_level {level!r}: token, sequence")
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1 + clip_high).detach() * adv * logp
        clipped_high, clipped_low = (ratio > 1 + clip_high) & (adv > 0), torch.zeros_like(ratio, dtype=torch.bool)
    else:
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
        clipped_high, clipped_low = (ratio > 1 + clip_high) & (adv > 0), (ratio < 1 - clip_low) & (adv < 0)
    stats = {}
    if beta != 0.0:
        q = ref_logp - logp
        kl = torch.exp(q) - q - 1
        per_token = per_token + beta * kl
        stats["kl_k3"] = _mean_over(kl.detach(), m)
    summed = (per_token * m).sum(-1)  # [B]
    rows = logp.shape[0]
    if loss_type == "grpo":
        loss, units = (summed / m.sum(-1).clamp(min=1.0)).sum(), rows
    elif loss_type == "bnpo":
        loss, units = summed.sum() / m.sum().clamp(min=1.0), 1
    elif loss_type == "dr_grpo":
        if max_length is None:
            raise ValueError("dr_grpo needs max_length (the generation limit, its constant normaliser)")
        loss, units = summed.sum(), rows * max_length
    else:
        loss, units = summed.sum(), int(mask.sum())
    stats["clip_low"] = _mean_over(clipped_low.to(m.dtype), m)
    stats["clip_high"] = _mean_over(clipped_high.to(m.dtype), m)
    return loss, units, stats


def _mean_over(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # per-sequence values [B, 1] (sequence level) average over sequences, per-token ones over the mask, as TRL logs
    if x.shape[-1] == 1:
        return x.mean()
    return (x * m).sum() / m.sum().clamp(min=1.0)
