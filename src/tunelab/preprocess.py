"""`tunelab preprocess`: what the model will see, before any training."""

from __future__ import annotations

import json

from tunelab.config import Config


def preprocess(cfg: Config, show: int = 3, as_json: bool = False) -> str:
    """The template picked, `show` examples with their loss-carrying tokens marked, and data statistics; or, with
    as_json, one JSON line per shown example: input_ids, labels (-100: no loss) and the text the ids decode to."""
    from tunelab.modeling.build import build_tokenizer
    from tunelab.objectives import make_objective, objective_class

    lines = []
    traits = objective_class(cfg.method)
    tokenizer, _ = build_tokenizer(cfg, traits.model_kind, traits.text_only, say=lines.append)
    objective = make_objective(cfg, tokenizer)
    train, evals = objective.datasets()
    if as_json:
        return "\n".join(json.dumps(record(item, tokenizer), ensure_ascii=False) for item in train[:show])
    lines += [objective.preview(train, show), f"train items: {len(train)}, eval items: {len(evals)}"]
    lines += [f"{k}: {v}" for k, v in objective.log_stats().items()]
    return "\n".join(lines)


def record(item, tokenizer) -> dict:
    """An objective's training item as JSON: a preference pair as its chosen and rejected sequences, a pretraining
    block as its packed ids, a prompt (PPO/GRPO) without labels."""
    if hasattr(item, "chosen_ids"):
        return {"chosen": _ids(item.chosen_ids, item.chosen_labels, tokenizer),
                "rejected": _ids(item.rejected_ids, item.rejected_labels, tokenizer)}
    if hasattr(item, "blocks"):
        item = item.blocks.packed(item.index)
    return _ids(item.input_ids, getattr(item, "labels", None), tokenizer)


def _ids(input_ids, labels, tokenizer) -> dict:
    as_list = lambda ids: [int(i) for i in ids]  # noqa: E731  (numpy blocks from pretraining)
    out = {"input_ids": as_list(input_ids)}
    if labels is not None:
        out["labels"] = as_list(labels)
    out["text"] = tokenizer.decode(out["input_ids"], skip_special_tokens=False)
    return out
