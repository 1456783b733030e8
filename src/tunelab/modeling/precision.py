"""The number format a run computes in: autocast and, for fp16, the gradient scaler.

Used by the loop and by objectives that run the model outside it (DPO's reference pass, PPO/GRPO and on-policy
distillation's sampling), so it sits below both.
"""

from __future__ import annotations

import contextlib

import torch

from tunelab.config import UserError


def precision_context(precision: str, device: torch.device):
    """(autocast context factory, GradScaler or None) for the resolved precision."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision: fp16 needs a CUDA GPU (CPUs have no fast fp16 math); use fp32 or bf16")
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler
