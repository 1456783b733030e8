"""Atomic checkpoints with a checksummed manifest.

A checkpoint is a directory `checkpoints/step-00000120/` holding the trainable weights
(safetensors), the optimizer/scheduler/trainer state (torch.save of tensors and plain data, loaded
with weights_only=True) and `manifest.json` with a SHA-256 of every file. It is written to a
temporary sibling, fsynced, then renamed into place, so a crash leaves either the whole checkpoint
or none. Loading verifies the manifest; a torn checkpoint is reported and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.config import UserError

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int,
         protect: set[int] = frozenset()) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep` (plus `protect`ed steps)."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
    torch.save(state, tmp / STATE)
    files = {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    for name in (WEIGHTS, STATE, MANIFEST):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep, protect | {step})
    return final


def _prune(root: Path, keep: int, protect: set[int]) -> None:
    steps = list_steps(root)
    for s in steps[:-keep] if keep else steps:
        if s not in protect:
            shutil.rmtree(step_dir(root, s), ignore_errors=True)


def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / MANIFEST).is_file():
            steps.append(int(d.name.removeprefix("step-")))
    return sorted(steps)


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (torn or modified)"
    return None


def latest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; torn ones are reported and skipped."""
    for step in reversed(list_steps(root)):
        path = step_dir(root, step)
        problem = verify(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is damaged: {problem}; falling back to the previous one")
    return None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    problem = verify(path)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")
    return load_file(path / WEIGHTS), torch.load(path / STATE, weights_only=True)
