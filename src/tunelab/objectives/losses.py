"""Loss functions for the training objectives: pure tensor maths, no model code.

Shapes: B batch, T sequence, V vocabulary, H hidden size. Label tensors use -100 for "no target".
Causal-LM label convention: `labels` is aligned with `input_ids`; the logits at position t predict
`labels[:, t + 1]`, so per-token outputs have length T - 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # softmax statistics in at least fp32: bf16 logsumexp over a 100k vocabulary loses several digits
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of `x` where `mask` is true/non-zero (over all elements when `dim` is None)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # where, not x * mask: keeps inf/nan out of padding
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `x` over masked elements; 0 (not nan) when the mask is empty."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening: (x - mean) / std over the masked elements; 0 outside the mask.

    The variance is the unbiased (Bessel-corrected) one, as in the PPO-for-RLHF reference code
    (Huang et al., "The N implementation details of RLHF with PPO", 2022/2024). With
    `shift_mean=False` the mean is added back, so only the scale changes (used for rewards).
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    n = m.sum()
    var = masked_mean((x - mean) ** 2, m) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# Token log-probabilities
# ---------------------------------------------------------------------------------------------


class _TokenLogprobs(torch.autograd.Function):
    """log p(labels[t+1] | logits[t]) computed chunk by chunk over the sequence.

    Saves only the logits (already alive) and one log-normaliser per token; the backward pass
    recomputes the softmax per chunk and writes straight into one gradient buffer, so neither
    pass holds an fp32 copy of the whole [B, T, V] tensor.
    """

    @staticmethod
    def forward(ctx, logits, labels, chunk_size, temperature):
        cdt = _compute_dtype(logits.dtype)
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        index = target.masked_fill(~valid, 0).unsqueeze(-1)
        n = target.shape[1]
        out = torch.zeros(target.shape, dtype=cdt, device=logits.device)
        lse = torch.zeros(target.shape, dtype=cdt, device=logits.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = logits[:, s:e].to(cdt) / temperature
            lse[:, s:e] = z.logsumexp(-1)
            out[:, s:e] = z.gather(-1, index[:, s:e]).squeeze(-1) - lse[:, s:e]
        out = out.masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, index, valid, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, valid, lse = ctx.saved_tensors
        cdt = lse.dtype
        g = (grad_out.to(cdt) * valid / ctx.temperature).unsqueeze(-1)
        grad = torch.zeros_like(logits)  # the last position predicts nothing: its gradient stays 0
        n = lse.shape[1]
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            z = logits[:, s:e].to(cdt) / ctx.temperature
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z)
            gz = -torch.exp(z - lse[:, s:e].unsqueeze(-1)) * g[:, s:e]
            gz.scatter_add_(-1, index[:, s:e], g[:, s:e])
            grad[:, s:e] = gz.to(logits.dtype)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 64, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probabilities of the shifted labels, [B, T-1]; 0 where the label is -100.

    Computed as `gather(z) - logsumexp(z)` with z = logits / temperature, `chunk_size` sequence
    positions at a time (the log-softmax over [B, T, V] is never materialised). Output is fp32
    (fp64 for fp64 logits) whatever the logits dtype. Differentiable w.r.t. `logits`.
    """
    return _TokenLogprobs.apply(logits, labels, chunk_size, temperature)


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 64, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens and their count: ([B], [B])."""
    lp = token_logprobs(logits, labels, chunk_size, temperature)
    return lp.sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor | None = None, chunk_size: int = 64
) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per position, [B, T]; 0 outside `mask`.

    H = logsumexp(z) - sum_v softmax(z)_v z_v, chunked over the sequence to bound fp32 temporaries.
    """
    cdt = _compute_dtype(logits.dtype)
    parts = []
    for z in logits.split(chunk_size, dim=1):
        z = z.to(cdt)
        lse = z.logsumexp(-1)
        parts.append(lse - (torch.softmax(z, -1) * z).sum(-1))
    ent = torch.cat(parts, dim=1)
    return ent if mask is None else torch.where(mask.bool(), ent, torch.zeros_like(ent))


