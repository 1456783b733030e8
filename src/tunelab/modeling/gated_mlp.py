"""Gated MLPs (SwiGLU, GeGLU) that keep three intermediate-width activations for the backward pass instead of four.

`down_proj(act_fn(gate_proj(x)) * up_proj(x))`, as Llama, Mistral, Qwen and Gemma write it, leaves autograd
holding the gate, act(gate) and up (the activation keeps its input, the product keeps both factors), and down_proj
or its LoRA keeps the product: four intermediate-width tensors per token and layer, the largest share of a
decoder's activations (measured on the benchmark's LoRA step: 338 of 705 MB). `_GatedProduct` keeps the gate and
up only and computes act(gate) again in the backward pass, one element-wise op: 85 of those 705 MB are not kept.
Same maths, same parameters; only what autograd keeps differs.

A model's MLP is switched only after a probe: on a few random tokens it must give exactly what its own forward
gives, so an MLP of the same attribute names that computes something else keeps its forward.
"""

from __future__ import annotations

import torch
from torch import nn


class _GatedProduct(torch.autograd.Function):
    """act(gate) * up, keeping gate and up."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            gate_ = gate.detach().requires_grad_(True)
            activated = ctx.act(gate_)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            (grad_gate,) = torch.autograd.grad(activated, gate_, grad * up)
        if ctx.needs_input_grad[1]:
            grad_up = grad * activated.detach()
        return grad_gate, grad_up, None


def _gated_forward(self, x):
    return self.down_proj(_GatedProduct.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


_classes: dict[type, type] = {}


def _gated_class(cls: type) -> type:
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (cls,), {"forward": _gated_forward, "__module__": cls.__module__})
    return _classes[cls]


@torch.no_grad()
def keep_less_in_gated_mlps(model: nn.Module, dtype: torch.dtype) -> int:
    """Switch every gated MLP of `model` whose forward the probe reproduces; returns how many were switched."""
    switched = 0
    for module in model.modules():
        gated = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        if not gated or type(module) in _classes.values() or \
                not isinstance(getattr(module.gate_proj, "in_features", None), int):
            continue
        weight = next(module.parameters())
        x = torch.randn(2, 3, module.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
        x = x.to(weight.device, dtype)
        # both forwards draw the same dropout masks (if the model is in training mode) from one seed, without touching
        # the run's own random state; a 4-bit layer stays unpacked in this no-grad forward (modeling.load.keep_4bit_layout)
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(0)
            expected = module(x)
            cls = type(module)
            module.__class__ = _gated_class(cls)
            torch.manual_seed(0)
            same = torch.equal(module(x), expected)
        if same:
            switched += 1
        else:
            module.__class__ = cls
    return switched
