"""The order a run sees its training items in: a seeded shuffle per epoch, optionally grouped by length, taken a
window of micro-batches at a time from a position (epoch, micro) that checkpoints save, so a resumed run replays
exactly the batches the interrupted one would have seen."""

from __future__ import annotations

import torch

from ..config import UserError

# train.group_by_length sorts this many micro-batches' worth of the shuffled order at a time (HF Trainer's
# length-grouped sampler uses 50): a larger window pads less but makes batch lengths less random.
GROUP_WINDOW = 64


def epoch_order(n_items: int, micro_batch: int, seed: int, epoch: int,
                lengths: list[int] | None = None) -> list[list[int]]:
    """Micro-batches of item indices for one epoch: a seeded shuffle, so resume replays the same order.

    With `lengths` (train.group_by_length), each window of GROUP_WINDOW micro-batches of the shuffled order is
    sorted by length (longest first) and cut into micro-batches, and the micro-batches are then shuffled: rows of
    similar length share a batch, so there is little padding, while every batch of the epoch is still a seeded
    draw. A pure function of (seed, epoch, lengths), so resume replays it exactly.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_items, generator=g).tolist()
    if lengths is None:
        return [perm[i:i + micro_batch] for i in range(0, n_items, micro_batch)]
    window, batches = GROUP_WINDOW * micro_batch, []
    for start in range(0, n_items, window):
        chunk = sorted(perm[start:start + window], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches += [chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def item_length(item) -> int:
    """Tokens an item takes in a padded batch, for train.group_by_length: its input_ids, or its longest *_ids
    sequence (a preference pair pads chosen and rejected to one length)."""
    ids = getattr(item, "input_ids", None)
    if ids is not None:
        return len(ids)
    seqs = [v for k, v in getattr(item, "__dict__", {}).items() if k.endswith("_ids") and v is not None]
    if not seqs:
        raise UserError(f"train.group_by_length: training items of type {type(item).__name__} carry no token ids "
                        "to group by; set it to false for this method")
    return max(len(s) for s in seqs)


class Batches:
    """Endless micro-batch index stream over epochs, positioned by (epoch, micro) for exact resume."""

    def __init__(self, n_items: int, micro_batch: int, seed: int, state, lengths: list[int] | None = None):
        """`state` is the run's TrainState: `take` advances its `epoch` and `micro`, which checkpoints save."""
        self.n, self.mb, self.seed, self.state, self.lengths = n_items, micro_batch, seed, state, lengths
        self._order = epoch_order(n_items, micro_batch, seed, state.epoch, lengths)

    def take(self, count: int) -> list[list[int]]:
        out = []
        while len(out) < count:
            if self.state.micro >= len(self._order):
                self.state.epoch += 1
                self.state.micro = 0
                self._order = epoch_order(self.n, self.mb, self.seed, self.state.epoch, self.lengths)
            out.append(self._order[self.state.micro])
            self.state.micro += 1
        return out
