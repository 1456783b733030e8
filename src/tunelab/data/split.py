"""A run's rows: its train and eval sources read (bad rows skipped and counted under data.skip_bad_rows), and,
when no eval source is given, data.eval_fraction of the training rows held out, seeded by train.seed so that
`tunelab eval` holds out the same rows as training did."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunelab.config import Config, DataSource

from .readers import load_rows


@dataclass
class RunRows:
    train: list
    eval: list
    skipped: int = 0  # bad rows skipped (data.skip_bad_rows), train and eval together
    skipped_errors: list[str] = field(default_factory=list)  # the first few, with file:line


def run_rows(cfg: Config, train_sources: list[DataSource] | None = None,
             eval_sources: list[DataSource] | None = None, hold_out: bool = True) -> RunRows:
    """The rows of `train_sources` and `eval_sources` (default: data.train, data.eval), the eval rows held out of
    the training rows when `hold_out` and no eval source is given."""
    data = cfg.data
    train_sources = data.train if train_sources is None else train_sources
    eval_sources = data.eval if eval_sources is None else eval_sources
    train = load_rows(train_sources, skip_bad_rows=data.skip_bad_rows)
    evals = load_rows(eval_sources, skip_bad_rows=data.skip_bad_rows) if eval_sources else []
    skipped = getattr(train, "skipped", 0) + getattr(evals, "skipped", 0)
    errors = [*getattr(train, "skipped_errors", []), *getattr(evals, "skipped_errors", [])][:5]
    train, evals = list(train), list(evals)
    if hold_out:
        train, evals = split_eval(cfg, train, evals)
    return RunRows(train, evals, skipped, errors)


def split_eval(cfg: Config, train_rows: list, eval_rows: list) -> tuple[list, list]:
    """Hold out `data.eval_fraction` of the training rows (seeded) when no eval rows are given."""
    if eval_rows or not cfg.data.eval_fraction:
        return train_rows, eval_rows
    order = list(range(len(train_rows)))
    random.Random(cfg.train.seed).shuffle(order)
    n_eval = max(1, round(len(order) * cfg.data.eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train_rows) if i not in held], [train_rows[i] for i in sorted(held)]
