"""In-process measurements of the data path: tokenizing a dataset cold vs loading it from the token cache, and
collating micro-batches (the previous list-padding collate vs the current one)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import assets


def _old_collate(batch, pad_id):
    """tunelab.data.collate before this change (unpacked examples): nested Python lists, padded per token."""
    import torch

    length = max(len(item.input_ids) for item in batch)

    def pad(rows, value):
        return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)

    input_ids = pad([item.input_ids for item in batch], pad_id)
    labels = pad([item.labels for item in batch], -100)
    return {"input_ids": input_ids, "labels": labels,
            "attention_mask": pad([[1] * len(item.input_ids) for item in batch], 0),
            "num_loss_tokens": (labels[:, 1:] != -100).sum()}


def data_path(copies: int = 32, reps: int = 3) -> dict:
    """Token cache and collate timings on `copies` x 64 benchmark rows (each copy's text made distinct)."""
    from tunelab.config import load_config
    from tunelab.data import collate
    from tunelab.objectives.sft import SFT

    tok = assets.tokenizer()
    base = assets.rows(64)
    rows = [{**r, "instruction": f"{r['instruction']} ({k})"} for k in range(copies) for r in base]
    out = {"rows": len(rows)}
    with tempfile.TemporaryDirectory() as d:
        path = assets.write_jsonl(rows, Path(d) / "rows.jsonl")
        cfg = load_config(data={"model": {"path": "unused"}, "output_dir": d,
                                "data": {"train": [{"path": str(path), "format": "alpaca"}],
                                         "template": assets.TEMPLATE, "max_length": assets.CAP}})
        old = os.environ.get("TUNELAB_CACHE_DIR")
        try:
            cold, warm, off = [], [], []
            for rep in range(reps):
                os.environ["TUNELAB_CACHE_DIR"] = str(Path(d) / f"cache{rep}")
                t = time.perf_counter()
                examples, _ = SFT(cfg, tok).datasets()
                cold.append(time.perf_counter() - t)
                t = time.perf_counter()
                again, _ = SFT(cfg, tok).datasets()
                warm.append(time.perf_counter() - t)
                assert [e.input_ids for e in again] == [e.input_ids for e in examples]
                os.environ["TUNELAB_CACHE_DIR"] = "off"
                t = time.perf_counter()
                SFT(cfg, tok).datasets()
                off.append(time.perf_counter() - t)
        finally:
            if old is None:
                os.environ.pop("TUNELAB_CACHE_DIR", None)
            else:
                os.environ["TUNELAB_CACHE_DIR"] = old
    out.update(tokenize_no_cache_s=statistics.median(off), tokenize_and_store_s=statistics.median(cold),
               cache_hit_s=statistics.median(warm))
    batches = [examples[i:i + 8] for i in range(0, len(examples), 8)]
    times = {"old": [], "new": []}
    for _ in range(reps):
        for name, fn in (("old", _old_collate), ("new", collate)):
            t = time.perf_counter()
            for b in batches:
                fn(b, tok.pad_token_id)
            times[name].append((time.perf_counter() - t) / len(batches) * 1e3)
    out.update(collate_old_ms=statistics.median(times["old"]), collate_new_ms=statistics.median(times["new"]))
    return out


def table(r: dict) -> str:
    return "\n".join([
        f"| data path ({r['rows']:,} rows) | time |", "|---|---|",
        f"| read + render + tokenize (cache off) | {r['tokenize_no_cache_s']:.2f} s |",
        f"| same, storing the cache entry (cold) | {r['tokenize_and_store_s']:.2f} s |",
        f"| cache hit (hash files + load) | {r['cache_hit_s']:.2f} s |",
        f"| collate, 8 rows, previous (per-token lists) | {r['collate_old_ms']:.2f} ms |",
        f"| collate, 8 rows, current (per-row tensors) | {r['collate_new_ms']:.2f} ms |",
    ])
