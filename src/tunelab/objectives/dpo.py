"""Direct preference optimisation and its variants: `method: dpo` with dpo.loss sigmoid | ipo | label_smoothing | simpo,
each optionally with RPO's NLL term on the chosen response (dpo.nll_alpha).

Loss maths: losses.dpo_loss (DPO, Rafailov et al. 2023; cDPO, Mitchell 2023; IPO, Azar et al. 2023;
SimPO, Meng et al. 2024). Here: the per-sequence log-probabilities it takes.

- Chosen and rejected sequences of a batch go through ONE forward pass (collate_pairs stacks them).
- Log-probs are summed over response tokens only: the decoder's hidden states are taken at label
  positions and only those rows go through the LM head, a chunk at a time, recomputed in the backward
  pass, so no [tokens x vocab] tensor is ever whole (forward.response_logprobs).
- The reference model: with an adapter (LoRA / QLoRA) it is the same model with the adapter disabled
  (`model.disable_adapter()` under no_grad; the base weights exist once). With full fine-tuning it is a
  frozen copy made in `setup`, or, with `dpo.precompute_reference: true`, no model at all: reference
  log-probs are computed once in `setup` (before any update) and cached on each item. SimPO needs none.
  Reference passes run in eval mode (no dropout): the reference is a fixed function.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from tunelab.config import Config
from tunelab.objectives.base import move_to
from tunelab.objectives.forward import add_router_loss, eval_mode, response_logprobs, router_loss
from tunelab.objectives.losses import dpo_loss
from tunelab.objectives.preference import PreferenceObjective


class DPO(PreferenceObjective):
    sequences_per_item = 2

    def __init__(self, cfg: Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.dc = cfg.dpo
        self.ref_model = None  # full fine-tuning without precompute_reference: a frozen copy

    @property
    def needs_reference(self) -> bool:
        return self.dc.loss != "simpo"

    def setup(self, model, dist=None, padding_free=None):
        super().setup(model, dist, padding_free)  # first: the reference pass below collates as training will
        self.router = router_loss(model, self.cfg.train.router_aux_loss_coef)
        if not self.needs_reference:
            return
        if self.dc.precompute_reference:
            self._precompute(model)
        elif self.cfg.adapter is None:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def reference_logprobs(self, model, batch: dict) -> torch.Tensor:
        """Reference log-probs of every row of the batch, [2B]."""
        if self.ref_model is not None:
            return response_logprobs(self.ref_model, batch)[0]
        if self.cfg.adapter is not None:
            with model.disable_adapter(), eval_mode(model):
                return response_logprobs(model, batch)[0]
        with eval_mode(model):  # precompute_reference with full fine-tuning: the model before training
            return response_logprobs(model, batch)[0]

    def _precompute(self, model):
        from tunelab.modeling.precision import precision_context

        device = next(model.parameters()).device
        autocast, _ = precision_context(self.cfg.train.precision, device)
        mb = self.cfg.train.micro_batch_size
        for items in (self.train_items, self.eval_items):
            for start in range(0, len(items), mb):
                chunk = items[start:start + mb]
                batch = move_to(self.collate(chunk), device)
                with autocast():
                    ref = self.reference_logprobs(model, batch).tolist()
                for i, item in enumerate(chunk):
                    item.ref_chosen, item.ref_rejected = ref[i], ref[len(chunk) + i]

    def loss(self, model, batch):
        n = int(batch["num_pairs"])
        router = getattr(self, "router", None)
        with router.record() if router else contextlib.nullcontext():
            logps, counts = response_logprobs(model, batch)
        ref_c = ref_r = None
        if self.needs_reference:
            if "ref_chosen" in batch:
                ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
            else:
                ref = self.reference_logprobs(model, batch)
                ref_c, ref_r = ref[:n], ref[n:]
        losses, r_c, r_r = dpo_loss(
            logps[:n], logps[n:], ref_c, ref_r, beta=self.dc.beta, loss_type=self.dc.loss,
            label_smoothing=self.dc.label_smoothing, gamma=self.dc.gamma,
            chosen_len=counts[:n], rejected_len=counts[n:],
        )
        if self.dc.nll_alpha:
            nll = -logps[:n] / counts[:n].clamp(min=1)  # per-token NLL of each chosen response
            losses = losses + self.dc.nll_alpha * nll
        metrics = {
            "rewards/chosen": r_c.sum(),
            "rewards/rejected": r_r.sum(),
            "accuracy": (r_c > r_r).float().sum(),
            "margin": (r_c - r_r).sum(),
            "logps/chosen": logps[:n].detach().sum(),
            "logps/rejected": logps[n:].detach().sum(),
        }
        if router:
            return add_router_loss(router, losses.sum(), n, batch, metrics)
        return losses.sum(), metrics
