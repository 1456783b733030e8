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

    # Traits: what the model builder, the tokenizer trainer and the estimator need to know of a method, read from
    # the class (objectives.objective_class) so that none of them switches on the method's name.
    model_kind = "causal_lm"  # which transformers Auto class loads the model
    text_only = False  # reads its sources as raw text: no chat template, no tokens added (pretrain, mlm)
    sequences_per_item = 1  # sequences one item puts through the model (DPO, ORPO: chosen and rejected together)
    fused_head_loss = False  # the loss is losses.chunked_cross_entropy, gradients formed in its forward
    heads_per_chunk = 1  # LM heads run on each chunk of rows (distillation: the student's and the teacher's)
    masked_batches = True  # batches carry an attention mask (fixed-length pretraining blocks need none)
    extra_models = False  # runs models besides the trained one (a reference, a value model, a teacher)

    def __init__(self, cfg: Config, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        # Whether `collate` lays a micro-batch's sequences end to end in one row (data.padding_free; `auto` is
        # decided by the loop once the model exists, modeling/attention.choose, and given to `setup`).
        self.padding_free = cfg.data.padding_free is True
        self.dist = None  # the loop's process group (training/distributed.Dist), given to `setup`; None: one process

    def datasets(self) -> tuple[list, list]:
        """(train items, eval items): whatever `collate` accepts."""
        raise NotImplementedError

    def collate(self, items: list) -> dict[str, Any]:
        raise NotImplementedError

    def units(self, batch: dict) -> int:
        return int(batch["num_loss_tokens"])

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def idle_metrics(self, batches: list[dict], units: int) -> dict[str, float] | None:
        """None when some token of an update's micro-batches (`units` of this objective on this rank) carries
        loss. Otherwise the update is a no-op (no forward, no optimizer step, weights and optimizer state
        unchanged) and this is what it logs."""
        return None if units else {}

    def setup(self, model: nn.Module, dist=None, padding_free: bool | None = None) -> None:
        """Called once the trainable model exists, before any batch. `dist`: the loop's process group (a
        training.distributed.Dist): an objective reduces across ranks through it (`reduce_sum`), never through
        torch.distributed. `padding_free`: the batch layout the loop chose for this model. An objective that needs
        more (a reference model, a teacher, precomputed log-probs) extends this and calls it first."""
        self.dist = dist
        if padding_free is not None:
            self.padding_free = padding_free

    def reduce_sum(self, value: float) -> float:
        """`value` summed over the ranks of the run."""
        return float(value) if self.dist is None else self.dist.sum(value)

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

    def eval_cross_entropy(self, averaged: dict[str, float]) -> float | None:
        """The next-token cross-entropy per unit of an evaluation, whose exp the loop reports as eval_perplexity;
        `averaged`: eval_loss and eval_<metric> averaged over the eval units. None: the objective has none."""
        return None

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
