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
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    if len(lengths) > 1 and (not window or max(lengths) <= window) and \
            len(lengths) * max(lengths) ** 2 <= BATCH_WASTE * sum(n * n for n in lengths):
        return _attend_batched(module, query, key, value, bounds, lengths, dropout, scaling), None
    outputs = []
    # split, not slicing: its backward joins the documents' gradients in one cat, where each slice's backward would
    # write its gradient into a zeroed tensor of the whole row
    for q, k, v, length in zip(*(x.split(lengths, dim=2) for x in (query, key, value)), lengths):
        if window and length > window:
            out, _ = sdpa_attention_forward(module, q, k, v, _band(length, window, query.device), dropout=dropout,
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


# Documents of similar length go through one batched SDPA call (padded inside the attention only) when that computes
# at most this many times the attention work of one call per document: short rows then pay one kernel launch per layer
# instead of one per document, and long, uneven rows keep the per-document calls that skip the padded squares.
BATCH_WASTE = 2.0


def _attend_batched(module, query, key, value, bounds, lengths, dropout, scaling):
    """The documents of one row as a right-padded [docs, heads, longest, head_dim] batch with a causal SDPA call. A
    document's queries only see keys at or before them, all its own, so the padding needs no mask; the padded
    positions' outputs are dropped, and with them any gradient they would send back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    longest, device = max(lengths), query.device
    starts = torch.tensor(bounds[:-1], device=device)
    offsets = torch.arange(longest, device=device)
    real = offsets < torch.tensor(lengths, device=device)[:, None]  # [docs, longest]
    index = (starts[:, None] + offsets).masked_fill(~real, 0)  # padding reads token 0: never attended

    def batched(x):  # [1, heads, tokens, dim] -> [docs, heads, longest, dim]
        return x[0][:, index].transpose(0, 1)

    out, _ = sdpa_attention_forward(module, batched(query), batched(key), batched(value), None, dropout=dropout,
                                    scaling=scaling, is_causal=True)  # [docs, longest, heads, dim]
    return out[real].unsqueeze(0)


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


def choose(cfg, model) -> tuple[bool, str | None]:
    """Whether this run's batches are padding-free, and the one console line that says so for `auto`.

    `true` was switched on when the model was built; `false` stays padded. `auto` (the default) takes padding-free
    batches for the methods that have them (sft, dpo; not with data.packing) when the model keeps a row's
    documents apart, which `probe` checks on a few tokens: otherwise the run stays padded and says why. Padding-free
    batches never cost more than padded ones: the linear layers see only real tokens, and documents of similar
    length share one attention call (`BATCH_WASTE`)."""
    from tunelab.config import wants_padding_free

    if cfg.data.padding_free != "auto" or not wants_padding_free(cfg):
        return wants_padding_free(cfg), None
    reason = probe(model)
    if reason is not None:
        return False, f"data.padding_free: auto -> padded batches ({reason})"
    return True, ("data.padding_free: auto -> padding-free batches (each micro-batch one row of its sequences, "
                  "attention per document; data.padding_free: false for padded batches)")


@torch.no_grad()
def probe(model) -> str | None:
    """Switch `model` to padding-free attention if its documents stay apart: two short documents in one row must give
    the hidden states each gives alone. None when switched; else the reason, with the model as it was."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # as use_padding_free_attention
    before = getattr(hf.config, "_attn_implementation", None)
    if unsupported_reason(model):
        return unsupported_reason(model)
    try:
        use_padding_free_attention(model)
    except Exception as e:  # a model without transformers' attention interface
        return f"{type(hf).__name__} cannot switch its attention: {str(e).splitlines()[0][:120]}"
    decoder = hf.base_model  # the decoder without its head
    device = next(hf.parameters()).device
    docs = [[1, 2, 3, 4], [5, 3, 2]]
    was_training, calls = model.training, bounded_calls
    model.eval()
    try:
        row = torch.tensor([docs[0] + docs[1]], device=device)
        positions = torch.tensor([list(range(len(docs[0]))) + list(range(len(docs[1])))], device=device)
        together = decoder(input_ids=row, position_ids=positions, use_cache=False,
                           **{BOUNDS_KWARG: [0, len(docs[0]), len(row[0])]}).last_hidden_state
        alone = torch.cat([decoder(input_ids=torch.tensor([d], device=device), use_cache=False).last_hidden_state
                           for d in docs], 1)
        tol = 1e-4 if together.dtype == torch.float32 else 2e-2
        if bounded_calls == calls:
            reason = f"{type(hf).__name__} does not pass attention arguments through its layers"
        elif not torch.allclose(together.float(), alone.float(), atol=tol, rtol=tol):
            reason = f"{type(hf).__name__} lets the documents of one row attend to each other"
        else:
            reason = None
    except Exception as e:
        reason = f"{type(hf).__name__} failed a padding-free forward: {str(e).splitlines()[0][:120]}"
    finally:
        model.train(was_training)
    if reason is not None and before is not None:
        hf.set_attn_implementation(before)
    return reason
