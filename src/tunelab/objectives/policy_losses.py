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


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): (r - group mean) / (group std + eps), for N = groups * group_size
    rewards laid out group after group.

    Matches TRL GRPOTrainer (scale_rewards="group"): unbiased (Bessel-corrected) std, eps added to the
    std, and std taken as 0 when group_size == 1. `scale=False` skips the division (Dr. GRPO,
    Liu et al. 2025; TRL scale_rewards="none").
    """
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    return adv.reshape(-1)
