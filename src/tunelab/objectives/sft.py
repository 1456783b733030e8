"""Supervised fine-tuning (and the causal-LM loss other objectives reuse)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.config import Config, DataSource
from tunelab.model import unwrap
from tunelab.objectives.base import Objective

# Rows of logits computed at once; keeps the [tokens x vocab] tensor from ever existing whole.
CE_CHUNK = 2048


def decoder_and_head(model):
    hf = unwrap(model)
    return hf.base_model, hf.get_output_embeddings()


def attention_mask_for(model, mask):
    """Packed batches carry a 4-D bool mask (causal and same-document). SDPA and flex read bools;
    the eager path adds the mask to the scores, so it needs 0 / -inf floats instead."""
    if mask is None or mask.dim() != 4 or model.config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)


def _chunk_ce(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over label positions, and their count.

    Logits are computed only where a label exists, a chunk at a time, and recomputed in the
    backward pass instead of stored: peak memory is one chunk of logits, not the whole batch's.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=attention_mask_for(decoder, batch.get("attention_mask")),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    h = hidden[:, :-1][keep]
    y = labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), CE_CHUNK):
        hc, yc = h[start:start + CE_CHUNK], y[start:start + CE_CHUNK]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, yc)
    return total, keep.sum()


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
    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.stats: dict = {}

    def _examples(self, rows):
        from tunelab.data import build_sft_examples, pack_examples

        examples, stats = build_sft_examples(rows, None, self.tokenizer, self.cfg.data)
        if self.cfg.data.packing:
            examples = pack_examples(examples, self.cfg.data.max_length)
        return examples, stats

    def datasets(self):
        data = self.cfg.data
        train_rows = load_sources(data.train, data.skip_bad_rows)
        eval_rows = load_sources(data.eval, data.skip_bad_rows) if data.eval else []
        skipped = getattr(train_rows, "skipped", 0) + getattr(eval_rows, "skipped", 0)
        errors = [*getattr(train_rows, "skipped_errors", []), *getattr(eval_rows, "skipped_errors", [])][:5]
        train_rows, eval_rows = split_eval(self.cfg, list(train_rows), list(eval_rows))
        train, self.stats = self._examples(train_rows)
        evals = self._examples(eval_rows)[0] if eval_rows else []
        if skipped:
            self.stats["skipped_bad_rows"] = skipped
            self.stats["skipped_errors"] = errors
        return train, evals

    def collate(self, items):
        from tunelab.data import collate

        return collate(items, self.tokenizer.pad_token_id)

    def loss(self, model, batch):
        total, n = causal_lm_loss(model, batch)
        return total, {"loss": total.detach()}

    def log_stats(self):
        return self.stats
