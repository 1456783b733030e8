"""LoRA dropout that keeps a one-byte mask for the backward pass instead of two full-width copies of the input.

PEFT computes `lora_B(lora_A(dropout(x)))`. On CPU, dropout keeps its noise tensor (the input's dtype) and lora_A
keeps the dropped-out input for its weight gradient: 8 bytes per input element in fp32, for each adapted layer,
where q, k and v (and gate and up) each make their own copies of one input. Measured on the benchmark's LoRA step
that is more than the whole frozen block keeps (bench/README.md). `DroppedInputLinear` computes lora_A on the
dropped-out input in one autograd node that keeps the input itself (one tensor, shared by every layer reading it,
and often alive anyway) and a bool mask, and forms the dropped-out input again in the backward pass. The maths, the
parameters and their names, saving, merging and PEFT's config are unchanged; only what autograd keeps differs.

It is also cheaper to compute. On CPU, drawing one random float per element (`bernoulli_`, `rand`) was 15 % of the
benchmark's LoRA step and multiplying by a bool mask another few per cent (bench/README.md). `keep_mask` draws 16
random bits per element instead (four elements from each 64-bit draw), `torch.where` applies the mask, and the
1 / (1 - p) scale goes onto the rank-r weight, not the full-width input. The price: p is rounded to a multiple of
1/65536 (0.05 becomes 0.0500031), and the scale uses that rounded p, so the dropped-out input stays unbiased.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16  # the mask compares 16 random bits per element: p is a multiple of 1/LEVELS


def _drop_levels(p: float) -> int:
    """How many of the LEVELS values of a 16-bit lane drop an element: p rounded to the nearest level, below 1."""
    return min(round(p * LEVELS), LEVELS - 1)


def rounded_p(p: float) -> float:
    """The drop probability `keep_mask` applies for `p`: the nearest multiple of 1/65536 (below 1)."""
    return _drop_levels(p) / LEVELS


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bool mask of `shape`, each element independently True with probability 1 - rounded_p(p)."""
    n = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return lanes >= _drop_levels(p) - LEVELS // 2


class _DroppedInputLinear(torch.autograd.Function):
    """F.linear(dropout(x, p), weight) (no bias), keeping x and a bool mask."""

    @staticmethod
    def forward(ctx, x, weight, p: float):
        keep = keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - rounded_p(p))
        out = F.linear(torch.where(keep, x, 0), weight * scale)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, grad @ (weight.to(grad.dtype) * ctx.scale), 0)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x.to(grad.dtype), 0)
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1]) * ctx.scale)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


class DroppedInputLinear(nn.Linear):
    """A LoRA A matrix that applies its layer's dropout itself (the class an adapted layer's lora_A is switched to)."""

    dropout_p: float = 0.0

    def forward(self, x):
        if not (self.training and self.dropout_p > 0 and torch.is_grad_enabled()) or self.bias is not None:
            return super().forward(F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x)
        if torch.is_autocast_enabled(x.device.type):  # the cast autocast would apply to F.linear's inputs
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return _DroppedInputLinear.apply(x.to(dtype), self.weight.to(dtype), self.dropout_p)
        return _DroppedInputLinear.apply(x, self.weight, self.dropout_p)


def fuse_lora_dropout(model) -> int:
    """Move the dropout of each plain LoRA layer of a PEFT `model` into its lora_A (DroppedInputLinear). Variants
    (DoRA) and layers without dropout are left alone. Returns how many adapters were switched."""
    switched = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in list(dropouts.items()):
            a = lora_a[name] if name in lora_a else None
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0 or name in variants or type(a) is not nn.Linear:
                continue
            a.__class__ = DroppedInputLinear
            a.dropout_p = float(dropout.p)
            dropouts[name] = nn.Identity()
            switched += 1
    return switched
