"""Padding-free attention: a micro-batch's documents laid end to end in one row, each attending only to itself.

With data.padding_free the SFT (and DPO) collate concatenates a micro-batch's sequences into one row of exactly their
tokens (position_ids restart per document) and passes the document boundaries along. Every linear layer then
runs on real tokens only, and attention runs per document with SDPA's causal kernel: no padding, and none of
the L x L work that packing's block-diagonal mask costs (SDPA computes the whole masked square on CPU). This is
what variable-length FlashAttention gives on GPUs (Dao 2023), built from plain SDPA calls, so it runs anywhere.

Registered with transformers' AttentionInterface as "tunelab_padding_free". Batches without boundaries (padded
eval batches, generation) go to ordinary SDPA with the usual mask, so a model switched to it works as before.
"""

from __future__ import annotations

import torch

NAME = "tunelab_padding_free"
BOUNDS_KWARG = "tunelab_doc_bounds"  # [0, end of doc 1, end of doc 2, ..., total]: Python ints, no device sync
bounded_calls = 0  # attention calls that received document bounds: see `check_reached`


def padding_free_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query/key/value [1, heads, tokens, head_dim]; the documents of `tunelab_doc_bounds` attend causally, each to
    itself. Returns ([1, tokens, heads, head_dim], None) like transformers' SDPA forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop(BOUNDS_KWARG, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("padding-free batches are one row of documents end to end")
    global bounded_calls
    bounded_calls += 1
    window = kwargs.get("sliding_window")  # Mistral, Gemma, Qwen: local layers see the last `window` tokens only
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if window and end - start > window:
            out, _ = sdpa_attention_forward(module, q, k, v, _band(end - start, window, query.device), dropout=dropout,
                                            scaling=scaling, is_causal=False)
        else:
            out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _band(length: int, window: int, device) -> torch.Tensor:
    """[1, 1, L, L] bool: query i sees keys j with 0 <= i - j < window (transformers' sliding-window overlay)."""
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


def unsupported_reason(model) -> str | None:
    """Why this model cannot run padding-free (None when it can): per-document SDPA has no attention soft-capping."""
    config = model.config  # a PEFT model forwards .config to its base model
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "attn_logit_softcapping", None):
        return (f"{config.model_type} soft-caps its attention scores (attn_logit_softcapping), which SDPA per "
                "document cannot do")
    return None


def use_padding_free_attention(model) -> None:
    """Switch a transformers model (PEFT-wrapped or not) to padding-free attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from tunelab.config import UserError

    reason = unsupported_reason(model)
    if reason:
        raise UserError(f"data.padding_free: {reason}; use data.packing or train.group_by_length")

    def mask(*args, attention_mask=None, **kwargs):
        # Padded batches get SDPA's mask; without a padding mask none is built (a padding-free row needs none, and
        # the [tokens x tokens] one transformers would derive from its position_ids is exactly what we avoid).
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(NAME, padding_free_attention)
    AttentionMaskInterface.register(NAME, mask)
    # A PEFT model's base model; called before any DDP/FSDP wrapping, so there is nothing else to unwrap.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(NAME)


def check_reached(calls_before: int, model) -> None:
    """After a padding-free forward: the bounds must have reached the attention. A model whose layers drop extra
    keyword arguments would otherwise attend across the documents of the row without any error."""
    if bounded_calls == calls_before:
        from tunelab.config import UserError

        raise UserError(f"data.padding_free: {type(model).__name__} does not pass attention arguments through its "
                        "layers, so its documents cannot be kept apart; use data.packing or train.group_by_length")
