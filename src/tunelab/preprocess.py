"""`tunelab preprocess`: what the model will see, before any training."""

from __future__ import annotations

from tunelab.config import Config


def preprocess(cfg: Config, show: int = 3) -> str:
    from tunelab.model import build_tokenizer
    from tunelab.objectives import make_objective, model_kind

    lines = []
    tokenizer, _ = build_tokenizer(cfg, model_kind(cfg.method), say=lines.append)
    objective = make_objective(cfg, tokenizer)
    train, evals = objective.datasets()
    lines += [objective.preview(train, show), f"train items: {len(train)}, eval items: {len(evals)}"]
    lines += [f"{k}: {v}" for k, v in objective.log_stats().items()]
    return "\n".join(lines)
