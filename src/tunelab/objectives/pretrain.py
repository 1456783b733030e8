"""Pretraining (method: pretrain): raw text -> one token stream -> fixed blocks, next-token loss on every token.

The corpus is tokenised once, in batches, by the fast tokenizer (its Rust encoder; no Python loop per token).
Each document becomes BOS + text + EOS; the documents are laid end to end in one int32 array and cut into blocks
of exactly `data.max_length` tokens (the last block may be shorter). A block holds pieces of several documents;
each piece restarts its position ids at 0, attends only to itself (the packed 4-D mask of data.collate), and its
first token carries no label, so nothing is learned across a document boundary. This is `data.pack_stream`
computed with numpy over the whole corpus (tests check the two agree token for token).

The same corpus / block machinery serves method: mlm (objectives/mlm.py) with bidirectional attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from tunelab.config import Config, UserError
from tunelab.data import run_rows, split_eval
from tunelab.data.readers import text_sources
from tunelab.objectives.base import Objective
from tunelab.objectives.forward import causal_lm_loss

IGNORE = -100
ENCODE_BATCH = 1024  # documents per call of the fast tokenizer


@dataclass
class Corpus:
    """Documents end to end: ids[doc_start[k]:...] is BOS + text + EOS (or CLS + text + SEP for mlm)."""

    ids: np.ndarray  # int32 [N]
    doc_start: np.ndarray  # bool [N], True at each document's first token
    word_start: np.ndarray | None  # bool [N], True at each word's first token (whole-word masking), else None
    docs: int


def tokenize_corpus(texts: list[str], tokenizer, prefix: list[int], suffix: list[int],
                    word_starts: bool = False) -> Corpus:
    """Tokenise every text with the fast tokenizer, ENCODE_BATCH documents per call, special-token strings in the
    text kept as plain text (only the pipeline writes control tokens), and wrap each in prefix / suffix ids."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("raw-text training needs a fast (Rust) tokenizer: this one is a slow Python tokenizer; "
                        "convert it with transformers (AutoTokenizer.from_pretrained(..., use_fast=True)) and save it")
    # Whole documents are longer than model_max_length by design (they are cut into blocks later): no warning
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    ids_parts, start_parts, word_parts = [], [], []
    extra = len(prefix) + len(suffix)
    for b in range(0, len(texts), ENCODE_BATCH):
        enc = tokenizer(texts[b:b + ENCODE_BATCH], add_special_tokens=False, split_special_tokens=True,
                        return_attention_mask=False, return_token_type_ids=False)
        batch = enc["input_ids"]
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
        flat = np.fromiter(chain.from_iterable(batch), dtype=np.int32, count=int(lengths.sum()))
        ends = np.cumsum(lengths + extra)
        starts = ends - (lengths + extra)
        out = np.empty(int(ends[-1]), dtype=np.int32)
        body = np.ones(len(out), dtype=bool)
        for k, token in enumerate(prefix):
            out[starts + k] = token
            body[starts + k] = False
        for k, token in enumerate(suffix):
            out[ends - len(suffix) + k] = token
            body[ends - len(suffix) + k] = False
        out[body] = flat
        doc_start = np.zeros(len(out), dtype=bool)
        doc_start[starts] = True
        ids_parts.append(out)
        start_parts.append(doc_start)
        if word_starts:
            # word index per token from the pre-tokenizer (None -> nan: its own word); a word starts where it changes
            words = [np.asarray(enc.word_ids(j), dtype=np.float64) for j in range(len(batch))]
            w = np.concatenate(words) if words else np.zeros(0)
            first = np.ones(len(w), dtype=bool)
            first[1:] = ~(w[1:] == w[:-1])
            bounds = np.cumsum(lengths)[:-1]
            first[bounds[bounds < len(first)]] = True  # documents never share a word
            ws = np.ones(len(out), dtype=bool)  # prefix / suffix tokens are words of their own
            ws[body] = first
            word_parts.append(ws)
    if not ids_parts:
        raise UserError("no text to train on")
    return Corpus(np.concatenate(ids_parts), np.concatenate(start_parts),
                  np.concatenate(word_parts) if word_starts else None, len(texts))


@dataclass
class Piece:
    """One block: its tokens, where each document piece starts, its words (or None)."""

    ids: np.ndarray
    starts: np.ndarray  # bool, True at the first token of each piece (index 0 always)
    words: np.ndarray | None  # int word index per token, from 0, increasing (whole-word masking)

    @property
    def position_ids(self) -> np.ndarray:
        piece = np.cumsum(self.starts) - 1
        return np.arange(len(self.ids)) - np.flatnonzero(self.starts)[piece]

    @property
    def doc_ids(self) -> np.ndarray:
        return np.cumsum(self.starts) - 1


