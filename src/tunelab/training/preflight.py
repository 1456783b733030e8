"""Refusing early: the checks a run makes before it spends time, each stopping it with a one-line UserError.

Before anything heavy is loaded (rank 0, once): the method exists, the settings go together, output_dir is
writable, a killed run's leftovers are cleaned, and for --resume the newest intact checkpoint is found and its
config compared with this one. After the data: something is left to train on. After the model: the checkpoints
and the final model fit on the disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from tunelab import run_files
from tunelab.training import checkpoint
from tunelab.config import Config, UserError, load_config
from tunelab.objectives.base import Objective


# What fixes the weights, the data and its order. train.grad_accum is checked as part of the global batch
# (micro_batch_size x grad_accum x ranks), so a resume on another number of ranks stays exact when that is kept.
RESUME_KEYS = ("model", "adapter", "method", "data", "tokenizer", "train.micro_batch_size", "train.seed",
               "train.optimizer", "train.distributed", "train.group_by_length")


def check_resume_compatible(saved: dict, cfg: Config, source: str, saved_world: int = 1, world: int = 1) -> None:
    old, new = saved, cfg.model_dump(mode="json")
    accum = (old.get("train") or {}).get("grad_accum")
    if accum is not None and accum * saved_world != cfg.train.grad_accum * world:
        fix = (f"; on {world} rank(s) set train.grad_accum: {accum * saved_world // world}"
               if accum * saved_world % world == 0 else "")
        raise UserError(
            f"--resume: the global batch changed since {source} was written (train.grad_accum x ranks: "
            f"{accum} x {saved_world} -> {cfg.train.grad_accum} x {world}); that breaks an exact resume{fix}")
    for key in RESUME_KEYS:
        a, b = old, new
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            raise UserError(
                f"--resume: '{key}' changed since {source} was written ({a!r} -> {b!r}); "
                "that breaks an exact resume. Restore it, or start a new run with another output_dir"
            )


def check_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        culprit = f" ({e.filename})" if e.filename and str(e.filename) != str(run_dir) else ""
        raise UserError(f"output_dir {run_dir} is not writable: {e.strerror or e}{culprit}") from None


def check_run(cfg: Config, resume: bool, world: int, say=print) -> Path | None:
    """Everything that can be checked before loading anything heavy (run once, on rank 0): the method, settings
    that cannot go together, output_dir, a killed run's leftovers, the base model dir, and the checkpoint to resume
    from (None for a new run)."""
    from tunelab.objectives import REGISTRY

    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / run_files.CHECKPOINTS
    if cfg.method not in REGISTRY:
        raise UserError(f"method: {cfg.method} is not available in this version (available: {', '.join(REGISTRY)})")
    if cfg.train.distributed == "fsdp" and cfg.model.quantize:
        raise UserError("train.distributed: fsdp cannot shard 4-bit (model.quantize) weights; use distributed: ddp "
                        "for QLoRA, or leave out model.quantize to shard a full-precision model")
    check_output_dir(run_dir)
    for line in checkpoint.clean_leftovers(ckpt_root):
        say(line)
    final, old = run_dir / run_files.FINAL, run_dir / run_files.FINAL_OLD
    if old.is_dir() and not final.exists():  # killed while swapping in a new final/: the old one is whole
        os.rename(old, final)
    for leftover in (run_dir / run_files.FINAL_TMP, old):
        shutil.rmtree(leftover, ignore_errors=True)
    if cfg.model.path and cfg.model.init is None:
        from tunelab.modeling.load import check_model_dir

        check_model_dir(cfg.model.path, cfg.model.allow_pickle)
    if not resume:
        if checkpoint.list_steps(ckpt_root):
            raise UserError(
                f"{ckpt_root} already holds checkpoints; continue with `tunelab train CONFIG --resume`, "
                "or set another output_dir")
        return None
    return find_resume(cfg, world, say)


def find_resume(cfg: Config, world: int, say=print) -> Path:
    """The newest intact checkpoint (torn ones are set aside), refused when the config changed what it depends on."""
    run_dir, ckpt_root = cfg.run_dir, cfg.run_dir / run_files.CHECKPOINTS
    path = checkpoint.latest_valid(ckpt_root, warn=say, quarantine=True)
    if path is None:
        raise UserError(f"--resume: no usable checkpoint in {ckpt_root}")
    meta = checkpoint.manifest(path).get("meta", {})
    saved = meta.get("config")
    if saved is not None:
        check_resume_compatible(saved, cfg, str(path), meta.get("world_size", 1), world)
    elif (run_dir / run_files.CONFIG).is_file():
        saved_cfg = load_config(run_dir / run_files.CONFIG)
        check_resume_compatible(saved_cfg.model_dump(mode="json"), cfg, str(run_dir / run_files.CONFIG))
    if checkpoint.is_sharded(path) != (cfg.train.distributed == "fsdp"):
        raise UserError(f"--resume: {path} was written with train.distributed: "
                        f"{'fsdp' if checkpoint.is_sharded(path) else 'ddp'}; resume with the same setting")
    return path


def check_sharding(cfg: Config, objective: Objective) -> None:
    """FSDP shards the forward pass the loop runs; an on-policy objective (its own stream / updates) generates with the
    model outside it."""
    base, cls = Objective, type(objective)
    on_policy = cls.stream is not base.stream or getattr(cls, "updates", None) is not getattr(base, "updates", None)
    if cfg.train.distributed == "fsdp" and on_policy:
        raise UserError(f"train.distributed: fsdp does not support method {cfg.method} yet (it generates with the "
                        "model outside the sharded forward pass); use distributed: ddp")


def report_data(objective: Objective, train_items: list, eval_items: list, main: bool, say=print) -> None:
    """Say what the data came to, the rows skipped (data.skip_bad_rows) and dropped (no loss tokens) counted;
    refuse when nothing is left to train on, naming where the rows went."""
    stats = objective.log_stats() or {}
    skipped, dropped = stats.get("skipped_bad_rows", 0), stats.get("dropped_no_loss", 0)
    where = ", ".join(stats.get("dropped_lines", []))
    notes = []
    if skipped:
        first = stats.get("skipped_errors") or []
        notes.append(f"skipped {skipped} bad rows (data.skip_bad_rows)" + (f", first: {first[0]}" if first else ""))
    data = objective.cfg.data
    if stats.get("truncated"):
        how = "prompt cut" if data.truncation == "keep_response" else "cut at the end"
        notes.append(f"{stats['truncated']} rows over data.max_length={data.max_length} truncated ({how})")
    if stats.get("dropped_too_long"):
        lines = stats.get("too_long_lines", [])
        more = ", ..." if stats["dropped_too_long"] > len(lines) else ""
        notes.append(f"dropped {stats['dropped_too_long']} rows whose response alone exceeds data.max_length="
                     f"{data.max_length} ({', '.join(lines)}{more})")
    if dropped:
        notes.append(f"dropped {dropped} rows with no loss tokens after masking/truncation"
                     + (f" ({where}{', ...' if dropped > len(stats.get('dropped_lines', [])) else ''})" if where else ""))
    if not train_items:
        detail = "; ".join(notes) or "the data produced no examples"
        raise UserError(f"no training examples left after loading and filtering the data: {detail}. "
                        "Check data.max_length (truncation), data.train_on_prompt and the assistant turns")
    if main:
        say(f"data: {len(train_items)} training / {len(eval_items)} eval examples"
            + (f"; {'; '.join(notes)}" if notes else ""))


def check_disk_space(cfg: Config, module: nn.Module) -> None:
    """Refuse before training when the checkpoints and the final model cannot fit in output_dir's free space."""
    tc, run_dir = cfg.train, cfg.run_dir
    params = list(module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    moment_bytes = 1 if tc.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 4
    one_ckpt = trainable + 2 * n_trainable * moment_bytes
    n_ckpts = (tc.keep_checkpoints + 1 + bool(tc.early_stopping_patience)) if tc.save_every else 0
    final = trainable if cfg.adapter is not None else sum(
        p.numel() * p.element_size() for p in params if p.dtype.is_floating_point)
    need = n_ckpts * one_ckpt + final - checkpoint.bytes_on_disk(run_dir / run_files.CHECKPOINTS)
    free = shutil.disk_usage(run_dir).free
    if need > free:
        gb = 1e9
        raise UserError(
            f"output_dir {run_dir}: {free / gb:.3g} GB free, but this run writes about {need / gb:.3g} GB "
            f"({n_ckpts} checkpoints of {one_ckpt / gb:.3g} GB at train.keep_checkpoints={tc.keep_checkpoints}, "
            f"plus the final model of {final / gb:.3g} GB). Free space, lower train.keep_checkpoints, "
            "or set another output_dir")
