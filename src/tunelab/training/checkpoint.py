"""Atomic checkpoints with a checksummed manifest.

A checkpoint is a directory `checkpoints/step-00000120/` holding the trainable weights
(safetensors), the optimizer/scheduler/trainer state (torch.save of tensors and plain data, loaded
with weights_only=True) and `manifest.json` with a SHA-256 of every file. With
`train.distributed: fsdp` the weights and optimizer state are instead a torch.distributed.checkpoint
directory `sharded/` written by every rank (loadable at any world size); the rest is the same.

It is written to a temporary sibling `.tmp-step-...`, every file and directory fsynced, then renamed
into place, so a crash leaves either the whole checkpoint or none (plus a `.tmp-*` leftover that is
never read and is removed on the next start). Loading verifies the manifest; a torn checkpoint is
reported, set aside as `damaged-step-...`, and the previous one is used. A failed write (disk full,
permissions) removes its temporary dir and raises CheckpointWriteError: the previous checkpoints
are never touched before a new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file, save_file

from tunelab import run_files
from tunelab.config import UserError

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
SHARDED = "sharded"  # torch.distributed.checkpoint dir (train.distributed: fsdp)
_STEP = re.compile(rf"^{run_files.STEP_PREFIX}(\d{{8,}})$")


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, permissions, I/O error); the previous ones are intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return root / run_files.step_dir(step)


def tmp_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` is assembled. The name is fixed, so every rank of a sharded save agrees on it."""
    return root / f".tmp-step-{step:08d}"


def _files(path: Path) -> list[str]:
    """Every file under `path` except the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p != path / MANIFEST)


# ---------------------------------------------------------------- writing

def save(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int,
         protect: set[int] = frozenset(), meta: dict | None = None) -> Path:
    """Write checkpoint `step` (one writer) atomically, then prune to the newest `keep` (plus `protect`ed steps)."""
    tmp = begin(root, step)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
    except OSError as e:
        abort(root, step, e)
    return commit(root, step, keep, protect, meta)


def begin(root: Path, step: int) -> Path:
    """Create the (empty) temporary dir for checkpoint `step`; a leftover of a killed run is replaced."""
    tmp = tmp_dir(root, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        abort(root, step, e)
    return tmp


def commit(root: Path, step: int, keep: int, protect: set[int] = frozenset(), meta: dict | None = None) -> Path:
    """Checksum, fsync and rename the filled temporary dir into `step-...`; prune old checkpoints."""
    tmp, final = tmp_dir(root, step), step_dir(root, step)
    try:
        files = {name: _sha256(tmp / name) for name in _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, "meta": meta or {}}, indent=1))
        for name in [*files, MANIFEST]:
            _fsync(tmp / name)
        for d in sorted({(tmp / name).parent for name in files}, key=lambda p: -len(p.parts)):
            _fsync(d)
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            old = root / f".old-{final.name}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)  # a crash here leaves .old-step-N, which clean_leftovers puts back
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(root)
    except OSError as e:
        abort(root, step, e)
    _prune(root, keep, set(protect) | {step})
    return final


def abort(root: Path, step: int, err: BaseException) -> NoReturn:
    """Remove the half-written temporary dir and raise a CheckpointWriteError that says what is still there."""
    shutil.rmtree(tmp_dir(root, step), ignore_errors=True)
    steps = list_steps(root)
    intact = (f"the previous checkpoints are intact (newest: {step_dir(root, steps[-1])})" if steps
              else "no earlier checkpoint exists")
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        lines = str(err).strip().splitlines()
        reason = lines[-1] if lines else type(err).__name__
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    raise CheckpointWriteError(f"could not write checkpoint {step_dir(root, step)}: {reason}{where}; {intact}. "
                               "Free space (or fix permissions) and continue with --resume") from None


def _prune(root: Path, keep: int, protect: set[int]) -> None:
    steps = list_steps(root)
    for s in steps[:-keep] if keep else steps:
        if s not in protect:
            shutil.rmtree(step_dir(root, s), ignore_errors=True)


def clean_leftovers(root: Path) -> list[str]:
    """Undo what a killed writer left behind: incomplete `.tmp-*` dirs are removed; an `.old-step-N` (killed while
    replacing step N) is put back if step N is gone, else removed. Returns one line per thing done."""
    done = []
    if not root.is_dir():
        return done
    for d in sorted(root.iterdir()):
        if d.name.startswith(".tmp-"):
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed the incomplete checkpoint {d} (a write was interrupted)")
        elif d.name.startswith(".old-step-"):
            target = root / d.name.removeprefix(".old-")
            if target.exists():
                shutil.rmtree(d, ignore_errors=True)
                done.append(f"removed {d} (replaced by {target.name})")
            else:
                os.rename(d, target)
                done.append(f"restored {target} from {d.name} (a re-save was interrupted)")
    return done


# ---------------------------------------------------------------- reading

def list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP.match(d.name)
        if m and d.is_dir() and (d / MANIFEST).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _verify(path: Path) -> str | None:
    return verify(path)


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        files = manifest(path)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (torn or modified)"
    return None


def latest_valid(root: Path, warn=print, quarantine: bool = False) -> Path | None:
    """The newest checkpoint that verifies; torn ones are reported and skipped (with `quarantine`, renamed to
    `damaged-step-...` so they are neither loaded, counted nor pruned, and a new save of that step is clean)."""
    for step in reversed(list_steps(root)):
        path = step_dir(root, step)
        problem = verify(path)
        if problem is None:
            return path
        note = ""
        if quarantine:
            aside = root / f"damaged-{path.name}"
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(path, aside)
            note = f" (moved to {aside.name})"
        warn(f"checkpoint {path} is damaged: {problem}{note}; falling back to the previous one")
    return None


def is_sharded(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def load(path: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, state) of a checkpoint; the weights are {} for a sharded one (read them with
    torch.distributed.checkpoint). `verify=False` skips the checksums when the caller just verified them."""
    problem = _verify(path) if verify else None
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")
    weights = {} if is_sharded(path) else load_file(path / WEIGHTS)
    return weights, torch.load(path / STATE, weights_only=True)


def bytes_on_disk(root: Path) -> int:
    """Total size of the checkpoints under `root`."""
    return sum(f.stat().st_size for s in list_steps(root) for f in step_dir(root, s).rglob("*") if f.is_file())
