"""Gated MLPs recompute act(gate) in backward: nothing activated is kept, and the gradients are the plain ones."""

from __future__ import annotations

import pytest
import torch
from lm_reference import saved_bytes, tiny_llama


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gated_mlp_keeps_no_activated_gate_and_gives_the_same_gradients(lora):
    """A model whose MLPs keep_less_in_gated_mlps switched gives transformers' own loss and gradients, no longer
    keeps act(gate) for the backward pass (gate, up and their product stay), and the probe leaves the run's random
    state alone. An MLP with the same attribute names that computes something else keeps its forward."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tunelab.modeling.gated_mlp import keep_less_in_gated_mlps

    def build():
        model = tiny_llama(tie=False)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        return model.train()

    reference, model = build(), build()
    state = torch.get_rng_state()
    assert keep_less_in_gated_mlps(model, torch.float32) == 2
    assert torch.equal(torch.get_rng_state(), state)
    ids = torch.randint(0, 97, (2, 24))

    def loss_grads_kept(m):
        loss, kept = saved_bytes(lambda: m(input_ids=ids, labels=ids).loss)
        loss.backward()
        return loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, kept

    loss, grads, kept = loss_grads_kept(model)
    ref_loss, ref_grads, ref_kept = loss_grads_kept(reference)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5), name
    assert ref_kept - kept == 2 * (2 * 24 * 64 * 4)  # 2 layers x act(gate) [2, 24, 64] fp32

    class Doubled(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)

    mlp = Doubled(tiny_llama(tie=False).config)
    assert keep_less_in_gated_mlps(mlp, torch.float32) == 0 and type(mlp) is Doubled