# ---------------------------------------------------------------------------------------------
# SFT cross-entropy from hidden states
# ---------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of (h @ W^T + b) against y, in row chunks, gradients formed during the forward.

    Each chunk's logits live only inside the loop: the forward computes the loss and, when needed,
    the gradients of h, W and b; the backward only scales them by the incoming scalar gradient.
    One fp32 tensor of the chunk's logits is shifted, exponentiated and normalised in place into the
    softmax: the chunk peaks at 4 bytes per logit, +2 for a 16-bit copy as it enters or leaves the
    16-bit matmuls (+4 with a softcap, whose derivative needs tanh kept).
    This is the "fused linear cross-entropy" of Liger Kernel (Hsu et al. 2024) and Cut Cross-Entropy
    (Wijmans et al. 2024), in plain PyTorch. It also returns how many rows' target has the largest logit (token
    accuracy) from the shift by the max that logsumexp takes anyway: no extra pass over the logits.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_size, softcap, need_h, need_w, need_b):
        cdt = _compute_dtype(h.dtype)
        loss = torch.zeros((), dtype=cdt, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=cdt, device=h.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=cdt, device=h.device) if need_b else None
        for s in range(0, h.shape[0], chunk_size):
            hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
            z = F.linear(hc, weight, bias).to(cdt)
            if softcap is not None:  # Gemma-2 style cap * tanh(z / cap)
                t = torch.tanh(z.div_(softcap))
                z = t * softcap
            # logsumexp as torch computes it (shift by the max, exp, sum, log), in place over z
            z = z.sub_(z.amax(-1, keepdim=True))
            target = z.gather(-1, yc.unsqueeze(-1)).squeeze(-1)
            correct += (target == 0).sum()  # the target's logit is the max: exactly 0 after the shift
            total = z.exp_().sum(-1)  # z is now exp(z - max)
            loss += (total.log() - target).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.div_(total.unsqueeze(-1))  # d loss / dz = softmax(z) - onehot(y)
            g[torch.arange(len(yc), device=g.device), yc] -= 1
            if softcap is not None:
                g *= t.mul_(t).neg_().add_(1)  # d cap*tanh(u/cap) / du = 1 - tanh^2
            if need_h:
                gh[s:s + chunk_size] = (g.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                gw.addmm_(g.t(), hc.to(cdt))
            if need_b:
                gb += g.sum(0)
        ctx.save_for_backward(*(x for x in (gh, gw, gb) if x is not None))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = iter(ctx.saved_tensors)
        grads = []
        for need, dtype in zip(ctx.needs, ctx.dtypes):
            grads.append((next(saved) * grad_loss).to(dtype) if need else None)
        return (*grads, None, None, None, None, None, None)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy from final hidden states, the number of target tokens, and how many of
    them have the largest logit (an int64 count, no gradient): `logits.argmax(-1) == target`, except that a target
    tied with another token for the top counts as correct whichever of them argmax would pick (exact float ties:
    with fp32 logits practically never).

    hidden [B, T, H], lm_head_weight [V, H], labels [B, T] (unshifted, -100 = ignore). Only rows whose
    shifted label is kept go through the LM head, `chunk_size` rows at a time, so the [tokens, V]
    logits never exist at once. Equals
    `F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")`.
    `softcap` applies cap * tanh(logits / cap) (Gemma 2, Team et al. 2024). A logit scale can be
    folded into `hidden` by the caller. Differentiable w.r.t. hidden, weight and bias.
    """
    target = labels[:, 1:]
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = target != IGNORE_INDEX
    h = hidden[keep]  # [N, H], row-major over (b, t), same order as target[target != -100]
    y = target[target != IGNORE_INDEX]
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (h, lm_head_weight, bias)]
    loss, correct = _LinearCrossEntropy.apply(h, lm_head_weight, bias, y, chunk_size, softcap, *need)
    return loss, keep.sum(), correct


# ---------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------


def _smoothed_logsigmoid_loss(logits: torch.Tensor, eps: float) -> torch.Tensor:
    # conservative loss: the preference label is flipped with probability eps
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses on summed response log-probs; returns (losses, chosen_rewards, rejected_rewards).

    With h = beta * [(pi_c - ref_c) - (pi_r - ref_r)]:
    - "sigmoid" (DPO, Rafailov et al. 2023): -log sigma(h); also applies `label_smoothing` if non-zero.
    - "label_smoothing" (cDPO, Mitchell 2023): -(1 - eps) log sigma(h) - eps log sigma(-h).
    - "ipo" (IPO, Azar et al. 2023, Eq. 17): (g - 1/(2 beta))^2 with g the *length-averaged* log-ratio gap
      (pi_c - ref_c)/|y_w| - (pi_r - ref_r)/|y_l|. Length averaging is TRL's convention (DPOTrainer,
      loss_type="ipo"; confirmed with the IPO authors per TRL); needs chosen_len / rejected_len.
      For the unnormalised paper form pass lengths of 1.
    - "simpo" (SimPO, Meng et al. 2024): -log sigma(beta * (pi_c/|y_w| - pi_r/|y_l|) - gamma), reference-free
      (ref_* are ignored), `label_smoothing` applied as above. `gamma` is the paper's reward margin gamma, which
      equals TRL CPOConfig.simpo_gamma (TRL subtracts simpo_gamma / beta inside, then multiplies by beta).

    Rewards (detached, for logging) are beta * (pi - ref), or beta * pi / |y| for SimPO (as TRL reports them).
    """
    eps = label_smoothing
    if loss_type == "simpo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("simpo needs chosen_len and rejected_len")
        avg_c = policy_chosen / torch.as_tensor(chosen_len).clamp(min=1)
        avg_r = policy_rejected / torch.as_tensor(rejected_len).clamp(min=1)
        losses = _smoothed_logsigmoid_loss(beta * (avg_c - avg_r) - gamma, eps)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type in ("sigmoid", "label_smoothing"):
        losses = _smoothed_logsigmoid_loss(beta * (chosen_ratio - rejected_ratio), eps)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo needs chosen_len and rejected_len (TRL length-averages the log-ratios)")
        gap = chosen_ratio / torch.as_tensor(chosen_len).clamp(min=1) - rejected_ratio / torch.as_tensor(
            rejected_len
        ).clamp(min=1)
        losses = (gap - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: sigmoid, label_smoothing, ipo, simpo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, *, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, Eq. 6-7), reference-free, per pair; returns (losses, log_odds, ratio_term).

    chosen_avg / rejected_avg are the *length-averaged* response log-probs (as TRL's ORPOTrainer feeds them).
    log_odds = log(odds(y_w) / odds(y_l)) with odds(y) = p / (1 - p), p = exp(avg log-prob);
    loss = NLL(y_w) - beta * log sigma(log_odds), where the SFT term NLL(y_w) is the chosen response's per-token
    NLL, i.e. -chosen_avg. (TRL's ORPO NLL averages over the batch's prompt and response tokens instead; the
    paper's L_SFT is the response's. The odds-ratio term equals TRL's odds_ratio_loss.)
    """
    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    return -chosen_avg - beta * ratio, log_odds.detach(), ratio.detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7), per example; returns (losses, rewards).

    logps / ref_logps: summed response log-probs [N]; desirable: bool [N]; kl: the reference point z0, a
    detached scalar >= 0 (TRL: the batch mean of policy - reference log-probs of mismatched prompt/completion
    pairs, clamped at 0). With r = logps - ref_logps:
      desirable:    desirable_weight   * (1 - sigma(beta * (r - z0)))
      undesirable:  undesirable_weight * (1 - sigma(beta * (z0 - r)))
    as TRL's KTOTrainer (loss_type "kto"), which then averages over the batch's examples.
    """
    ratio = logps - ref_logps
    kl = kl.detach()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin=0.0) -> torch.Tensor:
    """Reward-model pairwise loss -log sigma(r_c - r_r - margin), per pair (Bradley & Terry 1952;
    Ouyang et al. 2022; margin as in Llama 2, Touvron et al. 2023)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    # KL(p || q) per row
    return (logp.exp() * (logp - logq)).sum(-1)


def _divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float, beta: float):
    cdt = _compute_dtype(student.dtype)
    log_s = F.log_softmax(student.to(cdt) / temperature, -1)
    log_t = F.log_softmax(teacher.to(cdt) / temperature, -1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        div = _kl(log_t, log_s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        div = _kl(log_s, log_t)
    elif kind == "jsd":
        # log m with m = beta p_T + (1 - beta) p_S, in log space for stability
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
        div = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}: forward_kl, reverse_kl, jsd")
    return div.sum() * temperature**2


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level distillation divergence summed over positions where `mask` is set, and their count.

    Distributions are softmax(logits / temperature); every kind is multiplied by temperature^2 so
    gradient scale does not depend on temperature (Hinton et al. 2015).
    - "forward_kl": KL(p_T || p_S) (Hinton et al. 2015).
    - "reverse_kl": KL(p_S || p_T) (mode-seeking; Gu et al. 2024, MiniLLM).
    - "jsd": generalised JSD (Agarwal et al. 2024, GKD, Eq. 1) in TRL GKDTrainer.generalized_jsd_loss's
      convention: m = beta p_T + (1 - beta) p_S, loss = beta KL(p_T || m) + (1 - beta) KL(p_S || m), and the
      end points beta = 0 / 1 mean forward / reverse KL. TRL applies no temperature^2 factor; we do, so
      ours = TRL * temperature^2 (equal at temperature 1).
    The teacher is treated as a constant (detached). Rows are processed `chunk_size` at a time and each
    chunk is recomputed in the backward pass, so fp32 softmax temporaries exist for one chunk only.
    """
    m = mask.bool()
    s = student_logits[m]
    t = teacher_logits.detach()[m]
    total = torch.zeros((), dtype=_compute_dtype(student_logits.dtype), device=s.device)
    recompute = torch.is_grad_enabled() and s.requires_grad
    for sc, tc in zip(s.split(chunk_size), t.split(chunk_size)):
        if recompute:
            total = total + checkpoint(_divergence, sc, tc, kind, temperature, beta, use_reentrant=False)
        else:
            total = total + _divergence(sc, tc, kind, temperature, beta)
    return total, m.sum()


# ---------------------------------------------------------------------------------------------
# Masked language modelling
# ---------------------------------------------------------------------------------------------


def mlm_mask(
    input_ids: torch.Tensor,
    *,
    special_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    whole_word_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019): returns (masked_input_ids, labels).

    Each non-special token is selected with probability `mask_prob`; with `whole_word_ids` ([B, T] word
    index per token, any integers >= 0 within a row; negative for none) whole words are selected together
    (whole-word masking, Devlin et al. 2019 repository update). Of the selected tokens 80 % become
    `mask_token_id`, 10 % a uniformly random token id in [0, vocab_size), 10 % stay unchanged, decided per
    token. `labels` holds the original id at selected positions and -100 elsewhere.
    """
    special = special_mask.bool()
    dev = input_ids.device

    def rand(shape):
        return torch.rand(shape, generator=generator, device=dev)

    if whole_word_ids is None:
        selected = rand(input_ids.shape) < mask_prob
    else:
        words = whole_word_ids.long()
        # one draw per (row, word index); tokens look up their word's draw
        draws = rand((words.shape[0], int(words.max().clamp(min=0)) + 1))
        selected = (draws.gather(1, words.clamp(min=0)) < mask_prob) & (words >= 0)
    selected &= ~special

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    u = rand(input_ids.shape)
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev, dtype=input_ids.dtype)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels
