"""Masked language modelling (method: mlm) for encoders: BERT-style models (model.init.architecture: bert, or a
BERT / RoBERTa model dir).

Text is tokenised once and cut into blocks as for pretraining (objectives/pretrain.py), each document wrapped as
CLS + text + SEP (the tokenizer's cls / sep tokens, else BOS / EOS). Attention is bidirectional within each
document piece and never crosses into another (a 4-D same-document mask), and position ids restart per piece.

Masks are drawn in `collate` (Devlin et al. 2019, losses.mlm_mask): `mlm.mask_prob` of the non-special tokens
are selected, 80 % of those become the mask token, 10 % a random token, 10 % stay; the loss is the cross-entropy
at the selected positions only, summed, and the units are the selected tokens. With `mlm.whole_word` the words of
the fast tokenizer's pre-tokenizer (its word_ids) are selected as a whole. Training masks are re-drawn every time a
block is seen, from the global torch RNG: the loop checkpoints that RNG, so a resumed run draws the same masks.
Evaluation masks are fixed (seeded per block), so successive evaluations are comparable.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from tunelab.config import Config, UserError
from tunelab.modeling.load import unwrap
from tunelab.objectives.chunks import head_chunk_rows
from tunelab.objectives.forward import attention_mask_for, chunk_ce, head_chunks, summed
from tunelab.objectives.losses import IGNORE_INDEX, mlm_mask
from tunelab.objectives.pretrain import TextBlocks


def mlm_head(hf):
    """The module mapping encoder states to vocabulary logits (BERT: `cls`, RoBERTa-style: `lm_head`), or None."""
    for name in ("cls", "lm_head"):
        head = getattr(hf, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


class MLM(TextBlocks):
    model_kind = "masked_lm"

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        if tokenizer.mask_token_id is None:
            raise UserError("method: mlm needs a tokenizer with a mask token (BERT's [MASK], RoBERTa's <mask>); this "
                            "one has none. Use a masked-LM model dir, or model.init with tokenizer.train: true")
        self.word_starts = cfg.mlm.whole_word
        special = torch.zeros(max(len(tokenizer), max(tokenizer.all_special_ids) + 1), dtype=torch.bool)
        special[tokenizer.all_special_ids] = True
        self.special = special
        self.position_offset = 0  # RoBERTa-style embeddings count positions from padding_idx + 1
        self.takes_positions = True

    def wrap_ids(self):
        tok = self.tokenizer
        cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        return ([cls] if cls is not None else []), ([sep] if sep is not None else [])

    def setup(self, model, dist=None, padding_free=None):
        super().setup(model, dist, padding_free)
        hf = unwrap(model)
        base = hf.base_model
        self.takes_positions = "position_ids" in inspect.signature(base.forward).parameters
        pad = getattr(getattr(base, "embeddings", None), "padding_idx", None)
        self.position_offset = pad + 1 if isinstance(pad, int) else 0
        limit = getattr(hf.config, "max_position_embeddings", None)
        if limit is not None and self.cfg.data.max_length + self.position_offset > limit:
            raise UserError(f"data.max_length ({self.cfg.data.max_length}) is longer than this encoder's "
                            f"{limit - self.position_offset} positions (max_position_embeddings); lower data.max_length")

    def collate(self, items):
        pieces = [ref.blocks.piece(ref.index) for ref in items]
        B, L = len(pieces), max(len(p.ids) for p in pieces)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        doc = torch.full((B, L), -1, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        words = torch.full((B, L), -1, dtype=torch.long) if self.word_starts else None
        for r, p in enumerate(pieces):
            n = len(p.ids)
            ids[r, :n] = torch.from_numpy(p.ids.astype("int64"))
            doc[r, :n] = torch.from_numpy(p.doc_ids)
            pos[r, :n] = torch.from_numpy(p.position_ids)
            if words is not None:
                words[r, :n] = torch.from_numpy(p.words)
        real = doc >= 0
        mask = (doc[:, :, None] == doc[:, None, :]) & real[:, None, :]  # bidirectional, same document only
        mask[:, :, 0] |= ~real  # padding attends to the first token: an empty row would give NaN
        special = self.special[ids] | ~real
        args = dict(mask_token_id=self.tokenizer.mask_token_id, vocab_size=len(self.tokenizer),
                    mask_prob=self.cfg.mlm.mask_prob)
        if items[0].eval:  # fixed masks per block: every evaluation scores the same task
            rows = []
            for r, ref in enumerate(items):
                g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + ref.index)
                rows.append(mlm_mask(ids[r:r + 1], special_mask=special[r:r + 1], generator=g,
                                     whole_word_ids=None if words is None else words[r:r + 1], **args))
            masked, labels = torch.cat([m for m, _ in rows]), torch.cat([y for _, y in rows])
        else:  # the global RNG: re-drawn at every visit, restored exactly on resume
            masked, labels = mlm_mask(ids, special_mask=special, whole_word_ids=words, **args)
        return {"input_ids": masked, "labels": labels, "attention_mask": mask[:, None], "position_ids": pos,
                "num_loss_tokens": (labels != IGNORE_INDEX).sum()}

    def preview(self, items, n: int) -> str:
        """The first blocks as the model sees them (with their fixed evaluation masks): a selected token shows as
        [[what the model reads=what it must predict]]."""
        from tunelab.objectives.pretrain import BlockRef

        refs = [BlockRef(ref.blocks, ref.index, eval=True) for ref in items[:n]]
        if not refs:
            return "--- no blocks"
        batch = self.collate(refs)
        dec = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        out = []
        for k, ref in enumerate(refs):
            length = len(ref.blocks.piece(ref.index).ids)
            ids, labels = batch["input_ids"][k, :length].tolist(), batch["labels"][k, :length].tolist()
            text, run = [], []
            for token, label in zip(ids, labels):
                if label == IGNORE_INDEX:
                    run.append(token)
                    continue
                text += [dec(run), f"[[{dec([token])}={dec([label])}]]"]
                run = []
            text.append(dec(run))
            selected = sum(label != IGNORE_INDEX for label in labels)
            out += [f"--- block {k + 1}: {length} tokens, {selected} selected", "".join(text)]
        out.append(f"--- {len(items)} blocks of up to {self.cfg.data.max_length} tokens; mask_prob "
                   f"{self.cfg.mlm.mask_prob}{', whole words' if self.cfg.mlm.whole_word else ''}")
        return "\n".join(out)

    def loss(self, model, batch):
        hf = unwrap(model)
        base, head = hf.base_model, mlm_head(hf)
        kwargs = {"input_ids": batch["input_ids"]}
        if head is None:  # an unknown masked-LM class: full logits
            kwargs["attention_mask"] = attention_mask_for(hf, batch["attention_mask"])
            if self.takes_positions:
                kwargs["position_ids"] = batch["position_ids"] + self.position_offset
            logits = model(**kwargs).logits
            keep = batch["labels"] != IGNORE_INDEX
            total = F.cross_entropy(logits[keep].float(), batch["labels"][keep], reduction="sum")
            return total, {"loss": total.detach()}
        kwargs["attention_mask"] = attention_mask_for(base, batch["attention_mask"])
        if self.takes_positions:
            kwargs["position_ids"] = batch["position_ids"] + self.position_offset
        hidden = base(**kwargs)[0]
        keep = batch["labels"] != IGNORE_INDEX
        rows = head_chunk_rows(hf.config.vocab_size)  # logits only at masked positions, a chunk at a time
        total = summed(head_chunks(chunk_ce, rows, (hidden[keep], batch["labels"][keep]), head), hidden)
        return total, {"loss": total.detach()}
