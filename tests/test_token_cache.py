"""The tokenized-data cache: a hit returns the same examples, every input it depends on invalidates it, a bad entry
is rebuilt."""

from __future__ import annotations

import copy
import json

import pytest


@pytest.fixture
def sft_setup(tmp_path, tiny_tokenizer, monkeypatch):
    from tunelab.config import load_config

    monkeypatch.setenv("TUNELAB_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def make(**data_cfg):
        cfg = load_config(data={"model": {"path": "unused"},
                                "data": {"train": [{"path": str(data), "format": "alpaca"}], "template": "chatml",
                                         "max_length": 64, **data_cfg}})
        return cfg

    return make, data, tmp_path / "cache"


def _datasets(cfg, tokenizer, monkeypatch):
    """(train, eval, built): built says whether the rows were read and tokenized (a cache miss)."""
    from tunelab.objectives.sft import SFT

    objective = SFT(cfg, tokenizer)
    built = []
    original = objective._tokenized
    monkeypatch.setattr(objective, "_tokenized", lambda: built.append(1) or original())
    train, evals = objective.datasets()
    return train, evals, bool(built), objective.stats


def _plain(items):
    return [(list(e.input_ids), list(e.labels), getattr(e, "position_ids", None)) for e in items]


def test_token_cache_hits_and_returns_the_same_examples(sft_setup, tiny_tokenizer, monkeypatch):
    make, _, cache_root = sft_setup
    train1, _, built1, stats1 = _datasets(make(), tiny_tokenizer, monkeypatch)
    train2, _, built2, stats2 = _datasets(make(), tiny_tokenizer, monkeypatch)
    assert built1 and not built2
    assert _plain(train1) == _plain(train2) and stats1 == stats2
    assert len(list((cache_root / "tokenized").glob("*.npz"))) == 1
    # packing is applied after the cache: same entry, and the same blocks as packing uncached examples
    packed, _, built3, _ = _datasets(make(packing=True), tiny_tokenizer, monkeypatch)
    monkeypatch.setenv("TUNELAB_CACHE_DIR", "off")
    uncached, _, built4, _ = _datasets(make(packing=True), tiny_tokenizer, monkeypatch)
    assert not built3 and built4 and _plain(packed) == _plain(uncached)


@pytest.mark.parametrize("change", ["template", "max_length", "train_on_prompt", "data", "tokenizer", "eval_split"])
def test_token_cache_invalidates(change, sft_setup, tiny_tokenizer, monkeypatch):
    make, data, _ = sft_setup
    tok = tiny_tokenizer
    before, _, built, _ = _datasets(make(), tok, monkeypatch)
    assert built
    cfg = make()
    if change == "template":
        cfg = make(template="alpaca")
    elif change == "max_length":
        cfg = make(max_length=12)
    elif change == "train_on_prompt":
        cfg = make(train_on_prompt=True)
    elif change == "data":
        data.write_text(data.read_text().replace("plus 3", "plus three"))  # same size, other bytes
    elif change == "tokenizer":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.add_tokens(["plus"])
    elif change == "eval_split":
        cfg = make(eval_fraction=0.25)
    after, evals, built, _ = _datasets(cfg, tok, monkeypatch)
    assert built, f"changing {change} must not reuse the cached examples"
    if change != "eval_split":
        assert _plain(after) != _plain(before)
    else:
        assert len(after) + len(evals) == len(before) and evals


def test_token_cache_survives_a_bad_entry(sft_setup, tiny_tokenizer, monkeypatch):
    make, _, cache_root = sft_setup
    train1, _, _, _ = _datasets(make(), tiny_tokenizer, monkeypatch)
    for entry in (cache_root / "tokenized").glob("*.npz"):
        entry.write_bytes(b"not a zip file")
    train2, _, built, _ = _datasets(make(), tiny_tokenizer, monkeypatch)
    assert built and _plain(train1) == _plain(train2)
