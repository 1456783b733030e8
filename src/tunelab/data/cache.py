"""A disk cache of tokenized examples: read, render and tokenize a dataset once, reload it in milliseconds.

The key is a SHA-256 of everything the examples depend on: the data files' bytes (not their names or times), the
data config (sources, template, max_length, train_on_prompt, skip_bad_rows, eval split), the seed of the eval
split, the tokenizer (its full serialisation, special tokens and chat template) and the source code of the data
package that turns rows into tokens. Change any of them and the key changes, so a stale entry is never read.

Entries live in $TUNELAB_CACHE_DIR (default ~/.cache/tunelab) under tokenized/<key>.npz: token ids and labels as
flat int32 arrays with offsets, plus the build statistics as JSON. They are written atomically (temporary file,
then rename), so concurrent ranks or runs never see half an entry. TUNELAB_CACHE_DIR=off disables the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from .tokenize import Example

FORMAT = 1  # bump when the entry layout changes


def cache_dir() -> Path | None:
    where = os.environ.get("TUNELAB_CACHE_DIR")
    if where is not None and where.strip().lower() in ("", "off", "0", "none"):
        return None
    return Path(where) if where else Path.home() / ".cache" / "tunelab"


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def files_digest(patterns: list[str]) -> str:
    """SHA-256 over the content of every file the patterns name (globs expanded, directories walked in order)."""
    from .readers import _expand

    h = hashlib.sha256()
    for pattern in patterns:
        for name in _expand(pattern):
            p = Path(name)
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            for f in files:
                h.update(str(f.relative_to(p) if p.is_dir() else "").encode() + b"\0")
                _file_digest(f, h)
            h.update(b"\1")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of what decides how the tokenizer encodes: its vocabulary, merges, normalisation and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary is what we can see
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "add_prefix_space": getattr(tokenizer, "add_prefix_space", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def code_digest() -> str:
    """SHA-256 of the data package's source: a change to how rows become tokens invalidates every entry."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def _pack_arrays(prefix: str, examples: list[Example]) -> dict:
    import numpy as np

    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    def flat(seqs):
        return np.concatenate([np.asarray(x, dtype=np.int32) for x in seqs]) if seqs else np.zeros(0, np.int32)

    ids, labels = flat([e.input_ids for e in examples]), flat([e.labels for e in examples])
    truncated = np.fromiter((e.truncated for e in examples), dtype=bool, count=len(examples))
    return {f"{prefix}_ids": ids, f"{prefix}_labels": labels, f"{prefix}_offsets": offsets,
            f"{prefix}_truncated": truncated}


def _unpack_arrays(prefix: str, arrays) -> list[Example]:
    offsets = arrays[f"{prefix}_offsets"].tolist()
    ids, labels = arrays[f"{prefix}_ids"].tolist(), arrays[f"{prefix}_labels"].tolist()
    truncated = arrays[f"{prefix}_truncated"].tolist()
    return [Example(ids[a:b], labels[a:b], t) for a, b, t in zip(offsets, offsets[1:], truncated)]


def load(path: Path) -> tuple[list[Example], list[Example], dict] | None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            stats = json.loads(str(arrays["stats"]))
            return _unpack_arrays("train", arrays), _unpack_arrays("eval", arrays), stats
    except (OSError, ValueError, KeyError):
        return None  # missing or unreadable: rebuild


def save(path: Path, train: list[Example], evals: list[Example], stats: dict) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = {**_pack_arrays("train", train), **_pack_arrays("eval", evals), "stats": np.array(json.dumps(stats))}
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def cached(parts: dict, build: Callable[[], tuple[list[Example], list[Example], dict]]):
    """(train examples, eval examples, stats, hit): from the cache entry for `parts` when there is one, else from
    `build()`, which is then stored. Unwritable cache dirs are ignored (the run just tokenizes)."""
    root = cache_dir()
    if root is None:
        return (*build(), False)
    path = root / "tokenized" / f"{key(parts)}.npz"
    hit = load(path) if path.is_file() else None
    if hit is not None:
        return (*hit, True)
    train, evals, stats = build()
    try:
        save(path, train, evals, stats)
    except OSError:
        pass
    return train, evals, stats, False
