"""Supervised fine-tuning (and the causal-LM loss other objectives reuse)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.config import Config, DataSource, UserError
from tunelab.model import unwrap
from tunelab.objectives.base import Objective
from tunelab.objectives.losses import chunked_cross_entropy

# Rows of logits computed at once; keeps the [tokens x vocab] tensor from ever existing whole. Vocabularies over
# 32k get fewer rows (Llama-3's 128k: 523), so that a chunk holds at most 2048 x 32k logits (0.4 GiB fp32).
CE_CHUNK = 2048
CE_CHUNK_LOGITS = 2048 * 32768


def ce_chunk_rows(vocab: int) -> int:
    return max(1, min(CE_CHUNK, CE_CHUNK_LOGITS // vocab))


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


def attention_mask_for(model, mask):
    """Packed batches carry a 4-D bool mask (causal and same-document). SDPA and flex read bools;
    the eager path adds the mask to the scores, so it needs 0 / -inf floats instead."""
    if mask is None or mask.dim() != 4 or model.config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)


def _chunk_ce(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


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


def decoder_hidden(decoder, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states for a padded batch, or for a padding-free one (data.padding_free: one row
    of documents end to end, attention per document; the bounds must reach the attention, tunelab.attention)."""
    extra, calls_before = {}, None
    if "doc_bounds" in batch:
        from tunelab import attention

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


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over label positions, and their count.

    Logits are computed only where a label exists, a chunk at a time, and never kept: with a plain linear
    head, losses.chunked_cross_entropy forms each chunk's gradients during the forward (one head matmul
    per chunk fewer than recomputing it, and no weight gradient for a frozen head); any other head runs
    each chunk under activation checkpointing. Peak memory is one chunk of logits, not the whole batch's.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder_hidden(decoder, batch)
    linear = plain_linear(head)
    if linear is not None:
        rows = ce_chunk_rows(linear.weight.shape[0])
        return chunked_cross_entropy(hidden, linear.weight, batch["labels"], rows, bias=linear.bias)
    rows = ce_chunk_rows(unwrap(model).config.get_text_config().vocab_size)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    h = hidden[:, :-1][keep]
    y = labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), rows):
        hc, yc = h[start:start + rows], y[start:start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, yc)
    return total, keep.sum()


def add_router_loss(router, total, units, batch, metrics):
    """MoE: the router load-balancing loss of the recorded forward, weighted by this micro-batch's units (see
    moe.RouterLoss for why), added to the summed loss and logged as router_aux_loss."""
    aux = router.loss(batch.get("attention_mask"))
    metrics["router_aux_loss"] = aux.detach() * units
    return total + router.coef * aux * units, metrics


def load_sources(sources: list[DataSource], skip_bad_rows: bool):
    """Rows of all sources; each row carries its source's format."""
    from tunelab.data import load_rows

    return load_rows(sources, skip_bad_rows=skip_bad_rows)


def split_eval(cfg: Config, train_rows: list, eval_rows: list) -> tuple[list, list]:
    """Hold out `data.eval_fraction` of the training rows (seeded) when no eval files are given."""
    if eval_rows or not cfg.data.eval_fraction:
        return train_rows, eval_rows
    order = list(range(len(train_rows)))
    random.Random(cfg.train.seed).shuffle(order)
    n_eval = max(1, round(len(order) * cfg.data.eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train_rows) if i not in held], [train_rows[i] for i in sorted(held)]


class SFT(Objective):
    perplexity = True

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.stats: dict = {}

    def _examples(self, rows):
        from tunelab.data import build_sft_examples

        return build_sft_examples(rows, None, self.tokenizer, self.cfg.data)

    def _tokenized(self):
        """(train examples, eval examples, stats), unpacked: what the token cache stores."""
        data = self.cfg.data
        train_rows = load_sources(data.train, data.skip_bad_rows)
        eval_rows = load_sources(data.eval, data.skip_bad_rows) if data.eval else []
        skipped = getattr(train_rows, "skipped", 0) + getattr(eval_rows, "skipped", 0)
        errors = [*getattr(train_rows, "skipped_errors", []), *getattr(eval_rows, "skipped_errors", [])][:5]
        train_rows, eval_rows = split_eval(self.cfg, list(train_rows), list(eval_rows))
        train, stats = self._examples(train_rows)
        evals = self._examples(eval_rows)[0] if eval_rows else []
        if skipped:
            stats["skipped_bad_rows"] = skipped
            stats["skipped_errors"] = errors
        return train, evals, stats

    def cache_key(self) -> dict:
        """Everything the tokenized examples depend on (see data.cache); packing and collation come after it."""
        from tunelab.data import cache

        data = self.cfg.data
        return {
            "objective": "sft",
            "train_files": cache.files_digest([s.path for s in data.train]),
            "eval_files": cache.files_digest([s.path for s in data.eval]),
            "data": data.model_dump(mode="json", exclude={"packing", "padding_free"}),
            "split_seed": self.cfg.train.seed if data.eval_fraction and not data.eval else None,
            "tokenizer": cache.tokenizer_digest(self.tokenizer),
            "code": cache.code_digest(),
        }

    def datasets(self):
        from tunelab.data import cache, pack_examples

        try:
            parts = self.cache_key() if cache.cache_dir() is not None else None
        except (OSError, UserError):  # an unreadable or missing file: let the loading report it
            parts = None
        if parts is None:
            train, evals, self.stats = self._tokenized()
        else:
            train, evals, self.stats, _ = cache.cached(parts, self._tokenized)
        if self.cfg.data.packing:
            train = pack_examples(train, self.cfg.data.max_length)
            evals = pack_examples(evals, self.cfg.data.max_length) if evals else []
        return train, evals

    def collate(self, items):
        from tunelab.data import collate, collate_padding_free

        if self.padding_free:
            return collate_padding_free(items)
        return collate(items, self.tokenizer.pad_token_id)

    def setup(self, model):
        from tunelab.moe import RouterLoss

        self.router = RouterLoss.for_model(unwrap(model), self.cfg.train.router_aux_loss_coef)

    def loss(self, model, batch):
        router = getattr(self, "router", None)
        if router is None:
            total, n = causal_lm_loss(model, batch)
            return total, {"loss": total.detach()}
        with router.record():
            total, n = causal_lm_loss(model, batch)
        return add_router_loss(router, total, n, batch, {"loss": total.detach()})

    def log_stats(self):
        return self.stats
