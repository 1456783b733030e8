"""The SFT loss's fused linear cross-entropy (gradients formed in the forward) against the plain full-logits one,
and the checkpointed chunks an adapted head falls back to."""

from __future__ import annotations

import pytest
import torch
from lm_reference import full_logits_loss, grads_of, lm_batch, tiny_llama


@pytest.mark.parametrize("mode", ["full", "full-tied", "lora", "lora-save-head"])
def test_fused_sft_loss_matches_plain_cross_entropy(mode, monkeypatch):
    from tunelab.objectives import forward, losses

    model = tiny_llama(tie=mode == "full-tied")
    if mode.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        save = ["lm_head"] if mode == "lora-save-head" else None
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 modules_to_save=save, task_type="CAUSAL_LM"))
        with torch.no_grad():  # non-zero B, so the adapter's gradients are not trivially zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    _, head = forward.decoder_and_head(model)
    linear = forward.plain_linear(head)
    assert linear is not None
    if mode == "lora-save-head":
        assert linear is head.modules_to_save["default"] and linear.weight.requires_grad
    calls = []
    monkeypatch.setattr(forward, "chunked_cross_entropy",
                        lambda *a, **k: calls.append(1) or losses.chunked_cross_entropy(*a, **k))
    monkeypatch.setattr(forward, "head_chunk_rows", lambda vocab, heads=1: 16)  # several chunks
    batch = lm_batch()
    model.train()  # dropout is 0 in this config: train and eval forwards agree
    ref = full_logits_loss(model, batch)
    ref_grads = grads_of(model, ref)
    fused, count = forward.causal_lm_loss(model, batch)
    fused_grads = grads_of(model, fused)
    assert calls, "the fused path was not taken"
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert float(fused) == pytest.approx(float(ref), rel=1e-5)
    assert set(fused_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        scale = max(1.0, float(g.abs().max()))
        assert float((fused_grads[name] - g).abs().max()) <= 1e-5 * scale, name
    if mode.startswith("lora") and mode != "lora-save-head":
        assert not any("lm_head" in n for n in fused_grads)  # frozen head: no weight gradient formed


def test_adapted_head_falls_back_to_checkpointed_chunks():
    from peft import LoraConfig, get_peft_model

    from tunelab.objectives import forward

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    _, head = forward.decoder_and_head(model)
    assert forward.plain_linear(head) is None
    batch = lm_batch()
    ref = full_logits_loss(model, batch)
    got, _ = forward.causal_lm_loss(model, batch)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
