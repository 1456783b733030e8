"""Training objectives. Each one contributes its data, its batch shape and its loss to the one loop."""

from __future__ import annotations

import importlib

from tunelab.config import Config
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


def make_objective(cfg: Config, tokenizer) -> Objective:
    module_name, _, class_name = REGISTRY[cfg.method].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(cfg, tokenizer)


def model_kind(method: str) -> str:
    module_name, _, class_name = REGISTRY[method].partition(":")
    return getattr(importlib.import_module(module_name), class_name).model_kind
