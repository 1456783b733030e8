"""Packing examples into fixed-size blocks, and collating batches into tensors."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from .tokenize import IGNORE, Example

if TYPE_CHECKING:
    import torch


@dataclass
class Packed:
    """Several documents in one block. position_ids restart at 0 and doc_ids count up per document; the first
    token of each document carries no label, so no document is trained to follow another."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    doc_ids: list[int]


def pack_examples(examples: list[Example], max_length: int) -> list[Packed]:
    """Pack whole examples into blocks of at most max_length tokens (best-fit decreasing: each example, longest
    first, goes into the fullest block it fits in; this packs as tightly as first-fit and runs in n log n)."""
    blocks: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, block index)
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        if size > max_length:
            raise ValueError(f"an example of {size} tokens is longer than max_length {max_length}; truncate first")
        i = bisect.bisect_left(free, (size, -1))
        if i == len(free):
            blocks.append([])
            room, block = max_length, len(blocks) - 1
        else:
            room, block = free.pop(i)
        blocks[block].append(example)
        bisect.insort(free, (room - size, block))
    return [_pack([(e.input_ids, e.labels) for e in block]) for block in blocks]


def pack_stream(token_docs: Iterable[list[int]], max_length: int, eos_id: int) -> Iterator[Packed]:
    """Pretraining: concatenate documents, each followed by EOS, and cut blocks of exactly max_length tokens
    (the last one may be shorter). A document split across blocks continues as a new document (positions from 0)
    in the next block. Every token carries a label except the first of each piece (see Packed)."""
    pieces: list[tuple[list[int], list[int]]] = []
    room = max_length
    for doc in token_docs:
        doc = list(doc) + [eos_id]
        while doc:
            piece, doc = doc[:room], doc[room:]
            pieces.append((piece, piece))
            room -= len(piece)
            if room == 0:
                yield _pack(pieces)
                pieces, room = [], max_length
    if pieces:
        yield _pack(pieces)


def _pack(docs: list[tuple[list[int], list[int]]]) -> Packed:
    packed = Packed([], [], [], [])
    for doc_id, (ids, labels) in enumerate(docs):
        packed.input_ids += ids
        packed.labels += [IGNORE] + list(labels[1:])
        packed.position_ids += range(len(ids))
        packed.doc_ids += [doc_id] * len(ids)
    return packed


def collate_padding_free(batch: list[Example]) -> dict:
    """data.padding_free: the examples end to end in ONE row, no padding. input_ids, labels and position_ids [1, N]
    (positions restart and the first token of each document carries no label, as in pack_examples, so no
    document is trained to follow another), doc_bounds (Python ints: 0, the end of each document), and
    num_loss_tokens. The model attends within each document (tunelab.modeling.attention), so the loss equals the padded
    batch's."""
    import torch

    from itertools import accumulate

    packed = _pack([(e.input_ids, e.labels) for e in batch])
    bounds = [0, *accumulate(len(e.input_ids) for e in batch)]
    labels = torch.tensor([packed.labels], dtype=torch.long)
    return {"input_ids": torch.tensor([packed.input_ids], dtype=torch.long), "labels": labels,
            "position_ids": torch.tensor([packed.position_ids], dtype=torch.long), "doc_bounds": bounds,
            "num_loss_tokens": (labels[:, 1:] != IGNORE).sum()}


def collate(batch: list[Example | Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors.

    Examples: input_ids, labels (IGNORE on padding), attention_mask (1/0, long).
    Packed: input_ids, labels, position_ids, and attention_mask as a [B, 1, L, L] bool mask (True = may attend):
    causal and within the same document. Transformers passes a 4D mask to the attention as is: attn_implementation
    "sdpa" reads a bool mask correctly, "eager" adds it to the scores and would NOT isolate documents.
    Padding rows attend to the first token only (an empty row would give NaN); the diagonal is True exactly on
    real tokens.
    Both: num_loss_tokens, the labels that carry loss after the causal shift, for normalising the loss.
    """
    import torch  # here, so `import tunelab.data` stays light for `tunelab validate`

    packed = isinstance(batch[0], Packed)
    if any(isinstance(item, Packed) != packed for item in batch):
        raise ValueError("cannot collate packed and unpacked examples together")
    lengths = torch.tensor([len(item.input_ids) for item in batch])
    length = int(lengths.max())

    def pad(rows, value):  # one tensor conversion per row, no per-token Python
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        return out

    input_ids = pad([item.input_ids for item in batch], pad_id)
    labels = pad([item.labels for item in batch], IGNORE)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        doc_ids = pad([item.doc_ids for item in batch], -1)
        real = doc_ids >= 0
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :]) & real[:, None, :]
        mask[:, :, 0] |= ~real  # padding attends to the first token: an empty row would give NaN
        out["position_ids"] = pad([item.position_ids for item in batch], 0)
        out["attention_mask"] = mask[:, None]
    else:
        out["attention_mask"] = (torch.arange(length) < lengths[:, None]).long()
    out["num_loss_tokens"] = (labels[:, 1:] != IGNORE).sum()
    return out
