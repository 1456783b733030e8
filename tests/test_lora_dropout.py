"""LoRA dropout inside lora_A: a kept bool mask instead of a copy of the input, the dropped-out matmul, and each
element dropped independently with probability p."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_reference import saved_bytes, tiny_llama


def test_lora_dropout_keeps_a_mask_and_gives_the_dropped_out_matmul(monkeypatch):
    """DroppedInputLinear equals lora_A(dropout(x)) with the mask it drew (output and both gradients), keeps less for
    the backward pass than PEFT's dropout + linear, and fuse_lora_dropout switches a PEFT model's plain adapters."""
    from peft import LoraConfig, get_peft_model

    from tunelab.modeling import lora_dropout
    from tunelab.modeling.lora_dropout import DroppedInputLinear, fuse_lora_dropout, rounded_p

    p = 0.25
    x = torch.randn(3, 11, 32, requires_grad=True)
    layer = torch.nn.Linear(32, 8, bias=False)
    layer.__class__ = DroppedInputLinear
    layer.dropout_p = p
    drawn = []
    draw = lora_dropout.keep_mask
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda *a: drawn.append(draw(*a)) or drawn[-1])
    out = layer(x)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.weight), grad_out)
    (keep,) = drawn
    assert keep.dtype == torch.bool and keep.shape == x.shape and 0 < int(keep.sum()) < keep.numel()
    ref = F.linear(x * keep / (1 - p), layer.weight)  # p = 0.25 is a multiple of 1/65536: exact
    rx, rw = torch.autograd.grad(ref, (x, layer.weight), grad_out)
    assert rounded_p(p) == p
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(gx, rx, atol=1e-6) and torch.allclose(gw, rw, atol=1e-5)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # no dropout outside training

    def kept_bytes(model):
        return saved_bytes(lambda: model(input_ids=torch.randint(0, 97, (2, 24))))[1]

    def lora(fused):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                  target_modules="all-linear"))
        if fused:
            assert fuse_lora_dropout(model) == 14  # 7 linears x 2 layers
        return model.train()

    peft_model, fused_model = lora(False), lora(True)
    assert sum(isinstance(m, DroppedInputLinear) for m in fused_model.modules()) == 14
    assert kept_bytes(fused_model) < 0.8 * kept_bytes(peft_model)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_lora_dropout_mask_drops_each_element_independently_with_p(p):
    """keep_mask draws 16 random bits per element, four elements from each 64-bit draw: every one of the four lanes
    must drop at rate p (a generator that leaves the sign bit 0 would never drop one lane), neighbours must be
    uncorrelated, and two draws must differ. Bounds are 6 standard deviations of the binomial."""
    from tunelab.modeling.lora_dropout import keep_mask, rounded_p

    assert abs(rounded_p(p) - p) <= 0.5 / 65536
    n = 1 << 20
    keep = keep_mask((n // 64, 64), p, "cpu").flatten()
    drop = (~keep).double()
    sd = (p * (1 - p) / (n // 4)) ** 0.5
    for lane in range(4):
        assert abs(drop[lane::4].mean().item() - rounded_p(p)) < 6 * sd
    pairs = torch.stack([drop[0::2], drop[1::2]])
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 6 / (n // 2) ** 0.5
    assert not torch.equal(keep, keep_mask((n // 64, 64), p, "cpu").flatten())
