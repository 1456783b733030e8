"""Training objectives. Each one contributes its data, its batch shape and its loss to the one loop."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tunelab.config import Config

if TYPE_CHECKING:  # the registry stays free of torch: the estimator reads objectives.chunks without it
    from tunelab.objectives.base import Objective

# method name -> "module:Class", imported on first use so a run pays only for what it trains.
REGISTRY = {
    "sft": "tunelab.objectives.sft:SFT",
    "pretrain": "tunelab.objectives.pretrain:Pretrain",
    "mlm": "tunelab.objectives.mlm:MLM",
    "distill": "tunelab.objectives.distill:Distill",
    "dpo": "tunelab.objectives.dpo:DPO",
    "orpo": "tunelab.objectives.orpo:ORPO",
    "kto": "tunelab.objectives.kto:KTO",
    "reward": "tunelab.objectives.reward:Reward",
    "ppo": "tunelab.objectives.rl:PPO",
    "grpo": "tunelab.objectives.grpo:GRPO",
}


def objective_class(method: str) -> type[Objective]:
    """The class of `method`: what the loop instantiates, and whose traits (Objective.model_kind, text_only, ...)
    the model builder and the estimator read."""
    module_name, _, class_name = REGISTRY[method].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_objective(cfg: Config, tokenizer) -> Objective:
    return objective_class(cfg.method)(cfg, tokenizer)
