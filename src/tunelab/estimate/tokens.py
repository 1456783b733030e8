"""Training tokens per epoch, roughly, from the data files' rows and bytes (nothing is tokenised)."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config import Config


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
