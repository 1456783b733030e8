"""Training tokens per epoch: exactly, as the run's micro-batches, when the tokenizer is local (`run_batches`), or
roughly from the data files' rows and bytes (`count_tokens`: nothing is tokenised)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import PADDING_FREE_METHODS, Config, UserError


def _count_rows(path: Path) -> tuple[int, int]:
    """(rows, bytes of row text) of one data file, without parsing rows (parquet: from its metadata)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return meta.num_rows, sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    data = path.read_bytes()
    if path.suffix == ".json":
        rows = json.loads(data)
        return (len(rows) if isinstance(rows, list) else 1), len(data)
    lines = sum(1 for line in data.splitlines() if line.strip())
    return lines - (1 if path.suffix in (".csv", ".tsv") else 0), len(data)


def count_tokens(cfg: Config, chars_per_token: float = 4.0) -> tuple[int | None, str]:
    """Training tokens per epoch from the data files: rows x min(max_length, bytes per row / 4).

    Cheap and rough: nothing is tokenised; ~4 bytes per token is typical of BPE on English text, and the
    JSON keys counted in the bytes roughly make up for the template tokens added at training time.
    """
    rows = size = 0
    for source in cfg.data.train:
        p = Path(source.path)
        files = sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")) \
            if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            return None, f"{source.path} is not a local file: pass tokens"
        for f in files:
            r, b = _count_rows(f)
            rows, size = rows + r, size + b
    if rows == 0:
        return None, "no rows found"
    rows = round(rows * (1 - cfg.data.eval_fraction))
    per_row = min(cfg.data.max_length, size / rows / chars_per_token) if rows else 0
    return int(rows * per_row), f"{rows} rows x ~{per_row:.0f} tokens (bytes/{chars_per_token:g}, not tokenised)"


@dataclass(frozen=True)
class Batches:
    """An epoch's micro-batches as the run forms them (its seeded order, padded or padding-free), from the training
    data tokenized with the run's own tokenizer and template."""

    padding_free: bool
    tokens: int  # real tokens of the epoch: what the trainer counts as trained
    computed: int  # tokens the linear layers compute: padding included
    attention: int  # sum of length^2 over what attends: each document (padding-free), rows x longest^2 (padded)
    peak_tokens: int  # computed tokens of the largest micro-batch
    peak_rows: int  # its sequences
    peak_longest: int  # its longest sequence
    peak_real: int  # its real tokens: at most this many positions carry a label (the loss's logits)
    labelled: int = 0  # positions of the epoch that carry a label: the head runs on these only (chunked loss)

    @property
    def source(self) -> str:
        path = "padding-free" if self.padding_free else "padded"
        return (f"tokenized with the model's tokenizer; {path} micro-batches, the largest {self.peak_tokens:,} tokens"
                + ("" if self.padding_free else f", {1 - self.tokens / self.computed:.0%} padding"))


def local_tokenizer(cfg: Config) -> bool:
    """Whether the run's tokenizer is on disk already (model.init trains its own at run time: not yet)."""
    if cfg.model.init is not None:
        return False
    path = Path(cfg.tokenizer.path or cfg.model.path or "")
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def run_batches(cfg: Config, padding_free: bool) -> Batches | None:
    """The first epoch's micro-batches of a run whose method has padding-free batches (sft, dpo, orpo) and whose
    tokenizer is local, None otherwise: the data read and tokenized as the trainer does it (its tokenized-data cache
    makes the run's own look cheap afterwards), in the order `tunelab.data.order` gives the first epoch."""
    if cfg.method not in PADDING_FREE_METHODS or not local_tokenizer(cfg):
        return None
    from tunelab.data.order import epoch_order, item_length
    from tunelab.modeling.build import build_tokenizer
    from tunelab.objectives import make_objective, objective_class

    traits = objective_class(cfg.method)
    try:
        tokenizer, _ = build_tokenizer(cfg, traits.model_kind, traits.text_only)
        items, _ = make_objective(cfg, tokenizer).datasets()
    except (UserError, OSError):
        return None  # unreadable data or tokenizer: the rough count says so
    if not items:
        return None
    seqs = [[len(i.chosen_ids), len(i.rejected_ids)] if hasattr(i, "chosen_ids") else [len(i.input_ids)] for i in items]
    labelled = sum(_labelled(i) for i in items)
    tc = cfg.train
    lengths = [item_length(i) for i in items] if tc.group_by_length else None
    tokens = computed = attention = 0
    peak = (0, 0, 0, 0)
    for batch in epoch_order(len(items), tc.micro_batch_size, tc.seed, 0, lengths):
        lens = [n for i in batch for n in seqs[i]]
        longest = max(lens)
        size = sum(lens) if padding_free else len(lens) * longest
        tokens += sum(lens)
        computed += size
        attention += sum(n * n for n in lens) if padding_free else len(lens) * longest ** 2
        peak = max(peak, (size, len(lens), longest, sum(lens)))
    return Batches(padding_free, tokens, computed, attention, *peak, labelled)


def _labelled(item) -> int:
    """Positions of an item whose next token carries a label (its sequences' labels past the first)."""
    sides = [item.labels] if hasattr(item, "labels") else [item.chosen_labels, item.rejected_labels]
    return sum(sum(1 for y in labels[1:] if y != -100) for labels in sides)
