"""Tiny local models, data and configs for tests: built here, never downloaded."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

from tunelab import tasks
from tunelab.config import InitConfig, load_config

TINY_SHAPE = InitConfig(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128, max_position=256)


def write_task_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    train, _ = tasks.split_items(n, 4, seed)
    return tasks.write_jsonl([tasks.to_alpaca(item) for item in train], path)


_BASES: dict[int, Path] = {}  # one build per process and warm-up length: tests only read the base dir


def make_base_model(root: Path, warm_steps: int = 40) -> Path:
    cached = _BASES.get(warm_steps)
    if cached is not None and cached.is_dir():
        return cached
    _BASES[warm_steps] = _build_base_model(root, warm_steps)
    return _BASES[warm_steps]


def _build_base_model(root: Path, warm_steps: int) -> Path:
    """A tiny Llama + a BPE tokenizer trained on task text, saved as an HF model dir.

    The random model is first trained briefly (full fine-tuning on other task rows): a frozen random
    embedding/head with init std 0.02 caps the logits near ±1.3, so no adapter could lower the loss
    much, whereas a real base model has grown its embeddings."""
    from tunelab.modeling.scratch import save_tiny_model, train_tokenizer
    from tunelab.training.loop import train

    data = write_task_data(root / "tok-data.jsonl", n=200)
    cfg = load_config(data={
        "model": {"init": TINY_SHAPE.model_dump()},
        "tokenizer": {"train": True, "vocab_size": 400},
        "data": {"train": [{"path": str(data), "format": "alpaca"}]},
        "output_dir": str(root / "tok-run"),
    })
    tokenizer = train_tokenizer(cfg)
    import torch

    torch.manual_seed(0)  # the same base in every process: tests compare runs across processes
    random_base = save_tiny_model(root / "random", tokenizer, TINY_SHAPE)
    if not warm_steps:
        return random_base
    warm = config_dict(random_base, data, root / "warm", data={"train_on_prompt": True},
                       train={"max_steps": warm_steps, "lr": 3e-3, "micro_batch_size": 16})
    return train(load_config(data=warm), say=lambda *a: None)


def config_dict(base: Path, data_path: Path, out: Path, **sections) -> dict:
    cfg = {
        "model": {"path": str(base)},
        "data": {"train": [{"path": str(data_path), "format": "alpaca"}], "max_length": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": None,
                  "save_every": None, "progress": False},
        "log": {"tensorboard": False, "plot": False},
        "output_dir": str(out),
    }
    return with_sections(cfg, **sections)


def with_sections(cfg: dict, **sections) -> dict:
    """`cfg` with each section's keys overridden (a dict merges into the section, anything else replaces it)."""
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **copy.deepcopy(values)}
        else:
            cfg[section] = copy.deepcopy(values)
    return cfg


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