class Blocks:
    """A corpus cut into blocks of `length` tokens."""

    def __init__(self, corpus: Corpus, length: int):
        self.corpus, self.length = corpus, length

    def __len__(self) -> int:
        return math.ceil(len(self.corpus.ids) / self.length)

    def piece(self, i: int) -> Piece:
        a, b = i * self.length, min((i + 1) * self.length, len(self.corpus.ids))
        starts = self.corpus.doc_start[a:b].copy()
        starts[0] = True  # a document cut by the block boundary continues as a new piece
        words = None
        if self.corpus.word_start is not None:
            ws = self.corpus.word_start[a:b].copy()
            ws[0] = True
            words = np.cumsum(ws) - 1
        return Piece(self.corpus.ids[a:b], starts, words)

    def packed(self, i: int):
        """The block as data.Packed (labels: the tokens, IGNORE at each piece's first token)."""
        from tunelab.data import Packed

        p = self.piece(i)
        labels = p.ids.astype(np.int64)
        labels[p.starts] = IGNORE
        return Packed(p.ids.tolist(), labels.tolist(), p.position_ids.tolist(), p.doc_ids.tolist())


@dataclass(frozen=True)
class BlockRef:
    blocks: Blocks
    index: int
    eval: bool = False


class BlockList(Sequence):
    """The items the loop indexes: references to blocks, made on demand (no per-block object is stored)."""

    def __init__(self, blocks: Blocks, eval: bool = False):
        self.blocks, self.eval = blocks, eval

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return BlockRef(self.blocks, i % len(self), self.eval)


class TextBlocks(Objective):
    """Shared by pretrain and mlm: read raw text, tokenise once, cut blocks; subclasses choose the wrapping ids
    and how a batch of blocks becomes tensors."""

    text_only = True
    word_starts = False

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.stats: dict = {}

    def wrap_ids(self) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def _corpus(self, rows) -> Corpus:
        prefix, suffix = self.wrap_ids()
        return tokenize_corpus([r.data["text"] for r in rows], self.tokenizer, prefix, suffix, self.word_starts)

    def datasets(self):
        data, method = self.cfg.data, self.cfg.method
        rows = run_rows(self.cfg, text_sources(data.train, method, "data.train"),
                        text_sources(data.eval, method, "data.eval"), hold_out=False)
        if data.eval_fraction and not rows.eval and round(len(rows.train) * data.eval_fraction) < 1:
            # too few documents to hold out whole ones (e.g. one big .txt file): hold out the last blocks
            train, evals = self._split_blocks(self._corpus(rows.train), data.max_length, data.eval_fraction)
        else:
            train_rows, eval_rows = split_eval(self.cfg, rows.train, rows.eval)  # whole documents held out
            train = Blocks(self._corpus(train_rows), data.max_length)
            evals = Blocks(self._corpus(eval_rows), data.max_length) if eval_rows else None
        n = len(train.corpus.ids)
        self.stats = {"documents": train.corpus.docs, "tokens": n, "blocks": len(train),
                      "tokens_per_document": round(n / max(1, train.corpus.docs), 1)}
        if evals is not None:
            self.stats.update(eval_documents=evals.corpus.docs, eval_tokens=len(evals.corpus.ids))
        if rows.skipped:
            self.stats["skipped_bad_rows"] = rows.skipped
        return BlockList(train), (BlockList(evals, eval=True) if evals is not None else [])

    @staticmethod
    def _split_blocks(corpus: Corpus, length: int, fraction: float) -> tuple[Blocks, Blocks | None]:
        n = len(Blocks(corpus, length))
        held = max(1, round(n * fraction)) if n > 1 else 0
        if not held:
            return Blocks(corpus, length), None
        cut = (n - held) * length

        def part(s: slice) -> Corpus:
            words = corpus.word_start[s] if corpus.word_start is not None else None
            starts = corpus.doc_start[s].copy()
            return Corpus(corpus.ids[s], starts, words, int(starts.sum()) or 1)

        return Blocks(part(slice(0, cut)), length), Blocks(part(slice(cut, None)), length)

    def preview(self, items, n: int) -> str:
        from tunelab.data import preview

        return preview([ref.blocks.packed(ref.index) for ref in items[:n]], self.tokenizer, n)

    def log_stats(self):
        return self.stats


class Pretrain(TextBlocks):
    fused_head_loss = True
    masked_batches = False  # blocks of max_length tokens, every one real

    def eval_cross_entropy(self, averaged):
        return averaged["eval_loss"]

    def wrap_ids(self):
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise UserError("method: pretrain needs a tokenizer with an eos_token: it ends every document")
        # BOS first, as tokenize_example (SFT, inference prompts) does, so the first word is predicted in context
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []), [tok.eos_token_id]

    def collate(self, items):
        from tunelab.data import collate

        return collate([ref.blocks.packed(ref.index) for ref in items], self.tokenizer.pad_token_id)

    def loss(self, model, batch):
        total, _ = causal_lm_loss(model, batch)
        return total, {"loss": total.detach()}
