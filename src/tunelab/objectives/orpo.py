"""Odds-ratio preference optimisation: `method: orpo` (Hong et al. 2024). Reference-free: one model, one forward
pass over each batch of (chosen, rejected) pairs, no frozen copy and no disabled adapter.

The data, collation (padded or data.padding_free), units (pairs) and reports are DPO's (preference.py); the log-probs
are forward.response_logprobs, averaged over each response's tokens; the maths is losses.orpo_loss: the chosen
response's per-token NLL (the SFT term) plus beta x the odds-ratio term.
"""

from __future__ import annotations

from tunelab.objectives.forward import response_logprobs
from tunelab.objectives.losses import orpo_loss
from tunelab.objectives.preference import PreferenceObjective


class ORPO(PreferenceObjective):
    sequences_per_item = 2

    def loss(self, model, batch):
        n = int(batch["num_pairs"])
        logps, counts = response_logprobs(model, batch)
        avg = logps / counts.clamp(min=1)
        losses, log_odds, ratio = orpo_loss(avg[:n], avg[n:], beta=self.cfg.orpo.beta)
        chosen, rejected = avg[:n].detach(), avg[n:].detach()
        metrics = {
            "nll": -chosen.sum(),
            "log_odds_ratio": log_odds.sum(),
            "odds_ratio_term": ratio.sum(),
            "accuracy": (chosen > rejected).float().sum(),
            "logps/chosen": chosen.sum(),
            "logps/rejected": rejected.sum(),
        }
        return losses.sum(), metrics
