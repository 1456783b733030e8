"""A tiny Llama with a spread-out head, a batch with a prompt and padding, the plain full-logits cross-entropy and
the bytes autograd keeps: the references that the fused loss, padding-free batches, LoRA dropout and the gated MLP
are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a head with real spread, so the softmax is not nearly uniform
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def lm_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[1, 15:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def full_logits_loss(model, batch):
    """Plain full-logits cross-entropy, summed over the shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_bytes(forward):
    """(forward(), bytes autograd keeps for the backward pass while it runs: each storage once)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(kept.values())
