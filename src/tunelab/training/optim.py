"""The optimizer and the learning-rate schedule a run steps with (train.optimizer, train.scheduler)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.config import TrainConfig, UserError


def make_optimizer(tc: TrainConfig, module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            # Biases and norm gains are not weights to shrink (Loshchilov & Hutter's AdamW setup).
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if tc.optimizer == "adamw":
        # The fused kernel updates each parameter in one pass; on CPU it is several times faster than the
        # foreach path, which makes ~6 full passes over the weights and both moments (bench/README.md).
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.adam_betas, fused=fused, foreach=None if fused else True)
    if device.type != "cuda" and tc.optimizer == "paged_adamw_8bit":
        raise UserError("train.optimizer: paged_adamw_8bit is CUDA only (it pages optimizer state through "
                        "CUDA unified memory); use adamw on this machine")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=tc.lr, betas=tc.adam_betas)


def lr_lambda(tc: TrainConfig, total_steps: int):
    warmup = tc.warmup_steps or int(round(tc.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tc.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if tc.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
