"""The contract between an objective and the training loop."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from tunelab.config import Config


class Objective:
    """One training method: its datasets, how items become a batch, and the loss of a batch.

    `loss` returns the loss *summed* over the batch's units (loss tokens, pairs, sequences) and
    `units` says how many there are; the loop divides by the units of the whole accumulation
    window (all ranks together), so any micro-batch split gives the same update.
    Metrics are sums over the same units and are averaged the same way.
    """

    model_kind = "causal_lm"  # which transformers Auto class loads the model
    perplexity = False  # evaluation also reports exp(eval CE): the loss is a next-token cross-entropy

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        # Whether `collate` lays a micro-batch's sequences end to end in one row (data.padding_free; `auto` is
        # decided by the trainer once the model exists, tunelab.attention.choose).
        self.padding_free = cfg.data.padding_free is True

    def datasets(self) -> tuple[list, list]:
        """(train items, eval items): whatever `collate` accepts."""
        raise NotImplementedError

    def collate(self, items: list) -> dict[str, Any]:
        raise NotImplementedError

    def units(self, batch: dict) -> int:
        return int(batch["num_loss_tokens"])

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def setup(self, model: nn.Module) -> None:
        """Called once the trainable model exists (e.g. to precompute reference log-probs)."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules the objective owns besides the model (e.g. a value head)."""
        return {}

    def stream(self, model: nn.Module, batches: Iterable[dict]) -> Iterator[dict]:
        """Micro-batches to train on. On-policy objectives turn prompt batches into rollouts here."""
        yield from batches

    def updates(self, model: nn.Module, batches: Iterable[dict]) -> Iterator[list[dict]]:
        """The optimizer updates of one loop step, each a list of micro-batches (loss normalised by the units
        of that list). Default: one update over `stream`. PPO makes `ppo_epochs x minibatches` updates from
        one rollout batch; the LR schedule, step count and checkpoints advance once per loop step."""
        yield list(self.stream(model, batches))

    def state_dict(self) -> dict:
        """Objective state to checkpoint besides trainable weights (e.g. an adaptive KL coefficient):
        plain Python numbers / tensors."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def preview(self, items: list, n: int) -> str:
        """Human-readable view of the first items: tokens and which carry loss."""
        from tunelab.data import preview

        return preview(items, self.tokenizer, n)

    def log_stats(self) -> dict[str, float]:
        """Data statistics worth a line in the run summary."""
        return {}


def move_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def real_tokens(batch: dict) -> int:
    """Non-padding tokens in a batch, for throughput: 2-D masks count ones; packed 4-D masks count
    positions that attend to themselves."""
    mask = batch.get("attention_mask")
    if mask is None:
        return int(batch["input_ids"].numel())
    if mask.dim() == 2:
        return int(mask.sum())
    return int(mask[:, 0].diagonal(dim1=1, dim2=2).sum())
