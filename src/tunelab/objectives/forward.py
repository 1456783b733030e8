"""The forward pass objectives share: the decoder's hidden states, the LM head run a chunk of positions at a
time (objectives/chunks.py says how many), and what is built on that loop: the causal-LM loss, per-response
log-probs, eval mode for reference passes, and the MoE router's load-balancing loss.

The head runs only where a label is, and a chunk's logits are never kept: under gradients each chunk runs under
activation checkpointing (recomputed in backward), so peak memory is one chunk of logits, not the batch's.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.modeling.load import unwrap
from tunelab.objectives.chunks import head_chunk_rows
from tunelab.objectives.losses import IGNORE_INDEX, chunked_cross_entropy


class SoftcappedHead(nn.Module):
    """Gemma 2 and 3 squash their logits as cap * tanh(logits / cap) (`final_logit_softcapping`) after the LM head.
    Objectives that run the head themselves must do the same, or they train a different model from the one that
    generates."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def decoder_and_head(model):
    """(the decoder that gives the last hidden states, the function from them to the logits the model outputs)."""
    hf = unwrap(model)
    head = hf.get_output_embeddings()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return hf.base_model, SoftcappedHead(head, cap) if cap else head


def plain_linear(head) -> nn.Linear | None:
    """The LM head as a plain nn.Linear (tied embeddings included; with PEFT modules_to_save, the copy that is
    active), or None when it is anything else (a LoRA-adapted or quantized head, a module with hooks)."""
    if type(head).__name__ == "ModulesToSaveWrapper":  # peft: mirror its forward's choice of module
        active = head.active_adapters
        if head.disable_adapters or not active or any(a not in head.modules_to_save for a in active):
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks:
        return head
    return None


def head_rows(model, head) -> int:
    """Outputs of the LM head: its weight's rows when it is a plain linear, else the model's vocabulary."""
    linear = plain_linear(head)
    return linear.weight.shape[0] if linear is not None else unwrap(model).config.get_text_config().vocab_size


def attention_mask_for(model, mask):
    """Packed batches carry a 4-D bool mask (causal and same-document). SDPA and flex read bools;
    the eager path adds the mask to the scores, so it needs 0 / -inf floats instead."""
    if mask is None or mask.dim() != 4 or model.config._attn_implementation != "eager":
        return mask
    blocked = torch.finfo(model.dtype).min
    return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, blocked)


def decoder_hidden(decoder, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states for a padded batch, or for a padding-free one (data.padding_free: one row
    of documents end to end, attention per document; the bounds must reach the attention, modeling/attention.py)."""
    extra, calls_before = {}, None
    if "doc_bounds" in batch:
        from tunelab.modeling import attention

        extra[attention.BOUNDS_KWARG] = batch["doc_bounds"]
        calls_before = attention.bounded_calls
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(decoder, batch.get("attention_mask")),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **extra,
    ).last_hidden_state
    if calls_before is not None:
        attention.check_reached(calls_before, decoder)
    return hidden


def head_chunks(fn: Callable, rows: int, sliced: tuple[torch.Tensor, ...], *args) -> list:
    """fn(*a chunk of each tensor in `sliced`, *args) for each chunk of `rows` rows, in order. With gradients on,
    each call runs under activation checkpointing: its logits are recomputed in backward, never kept."""
    out = []
    for start in range(0, len(sliced[0]), rows):
        part = (*(t[start:start + rows] for t in sliced), *args)
        out.append(checkpoint(fn, *part, use_reentrant=False) if torch.is_grad_enabled() else fn(*part))
    return out


def summed(parts: list, like: torch.Tensor) -> torch.Tensor:
    """The fp32 sum of per-chunk scalars, added in chunk order."""
    total = like.new_zeros((), dtype=torch.float32)
    for part in parts:
        total = total + part
    return total


def chunk_ce(hidden, targets, head):
    """Summed cross-entropy of one chunk of rows."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunk_ce_correct(hidden, targets, head):
    """(summed cross-entropy of one chunk of rows, how many rows' target has the largest logit; ties count, as in
    losses.chunked_cross_entropy)."""
    logits = head(hidden).float()
    with torch.no_grad():
        correct = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) == logits.amax(-1)).sum()
    return F.cross_entropy(logits, targets, reduction="sum"), correct


def causal_lm_loss_and_correct(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over label positions, their count, and how many of them have the largest
    logit (an int64 count: the token accuracy's numerator, found on each chunk's logits as they pass; equal to
    argmax == label but at exact ties for the top, which fp32 logits practically never have).

    With a plain linear head, losses.chunked_cross_entropy forms each chunk's gradients during the forward (one
    head matmul per chunk fewer than recomputing it, and no weight gradient for a frozen head); any other head
    goes through head_chunks.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder_hidden(decoder, batch)
    rows = head_chunk_rows(head_rows(model, head))
    linear = plain_linear(head)
    if linear is not None:
        return chunked_cross_entropy(hidden, linear.weight, batch["labels"], rows, bias=linear.bias)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    parts = head_chunks(chunk_ce_correct, rows, (hidden[:, :-1][keep], labels[keep]), head)
    correct = sum((c for _, c in parts), torch.zeros((), dtype=torch.long, device=hidden.device))
    return summed([ce for ce, _ in parts], hidden), keep.sum(), correct


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over label positions, and their count (causal_lm_loss_and_correct without
    the accuracy count, for callers that log none)."""
    return causal_lm_loss_and_correct(model, batch)[:2]


def chunk_logprobs(hidden, targets, head):
    """log p(target) of each row of one chunk, fp32."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def label_logprobs(model, head, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each labelled next token, row-major over (sequence, position), fp32; the bool mask of the
    positions that carry one, [N, T-1]). The head runs only on those positions."""
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    parts = head_chunks(chunk_logprobs, head_chunk_rows(head_rows(model, head)), (hidden[:, :-1][keep], target[keep]),
                        head)
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), keep


def response_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens (fp32, [N]) and their count ([N]).

    Equals `log_softmax(model(input_ids).logits)[:, :-1].gather(labels[:, 1:])` summed over labelled positions.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder_hidden(decoder, batch)
    lp, keep = label_logprobs(model, head, hidden, batch["labels"])
    if "doc_bounds" in batch:  # one row of sequences end to end: a label at position p + 1 belongs to its document
        bounds = torch.tensor(batch["doc_bounds"], device=keep.device)
        rows = torch.searchsorted(bounds, keep[0].nonzero()[:, 0] + 1, right=True) - 1
        n_rows = len(batch["doc_bounds"]) - 1
    else:
        rows = keep.nonzero()[:, 0]
        n_rows = keep.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=lp.device).index_add(0, rows, lp)
    counts = torch.zeros(n_rows, dtype=torch.long, device=lp.device).index_add(0, rows, torch.ones_like(rows))
    return sums, counts


@contextlib.contextmanager
def eval_mode(model):
    """Reference passes run without dropout: the reference is a fixed function."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def router_loss(model, coef: float):
    """MoE: a RouterLoss recording the routers' choices in a forward (moe.RouterLoss), or None for a dense model."""
    from tunelab.modeling.moe import RouterLoss

    return RouterLoss.for_model(unwrap(model), coef)


def add_router_loss(router, total, units, batch, metrics):
    """MoE: the router load-balancing loss of the recorded forward, weighted by this micro-batch's units (see
    moe.RouterLoss for why), added to the summed loss and logged as router_aux_loss."""
    aux = router.loss(batch.get("attention_mask"))
    metrics["router_aux_loss"] = aux.detach() * units
    return total + router.coef * aux * units, metrics
